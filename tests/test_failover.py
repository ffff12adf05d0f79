"""A broker lost: its workers join another broker of the federation
(docs/federation.md, "A broker lost"). Brokers and workers are separate
processes started by environment variables, as a user starts them; brokers
die by signal. Waits are on log lines, results and process exits, each
with a deadline."""

from __future__ import annotations

import ast
import collections
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from futurefed import FederatedExecutor
from futurefed.worker.loop import LIVENESS

from fedprocs import GUARD, ROOT, TESTS, Process
from procs import wait_gone
from test_executor_contract import arrive_and_wait
from test_faults import await_load

BEAT = 0.2  # seconds; a peer silent for LIVENESS beats is lost


@pytest.fixture(autouse=True)
def short_heartbeat(monkeypatch):
    monkeypatch.setenv("FUTUREFED_HEARTBEAT", str(BEAT))


def where(i: int, seconds: float = 0.005) -> tuple:
    """(i * i, worker name, pid, when it started): what ran where."""
    started = time.time()
    time.sleep(seconds)
    return i * i, os.environ["WORKER_NAME"], os.getpid(), started


def closed_port_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def welcomed_worker(federation, name: str, broker, args=()):
    """A worker that has had its broker's WELCOME (so it knows the broker's
    peers), not merely one the broker has heard from."""
    worker = federation.worker(name, broker, args=["-v", *args])
    worker.wait_for(rf"worker {re.escape(name)}: joined broker {re.escape(broker.name)} at ")
    return worker


def joined(process, name: str, brokers: str = r"\S+") -> "re.Match[str]":
    """The log line of ``name`` joining another broker after a loss."""
    return process.wait_for(
        rf"worker {re.escape(name)}: joined broker ({brokers}) at (tcp://\S+),"
        rf" ([\d.]+) s after losing"
    )


def test_workers_of_a_killed_broker_join_another_and_get_work_at_once(federation):
    """Origin at A (no workers); B and C lend A their workers. B dies by
    SIGKILL mid-map: every result arrives once and right, and B's two worker
    processes, the same pids, go on running A's tasks from A or C."""
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    c = federation.broker("C", peers=[a, b])
    b_workers = {name: welcomed_worker(federation, name, b) for name in ("B.w0", "B.w1")}
    federation.worker("C.w0", c)
    total = 0
    with FederatedExecutor(address=a.task) as executor:
        fs = [executor.submit(where, i) for i in range(1000)]
        total += len(fs)
        for done, _ in enumerate(cf.as_completed(fs, timeout=GUARD)):
            if done == 100:
                killed_at = time.time()
                os.kill(b.process.pid, signal.SIGKILL)
        results = [f.result() for f in fs]
        assert [r[0] for r in results] == [i * i for i in range(1000)]
        moves = {name: joined(process, name, "A|C") for name, process in b_workers.items()}
        for process in b_workers.values():
            assert process.popen.poll() is None  # still the same process
        # Both run tasks again, from wherever they went: keep A busy until
        # each has been seen (a deadlock guard bounds it, not a sleep).
        deadline = time.monotonic() + GUARD
        def ran_since_the_kill(name: str) -> bool:
            return any(r[1] == name and r[3] > killed_at for r in results)

        while not all(ran_since_the_kill(name) for name in b_workers):
            assert time.monotonic() < deadline, collections.Counter(r[1] for r in results)
            more = list(executor.map(where, range(60), [0.01] * 60, timeout=GUARD))
            assert [r[0] for r in more] == [i * i for i in range(60)]
            total += len(more)
            results += more
    for name, process in b_workers.items():
        after = [r for r in results if r[1] == name and r[3] > killed_at]
        assert {r[2] for r in after} == {process.pid}
    # A delivered each result once: as many as the origin asked for
    assert await_load(a.meta, lambda load: load["done"] >= total)["done"] == total
    first = min(r[3] for r in results if r[1] in b_workers and r[3] > killed_at)
    print(
        f"\nB SIGKILLed; its workers joined {', '.join(m.group(1) for m in moves.values())}"
        f" in {', '.join(m.group(3) for m in moves.values())} s; first task of one"
        f" there {first - killed_at:.3f} s after the kill"
    )


@pytest.mark.parametrize("sig, reason", [
    (signal.SIGKILL, r"its connection closed"),
    (signal.SIGSTOP, r"silent for [\d.]+ s"),
], ids=["killed", "stopped"])
def test_a_worker_whose_only_broker_is_lost_tries_it_again_then_exits(
    federation, sig, reason
):
    a = federation.broker("A")
    worker = welcomed_worker(federation, "A.w0", a, args=["--connect-timeout", "1"])
    lost = time.monotonic()
    os.kill(a.process.pid, sig)
    try:
        status = worker.popen.wait(GUARD)
        elapsed = time.monotonic() - lost
    finally:
        if sig == signal.SIGSTOP:
            os.kill(a.process.pid, signal.SIGCONT)
    assert status == 1
    # lost after LIVENESS silent beats (noticed at the next turn, <= 1 beat),
    # then the 1 s of trying it again
    assert elapsed < (LIVENESS + 2) * BEAT + 1.0 + 2.0, elapsed
    worker.wait_for(
        rf"worker A.w0: broker A at {re.escape(a.task)} lost \({reason}\);"
        r" abandoned 0 tasks; trying 0 other brokers, then it again$"
    )
    message = (
        rf"broker A at {re.escape(a.task)} lost, and no broker took us within 1 s"
        rf" \(tried {re.escape(a.task)}"
    )
    worker.wait_for(rf"worker A.w0: {message}")
    worker.wait_for(rf"^fedworker: {message}")


def test_a_worker_rejoins_its_broker_when_it_comes_back(federation):
    """A broker that stood still (SIGSTOP: a hung host, a network cut)
    loses its worker; once it is back, the worker joins it again, as a new
    session, and runs its tasks: the pool keeps its size."""
    a = federation.broker("A")
    worker = welcomed_worker(federation, "A.w0", a, args=["--connect-timeout", "30"])
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        worker.wait_for(rf"worker A.w0: broker A at {re.escape(a.task)} lost \(silent for")
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    joined(worker, "A.w0", "A")
    pid = worker.popen.pid
    with FederatedExecutor(address=a.task) as executor:
        results = list(executor.map(where, range(20)))
    assert [r[0] for r in results] == [i * i for i in range(20)]
    assert {(r[1], r[2]) for r in results} == {("A.w0", pid)}
    assert worker.popen.poll() is None


def test_a_worker_that_knows_no_live_broker_exits_clearly(federation):
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    worker = welcomed_worker(federation, "B.w0", b, args=["--connect-timeout", "1"])
    os.kill(a.process.pid, signal.SIGKILL)
    federation.stop(a.process)
    lost = time.monotonic()
    os.kill(b.process.pid, signal.SIGKILL)
    assert worker.popen.wait(GUARD) == 1
    elapsed = time.monotonic() - lost
    assert 1.0 <= elapsed < 1.0 + 2.0, elapsed  # the connect timeout, then no more
    worker.wait_for(
        rf"worker B.w0: broker B at {re.escape(b.task)} lost \(its connection closed\);"
        r" abandoned 0 tasks; trying 1 other broker, then it again$"
    )
    message = (
        rf"broker B at {re.escape(b.task)} lost, and no broker took us within 1 s"
        rf" \(tried {re.escape(a.task)} {re.escape(b.task)}\)"
    )
    worker.wait_for(rf"worker B.w0: {message}; exiting")
    worker.wait_for(rf"^fedworker: {message}$")
    assert not any("Traceback" in line for line in worker.lines)


def test_a_worker_learns_of_brokers_that_join_later(federation):
    """B's worker joined when B knew no peer; A joins the federation later,
    B tells its worker, and the worker goes to A when B is lost."""
    b = federation.broker("B")
    worker = federation.worker("B.w0", b, args=["-v"])
    a = federation.broker("A", peers=[b])
    worker.wait_for(rf"worker B.w0: broker B names other brokers: {re.escape(a.task)}$")
    os.kill(b.process.pid, signal.SIGKILL)
    joined(worker, "B.w0", "A")
    with FederatedExecutor(address=a.task) as executor:
        assert executor.submit(where, 3).result(timeout=GUARD)[:3] == (9, "B.w0", worker.pid)


def test_a_worker_whose_broker_does_not_answer_tries_broker_addresses(federation):
    a = federation.broker("A")
    nowhere = closed_port_address()
    worker = federation.worker(
        "w0", a, wait=False, env={"BROKER_ADDRESS": nowhere, "BROKER_ADDRESSES": a.task}
    )
    worker.wait_for(
        rf"worker w0: joined broker A at {re.escape(a.task)} \(no answer at {re.escape(nowhere)}\)"
    )
    with FederatedExecutor(address=a.task) as executor:
        assert executor.submit(where, 4).result(timeout=GUARD)[:3] == (16, "w0", worker.pid)


def parent(address: str) -> tuple:
    """Waits on a child that blocks its worker until the test lets it go."""
    child = FederatedExecutor().submit(arrive_and_wait, address, os.environ["WORKER_NAME"], 7)
    return os.environ["WORKER_NAME"], os.getpid(), child.result()


def test_a_task_parked_when_its_broker_dies_is_abandoned_and_runs_again(federation, rendezvous):
    """B's only worker holds a parent task (parked on its child) and the
    child (blocking it) when B dies: the worker abandons both, joins A, and
    runs the parent again there, for one right result."""
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    worker = federation.worker("B.w0", b)
    with FederatedExecutor(address=a.task) as executor:
        future = executor.submit(parent, rendezvous.address)
        assert rendezvous.wait(1) == ["B.w0"]  # the child runs, its parent parked
        os.kill(b.process.pid, signal.SIGKILL)
        rendezvous.release()
        assert future.result(timeout=GUARD) == ("B.w0", worker.pid, 7)
    worker.wait_for(
        rf"worker B.w0: broker B at {re.escape(b.task)} lost \(its connection closed\);"
        r" abandoned 1 task; trying 1 other broker, then it again"
    )
    joined(worker, "B.w0", "A")


# -- fedrun's host agents --------------------------------------------------------------------


class HostAgent:
    """``python -m futurefed.launch.hostagent`` driven as fedrun drives it
    (docs/fedrun.md): lines on stdin, ``@`` lines read back."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "futurefed.launch.hostagent"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                [TESTS, ROOT, os.environ.get("PYTHONPATH", "")])),
        )
        self.lines: list = []
        self._changed = threading.Condition()
        self._done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._done.set()
            self._changed.notify_all()

    def _beat(self) -> None:
        while not self._done.wait(1.0):  # fedrun's heartbeat schedule
            self.send("@beat")

    def send(self, line: str) -> None:
        try:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # it ended

    def wait_for(self, pattern: str, timeout: float = GUARD) -> "re.Match[str]":
        regex = re.compile(pattern)

        def found():
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._done.is_set(), timeout)
            match = found()
        if match is None:
            raise AssertionError(f"the agent never said {pattern!r}:\n" + "\n".join(self.lines))
        return match

    def start(self, spec: dict) -> dict:
        self.send("@start " + json.dumps(spec))
        broker = json.loads(self.wait_for(r"^@broker (.*)$").group(1))
        self.wait_for(rf'^@joined {{"workers":{spec["workers"]}}}$')
        return broker

    def pid(self, name: str) -> int:
        return int(self.wait_for(rf"^@spawn {re.escape(name)} (\d+)$").group(1))

    def stop(self) -> None:
        self.send("@stop")
        try:
            self.popen.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.popen.wait(GUARD)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError("the host agent did not stop") from None
        self._done.wait(GUARD)


@pytest.fixture
def agents():
    started = []

    def start() -> HostAgent:
        agent = HostAgent()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def test_host_agent_workers_outlive_their_broker_and_a_replacement_finds_another(agents):
    """fedrun's agent on host h2 sees its broker die: its workers, the same
    processes, join h1's broker and are not replaced; a worker that dies
    after that is replaced by one that joins h1 through BROKER_ADDRESSES."""
    env = {"FUTUREFED_HEARTBEAT": str(BEAT)}
    h1, h2 = agents(), agents()
    spec = {"bind": "tcp://127.0.0.1:0", "advertise": None, "env": env}
    first = h1.start({**spec, "name": "h1", "peers": [], "workers": 0})
    h2.start({**spec, "name": "h2", "peers": [[first["task"], first["meta"]]], "workers": 2})
    workers = {name: h2.pid(name) for name in ("h2.w0", "h2.w1")}
    broker = h2.pid("h2.broker")
    os.kill(broker, signal.SIGKILL)
    h2.wait_for(r"^@exit h2\.broker -9$")
    for name in workers:
        h2.wait_for(rf"^@e {name} .*worker {name}: joined broker h1 at {re.escape(first['task'])},")
    with FederatedExecutor(address=first["task"]) as executor:
        seen: dict = {}
        deadline = time.monotonic() + GUARD
        while set(seen) != set(workers):
            assert time.monotonic() < deadline, seen
            seen.update((r[1], r[2]) for r in executor.map(where, range(40), [0.01] * 40))
    assert seen == workers  # the very processes the agent started
    assert not [line for line in h2.lines if line.startswith("@exit h2.w")]

    os.kill(workers["h2.w0"], signal.SIGKILL)
    h2.wait_for(r"^@exit h2\.w0 -9$")
    replacement = int(h2.wait_for(rf"^@spawn h2\.w0 (?!{workers['h2.w0']}$)(\d+)$").group(1))
    h2.wait_for(rf"^@e h2\.w0 .*worker h2\.w0: joined broker h1 at {re.escape(first['task'])}"
                r" \(no answer at tcp://127\.0\.0\.1:\d+\)")
    with FederatedExecutor(address=first["task"]) as executor:
        ran_on: set = set()
        deadline = time.monotonic() + GUARD
        while replacement not in ran_on:
            assert time.monotonic() < deadline, ran_on
            ran_on.update(r[2] for r in executor.map(where, range(40), [0.01] * 40))
    pids = [*workers.values(), replacement, broker]
    h2.stop()
    h1.stop()
    assert wait_gone(pids, GUARD) == []


SESSION = """\
import sys
from futurefed.launch.channels import AgentCommand, LocalChannel
from futurefed.launch.session import Plan, Session

program, gate, window, pythonpath = sys.argv[1:]
plan = Plan(program=[sys.executable, program, gate, window], workers=3, bind_host="127.0.0.1",
            env={"FUTUREFED_HEARTBEAT": "%s"}, verbose=True)
sys.exit(Session(plan, [LocalChannel("h1"), LocalChannel("h2")],
                 lambda channel: AgentCommand(env={"PYTHONPATH": pythonpath}),
                 lambda total, cores: [1, 2]).run())
""" % BEAT

H2_PROGRAM = """\
import os, sys, time
from futurefed import FederatedExecutor

def where(_):
    time.sleep(0.01)
    return os.environ["WORKER_NAME"], os.getpid()

def h2_workers(executor):
    seen, deadline = {}, time.monotonic() + 20  # a deadlock guard
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.update(r for r in executor.map(where, range(30)) if r[0].startswith("h2."))
    return sorted(seen.items())

with FederatedExecutor() as executor:
    print("before", h2_workers(executor), file=sys.stderr, flush=True)
    with open(sys.argv[1]) as gate:  # the test kills h2's broker, then opens it
        gate.readline()
    watch_until = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < watch_until:  # how long h2's workers must last
        list(executor.map(where, range(30)))
    print("after", h2_workers(executor), file=sys.stderr, flush=True)
"""


def test_a_fedrun_session_keeps_the_workers_of_a_host_whose_broker_died(tmp_path):
    """Two host agents on this machine, as fedrun runs them (h1 has the
    program's broker). h2's broker dies: fedrun goes on heartbeating h2's
    agent, whose workers, the same processes, serve h1's broker for longer
    than an agent's silence timeout, and the session ends cleanly."""
    from futurefed.launch.hostagent import SILENCE_TIMEOUT

    program, gate = tmp_path / "prog.py", tmp_path / "gate"
    program.write_text(H2_PROGRAM)
    os.mkfifo(gate)
    popen = subprocess.Popen(
        [sys.executable, "-c", SESSION, str(program), str(gate), str(SILENCE_TIMEOUT + 1.5), ROOT],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    fedrun = Process("fedrun", popen)
    gate_fd = -1
    try:
        before = ast.literal_eval(fedrun.wait_for(r"^before (.*)$").group(1))
        assert [name for name, _ in before] == ["h2.w0", "h2.w1"]
        broker = int(fedrun.wait_for(r"fedrun: h2: started h2\.broker \(pid (\d+)\)").group(1))
        os.kill(broker, signal.SIGKILL)
        fedrun.wait_for(
            r"fedrun: h2: the broker exited with status -9; its tasks run again on the other"
            r" hosts and its workers join their brokers"
        )
        gate_fd = os.open(gate, os.O_RDWR)  # never blocks; the program reads the line
        os.write(gate_fd, b"go\n")
        assert popen.wait(GUARD) == 0, "".join(fedrun.lines)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
        if gate_fd != -1:
            os.close(gate_fd)
        fedrun.close()
    after = ast.literal_eval(fedrun.wait_for(r"^after (.*)$").group(1))
    assert after == before, "".join(fedrun.lines)  # the same processes, still serving
    log = "".join(fedrun.lines)
    assert not re.search(r"fedrun: h2: worker \S+ exited", log), log  # none replaced
    pids = [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", log)]
    assert len(pids) == 2 + 2 + 3  # agents, brokers, workers
    assert wait_gone(pids, GUARD) == []
