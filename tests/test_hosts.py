"""Host lists (futurefed/hosts.py): the ``--hosts`` grammar, hostfiles, SLURM
hostlists, batch allocations and how workers are spread over hosts. Pure
parsing: no network, files only under ``tmp_path``."""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from futurefed.errors import ConfigError
from futurefed.hosts import (
    MAX_HOSTS,
    Host,
    distribute,
    expand_nodelist,
    expand_tasks_per_node,
    from_allocation,
    parse_host,
    parse_hostfile,
    parse_hosts,
)

# -- parse_host ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node1", Host("node1")),
        ("node1.cluster.org", Host("node1.cluster.org")),
        ("node1.cluster.org.", Host("node1.cluster.org.")),  # absolute: one final dot
        ("x" * 63 + ".org", Host("x" * 63 + ".org")),
        ("10.0.0.7", Host("10.0.0.7")),
        ("my_alias-2", Host("my_alias-2")),
        ("NODE", Host("NODE")),
        ("node1:8", Host("node1", slots=8)),
        ("me@node1", Host("node1", user="me")),
        ("me@node1:2222", Host("node1", user="me", port=2222)),
        ("me@node1:2222:4", Host("node1", user="me", port=2222, slots=4)),
        ("node1:2222:4", Host("node1", port=2222, slots=4)),
        ("first.last@h.example.com:22", Host("h.example.com", user="first.last", port=22)),
        ("node1:022", Host("node1", slots=22)),
        ("h:65535:1", Host("h", port=65535, slots=1)),
        ("u@h:1", Host("h", user="u", port=1)),
        ("[::1]", Host("[::1]")),
        ("[::1]:3", Host("[::1]", slots=3)),
        ("[2001:db8::7]:2222:3", Host("[2001:db8::7]", port=2222, slots=3)),
        ("user@[fe80::1]:22:4", Host("[fe80::1]", user="user", port=22, slots=4)),
        ("user@[fe80::1]", Host("[fe80::1]", user="user")),
        ("user@[fe80::1%eth0]:22", Host("[fe80::1%eth0]", user="user", port=22)),
        ("[::ffff:10.0.0.1]", Host("[::ffff:10.0.0.1]")),
    ],
)
def test_parse_host_forms(text: str, expected: Host) -> None:
    assert parse_host(text, "--hosts") == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty host"),
        (" node1", "whitespace"),
        ("node 1", "whitespace"),
        ("node1\t", "whitespace"),
        ("x:y:z", "port 'y' is not a whole number"),
        ("node1:many", "slots 'many' is not a whole number"),
        ("node1:", "slots '' is not a whole number"),
        ("node1:0", "slots 0 is out of range"),
        ("node1:-1", "not a whole number"),
        ("node1:+3", "not a whole number"),
        ("node1:1.5", "not a whole number"),
        ("node1:99999999999", "too large"),
        ("u@node1:0", "port 0 is out of range"),
        ("u@node1:65536", "port 65536 is out of range"),
        ("node1:70000:2", "port 70000 is out of range"),
        ("node1:22:0", "slots 0 is out of range"),
        ("u@node1:22:x", "slots 'x' is not a whole number"),
        ("a:1:2:3", "too many ':'"),
        ("fe80::1", "IPv6 address in brackets"),
        ("::1", "IPv6 address in brackets"),
        (":4", "no host name"),
        ("u@", "no host name"),
        ("u@:22", "no host name"),
        ("@node1", "empty user"),
        ("a@b@c", "'b@c'"),
        ("bad user@node1", "whitespace"),
        ("us/er@node1", "user 'us/er'"),
        ("-oProxyCommand=x", "not starting with '-'"),
        ("node/1", "host 'node/1'"),
        ("nöde", "host 'nöde'"),
        ("node;rm", "host 'node;rm'"),
        ("[::1", "'[' without ']'"),
        ("[node1]", "[node1] is not an IPv6 address"),
        ("[10.0.0.1]", "is not an IPv6 address"),
        ("[]", "[] is not an IPv6 address"),
        ("[::1]x", "unexpected 'x'"),
        ("[fe80::1%]", "zone '' is not an interface name"),
        ("[fe80::1%$(reboot)]", "zone '$(reboot)'"),
        ("[fe80::1%a;b]", "zone 'a;b'"),
        ("[::1]:1:2:3", "too many ':' after the host"),
        ("[::1]:0", "slots 0"),
        # names the resolver cannot encode (IDNA): UnicodeError in getaddrinfo
        ("a..b", "host 'a..b' has an empty label"),
        (".node1", "host '.node1' has an empty label"),
        (".", "host '.' has an empty label"),
        ("node1..", "host 'node1..' has an empty label"),
        ("u@a..b:22", "host 'a..b' has an empty label"),
        ("x" * 64 + ".org", "has a label longer than 63 characters"),
    ],
)
def test_parse_host_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host(text, "--hosts")
    message = str(info.value)
    assert message.startswith(f"--hosts {text!r}: "), message
    assert reason in message
    assert "\n" not in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_host("x:y:z", "--hosts")


def test_parse_host_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^somewhere 'a:b': "):
        parse_host("a:b", "somewhere")


_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)  # users
_host_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,9}(\.[a-z0-9_-]{1,9}){0,3}\.?", fullmatch=True)
_ports = st.one_of(st.none(), st.integers(1, 65535))
_slot_counts = st.one_of(st.none(), st.integers(1, 10**6))


def _spell(host: Host) -> Optional[str]:
    """Write ``host`` in the --hosts grammar, None where it cannot be."""
    user = f"{host.user}@" if host.user else ""
    if host.port is None and host.slots is None:
        return user + host.name
    if host.port is None:
        return None if host.user else f"{host.name}:{host.slots}"
    if host.slots is None:
        return f"{user}{host.name}:{host.port}" if host.user else None
    return f"{user}{host.name}:{host.port}:{host.slots}"


@given(name=_host_names, user=st.one_of(st.none(), _names), port=_ports, slots=_slot_counts)
def test_parse_host_round_trips(
    name: str, user: Optional[str], port: Optional[int], slots: Optional[int]
) -> None:
    host = Host(name, user, port, slots)
    text = _spell(host)
    if text is not None:
        assert parse_host(text, "--hosts") == host


@given(st.text(max_size=30))
def test_parse_host_raises_only_config_error(text: str) -> None:
    try:
        host = parse_host(text, "--hosts")
    except ConfigError:
        return
    assert host.name and not any(ch.isspace() for ch in text)


# -- parse_hosts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items, expected",
    [
        ([], []),
        (["a"], [Host("a")]),
        (["a", "b", "c"], [Host("a"), Host("b"), Host("c")]),
        (["a,b", "c"], [Host("a"), Host("b"), Host("c")]),
        (["a, b ,c"], [Host("a"), Host("b"), Host("c")]),
        # SCOOP style: repeating a host means more slots, one per entry
        (["a", "a", "b"], [Host("a", slots=2), Host("b")]),
        (["a,a,a"], [Host("a", slots=3)]),
        # explicit slots add up; an entry without slots counts one
        (["a:4", "a:2"], [Host("a", slots=6)]),
        (["a:4", "a"], [Host("a", slots=5)]),
        (["a", "b:3", "a:2"], [Host("a", slots=3), Host("b", slots=3)]),
        # same name but another user or port is another host
        (["a", "u@a"], [Host("a"), Host("a", user="u")]),
        (["u@a:22", "u@a:2222"], [Host("a", "u", 22), Host("a", "u", 2222)]),
        (["u@a:22", "u@a:22:3"], [Host("a", "u", 22, 4)]),
        (["[::1]", "[::1]:2"], [Host("[::1]", slots=3)]),
        # first-seen order is kept
        (["c", "b", "a", "b"], [Host("c"), Host("b", slots=2), Host("a")]),
    ],
)
def test_parse_hosts(items: List[str], expected: List[Host]) -> None:
    assert parse_hosts(items) == expected


@pytest.mark.parametrize(
    "items, bad",
    [
        (["a", "x:y:z"], "x:y:z"),
        (["a,,b"], ""),
        (["a,"], ""),
        ([""], ""),
        (["a,b:0"], "b:0"),
        (["a b"], "a b"),
    ],
)
def test_parse_hosts_errors_name_the_item(items: List[str], bad: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--hosts {bad!r}: "):
        parse_hosts(items)


def test_parse_hosts_source() -> None:
    with pytest.raises(ConfigError, match=r"^FEDRUN_HOSTS 'a:b': "):
        parse_hosts(["a:b"], source="FEDRUN_HOSTS")


# -- parse_hostfile ------------------------------------------------------------------------


def _write(tmp_path, text: str, name: str = "hosts.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_hostfile_every_form(tmp_path) -> None:
    path = _write(
        tmp_path,
        "# cluster hosts\n"
        "\n"
        "node1\n"
        "node2 4\n"
        "node3 slots=8   # OpenMPI style\n"
        "node4:2\n"
        "  node5   slots=3 max_slots=6\n"
        "me@node6:2222:5\n"
        "me@node7 2\n"
        "[::1] 2\n"
        "\t\n"
        "   # indented comment\n"
        "node8#no space before the comment\n",
    )
    assert parse_hostfile(path) == [
        Host("node1"),
        Host("node2", slots=4),
        Host("node3", slots=8),
        Host("node4", slots=2),
        Host("node5", slots=3),
        Host("node6", user="me", port=2222, slots=5),
        Host("node7", user="me", slots=2),
        Host("[::1]", slots=2),
        Host("node8"),
    ]


def test_hostfile_merges_repeats(tmp_path) -> None:
    path = _write(tmp_path, "a\na\nb slots=2\nb 3\nc\na:2\n")
    assert parse_hostfile(path) == [Host("a", slots=4), Host("b", slots=5), Host("c")]


def test_hostfile_crlf_and_no_final_newline(tmp_path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_bytes(b"a 2\r\nb\r\nc slots=3")
    assert parse_hostfile(str(path)) == [Host("a", slots=2), Host("b"), Host("c", slots=3)]


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("a\nb\nx:y:z\n", 3, "port 'y'"),
        ("a 0\n", 1, "slots 0 is out of range"),
        ("# c\n\na two\n", 3, "slots 'two' is not a whole number"),
        ("a slots=\n", 1, "slots '' is not a whole number"),
        ("a slots=0\n", 1, "slots 0"),
        ("a slots=x\n", 1, "slots 'x'"),
        ("a 2 3\n", 1, "unexpected '3'"),
        ("a slots=2 4\n", 1, "unexpected '4'"),
        ("a cpus=2\n", 1, "unexpected 'cpus=2'"),
        ("a max_slots=0\n", 1, "max_slots 0"),
        ("a:2 3\n", 1, "slots given twice"),
        ("a:2 slots=3\n", 1, "slots given twice"),
        ("ok\n-bad\n", 2, "not starting with '-'"),
        ("ok\nfe80::1 2\n", 2, "brackets"),
    ],
)
def test_hostfile_errors_name_file_and_line(tmp_path, text: str, line: int, reason: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_hostfile(path)
    message = str(info.value)
    assert message.startswith(f"hostfile {path} line {line}"), message
    assert reason in message
    assert "\n" not in message


def test_hostfile_missing(tmp_path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=rf"^hostfile {path}: cannot read it"):
        parse_hostfile(path)


def test_hostfile_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_hostfile(str(tmp_path))


def test_hostfile_not_utf8(tmp_path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_bytes(b"node\xff\n")
    with pytest.raises(ConfigError, match="cannot read it"):
        parse_hostfile(str(path))


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n"])
def test_hostfile_without_hosts(tmp_path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^hostfile {path}: names no host"):
        parse_hostfile(path)


# -- expand_nodelist ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node1", ["node1"]),
        ("localhost", ["localhost"]),
        ("node1.cluster.org", ["node1.cluster.org"]),
        ("gpu-node_7", ["gpu-node_7"]),
        ("  node1  ", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("node[006,011-013]", ["node006", "node011", "node012", "node013"]),
        ("n[1,3,5-6]", ["n1", "n3", "n5", "n6"]),
        ("n[007]", ["n007"]),
        ("n[1,01,001]", ["n1", "n01", "n001"]),
        ("n[5-5]", ["n5"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a[1-2][3-4]", ["a13", "a14", "a23", "a24"]),
        ("x[01-02]-ib", ["x01-ib", "x02-ib"]),
        ("n[1-3],m5,x[01-02]-ib", ["n1", "n2", "n3", "m5", "x01-ib", "x02-ib"]),
        ("a,b,c", ["a", "b", "c"]),
        ("c,a,b", ["c", "a", "b"]),
        ("[1-3]", ["1", "2", "3"]),
        ("[1-2]node", ["1node", "2node"]),
        ("node[1-2].cluster.org", ["node1.cluster.org", "node2.cluster.org"]),
        ("rack-[1-2].node-1", ["rack-1.node-1", "rack-2.node-1"]),
        ("n[1-2],n[2-3]", ["n1", "n2", "n3"]),
        ("n1,n1,n[1-2]", ["n1", "n2"]),
        ("n[3,1,2]", ["n3", "n1", "n2"]),
        ("tux[0-1],gpu[10-11]-ib0", ["tux0", "tux1", "gpu10-ib0", "gpu11-ib0"]),
    ],
)
def test_expand_nodelist(text: str, expected: List[str]) -> None:
    assert expand_nodelist(text) == expected


@pytest.mark.parametrize(
    "text, count, first, last",
    [
        ("node[0001-1000]", 1000, "node0001", "node1000"),
        ("n[1-100],m[1-100]", 200, "n1", "m100"),
        ("r[1-10]n[1-20]", 200, "r1n1", "r10n20"),
        ("n[0-99999]", 100_000, "n0", "n99999"),
    ],
)
def test_expand_nodelist_large(text: str, count: int, first: str, last: str) -> None:
    names = expand_nodelist(text)
    assert len(names) == len(set(names)) == count
    assert (names[0], names[-1]) == (first, last)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty host name"),
        ("   ", "empty host name"),
        ("a,,b", "empty host name"),
        ("a,", "empty host name"),
        (",a", "empty host name"),
        ("node[1-3", "'[' without ']'"),
        ("node1-3]", "']' without '['"),
        ("node]1[", "']' without '['"),
        ("n[1[2]]", "nested '['"),
        ("n[3-1]", "runs backwards"),
        ("n[]", "is not a number or a range"),
        ("n[1,]", "is not a number or a range"),
        ("n[,1]", "is not a number or a range"),
        ("n[1-]", "is not a number or a range"),
        ("n[-3]", "is not a number or a range"),
        ("n[1--3]", "is not a number or a range"),
        ("n[a-b]", "is not a number or a range"),
        ("n[1-3-5]", "is not a number or a range"),
        ("n[ 1-3]", "is not a number or a range"),
        ("node[1-10:3]", "no steps"),
        ("node[1-10x2]", "is not a number or a range"),
        ("node 1", "'node 1'"),
        ("node/1", "'node/1'"),
        ("n[0-100000]", f"more than {MAX_HOSTS} hosts"),
        ("n[1-1000]m[1-1000]", f"more than {MAX_HOSTS} hosts"),
        ("a[0-99999],b[0-9]", f"more than {MAX_HOSTS} hosts"),
        ("n[1-9999999999999999999]", "is not a number or a range"),
    ],
)
def test_expand_nodelist_errors(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand_nodelist(text)
    message = str(info.value)
    assert message.startswith(f"nodelist {text!r}: "), message
    assert reason in message


def test_expand_nodelist_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^SLURM_JOB_NODELIST='n\[3-1\]': "):
        expand_nodelist("n[3-1]", "SLURM_JOB_NODELIST")


@given(
    prefix=st.from_regex(r"[a-z][a-z0-9.-]{0,10}", fullmatch=True),
    low=st.integers(0, 5000),
    size=st.integers(0, 300),
    width=st.integers(1, 6),
)
def test_expand_nodelist_range_property(prefix: str, low: int, size: int, width: int) -> None:
    high = low + size
    names = expand_nodelist(f"{prefix}[{low:0{width}d}-{high}]")
    assert len(names) == high - low + 1
    assert all(name.startswith(prefix) for name in names)
    assert [int(name[len(prefix) :]) for name in names] == list(range(low, high + 1))
    assert all(len(name) - len(prefix) >= width for name in names)


@given(st.text(alphabet="ab1-[],:x ", max_size=20))
def test_expand_nodelist_raises_only_config_error(text: str) -> None:
    try:
        names = expand_nodelist(text)
    except ConfigError:
        return
    assert names and len(names) == len(set(names))


# -- expand_tasks_per_node -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4", [4]),
        ("1", [1]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("2(x3)", [2, 2, 2]),
        ("1,2,3", [1, 2, 3]),
        ("16(x2),8,4(x1)", [16, 16, 8, 4]),
        (" 3(x2) ", [3, 3]),
    ],
)
def test_expand_tasks_per_node(text: str, expected: List[int]) -> None:
    assert expand_tasks_per_node(text) == expected


@pytest.mark.parametrize(
    "text", ["", "x", "0", "2(x0)", "2(3)", "2x3", "2(x3", "(x3)", "1,,2", "-1", "2(x3),"]
)
def test_expand_tasks_per_node_errors(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^SLURM_TASKS_PER_NODE="):
        expand_tasks_per_node(text)


def test_expand_tasks_per_node_bounded() -> None:
    with pytest.raises(ConfigError, match="too many nodes"):
        expand_tasks_per_node(f"1(x{MAX_HOSTS + 1})")


# -- from_allocation ---------------------------------------------------------------------


def _slots_by_name(hosts: List[Host]) -> Dict[str, Optional[int]]:
    return {host.name: host.slots for host in hosts}


@pytest.mark.parametrize(
    "environ, expected",
    [
        (
            {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"},
            {"n1": 2, "n2": 2, "n3": 1},
        ),
        # TASKS_PER_NODE wins over NTASKS
        (
            {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "3"},
            {"n1": 4, "n2": 4},
        ),
        # only NTASKS: spread evenly, the first nodes get the remainder
        ({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS": "8"}, {"n1": 3, "n2": 3, "n3": 2}),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4"}, {"n1": 2, "n2": 2}),
        # NTASKS wins over the CPU counts
        (
            {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_CPUS_ON_NODE": "8"},
            {"n1": 1, "n2": 1},
        ),
        (
            {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_CPUS_PER_NODE": "36(x2),72"},
            {"n1": 36, "n2": 36, "n3": 72},
        ),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_ON_NODE": "16"}, {"n1": 16, "n2": 16}),
        ({"SLURM_JOB_NODELIST": "n[1-2]"}, {"n1": None, "n2": None}),
        # the older variable
        ({"SLURM_NODELIST": "old[1-2]", "SLURM_NTASKS": "2"}, {"old1": 1, "old2": 1}),
        # the job's list wins over the step's
        ({"SLURM_JOB_NODELIST": "job1", "SLURM_NODELIST": "step1"}, {"job1": None}),
        ({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "step1"}, {"step1": None}),
        # empty values count as unset
        (
            {"SLURM_JOB_NODELIST": "a", "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS": " "},
            {"a": None},
        ),
    ],
)
def test_from_allocation_slurm(environ: Dict[str, str], expected: Dict[str, int]) -> None:
    found = from_allocation(environ)
    assert found is not None
    system, hosts = found
    assert system == "slurm"
    assert _slots_by_name(hosts) == expected
    assert list(_slots_by_name(hosts)) == list(expected)
    assert all(host.user is None and host.port is None for host in hosts)


@pytest.mark.parametrize(
    "environ, match",
    [
        (
            {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"},
            r"^SLURM_TASKS_PER_NODE='2\(x2\)' gives 2 nodes but SLURM_JOB_NODELIST='n\[1-3\]'"
            r" names 3$",
        ),
        (
            {"SLURM_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "1,1"},
            r"^SLURM_TASKS_PER_NODE='1,1' gives 2 nodes but SLURM_NODELIST='n1' names 1$",
        ),
        (
            {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "8"},
            r"^SLURM_JOB_CPUS_PER_NODE='8' gives 1 nodes but SLURM_JOB_NODELIST",
        ),
        ({"SLURM_JOB_NODELIST": "n[3-1]"}, r"^SLURM_JOB_NODELIST='n\[3-1\]': .*backwards"),
        (
            {"SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2(x)"},
            r"^SLURM_TASKS_PER_NODE='2\(x\)': ",
        ),
        ({"SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "many"}, r"^SLURM_NTASKS='many': "),
        ({"SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "0"}, r"^SLURM_NTASKS='0': "),
        (
            {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS": "2"},
            r"^SLURM_NTASKS=2 is fewer than the 3 nodes of SLURM_JOB_NODELIST$",
        ),
        ({"SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_ON_NODE": "-4"}, r"^SLURM_CPUS_ON_NODE="),
    ],
)
def test_from_allocation_slurm_errors(environ: Dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_allocation(environ)


def test_from_allocation_pbs(tmp_path) -> None:
    path = _write(tmp_path, "n2\nn2\nn1\nn2\n\nn3.cluster.org\nn1\n", "nodefile")
    assert from_allocation({"PBS_NODEFILE": path}) == (
        "pbs",
        [Host("n2", slots=3), Host("n1", slots=2), Host("n3.cluster.org", slots=1)],
    )


@pytest.mark.parametrize(
    "text, match",
    [("", "names no host"), ("n1\nbad host\n", "line 2"), ("-x\n", "line 1")],
)
def test_from_allocation_pbs_errors(tmp_path, text: str, match: str) -> None:
    path = _write(tmp_path, text, "nodefile")
    with pytest.raises(ConfigError, match=match):
        from_allocation({"PBS_NODEFILE": path})


def test_from_allocation_pbs_missing_file(tmp_path) -> None:
    path = str(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"^PBS_NODEFILE='.*gone': cannot read it"):
        from_allocation({"PBS_NODEFILE": path})


_PE = "n1 4 all.q@n1 UNDEFINED\nn2.cluster.org 2 all.q@n2 UNDEFINED\n\nn3 1 all.q@n3 <NULL>\n"


@pytest.mark.parametrize("nslots", [None, "7", ""])
def test_from_allocation_sge(tmp_path, nslots: Optional[str]) -> None:
    environ = {"PE_HOSTFILE": _write(tmp_path, _PE, "pe_hostfile")}
    if nslots is not None:
        environ["NSLOTS"] = nslots
    assert from_allocation(environ) == (
        "sge",
        [Host("n1", slots=4), Host("n2.cluster.org", slots=2), Host("n3", slots=1)],
    )


def test_from_allocation_sge_repeated_host(tmp_path) -> None:
    path = _write(tmp_path, "n1 2 a.q@n1 UNDEFINED\nn1 3 b.q@n1 UNDEFINED\n")
    assert from_allocation({"PE_HOSTFILE": path, "NSLOTS": "5"}) == ("sge", [Host("n1", slots=5)])


@pytest.mark.parametrize(
    "text, nslots, match",
    [
        (_PE, "8", r"^NSLOTS=8 but PE_HOSTFILE='.*' gives 7 slots$"),
        (_PE, "x", r"^NSLOTS='x': "),
        ("n1\n", None, r"line 1: expected 'host slots queue processors'"),
        ("n1 0 q UNDEFINED\n", None, r"line 1: slots 0"),
        ("n1 four q UNDEFINED\n", None, r"line 1: slots 'four'"),
        ("", None, r"names no host"),
    ],
)
def test_from_allocation_sge_errors(tmp_path, text: str, nslots: Optional[str], match: str) -> None:
    environ = {"PE_HOSTFILE": _write(tmp_path, text, "pe_hostfile")}
    if nslots is not None:
        environ["NSLOTS"] = nslots
    with pytest.raises(ConfigError, match=match):
        from_allocation(environ)


def test_from_allocation_precedence(tmp_path) -> None:
    pbs = _write(tmp_path, "p1\n", "nodefile")
    sge = _write(tmp_path, "s1 1 q UNDEFINED\n", "pe_hostfile")
    everything = {"SLURM_JOB_NODELIST": "s", "PBS_NODEFILE": pbs, "PE_HOSTFILE": sge}
    assert from_allocation(everything) == ("slurm", [Host("s")])
    del everything["SLURM_JOB_NODELIST"]
    assert from_allocation(everything) == ("pbs", [Host("p1", slots=1)])
    del everything["PBS_NODEFILE"]
    assert from_allocation(everything) == ("sge", [Host("s1", slots=1)])


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"HOME": "/home/me", "PATH": "/usr/bin"},
        {"SLURM_JOB_NODELIST": "", "PBS_NODEFILE": " ", "PE_HOSTFILE": ""},
        {"SLURM_NTASKS": "4", "SLURM_CPUS_ON_NODE": "8", "NSLOTS": "4"},
    ],
)
def test_from_allocation_none(environ: Dict[str, str]) -> None:
    assert from_allocation(environ) is None


# -- distribute ----------------------------------------------------------------------------


def _hosts(*slots: Optional[int]) -> List[Host]:
    return [Host(f"h{index}", slots=count) for index, count in enumerate(slots)]


@pytest.mark.parametrize(
    "total, slots, expected",
    [
        (4, (2, 2), [2, 2]),
        (6, (1, 2), [2, 4]),
        (16, (8, 8), [8, 8]),
        (17, (8, 8, 1), [8, 8, 1]),  # exact when total is the sum of the slots
        (8, (2, 2), [4, 4]),
        (5, (2, 2), [3, 2]),  # a tied remainder goes to the earlier host
        (7, (1, 1, 1), [3, 2, 2]),
        (10, (1, 2, 3, 4), [1, 2, 3, 4]),
        (5, (1, 2, 3, 4), [1, 1, 1, 2]),
        (7, (3, 1), [5, 2]),  # 5.25, 1.75: the larger remainder rounds up
        (3, (None, None, None), [1, 1, 1]),
        (4, (None, None), [2, 2]),
        (10, (4, None), [8, 2]),  # no slots and no cores: weight 1
    ],
)
def test_distribute_proportional(total: int, slots, expected: List[int]) -> None:
    assert distribute(total, _hosts(*slots)) == expected


@pytest.mark.parametrize(
    "total, slots, expected",
    [
        (10, (1, 100), [1, 9]),
        (3, (1, 1, 100), [1, 1, 1]),
        (4, (1, 1, 100), [1, 1, 2]),
        (5, (1, 1000, 1000), [1, 2, 2]),
        (4, (1, 1000, 1, 1000), [1, 1, 1, 1]),
    ],
)
def test_distribute_gives_every_host_one(total: int, slots, expected: List[int]) -> None:
    assert distribute(total, _hosts(*slots)) == expected


@pytest.mark.parametrize(
    "total, count, expected",
    [(1, 3, [1, 0, 0]), (2, 3, [1, 1, 0]), (2, 5, [1, 1, 0, 0, 0])],
)
def test_distribute_fewer_workers_than_hosts(total: int, count: int, expected: List[int]) -> None:
    assert distribute(total, _hosts(*([100] * count))) == expected


def test_distribute_cores_fallback() -> None:
    hosts = [Host("a"), Host("b", slots=2), Host("c"), Host("d")]
    cores = {"a": 4, "b": 64, "c": 2}  # b has slots, so its cores do not count; d has none
    assert distribute(9, hosts, cores) == [4, 2, 2, 1]
    assert distribute(18, hosts, cores) == [8, 4, 4, 2]
    assert distribute(9, hosts, {"a": 0, "c": -3}) == [2, 3, 2, 2]


def test_distribute_default_cores() -> None:
    assert distribute(2, [Host("a"), Host("b")]) == [1, 1]


@pytest.mark.parametrize("total", [0, -1])
def test_distribute_needs_a_worker(total: int) -> None:
    with pytest.raises(ConfigError, match=rf"^{total} workers: at least one is needed$"):
        distribute(total, _hosts(1))


def test_distribute_needs_a_host() -> None:
    with pytest.raises(ConfigError, match="no hosts"):
        distribute(4, [])


_weights = st.lists(st.one_of(st.none(), st.integers(1, 10_000)), min_size=1, max_size=30)


@given(total=st.integers(1, 2_000), slots=_weights)
def test_distribute_property(total: int, slots: List[Optional[int]]) -> None:
    hosts = _hosts(*slots)
    counts = distribute(total, hosts)
    assert sum(counts) == total
    assert len(counts) == len(hosts)
    assert all(count >= 0 for count in counts)
    if total >= len(hosts):
        assert all(count >= 1 for count in counts)
    else:
        assert counts == [1] * total + [0] * (len(hosts) - total)
    assert distribute(total, hosts) == counts  # deterministic


@given(slots=_weights)
def test_distribute_one_worker_per_slot(slots: List[Optional[int]]) -> None:
    hosts = _hosts(*slots)
    weights = [count or 1 for count in slots]
    assert distribute(sum(weights), hosts) == weights


@given(
    total=st.integers(1, 500),
    cores=st.lists(st.integers(1, 64), min_size=1, max_size=10),
)
def test_distribute_with_cores_property(total: int, cores: List[int]) -> None:
    hosts = _hosts(*([None] * len(cores)))
    counts = distribute(total, hosts, {host.name: n for host, n in zip(hosts, cores)})
    assert sum(counts) == total
    if total >= len(hosts):
        assert min(counts) >= 1
        # largest remainder: never more than one away from the exact share,
        # except where a host was raised to its one worker
        for count, n in zip(counts, cores):
            share = total * n / sum(cores)
            assert count <= share + 1 or count == 1
