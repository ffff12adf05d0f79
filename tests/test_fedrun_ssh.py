"""fedrun across real hosts: three network namespaces joined by a bridge,
each with its own OpenSSH server (tests/netns.py); fedrun runs in a fourth,
the client namespace, and reaches them by ssh (paramiko) with the cluster's
ssh config and known_hosts."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from fedprocs import ROOT
from netns import IP, SshCluster, ssh_cluster_fixture
from procs import wait_gone

GUARD = 60
FEDRUN = os.path.join(ROOT, "bin", "fedrun")
FEDRUN_PYTHON = sys.executable
STARTED = re.compile(r"fedrun: (\S+): started (\S+) \(pid (\d+)\)")

cluster = ssh_cluster_fixture(scope="module")

# Whether every worker gets part of a map depends on how fast each joins
# and borrows, so the programs that check it map again, round after round,
# until as many workers as the test expects have answered (WANT_WORKERS;
# at most 60 s, a deadlock guard: the test then fails on the names).
PROGRAM = """\
import functools, os, socket, sys, time
from futurefed import FederatedExecutor

def where(round_no, i):
    if round_no == 0 and i == 0:
        print("hello from", socket.gethostname(), flush=True)
    sum(range(20000))  # a little work, so that no worker can take it all
    return os.environ["WORKER_NAME"]

seen = set()
give_up = time.monotonic() + 60
with FederatedExecutor() as executor:
    for round_no in range(10**6):
        names = list(executor.map(functools.partial(where, round_no), range(600)))
        assert len(names) == 600
        seen.update(names)
        if len(seen) >= int(os.environ.get("WANT_WORKERS", "1")) or time.monotonic() > give_up:
            break
print("workers:", " ".join(sorted(seen)))
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
"""

BLOCKING_PROGRAM = """\
import os, sys
from futurefed import FederatedExecutor

with FederatedExecutor() as executor:
    executor.map(abs, range(-100, 0))
    print("ready", os.environ["FUTUREFED_KEY_FILE"], flush=True)
    sys.stdin.read()
"""


def write_program(tmp_path, text=PROGRAM):
    path = tmp_path / "prog.py"
    path.write_text(text)
    return str(path)


def fedrun_args(cluster: SshCluster, *args: str) -> list:
    return [cluster.python, FEDRUN, "--ssh-config", cluster.ssh_config, *args]


def run(cluster, tmp_path, *args, env=None):
    return cluster.run_in_client(
        fedrun_args(cluster, *args), env=env, timeout=GUARD, cwd=str(tmp_path),
    )


def started(stderr: str) -> dict:
    """{process name: (host, pid)} from fedrun -v."""
    return {name: (host, int(pid)) for host, name, pid in STARTED.findall(stderr)}


def assert_nothing_left(cluster: SshCluster, pids) -> None:
    assert wait_gone(pids, GUARD) == [], cluster.describe(list(pids))
    for alias in cluster.aliases:
        left = cluster.pids_in(alias)
        assert left == [], f"{alias}: {cluster.describe(left)}"


def test_runs_on_every_host_and_tears_down(cluster, tmp_path):
    program = write_program(tmp_path)
    logs = tmp_path / "logs"
    result = run(
        cluster, tmp_path, "--hosts", "node1", "node2", "node3", "-N", "6", "-v",
        "--log-dir", str(logs), program, env={"EXIT_WITH": "4", "WANT_WORKERS": "6"},
    )
    assert result.returncode == 4, result.stderr
    workers = re.search(r"^workers: (.*)$", result.stdout, re.M).group(1).split()
    assert {w.split(".")[0] for w in workers} == {"node1", "node2", "node3"}, workers
    assert len(workers) == 6
    hello = re.findall(r"^\[(node\d) (node\d\.w\d)\] hello from (node\d)$", result.stdout, re.M)
    assert len(hello) == 1 and hello[0][0] == hello[0][2] == hello[0][1].split(".")[0]
    procs = started(result.stderr)
    assert len(procs) == 12  # an agent, a broker and two workers per host
    assert {host for host, _ in procs.values()} == {"node1", "node2", "node3"}
    assert {p.name for p in logs.iterdir()} == {
        f"{name}.log" for name in procs if not name.endswith(".agent")
    }
    assert_nothing_left(cluster, [pid for _, pid in procs.values()])


def test_hostfile_slots_user_and_port(cluster, tmp_path):
    program = write_program(tmp_path)
    hostfile = tmp_path / "hosts.txt"
    ip2 = cluster.hosts[1]
    hostfile.write_text(f"# the cluster\nnode1 2\nroot@{ip2}:22:1   # by address, user and port\n\nnode3:1\n")
    result = run(cluster, tmp_path, "--hostfile", str(hostfile), "-v", program)
    assert result.returncode == 0, result.stderr
    procs = started(result.stderr)
    per_host = collections.Counter(host for name, (host, _) in procs.items() if ".w" in name)
    assert per_host == {"node1": 2, ip2: 1, "node3": 1}
    assert_nothing_left(cluster, [pid for _, pid in procs.values()])


@pytest.mark.parametrize(
    "case", ["unknown host", "refused", "unknown key", "wrong key", "no python", "no futurefed"]
)
def test_errors_name_the_host_and_leave_nothing(cluster, tmp_path, case):
    program = write_program(tmp_path)
    hosts = ["node1", "node2"]
    extra = []
    if case == "unknown host":
        hosts.append("node9")
        expect = "fedrun: node9: unknown host node9"
    elif case == "refused":
        hosts = ["node1", "root@node2:2222"]  # no sshd listens there
        expect = f"fedrun: node2: cannot connect to root@{cluster.hosts[1]}:2222: "
    elif case == "unknown key":
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        extra = ["--known-hosts", str(empty)]
        expect = "the host key of root@{}:22 is not in".format(cluster.hosts[1])
    elif case == "wrong key":
        other = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
        extra = ["-i", str(other)]
        expect = f"authentication failed for root@{cluster.hosts[1]}:22"
    elif case == "no python":
        extra = ["--python-interpreter", "/nonexistent/python3"]
        expect = "cannot run the host's Python"
    else:
        isolated = tmp_path / "isolated-python"
        isolated.write_text(f"#!/bin/sh\nexec {cluster.python} -I -S \"$@\"\n")
        isolated.chmod(0o755)
        extra = ["--python-interpreter", str(isolated)]
        expect = "futurefed is not installed for the host's Python"
    result = run(cluster, tmp_path, "--hosts", *hosts, "-N", "2", *extra, program)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "workers:" not in result.stdout
    assert_nothing_left(cluster, [])


def test_unknown_key_accepted_on_request(cluster, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    program = write_program(tmp_path)
    result = run(
        cluster, tmp_path, "--hosts", "node1", "-N", "1", "--known-hosts", str(empty),
        "--accept-unknown-hosts", program,
    )
    assert result.returncode == 0, result.stderr
    assert "workers: node1.w0" in result.stdout


def _start_blocking(cluster, tmp_path, *args):
    program = write_program(tmp_path, BLOCKING_PROGRAM)
    process = cluster.exec_in(
        cluster.client_ns, fedrun_args(cluster, "--hosts", "node1", "node2", "node3", "-N", "3", "-v",
                                       *args, program),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(tmp_path),
    )
    ready, key_file = process.stdout.readline().split()
    assert ready == "ready"
    process.key_dir = os.path.dirname(key_file)  # fedrun's copy of the key, for the program
    return process


def processes_naming(text: str) -> list:
    """The pids of the processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
    return found


CUT_PROGRAM = """\
import sys, threading
from futurefed import FederatedExecutor

def work(i):
    sum(range(30000))
    return i * i

stop = threading.Event()

def wait_for_stop():
    sys.stdin.readline()
    stop.set()

threading.Thread(target=wait_for_stop, daemon=True).start()
with FederatedExecutor() as executor:
    done = 0
    # rounds of work until the test has seen the cut host noticed
    while not stop.is_set() or done == 0:
        round_ = range(done, done + 300)
        assert list(executor.map(work, round_)) == [i * i for i in round_]
        done += len(round_)
        if done == 300:
            print("ready", flush=True)
print("done", done, flush=True)
"""

NODE2_LOST = re.compile(r"^\[node1 node1.broker\] .* <broker node2 on node2 pid \d+> lost: silent", re.M)


def test_a_cut_host_loses_no_work_and_heals(cluster, tmp_path):
    program = write_program(tmp_path, CUT_PROGRAM)
    process = cluster.exec_in(
        cluster.client_ns,
        fedrun_args(cluster, "--hosts", "node1", "node2", "node3", "-N", "3", "-v",
                    "--env", "FUTUREFED_HEARTBEAT=0.3", program),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(tmp_path),
    )
    err_lines: list = []
    noticed = threading.Event()

    def read_stderr():
        for line in process.stderr:
            err_lines.append(line)
            if NODE2_LOST.search(line):
                noticed.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert process.stdout.readline() == "ready\n"
        cluster.cut("node2")
        # the origin's broker notices while the program is still sending work
        noticed.wait(GUARD)
        process.stdin.write("stop\n")
        process.stdin.close()
        process.wait(GUARD)
        out = process.stdout.read()
        reader.join(GUARD)
    finally:
        cluster.uncut("node2")
        if process.poll() is None:
            process.kill()
            process.wait()
    err = "".join(err_lines)
    assert noticed.is_set(), err
    assert process.returncode == 0, err
    # every round came back complete and right (the program checks each one)
    assert re.fullmatch(r"done \d+\n", out), out + err
    # the cut host's agent heard nothing more either, and ended its processes
    assert_nothing_left(cluster, [pid for _, pid in started(err).values()])


def test_losing_the_programs_host_fails_fedrun_clearly(cluster, tmp_path):
    process = _start_blocking(cluster, tmp_path)
    try:
        cluster.cut("node1")
        process.wait(GUARD)  # stdin stays open: the program would go on for ever
        out, err = process.communicate()
    finally:
        cluster.uncut("node1")
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err
    assert re.search(r"^fedrun: node1: host lost", err, re.M), err
    assert_nothing_left(cluster, [pid for _, pid in started(err).values()])


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_fedrun_ending_ends_every_remote_process(cluster, tmp_path, how):
    process = _start_blocking(cluster, tmp_path)
    reapers = processes_naming(process.key_dir)  # they remove it if fedrun cannot
    assert reapers, "no reaper watches fedrun's key directory"
    try:
        process.send_signal(getattr(signal, how))
        process.wait(GUARD)
        out, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    procs = started(err)
    assert len(procs) == 9  # an agent, a broker and a worker per host
    if how != "SIGKILL":
        assert process.returncode == {"SIGINT": 130, "SIGTERM": 143}[how], err
    # with SIGKILL the ssh connections just drop: the agents see their stdin close
    assert_nothing_left(cluster, [pid for _, pid in procs.values()])
    # and fedrun's own copy of the key goes even when fedrun is killed
    assert wait_gone(reapers, GUARD) == []
    assert not os.path.exists(process.key_dir)


def workers_per_host(stderr: str) -> collections.Counter:
    return collections.Counter(host for name, (host, _) in started(stderr).items() if ".w" in name)


@pytest.mark.parametrize("system", ["slurm", "pbs", "sge"])
def test_hosts_and_slots_from_the_allocation(cluster, tmp_path, system):
    program = write_program(tmp_path)
    if system == "slurm":
        env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_TASKS_PER_NODE": "2,1(x2)"}
        expect = {"node1": 2, "node2": 1, "node3": 1}
    elif system == "pbs":
        nodefile = tmp_path / "nodefile"
        nodefile.write_text("node2\nnode3\nnode2\n")
        env = {"PBS_NODEFILE": str(nodefile)}
        expect = {"node2": 2, "node3": 1}
    else:
        hostfile = tmp_path / "pe_hostfile"
        hostfile.write_text("node3 2 all.q@node3 UNDEFINED\nnode1 1 all.q@node1 UNDEFINED\n")
        env = {"PE_HOSTFILE": str(hostfile), "NSLOTS": "3"}
        expect = {"node3": 2, "node1": 1}
    result = run(cluster, tmp_path, "-v", program, env=env)
    assert result.returncode == 0, result.stderr
    assert workers_per_host(result.stderr) == expect
    assert_nothing_left(cluster, [pid for _, pid in started(result.stderr).values()])


def test_srun_launcher(cluster, tmp_path):
    """Inside SLURM, --launcher srun starts each host's agent with srun. Here
    srun is a stand-in that runs the command in the node's namespace, as
    srun would run it on the node (no SLURM here to run the real one)."""
    calls = tmp_path / "srun-calls"
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    namespaces = " ".join(f"{alias}={cluster.ns(alias)}" for alias in cluster.aliases)
    fake.write_text(f"""#!/bin/sh
node=
for arg; do case $arg in --nodelist=*) node=${{arg#--nodelist=}};; esac; done
echo "$node $*" >> {calls}
while [ $# -gt 0 ]; do case $1 in --*) shift;; *) break;; esac; done
for pair in {namespaces}; do [ "${{pair%%=*}}" = "$node" ] && ns=${{pair#*=}}; done
exec {IP} netns exec "$ns" "$@"
""")
    fake.chmod(0o755)
    program = write_program(tmp_path)
    env = {
        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_NTASKS": "3",
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
    }
    result = run(cluster, tmp_path, "--launcher", "srun", "-v", program, env=env)
    assert result.returncode == 0, result.stderr
    assert workers_per_host(result.stderr) == {"node1": 1, "node2": 1, "node3": 1}
    lines = calls.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["node1", "node2", "node3"]
    assert all("--nodes=1 --ntasks=1" in line and "futurefed.launch.hostagent" in line for line in lines)
    assert all("--cpus-per-task=1" in line for line in lines)  # SLURM_NTASKS=3 over 3 nodes
    assert_nothing_left(cluster, [pid for _, pid in started(result.stderr).values()])


ENVIRONMENT_PROGRAM = """\
import os, time
from futurefed import FederatedExecutor

def look(_):
    sum(range(20000))  # a little work, so that one worker cannot take it all
    return os.environ["WORKER_NAME"].split(".")[0], os.environ.get("FROM_PROLOG"), \\
        os.environ.get("GREETING"), os.getcwd(), os.nice(0)

seen = set()
give_up = time.monotonic() + 60  # rounds until both hosts answered (see PROGRAM)
with FederatedExecutor() as executor:
    while len({item[0] for item in seen}) < 2 and time.monotonic() < give_up:
        seen.update(executor.map(look, range(300)))
for item in sorted(seen):
    print(*item)
print("origin", os.environ.get("GREETING"))
"""


def test_prolog_environment_working_directory_and_nice(cluster, tmp_path):
    prolog = tmp_path / "prolog.sh"
    prolog.write_text("export FROM_PROLOG=sourced\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    program = write_program(tmp_path, ENVIRONMENT_PROGRAM)
    result = run(
        cluster, tmp_path, "--hosts", "node1", "node2", "-N", "2", "--prolog", str(prolog),
        "--env", "GREETING=hi there", "--path", str(workdir), "--nice", "5", program,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "origin hi there" in lines
    for host in ("node1", "node2"):
        assert f"{host} sourced hi there {workdir} 5" in lines, lines


TUNNEL_PROGRAM = """\
import os, time
from futurefed import FederatedExecutor

names = set()
give_up = time.monotonic() + 60  # rounds until both workers answered (see PROGRAM)
with FederatedExecutor() as executor:
    while len(names) < 2 and time.monotonic() < give_up:
        # a little work per task, so that one worker cannot take them all
        names.update(executor.map(lambda _: (sum(range(20000)), os.environ["WORKER_NAME"])[1],
                                  range(400)))
print(os.environ["BROKER_ADDRESS"], " ".join(sorted(names)))
"""


def test_tunnel_carries_the_program_to_the_first_broker(cluster, tmp_path):
    program = write_program(tmp_path, TUNNEL_PROGRAM)
    result = run(cluster, tmp_path, "--hosts", "node1", "node2", "-N", "2", "--tunnel", program)
    assert result.returncode == 0, result.stderr
    address, *names = result.stdout.split()
    assert address.startswith("tcp://127.0.0.1:")  # a local end of the ssh tunnel
    assert names == ["node1.w0", "node2.w0"]


def test_tunnel_needs_ssh(tmp_path):
    program = write_program(tmp_path)
    result = subprocess.run(
        [FEDRUN_PYTHON, FEDRUN, "-N", "1", "--tunnel", program], capture_output=True, text=True,
        timeout=GUARD,
    )
    assert result.returncode == 2
    assert result.stderr == "fedrun: --tunnel needs hosts reached by ssh\n"


def test_an_interpreter_path_with_an_equals_sign(cluster, tmp_path):
    """env takes every word with a '=' before the command for an assignment:
    such an interpreter must still be run, not set."""
    odd = tmp_path / "py=3" / "python"
    odd.parent.mkdir()
    odd.write_text(f"#!/bin/sh\nexec {cluster.python} \"$@\"\n")
    odd.chmod(0o755)
    program = write_program(tmp_path)
    result = run(cluster, tmp_path, "--hosts", "node1", "-N", "1", "--python-interpreter",
                 str(odd), program)
    assert result.returncode == 0, result.stderr
    assert "workers: node1.w0" in result.stdout


@pytest.fixture
def system_known_hosts(cluster):
    """A function that sets /etc/ssh/ssh_known_hosts as fedrun sees it in
    the client namespace only (`ip netns exec` mounts /etc/netns/NS/ssh over
    /etc/ssh); the real one is never touched."""
    etc = f"/etc/netns/{cluster.client_ns}/ssh"

    def write(text: str) -> None:
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "ssh_known_hosts"), "w") as f:
            f.write(text)

    yield write
    shutil.rmtree(etc, ignore_errors=True)


def _host_key_line(cluster, alias: str) -> str:
    ip = cluster.hosts[cluster.aliases.index(alias)]
    for line in open(cluster.known_hosts):
        names, key = line.split(None, 1)
        if alias in names.split(","):
            return f"{ip} {key}"
    raise AssertionError(f"no key for {alias}")


def _other_key_line(cluster, alias: str, tmp_path) -> str:
    ip = cluster.hosts[cluster.aliases.index(alias)]
    other = tmp_path / "not-the-host-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = open(f"{other}.pub").read().split()[:2]
    return f"{ip} {kind} {key}\n"


@pytest.mark.parametrize("case", ["system file only", "stale system entry", "changed key"])
def test_host_keys_from_the_users_file_and_the_systems(cluster, tmp_path, system_known_hosts,
                                                       case):
    """Both files are read, as OpenSSH reads them, the user's (here the
    ssh config's UserKnownHostsFile, or --known-hosts) first."""
    program = write_program(tmp_path)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    if case == "system file only":  # the user's file does not know node1
        system_known_hosts(_host_key_line(cluster, "node1"))
        extra = ["--known-hosts", str(empty)]
    elif case == "stale system entry":  # the user's file has the right key
        system_known_hosts(_other_key_line(cluster, "node1", tmp_path))
        extra = []
    else:  # only the system's file knows node1, under another key
        system_known_hosts(_other_key_line(cluster, "node1", tmp_path))
        extra = ["--known-hosts", str(empty)]
    result = run(cluster, tmp_path, "--hosts", "node1", "-N", "1", *extra, program)
    if case == "changed key":
        assert result.returncode == 1
        assert result.stderr == (
            f"fedrun: node1: the host key of root@{cluster.hosts[0]}:22 does not match"
            " known_hosts (it changed, or this is not the host you think)\n"
        )
    else:
        assert result.returncode == 0, result.stderr
        assert "workers: node1.w0" in result.stdout
    assert_nothing_left(cluster, [])
