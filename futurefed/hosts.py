"""Host lists for ``fedrun``: ``--hosts``, hostfiles and batch allocations.

Pure parsing: nothing here opens a connection; the only I/O is reading the
files the user or the batch system names. Every invalid input raises
:class:`~futurefed.errors.ConfigError` with one line naming its source
(``--hosts 'a:b:c'``, ``hostfile /path line 3``, ``SLURM_JOB_NODELIST=...``).

Host grammar (``--hosts`` items, hostfile lines)::

    host                  host:slots
    user@host             user@host:port
    host:port:slots       user@host:port:slots

One number after the host means *slots*, unless ``user@`` is given, when it
means the ssh *port*; two numbers are the port, then the slots. So a port
without a user needs slots too (or an ssh config alias), and a user with
slots but the default port is ``user@host:22:N`` (or ``user@host N`` in a
hostfile). ``host`` is a name of ``[A-Za-z0-9._-]`` not starting with ``-``
whose dot-separated labels have 1 to 63 characters (a short name, an FQDN,
an IPv4 address or an ssh config alias; one final dot is allowed), or an
IPv6 address in brackets: ``[::1]``, ``user@[fe80::1]:22:4``. Ports are
1-65535, slots at least 1.

A host named more than once (same name, user and port) is one host whose
slots are the sum of the entries, an entry without slots counting one, as
with SCOOP: ``--hosts a a b`` gives ``a`` 2 slots and ``b`` none given.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError

__all__ = [
    "Host",
    "distribute",
    "expand_nodelist",
    "expand_tasks_per_node",
    "from_allocation",
    "name_problem",
    "parse_host",
    "parse_hostfile",
    "parse_hosts",
]

#: Most hosts a nodelist may expand to (a bound against ``n[0-999999999]``).
MAX_HOSTS = 100_000

_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_NAME_RULE = "is not letters, digits, '.', '_' and '-' (not starting with '-')"
_NUMBER = re.compile(r"[0-9]{1,9}")
_NO_CORES: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class Host:
    """One host to run on.

    Attributes:
        name: as the user wrote it: an ssh config alias, a short name, an
            FQDN, an IPv4 address or a bracketed IPv6 address.
        user: the ssh user, or None for ssh's default.
        port: the ssh port, or None for ssh's default.
        slots: how many workers it should get, or None when unknown
            (fedrun then asks the host for its core count).
    """

    name: str
    user: Optional[str] = None
    port: Optional[int] = None
    slots: Optional[int] = None


# -- host items --------------------------------------------------------------------------


def _number(text: str, what: str, lowest: int, highest: Optional[int] = None) -> int:
    """``text`` as a whole number in [lowest, highest], else ValueError(reason)."""
    if not _NUMBER.fullmatch(text):
        if text.isdigit():
            raise ValueError(f"{what} {text} is too large")
        raise ValueError(f"{what} {text!r} is not a whole number")
    value = int(text)
    if value < lowest or (highest is not None and value > highest):
        bound = f"{lowest}-{highest}" if highest is not None else f"at least {lowest}"
        raise ValueError(f"{what} {value} is out of range ({bound})")
    return value


def name_problem(name: str) -> Optional[str]:
    """Why the resolver cannot look ``name`` up, or None: each label (the
    parts between dots) must have 1 to 63 characters; one final dot (an
    absolute name) is allowed. (Python's resolver raises UnicodeError for
    these, not a lookup failure.)"""
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    if not all(labels):
        return "has an empty label (a '.' at its start, or two in a row)"
    if any(len(label) > 63 for label in labels):
        return "has a label longer than 63 characters"
    return None


def _split_host(rest: str) -> Tuple[str, List[str]]:
    """``host[:n[:m]]`` -> (host, [n, m]); ValueError(reason) if malformed."""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError("'[' without ']'")
        name, tail = rest[: end + 1], rest[end + 1 :]
        address, _, zone = name[1:-1].partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{name} is not an IPv6 address") from None
        if "%" in name and not re.fullmatch(r"[A-Za-z0-9._-]+", zone):
            raise ValueError(f"{name}: zone {zone!r} is not an interface name")
        if tail and not tail.startswith(":"):
            raise ValueError(f"unexpected {tail!r} after {name}")
        numbers = tail.split(":")[1:] if tail else []
        if len(numbers) > 2:
            raise ValueError("too many ':' after the host")
        return name, numbers
    name, *numbers = rest.split(":")
    if len(numbers) > 2 or "::" in rest:
        raise ValueError("too many ':' (write an IPv6 address in brackets, e.g. [::1])")
    if not name:
        raise ValueError("no host name")
    if not _NAME.fullmatch(name):
        raise ValueError(f"host {name!r} {_NAME_RULE}")
    problem = name_problem(name)
    if problem:
        raise ValueError(f"host {name!r} {problem}")
    return name, numbers


def parse_host(text: str, source: str) -> Host:
    """Parse one host item (see the module docstring for the grammar).

    Args:
        text: the item, e.g. ``node1:8`` or ``me@[::1]:2222``.
        source: where it comes from, for error messages, e.g. ``--hosts``.

    Raises:
        ConfigError: naming ``source`` and ``text`` if the item is invalid.
    """
    try:
        return _parse_host(text)
    except ValueError as exc:
        raise ConfigError(f"{source} {text!r}: {exc}") from None


def _parse_host(text: str) -> Host:
    if not text:
        raise ValueError("empty host")
    if any(ch.isspace() for ch in text):
        raise ValueError("whitespace in a host")
    user: Optional[str] = None
    rest = text
    if "@" in text:
        user, rest = text.split("@", 1)
        if not user:
            raise ValueError("empty user before '@'")
        if not _NAME.fullmatch(user):
            raise ValueError(f"user {user!r} {_NAME_RULE}")
    name, numbers = _split_host(rest)
    if len(numbers) == 1 and user is None:
        return Host(name, slots=_number(numbers[0], "slots", 1))
    port = _number(numbers[0], "port", 1, 65535) if numbers else None
    slots = _number(numbers[1], "slots", 1) if len(numbers) == 2 else None
    return Host(name, user, port, slots)


def _merge(hosts: Iterable[Host]) -> List[Host]:
    """Hosts in first-seen order, repeats (same name, user, port) merged by
    adding their slots; an entry without slots counts one when repeated."""
    merged: Dict[Tuple[str, Optional[str], Optional[int]], Host] = {}
    for host in hosts:
        key = (host.name, host.user, host.port)
        seen = merged.get(key)
        if seen is None:
            merged[key] = host
        else:
            merged[key] = replace(seen, slots=(seen.slots or 1) + (host.slots or 1))
    return list(merged.values())


def parse_hosts(items: Sequence[str], source: str = "--hosts") -> List[Host]:
    """Parse ``--hosts`` items; each may hold several hosts separated by commas.

    Whitespace around a comma is ignored; repeated hosts are merged (module
    docstring). ``[]`` gives ``[]``.

    Raises:
        ConfigError: naming ``source`` and the offending host.
    """
    hosts = []
    for item in items:
        for piece in item.split(","):
            hosts.append(parse_host(piece.strip(), source))
    return _merge(hosts)


# -- hostfiles -------------------------------------------------------------------------


def _read_lines(path: str, source: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{source}: cannot read it: {reason}") from None


def _hostfile_line(tokens: List[str], where: str) -> Host:
    """``host [N | slots=N] [max_slots=M]`` -> Host; max_slots is ignored."""
    host = parse_host(tokens[0], where)
    slots: Optional[int] = None
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        try:
            if not sep and slots is None:
                slots = _number(token, "slots", 1)
            elif key == "slots" and slots is None:
                slots = _number(value, "slots", 1)
            elif key in ("max_slots", "max-slots"):
                _number(value, key, 1)
            else:
                raise ValueError(f"unexpected {token!r} (expected: host [slots | slots=N])")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if slots is not None:
        if host.slots is not None:
            raise ConfigError(f"{where}: slots given twice ({tokens[0]!r} and {slots})")
        host = replace(host, slots=slots)
    return host


def parse_hostfile(path: str) -> List[Host]:
    """Parse a hostfile: one host per line as ``host``, ``host slots``,
    ``host slots=N`` (OpenMPI; ``max_slots=M`` is accepted and ignored) or
    ``host:slots``, with ``host`` in the ``--hosts`` grammar. ``#`` starts a
    comment; blank lines are skipped; repeated hosts are merged.

    Raises:
        ConfigError: naming the file (and line) if it cannot be read, has an
            invalid line, or names no host.
    """
    hosts = []
    for number, line in enumerate(_read_lines(path, f"hostfile {path}"), 1):
        tokens = line.split("#", 1)[0].split()
        if tokens:
            hosts.append(_hostfile_line(tokens, f"hostfile {path} line {number}"))
    if not hosts:
        raise ConfigError(f"hostfile {path}: names no host")
    return _merge(hosts)


# -- SLURM syntax ------------------------------------------------------------------------


def _split_top(text: str) -> List[str]:
    """Split at commas outside brackets, checking that brackets balance."""
    items, depth, start = [], False, 0
    for index, char in enumerate(text):
        if char == "[":
            if depth:
                raise ValueError("nested '['")
            depth = True
        elif char == "]":
            if not depth:
                raise ValueError("']' without '['")
            depth = False
        elif char == "," and not depth:
            items.append(text[start:index])
            start = index + 1
    if depth:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    return items


_RANGE = re.compile(r"([0-9]{1,18})(?:-([0-9]{1,18}))?")


def _expand_brackets(inside: str) -> List[str]:
    """``006,011-013`` -> ``['006', '011', '012', '013']``; a range pads its
    numbers to the width of its first endpoint, as SLURM does."""
    numbers: List[str] = []
    for element in inside.split(","):
        match = _RANGE.fullmatch(element)
        if not match:
            if ":" in element:
                raise ValueError(f"[{inside}]: SLURM hostlists have no steps ({element!r})")
            raise ValueError(f"[{inside}]: {element!r} is not a number or a range N-M")
        low, high = match.group(1), match.group(2)
        if high is None:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"[{inside}]: range {element} runs backwards")
        if int(high) - int(low) >= MAX_HOSTS or len(numbers) >= MAX_HOSTS:
            raise ValueError(f"more than {MAX_HOSTS} hosts")
        numbers.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return numbers


def _expand_item(item: str) -> List[str]:
    """``a[1-2]b[3-4]`` -> ``['a1b3', 'a1b4', 'a2b3', 'a2b4']``."""
    if not item:
        raise ValueError("empty host name")
    parts: List[List[str]] = []
    count = 1
    for index, part in enumerate(re.split(r"(\[[^\]]*\])", item)):
        if index % 2:
            parts.append(_expand_brackets(part[1:-1]))
            count *= len(parts[-1])
            if count > MAX_HOSTS:
                raise ValueError(f"more than {MAX_HOSTS} hosts")
        elif part:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", part):
                raise ValueError(f"{part!r} is not a name of letters, digits, '.', '_' and '-'")
            parts.append([part])
    return ["".join(names) for names in itertools.product(*parts)]


def expand_nodelist(text: str, source: Optional[str] = None) -> List[str]:
    """Expand a SLURM hostlist such as ``node[006,011-013],gpu[1-2]-ib``.

    Items are separated by commas outside brackets; each is literal text and
    bracketed lists of numbers and ranges, expanded as a cartesian product
    in order. Exact duplicates are dropped, the first kept.

    Args:
        text: the hostlist.
        source: its name for error messages, e.g. ``SLURM_JOB_NODELIST``.

    Raises:
        ConfigError: on unbalanced or nested brackets, empty items, ranges
            that are empty, backwards, stepped (``[1-9:2]``) or not numeric,
            or more than :data:`MAX_HOSTS` hosts.
    """
    where = f"{source}={text!r}" if source else f"nodelist {text!r}"
    try:
        names: Dict[str, None] = {}
        for item in _split_top(text.strip()):
            names.update(dict.fromkeys(_expand_item(item)))
            if len(names) > MAX_HOSTS:
                raise ValueError(f"more than {MAX_HOSTS} hosts")
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return list(names)


_TASKS = re.compile(r"([0-9]{1,9})(?:\(x([0-9]{1,9})\))?")


def expand_tasks_per_node(text: str, source: Optional[str] = None) -> List[int]:
    """Expand SLURM's ``2(x3),1`` to ``[2, 2, 2, 1]`` (``4`` to ``[4]``).

    Raises:
        ConfigError: naming ``source`` (default ``SLURM_TASKS_PER_NODE``) if
            an item is not ``N`` or ``N(xM)`` with N, M at least 1.
    """
    counts: List[int] = []
    for item in text.strip().split(","):
        match = _TASKS.fullmatch(item.strip())
        if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
            raise ConfigError(
                f"{source or 'SLURM_TASKS_PER_NODE'}={text!r}: {item!r} is not N or N(xM)"
                " with N, M at least 1"
            )
        if len(counts) + int(match.group(2) or 1) > MAX_HOSTS:
            raise ConfigError(f"{source or 'SLURM_TASKS_PER_NODE'}={text!r}: too many nodes")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# -- batch allocations -------------------------------------------------------------------


def _env_number(environ: Mapping[str, str], name: str) -> Optional[int]:
    """The positive whole number in ``environ[name]``, None if unset or empty."""
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return _number(value, "value", 1)
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r}: not a whole number >= 1") from None


def _per_node(environ: Mapping[str, str], name: str, nodelist: str, count: int) -> List[int]:
    """``environ[name]`` in the ``2(x3),1`` form, one number per node."""
    counts = expand_tasks_per_node(environ[name], name)
    if len(counts) != count:
        raise ConfigError(
            f"{name}={environ[name]!r} gives {len(counts)} nodes but"
            f" {nodelist}={environ[nodelist]!r} names {count}"
        )
    return counts


def _slurm(environ: Mapping[str, str]) -> Optional[List[Host]]:
    nodelist = next(
        (
            name
            for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
            if environ.get(name, "").strip()
        ),
        None,
    )
    if nodelist is None:
        return None
    nodes = expand_nodelist(environ[nodelist], nodelist)
    slots: Sequence[Optional[int]]
    ntasks = _env_number(environ, "SLURM_NTASKS")
    if environ.get("SLURM_TASKS_PER_NODE", "").strip():
        slots = _per_node(environ, "SLURM_TASKS_PER_NODE", nodelist, len(nodes))
    elif ntasks is not None:
        base, extra = divmod(ntasks, len(nodes))
        if base < 1:
            raise ConfigError(
                f"SLURM_NTASKS={ntasks} is fewer than the {len(nodes)} nodes of {nodelist}"
            )
        slots = [base + (index < extra) for index in range(len(nodes))]
    elif environ.get("SLURM_JOB_CPUS_PER_NODE", "").strip():
        slots = _per_node(environ, "SLURM_JOB_CPUS_PER_NODE", nodelist, len(nodes))
    else:
        slots = [_env_number(environ, "SLURM_CPUS_ON_NODE")] * len(nodes)
    return [Host(name, slots=count) for name, count in zip(nodes, slots)]


def _pbs(path: str) -> List[Host]:
    """PBS_NODEFILE: one line per slot."""
    hosts = []
    for number, line in enumerate(_read_lines(path, f"PBS_NODEFILE={path!r}"), 1):
        name = line.strip()
        if name:
            host = parse_host(name, f"PBS_NODEFILE {path} line {number}")
            hosts.append(Host(host.name, slots=1))
    if not hosts:
        raise ConfigError(f"PBS_NODEFILE={path!r}: names no host")
    return _merge(hosts)


def _sge(path: str, nslots: Optional[int]) -> List[Host]:
    """PE_HOSTFILE: lines ``host slots queue processors``; NSLOTS the total."""
    hosts = []
    for number, line in enumerate(_read_lines(path, f"PE_HOSTFILE={path!r}"), 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"PE_HOSTFILE {path} line {number}"
        if len(tokens) < 2:
            raise ConfigError(f"{where}: expected 'host slots queue processors'")
        try:
            slots = _number(tokens[1], "slots", 1)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        hosts.append(Host(parse_host(tokens[0], where).name, slots=slots))
    if not hosts:
        raise ConfigError(f"PE_HOSTFILE={path!r}: names no host")
    total = sum(host.slots or 0 for host in hosts)
    if nslots is not None and nslots != total:
        raise ConfigError(f"NSLOTS={nslots} but PE_HOSTFILE={path!r} gives {total} slots")
    return _merge(hosts)


def from_allocation(environ: Mapping[str, str]) -> Optional[Tuple[str, List[Host]]]:
    """The batch allocation this process runs in, if any.

    Looks for, in this order:

    * SLURM (``slurm``): ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``), with
      slots from ``SLURM_TASKS_PER_NODE``, else ``SLURM_NTASKS`` spread evenly
      (the first nodes get the remainder), else ``SLURM_JOB_CPUS_PER_NODE``,
      else ``SLURM_CPUS_ON_NODE`` for every node, else unknown (None);
    * PBS/Torque (``pbs``): ``PBS_NODEFILE``, a line per slot;
    * SGE (``sge``): ``PE_HOSTFILE``, checked against ``NSLOTS`` if set.

    Returns:
        (system, hosts with slots), or None outside an allocation.

    Raises:
        ConfigError: naming the variable or file that is inconsistent.
    """
    slurm = _slurm(environ)
    if slurm is not None:
        return "slurm", slurm
    if environ.get("PBS_NODEFILE", "").strip():
        return "pbs", _pbs(environ["PBS_NODEFILE"].strip())
    if environ.get("PE_HOSTFILE", "").strip():
        nslots = _env_number(environ, "NSLOTS")
        return "sge", _sge(environ["PE_HOSTFILE"].strip(), nslots)
    return None


# -- spreading workers -------------------------------------------------------------------


def distribute(
    total: int, hosts: Sequence[Host], cores: Mapping[str, int] = _NO_CORES
) -> List[int]:
    """How many of ``total`` workers each host gets, in proportion to its slots.

    A host's weight is its slots, else ``cores[host.name]``, else 1. Counts
    are rounded by largest remainder (ties to the earlier host), so they sum
    to ``total`` and are exact when ``total`` is the sum of the weights. When
    ``total >= len(hosts)`` every host gets at least one (its broker should
    have a worker), taken from the host most above its share; when
    ``total < len(hosts)`` the first ``total`` hosts get one each.

    Raises:
        ConfigError: if ``total < 1`` or ``hosts`` is empty.
    """
    if total < 1:
        raise ConfigError(f"{total} workers: at least one is needed")
    if not hosts:
        raise ConfigError("no hosts to run workers on")
    if total < len(hosts):
        return [1 if index < total else 0 for index in range(len(hosts))]
    weights = [max(1, host.slots or cores.get(host.name) or 1) for host in hosts]
    whole = sum(weights)
    counts = [total * weight // whole for weight in weights]
    order = sorted(range(len(hosts)), key=lambda i: (-(total * weights[i] % whole), i))
    for index in order[: total - sum(counts)]:
        counts[index] += 1
    for index in range(len(hosts)):
        if counts[index] == 0:
            donor = max(
                (i for i in range(len(hosts)) if counts[i] > 1),
                key=lambda i: (counts[i] * whole - total * weights[i], -i),
            )
            counts[donor] -= 1
            counts[index] = 1
    return counts
