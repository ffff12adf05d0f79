"""fedrun on this machine alone: the program's exit status, streamed and
logged output, and teardown on every kind of end (no process left)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fedprocs import ROOT, command
from procs import wait_gone

GUARD = 60
HOST = socket.gethostname()

PROGRAM = """\
import os, sys
from futurefed import FederatedExecutor

def where(i):
    if i < 2:
        print(f"task {i} says hello", flush=True)
    return os.environ["WORKER_NAME"]

with FederatedExecutor() as executor:
    names = sorted(set(executor.map(where, range(200))))
print("workers:", " ".join(names))
print("args:", " ".join(sys.argv[1:]))
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
"""

# Prints "ready" once a task has run, then blocks until its stdin closes.
BLOCKING_PROGRAM = """\
from futurefed import FederatedExecutor

with FederatedExecutor() as executor:
    assert executor.submit(abs, -1).result() == 1
    print("ready", flush=True)
    sys.stdin.read()
"""

STARTED = re.compile(r"fedrun: \S+: started (\S+) \(pid (\d+)\)")


def fedrun(args, program, tmp_path, **kwargs):
    path = tmp_path / "prog.py"
    path.write_text(program)
    return command("fedrun") + args + [str(path)]


def started_pids(stderr: str) -> dict:
    return {name: int(pid) for name, pid in STARTED.findall(stderr)}


def gone_within(pids, timeout: float) -> list:
    """wait_gone with one deadline for all the pids (wait_gone gives each
    its own): the pids still alive ``timeout`` seconds from now."""
    deadline = time.monotonic() + timeout
    return [pid for pid in pids if wait_gone([pid], max(0.0, deadline - time.monotonic()))]


def test_runs_the_program_with_its_arguments_and_exit_status(tmp_path):
    argv = fedrun(["-N", "2", "-v", "--log-dir", str(tmp_path / "logs")], PROGRAM, tmp_path)
    result = subprocess.run(
        argv + ["alpha", "--beta"], capture_output=True, text=True, timeout=GUARD,
        env=dict(os.environ, EXIT_WITH="3"),
    )
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert f"workers: {HOST}.w0 {HOST}.w1" in lines
    assert "args: alpha --beta" in lines
    # the workers' output, streamed with host and process
    hello = [line for line in lines if "says hello" in line]
    assert len(hello) == 2
    assert all(re.fullmatch(rf"\[{re.escape(HOST)} {re.escape(HOST)}\.w[01]\] task [01] says hello", h)
               for h in hello), hello
    # one session log per process, with what that process printed
    pids = started_pids(result.stderr)
    assert set(pids) == {f"{HOST}.agent", f"{HOST}.broker", f"{HOST}.w0", f"{HOST}.w1"}
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {f"{name}.log" for name in pids if not name.endswith(".agent")}
    logged = "".join((tmp_path / "logs" / name).read_text() for name in logs)
    assert logged.count("says hello") == 2
    assert wait_gone(pids.values(), GUARD) == []


def test_workers_default_to_the_cores(tmp_path):
    result = subprocess.run(
        fedrun(["-v"], PROGRAM, tmp_path), capture_output=True, text=True, timeout=GUARD
    )
    assert result.returncode == 0, result.stderr
    workers = {n for n in started_pids(result.stderr) if not n.endswith((".broker", ".agent"))}
    assert len(workers) == os.cpu_count()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_fedrun_ends_everything(tmp_path, sig, status):
    process = subprocess.Popen(
        fedrun(["-N", "2", "-v"], BLOCKING_PROGRAM, tmp_path), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout.readline() == "ready\n"  # the federation ran a task
        process.send_signal(sig)
        out, err = process.communicate(timeout=GUARD)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == status, err
    pids = started_pids(err)
    assert len(pids) == 4
    assert wait_gone(pids.values(), GUARD) == []


def test_a_failing_program_fails_fedrun(tmp_path):
    result = subprocess.run(
        fedrun(["-N", "1"], "raise SystemExit('boom')\n", tmp_path),
        capture_output=True, text=True, timeout=GUARD,
    )
    assert result.returncode == 1
    assert "boom" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-N", "0", "prog.py"], "at least one worker"),
    (["no-such-program.py"], "no such file"),
    (["--env", "X", "prog.py"], "--env 'X' is not NAME=VALUE"),
    (["--hosts", "a:b:c:d", "prog.py"], "--hosts"),
    (["--launcher", "srun", "prog.py"], "only inside a SLURM allocation"),
    (["--hosts", "a..b", "prog.py"], "fedrun: --hosts 'a..b': host 'a..b' has an empty label"),
    (["--hosts", ".node1", "prog.py"], "fedrun: --hosts '.node1': host '.node1' has an empty"),
    (["--hosts", "n1", "--ssh-config", "port.conf", "prog.py"],
     "fedrun: n1: ssh config port.conf: Port 'abc' is not a port (1-65535)"),
    (["--hosts", "n1", "--ssh-config", "name.conf", "prog.py"],
     "fedrun: n1: ssh config name.conf: HostName 'a..b' has an empty label"),
    (["--hosts", "n1", "--ssh-config", "confdir", "prog.py"],
     "fedrun: cannot read ssh config confdir: Is a directory"),
    (["--hosts", "n1", "--ssh-config", "none.conf", "prog.py"],
     "fedrun: cannot read ssh config none.conf: No such file or directory"),
    (["--nice", "99999999999", "prog.py"], "fedrun: --nice 99999999999 is out of range (-20 to"),
    (["--nice", "-21", "prog.py"], "fedrun: --nice -21 is out of range (-20 to 19)"),
    (["--connect-timeout", "0", "prog.py"], "fedrun: --connect-timeout 0: give a number of"),
    (["--connect-timeout", "-1", "prog.py"], "fedrun: --connect-timeout -1: give a number"),
    (["--connect-timeout", "nan", "prog.py"], "fedrun: --connect-timeout nan: give a number"),
    (["--connect-timeout", "inf", "prog.py"], "fedrun: --connect-timeout inf: give a number"),
    (["--log-dir", "prog.py", "prog.py"], "fedrun: --log-dir prog.py: not a directory"),
])
def test_bad_arguments_are_one_line_and_status_2(tmp_path, args, message):
    (tmp_path / "prog.py").write_text("pass\n")
    (tmp_path / "port.conf").write_text("Host n1\n    HostName 127.0.0.1\n    Port abc\n")
    (tmp_path / "name.conf").write_text("Host n1\n    HostName a..b\n")
    (tmp_path / "confdir").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "PE_HOSTFILE"))}
    result = subprocess.run(
        command("fedrun") + args, capture_output=True, text=True, timeout=GUARD, cwd=tmp_path, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def without_privilege(*capabilities: str) -> list:
    """A prefix that runs a command without these capabilities (root has
    them all: a directory of mode 0555 is writable to root, a negative nice
    allowed), or nothing when this user lacks them anyway."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop privileges with")
    return [setpriv, "--bounding-set", ",".join(f"-{c}" for c in capabilities)]


def test_a_log_dir_that_cannot_be_written_is_a_bad_argument(tmp_path):
    (tmp_path / "prog.py").write_text("pass\n")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    for log_dir in (locked, locked / "logs"):
        result = subprocess.run(
            without_privilege("dac_override", "dac_read_search") + command("fedrun")
            + ["--log-dir", str(log_dir), "prog.py"],
            capture_output=True, text=True, timeout=GUARD, cwd=tmp_path,
        )
        assert (result.returncode, result.stderr) == (
            2, f"fedrun: --log-dir {log_dir}: cannot write there: Permission denied\n"
        )


def test_a_log_that_cannot_be_opened_is_said_and_the_run_goes_on(tmp_path):
    logs = tmp_path / "logs"
    (logs / f"{HOST}.broker.log").mkdir(parents=True)  # in the way of the broker's log
    result = subprocess.run(
        fedrun(["-N", "1", "--log-dir", str(logs)], PROGRAM, tmp_path),
        capture_output=True, text=True, timeout=GUARD,
    )
    assert result.returncode == 0, result.stderr
    assert f"workers: {HOST}.w0" in result.stdout.splitlines()
    assert result.stderr.splitlines().count(
        f"fedrun: cannot write {logs}/{HOST}.broker.log: Is a directory;"
        f" {HOST}.broker's lines are not logged"
    ) == 1, result.stderr
    assert "says hello" in (logs / f"{HOST}.w0.log").read_text()


def test_logs_are_appended_to(tmp_path):
    logs = tmp_path / "logs"
    for _ in range(2):
        result = subprocess.run(
            fedrun(["-N", "1", "--log-dir", str(logs)], PROGRAM, tmp_path),
            capture_output=True, text=True, timeout=GUARD,
        )
        assert result.returncode == 0, result.stderr
    assert (logs / f"{HOST}.w0.log").read_text().count("says hello") == 4  # 2 a run


def test_a_negative_nice_without_privilege_fails_the_host_in_one_line(tmp_path):
    result = subprocess.run(
        without_privilege("sys_nice")
        + fedrun(["-N", "1", "-v", "--nice", "-5"], PROGRAM, tmp_path),
        capture_output=True, text=True, timeout=GUARD,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"fedrun: {HOST}: cannot give the workers niceness -5 (--nice -5): Operation not permitted"
    )
    assert "Traceback" not in result.stderr
    pids = started_pids(result.stderr)
    assert list(pids) == [f"{HOST}.agent"]  # nothing else was started
    assert gone_within(pids.values(), GUARD) == []


def test_a_port_that_cannot_be_bound(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            fedrun(["-N", "1", "--broker-port", str(port)], PROGRAM, tmp_path),
            capture_output=True, text=True, timeout=GUARD,
        )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedrun: {HOST}: the broker did not start: ")
    assert f"cannot bind BROKER_ADDRESS=tcp://127.0.0.1:{port}" in last


@pytest.mark.parametrize("argv, own, program", [
    (["-N", "4", "prog.py", "--size", "10"], ["-N", "4"], ["prog.py", "--size", "10"]),
    (["--hosts", "a", "b", "prog.py", "-v"], ["--hosts", "a", "b"], ["prog.py", "-v"]),
    (["--hosts", "a", "b", "--", "./tool", "x"], ["--hosts", "a", "b"], ["./tool", "x"]),
    (["-v", "-m", "pkg.main", "--hosts", "x"], ["-v", "-m", "pkg.main"], ["--hosts", "x"]),
    (["--module=pkg.main", "a"], ["--module=pkg.main"], ["a"]),
    (["--env", "A=1", "--path=/w", "prog.py"], ["--env", "A=1", "--path=/w"], ["prog.py"]),
    (["--pythonpath", "lib", "src", "-N", "2", "run.py"], ["--pythonpath", "lib", "src", "-N", "2"], ["run.py"]),
])
def test_where_the_program_starts(argv, own, program):
    from futurefed.launch.__main__ import split_argv

    assert split_argv(argv) == (own, program)


def test_program_options_are_the_programs(tmp_path):
    program = "import sys\nprint(sys.argv[1:])\n"
    result = subprocess.run(
        fedrun(["-N", "1"], program, tmp_path) + ["--size", "10", "-v"],
        capture_output=True, text=True, timeout=GUARD,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['--size', '10', '-v']"


# Two workers; a task kills its worker by SIGKILL, another exits with status
# 3; each prints to stderr first. With no retries each fails with WorkerLost
# at once. Then two tasks that each wait for the other run, which they can
# only do on two workers at once: the pool has its size again.
DYING_PROGRAM = """\
import json, os, signal, socket, sys, time
from futurefed import FederatedExecutor, WorkerLost

def die(how):
    print(f"dying by {how} at {time.time():.6f}", file=sys.stderr, flush=True)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)

def meet(port):
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.recv(1)  # until every task has arrived
    return os.environ["WORKER_NAME"], os.getpid()

def all_at_once(executor, count):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)  # a deadlock guard: fewer than count workers
        futures = [executor.submit(meet, server.getsockname()[1]) for _ in range(count)]
        arrived = [server.accept()[0] for _ in range(count)]
        for conn in arrived:
            conn.sendall(b"x")
            conn.close()
        return [future.result(timeout=60) for future in futures]

with FederatedExecutor() as executor:
    print("before", json.dumps(all_at_once(executor, 2)), flush=True)
    for how in ("SIGKILL", "exit"):
        try:
            executor.submit(die, how).result(timeout=60)
        except WorkerLost as error:
            noticed = time.time()
            died = float(error.stderr_tail[-1].rsplit(" ", 1)[1]) if error.stderr_tail else noticed
            print("lost", json.dumps({
                "host": error.host, "worker": error.worker, "pid": error.pid,
                "reason": error.reason,
                "exit_status": error.exit_status, "signal": error.signal,
                "stderr_tail": error.stderr_tail, "message": str(error), "seconds": noticed - died,
            }), flush=True)
    print("after", json.dumps(all_at_once(executor, 2)), flush=True)
"""


def test_a_worker_that_dies_fails_its_task_with_how_it_ended(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    argv = fedrun(["-N", "2", "-v", "--env", "FUTUREFED_MAX_RETRIES=0"], DYING_PROGRAM, tmp_path)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=GUARD * 2, env=env)
    assert result.returncode == 0, result.stderr
    started = STARTED.findall(result.stderr)
    pids = {name: [int(pid) for n, pid in started if n == name] for name, _ in started}
    out = {}
    for line in result.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("before", "after", "lost"):
            out.setdefault(tag, []).append(json.loads(rest))
    killed, exited = out["lost"]
    assert killed["exit_status"] == -9 and killed["signal"] == 9
    assert exited["exit_status"] == 3 and exited["signal"] is None
    for lost, how in ((killed, "SIGKILL"), (exited, "exit")):
        assert lost["host"] == HOST
        assert lost["pid"] in pids[lost["worker"]], (lost, started)  # the process that ran it
        assert lost["reason"].endswith("(its supervisor saw it end)")  # not found by silence
        assert lost["stderr_tail"][-1].startswith(f"dying by {how} at ")
        assert f"{lost['worker']} on {HOST} (pid {lost['pid']})" in lost["message"]
        assert "its last lines on stderr:" in lost["message"]
    assert "killed by SIGKILL" in killed["reason"] and "exited with status 3" in exited["reason"]
    # the agent replaced both: four worker processes in all, two at the end
    workers = [pid for name, pid in started if re.fullmatch(rf"{re.escape(HOST)}\.w[01]", name)]
    assert len(workers) == 4, started
    before = {pid for _, pid in out["before"][0]}
    after = {pid for _, pid in out["after"][0]}
    assert len(before) == len(after) == 2
    assert killed["pid"] in before and not after & {killed["pid"], exited["pid"]}
    assert "was killed by SIGKILL; replacing it" in result.stderr
    assert "exited with status 3; replacing it" in result.stderr
    print(f"to WorkerLost: {killed['seconds']:.3f} s from SIGKILL,"
          f" {exited['seconds']:.3f} s from exit")
    assert wait_gone([int(pid) for _, pid in started], GUARD) == []


KEY_PROGRAM = """\
import os, stat
from futurefed import FederatedExecutor
from futurefed.security import FederationKey

def key_file_seen_by_worker(_):
    path = os.environ["FUTUREFED_KEY_FILE"]
    return path, stat.S_IMODE(os.stat(path).st_mode), FederationKey.load(path).secret.decode()

path = os.environ["FUTUREFED_KEY_FILE"]
secret = FederationKey.load(path).secret.decode()
with FederatedExecutor() as executor:
    seen = executor.submit(key_file_seen_by_worker, 0).result()
    # nobody's command line or environment carries the secret itself
    leaks = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    if secret.encode() in f.read():
                        leaks.append(f"{pid}/{what}")
            except OSError:
                pass
print("origin", path, oct(stat.S_IMODE(os.stat(path).st_mode)), oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))
print("worker", seen[0], oct(seen[1]), seen[2] == secret)
print("leaks", leaks)
"""


def test_the_run_key_reaches_every_process_privately_and_goes_away(tmp_path):
    result = subprocess.run(fedrun(["-N", "1"], KEY_PROGRAM, tmp_path), capture_output=True,
                            text=True, timeout=GUARD)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    origin_path, origin_mode, origin_dir_mode = lines["origin"].split()
    worker_path, worker_mode, same_secret = lines["worker"].split()
    assert (origin_mode, origin_dir_mode) == ("0o600", "0o700")
    assert worker_mode == "0o600" and same_secret == "True"
    assert lines["leaks"] == "[]"
    # the brokers bound beyond loopback (fedrun's default) with the key, no warning
    assert "insecure" not in result.stderr and "refusing" not in result.stderr
    # both copies of the key went with the run
    assert not os.path.exists(origin_path) and not os.path.exists(worker_path)
    assert not os.path.exists(os.path.dirname(worker_path))


def test_fedrun_key_file_lets_a_hand_started_process_in(tmp_path):
    key = tmp_path / "lab.key"
    made = subprocess.run(command("fedkeys") + [str(key)], capture_output=True, text=True, timeout=GUARD)
    assert made.returncode == 0, made.stderr
    public = made.stdout.split()[-1]
    program = KEY_PROGRAM + "print('public', FederationKey.load(path).public.decode())\n"
    result = subprocess.run(fedrun(["-N", "1", "--key-file", str(key)], program, tmp_path),
                            capture_output=True, text=True, timeout=GUARD)
    assert result.returncode == 0, result.stderr
    assert f"public {public}" in result.stdout.splitlines()
    assert key.exists()  # the user's own file stays
    bad = subprocess.run(fedrun(["-N", "1", "--key-file", str(tmp_path / "none")], program, tmp_path),
                         capture_output=True, text=True, timeout=GUARD)
    assert bad.returncode == 2 and "--key-file=" in bad.stderr and "none" in bad.stderr


def test_every_option_with_a_value_is_known_to_the_argv_split():
    """split_argv must skip an option's value, or it takes it for the program."""
    import argparse

    from futurefed.launch.__main__ import _LIST_OPTIONS, _VALUE_OPTIONS, parser

    takes_value = {
        option
        for action in parser()._actions
        if not isinstance(action, (argparse._StoreConstAction, argparse._CountAction,
                                   argparse._HelpAction, argparse._VersionAction))
        and action.nargs != 0
        for option in action.option_strings
    }
    assert takes_value - {"-m", "--module"} == _VALUE_OPTIONS | _LIST_OPTIONS


# -- fedrun falls silent while the agent's output does not drain ----------------------------

# The task prints a kilobyte line every millisecond until its worker ends,
# more than any pipe holds; the program prints "ready" once it runs.
CHATTY_PROGRAM = """\
import os, socket, sys, time
from futurefed import FederatedExecutor

def chatter(port):
    socket.create_connection(("127.0.0.1", port)).close()  # it runs
    while True:
        print(os.environ["WORKER_NAME"], "x" * 1000, flush=True)
        time.sleep(0.001)  # the workload's pace, not synchronisation

with socket.create_server(("127.0.0.1", 0)) as server, FederatedExecutor() as executor:
    server.settimeout(60)  # a deadlock guard
    future = executor.submit(chatter, server.getsockname()[1])
    server.accept()[0].close()
    print("ready", flush=True)
    future.exception()  # until the federation is gone
"""


def test_the_silence_rule_ends_everything_even_when_output_cannot_drain(tmp_path):
    """fedrun stopped (SIGSTOP, as Ctrl-Z does; for the agent the same as a
    host cut off without a reset): it neither beats nor reads, so the
    agent's stdout fills with the workers' lines. After 6 s without a word
    the agent must still end its broker, its workers and itself."""
    process = subprocess.Popen(
        fedrun(["-N", "1", "-v"], CHATTY_PROGRAM, tmp_path), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, spread, err_lines = threading.Event(), threading.Event(), []

    def read_stdout():
        for line in process.stdout:
            if line == "ready\n":
                ready.set()

    def read_stderr():
        for line in process.stderr:
            err_lines.append(line)
            if re.match(r"fedrun: 1 workers ", line):  # after every "started" line
                spread.set()

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    try:
        assert ready.wait(GUARD) and spread.wait(GUARD), "".join(err_lines)
        pids = started_pids("".join(err_lines))
        assert len(pids) == 3, err_lines
        process.send_signal(signal.SIGSTOP)
        try:
            left = gone_within(pids.values(), GUARD)
        finally:
            process.send_signal(signal.SIGCONT)
        assert left == [], f"still running with fedrun stopped: {left} of {pids}"
        assert process.wait(GUARD) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(GUARD)
    assert "Traceback" not in "".join(err_lines)


# -- a broker that hangs before it binds ------------------------------------------------------

# On the PYTHONPATH of the agents and their children: a broker (the only
# process given --ready-fd) of a run with HANG_BROKER set hangs before it
# binds, and so before it watches its lifeline, deaf to SIGTERM.
HANGING_BROKER = """\
import os, signal, sys
if os.environ.get("HANG_BROKER") and "--ready-fd" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("hanging before binding", file=sys.stderr, flush=True)
    while True:
        signal.pause()
"""


def test_a_broker_hanging_before_it_binds_is_ended_when_fedrun_stops(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HANGING_BROKER)  # beside the program
    process = subprocess.Popen(
        fedrun(["-N", "1", "-v", "--env", "HANG_BROKER=1"], PROGRAM, tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    err = ""
    pids = {}
    try:
        for line in process.stderr:
            err += line
            if line.rstrip() == f"[{HOST} {HOST}.broker] hanging before binding":
                break
        pids = started_pids(err)
        process.send_signal(signal.SIGTERM)
        out, rest = process.communicate(timeout=GUARD)
        err += rest
        assert process.returncode == 143, err
        assert set(pids) == {f"{HOST}.agent", f"{HOST}.broker"}, err
        assert gone_within(pids.values(), GUARD) == [], err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for pid in wait_gone(pids.values(), 0):  # what this test started, by pid
            os.kill(pid, signal.SIGKILL)
    assert "the host agent did not stop" not in err  # it heard @stop at once


class AgentDriver:
    """A host agent run by hand, as fedrun runs it: lines on its stdin (a
    @beat a second), its lines read back."""

    def __init__(self, argv, env):
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env=env)
        self.lines = []
        self.changed = threading.Condition()
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.done.set()
            self.changed.notify_all()

    def _beat(self):
        while not self.done.wait(1.0):  # fedrun's heartbeat schedule
            self.send("@beat")

    def send(self, line):
        try:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it ended

    def wait_for(self, pattern):
        regex = re.compile(pattern)

        def found():
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self.changed:
            self.changed.wait_for(lambda: found() is not None or self.done.is_set(), GUARD)
            match = found()
        assert match is not None, f"the agent never said {pattern!r}:\n" + "\n".join(self.lines)
        return match

    def close(self):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.done.wait(GUARD)


def test_a_broker_that_never_says_ready_is_ended_and_the_agent_says_why(tmp_path):
    """The agent's own limit (BROKER_TIMEOUT, 30 s; 1 s here): it ends the
    broker, SIGTERM then SIGKILL, and reports it instead of waiting for ever."""
    (tmp_path / "sitecustomize.py").write_text(HANGING_BROKER)
    agent = AgentDriver(
        [sys.executable, "-c", "import sys\nfrom futurefed.launch import hostagent\n"
         "hostagent.BROKER_TIMEOUT = 1.0\nsys.exit(hostagent.main())"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT])),
    )
    broker = None
    try:
        agent.send("@start " + json.dumps({
            "name": "h", "bind": "tcp://127.0.0.1:0", "advertise": None, "peers": [],
            "workers": 1, "env": {"HANG_BROKER": "1"}, "nice": 0,
        }))
        broker = int(agent.wait_for(r"^@spawn h\.broker (\d+)$").group(1))
        agent.wait_for(r"^@e h\.broker hanging before binding$")
        agent.wait_for(r"^@error the broker did not start within 1 s, so the agent ended it"
                       r" \(its last line: hanging before binding\)$")
        agent.wait_for(r"^@exit h\.broker -9$")  # deaf to SIGTERM: killed
        assert agent.popen.wait(GUARD) == 1
        assert wait_gone([broker], GUARD) == []
        assert not [line for line in agent.lines if line.startswith("@spawn h.w")]
    finally:
        agent.close()
        if broker is not None:
            for pid in wait_gone([broker], 0):
                os.kill(pid, signal.SIGKILL)


# -- a host that is slow to start -------------------------------------------------------------

# Two host agents on this machine, as fedrun runs them, each after its
# prolog. h1's channel opens GATE once h1's agent has sent BEATS
# heartbeats: by then h1's agent has been ready for longer than its silence
# timeout, and has quit unless fedrun has beaten it all along. h2's channel
# opens H1_GATE once fedrun reads h2's output, i.e. waits for its @ready.
SLOW_HOST_SESSION = """\
import os, sys
from futurefed.launch.channels import AgentCommand, LocalChannel
from futurefed.launch.session import Plan, Session

program, gate, h1_gate, prolog1, prolog2, pythonpath, beats = sys.argv[1:]


def open_gate(path):
    os.write(os.open(path, os.O_RDWR), b"go\\n")  # O_RDWR: never blocks


class OpensTheGate(LocalChannel):
    def stdout(self):
        count = 0
        for line in super().stdout():
            count += line.startswith("@beat")
            if count == int(beats) and line.startswith("@beat"):
                open_gate(gate)
            yield line


class OpensH1Gate(LocalChannel):
    def stdout(self):
        open_gate(h1_gate)
        yield from super().stdout()


commands = {
    "h1": AgentCommand(env={"PYTHONPATH": pythonpath}, prolog=prolog1 or None),
    "h2": AgentCommand(env={"PYTHONPATH": pythonpath}, prolog=prolog2),
}
plan = Plan(program=[sys.executable, program], workers=2, bind_host="127.0.0.1", verbose=True)
sys.exit(Session(plan, [OpensTheGate("h1"), OpensH1Gate("h2")],
                 lambda channel: commands[channel.label], lambda total, cores: [1, 1]).run())
"""

MAP_PROGRAM = """\
from futurefed import FederatedExecutor

with FederatedExecutor() as executor:
    print("sum", sum(executor.map(abs, range(-100, 0))), flush=True)
"""


def run_slow_host_session(tmp_path, h1: str, h2: str):
    """SLOW_HOST_SESSION with these prologs (h1's empty: none), in which
    ``{gate}`` and ``{h1_gate}`` name its FIFOs; fedrun's output."""
    from futurefed.launch.hostagent import SILENCE_TIMEOUT

    program, gate, h1_gate = tmp_path / "prog.py", tmp_path / "gate", tmp_path / "h1-gate"
    program.write_text(MAP_PROGRAM)
    os.mkfifo(gate)
    os.mkfifo(h1_gate)
    prologs = []
    for name, text in (("h1", h1), ("h2", h2)):
        path = tmp_path / f"{name}.sh"
        path.write_text(text.format(gate=gate, h1_gate=h1_gate))
        prologs.append(str(path) if text else "")
    try:
        return subprocess.run(
            [sys.executable, "-c", SLOW_HOST_SESSION, str(program), str(gate), str(h1_gate),
             *prologs, ROOT, str(int(SILENCE_TIMEOUT) + 2)],
            capture_output=True, text=True, timeout=GUARD,
        )
    finally:  # a prolog still at a gate goes on (and its agent finds no fedrun)
        for fifo in (gate, h1_gate):
            os.write(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), b"go\n")


@pytest.mark.parametrize("late", ["ready", "failing"])
def test_a_slow_host_neither_stops_the_ready_ones_nor_takes_their_name(tmp_path, late):
    """h1 is ready at once, h2 long after h1's agent would have given up on
    a fedrun that does not beat it yet; h2 then starts or fails."""
    then = "" if late == "ready" else 'echo "h2 gave up" >&2; exit 3\n'
    result = run_slow_host_session(tmp_path, "", "read line < {gate}\n" + then)
    assert "no word from fedrun" not in result.stderr
    if late == "ready":
        assert result.returncode == 0, result.stderr
        assert result.stdout == "sum 5050\n"
    else:
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            "fedrun: h2: the host agent exited before it was ready (status 3): h2 gave up"
        ), result.stderr
    pids = started_pids(result.stderr)
    assert "h1.agent" in pids
    assert gone_within(pids.values(), GUARD) == []


def test_a_host_that_fails_ends_the_start_without_waiting_for_a_slow_one(tmp_path):
    """h1 fails once fedrun reads h2's output (and so waits for its @ready:
    h1's failure takes a few processes' turns, fedrun's wait a few
    bytecodes), and h2 stays at its gate (never opened: h1's agent never
    beats): fedrun says so at once and ends h2's agent, which never said
    @ready, without waiting for it (READY_TIMEOUT is 60 s, the guard here)."""
    result = run_slow_host_session(
        tmp_path, 'read line < {h1_gate}\necho "h1 is broken" >&2; exit 4\n',
        "read line < {gate}\n",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "fedrun: h1: the host agent exited before it was ready (status 4): h1 is broken"
    ]


# -- signals during the teardown --------------------------------------------------------------

# Ignores SIGINT and SIGTERM, saying so each time.
STUBBORN_PROGRAM = """\
import os, signal
from futurefed import FederatedExecutor

def note(signum, frame):
    print("got", signum, flush=True)

signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
with FederatedExecutor() as executor:
    assert executor.submit(abs, -1).result() == 1
    print("ready", os.getpid(), flush=True)
    while True:
        signal.pause()
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_more_signals_during_the_teardown_end_a_stubborn_program(tmp_path, sig, status):
    """A program that ignores SIGINT and SIGTERM; the user signals fedrun
    again each time fedrun passes a signal on to it. Every signal after the
    first makes fedrun kill the program, and the teardown completes."""
    process = subprocess.Popen(
        fedrun(["-N", "1", "-v"], STUBBORN_PROGRAM, tmp_path), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    program, relayed, err_lines = None, [], []

    def signal_again():
        for line in process.stdout:
            if line.startswith("got ") and len(relayed) < 3 and process.poll() is None:
                relayed.append(int(line.split()[1]))
                process.send_signal(sig)  # the user insists

    readers = [threading.Thread(target=signal_again, daemon=True),
               threading.Thread(target=lambda: err_lines.extend(process.stderr), daemon=True)]
    try:
        ready, pid = process.stdout.readline().split()
        assert ready == "ready"
        program = int(pid)
        for reader in readers:
            reader.start()
        process.send_signal(sig)
        process.wait(GUARD)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if program is not None:
            for pid in wait_gone([program], 0):  # it survived fedrun: end it here
                os.kill(pid, signal.SIGKILL)
        for reader in readers:
            reader.join(GUARD)
    err = "".join(err_lines)
    assert process.returncode == status, err
    assert "Traceback" not in err
    assert relayed == [int(sig)], relayed  # fedrun passed it on once, then killed it
    pids = started_pids(err)
    assert len(pids) == 3
    assert gone_within([program, *pids.values()], GUARD) == []
