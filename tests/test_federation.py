"""Several brokers sharing load (docs/federation.md), each broker and worker
a separate process started by environment variables, as a user would."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys


from futurefed import FederatedExecutor, WorkerLost

from fedprocs import GUARD
from test_executor_contract import arrive_and_wait


def worker_name(_: object = None) -> str:
    return os.environ["WORKER_NAME"]


def spin_work(iterations: int) -> str:
    """A fixed amount of CPU work (not a fixed time, which would hide a
    worker that shares its core with another)."""
    total = 0
    for i in range(iterations):
        total += i * i
    return os.environ["WORKER_NAME"]


def nested_sum(n: int) -> tuple:
    """A task that fans out to children and waits for them: wherever they run."""
    executor = FederatedExecutor()
    children = list(executor.map(worker_name, range(n)))
    return os.environ["WORKER_NAME"], children


def test_work_of_an_origin_without_workers_runs_on_peers(federation):
    a = federation.broker("A")
    for name in "BC":
        broker = federation.broker(name, peers=[a])
        for i in range(2):
            federation.worker(f"{name}.w{i}", broker)
    with FederatedExecutor(address=a.task) as executor:
        names = list(executor.map(worker_name, range(2000)))
    counts = collections.Counter(names)
    assert sum(counts.values()) == 2000
    assert {name[0] for name in counts} == {"B", "C"}, counts


def test_nested_tasks_across_brokers(federation):
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    federation.worker("B.w0", b)
    federation.worker("B.w1", b)
    with FederatedExecutor(address=a.task) as executor:
        results = list(executor.map(nested_sum, [20] * 6))
    assert len(results) == 6
    for parent, children in results:
        assert parent.startswith("B.") and len(children) == 20
        assert set(children) <= {"B.w0", "B.w1"}


def test_peer_learned_through_another_peers_meta_is_connected(federation):
    # C knows only B; B knows A. C must learn A from B's LOAD and link to A
    # itself: A's work then runs on C's worker although B has no worker.
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    c = federation.broker("C", peers=[b])
    federation.worker("C.w0", c)
    with FederatedExecutor(address=a.task) as executor:
        names = set(executor.map(worker_name, range(200)))
    assert names == {"C.w0"}
    c.process.wait_for(rf"linked to peer {a.task}")


def test_broker_and_workers_joining_mid_run_get_work(federation, rendezvous):
    a = federation.broker("A")
    with FederatedExecutor(address=a.task) as executor:
        fs = [executor.submit(worker_name) for _ in range(100)]
        assert not any(f.done() for f in fs)  # nobody to run them yet
        b = federation.broker("B", peers=[a])
        federation.worker("B.w0", b)
        assert {f.result(timeout=GUARD) for f in fs} == {"B.w0"}
        # a worker joining the origin's own broker gets work too: two held
        # tasks can only both run if A.w0 and B.w0 each have one
        federation.worker("A.w0", a)
        held = [executor.submit(held_where, rendezvous.address, i) for i in range(2)]
        assert sorted(rendezvous.wait(2)) == ["A.w0", "B.w0"]
        rendezvous.release()
        assert sorted(f.result(GUARD) for f in held) == ["A.w0", "B.w0"]


def held_where(address: str, _: int) -> str:
    """Arrive at the test's rendezvous as this worker, and wait there."""
    name = os.environ["WORKER_NAME"]
    arrive_and_wait(address, name)
    return name


def test_cpu_bound_map_keeps_every_worker_busy(federation, rendezvous):
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    c = federation.broker("C", peers=[a, b])
    for broker in (a, b, c):
        federation.worker(f"{broker.name}.w0", broker)
    with FederatedExecutor(address=a.task) as executor:
        list(executor.map(spin_work, [1000] * 30))  # every worker connected and warm
        # three tasks that can only all be running at once if each of the
        # three workers, one per broker, has one: the origin's broker lends
        # what its own worker cannot start (a timing-free check of spreading)
        held = [executor.submit(held_where, rendezvous.address, i) for i in range(3)]
        assert sorted(rendezvous.wait(3)) == ["A.w0", "B.w0", "C.w0"]
        rendezvous.release()
        assert sorted(f.result(GUARD) for f in held) == ["A.w0", "B.w0", "C.w0"]
        names = collections.Counter(executor.map(spin_work, [300_000] * 60))
    # how the CPU-bound map spread depends on timing on a shared machine
    # (benchmarks/bench_federation.py measures it); here: all of it ran
    assert sum(names.values()) == 60 and set(names) <= {"A.w0", "B.w0", "C.w0"}, names


ORIGIN_PROGRAM = """\
import os
from futurefed import FederatedExecutor

def where(_):
    return os.environ["WORKER_NAME"]

with FederatedExecutor() as executor:
    print(" ".join(sorted(set(executor.map(where, range(300))))))
"""


def test_origin_program_joins_by_environment_alone(federation, tmp_path):
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    federation.worker("B.w0", b)
    federation.worker("B.w1", b)
    program = tmp_path / "prog.py"
    program.write_text(ORIGIN_PROGRAM)
    result = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=GUARD,
        env=dict(os.environ, IS_ORIGIN="1", BROKER_ADDRESS=a.task),
    )
    assert result.returncode == 0, result.stderr + federation.log()
    assert result.stdout.split() == ["B.w0", "B.w1"]


def kill_own_worker() -> None:
    print(f"{os.environ['WORKER_NAME']} goes", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def test_how_a_worker_ended_reaches_an_origin_on_another_broker(federation, monkeypatch):
    """The origin joins A; the task runs on B's worker, whose parent (this
    test, as a supervisor) reports its death to B. B's LOST record travels
    back through A unchanged: WorkerLost names the signal and the stderr."""
    from futurefed.supervisor import report_exit

    monkeypatch.setenv("FUTUREFED_MAX_RETRIES", "0")
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    worker = federation.worker("B.w0", b)
    with FederatedExecutor(address=a.task) as executor:
        assert executor.submit(worker_name).result(timeout=GUARD) == "B.w0"
        future = executor.submit(kill_own_worker)
        status = worker.popen.wait(GUARD)
        worker.close()  # its stderr, to the end
        lines = [line.rstrip("\n") for line in worker.lines]
        report_exit(b.task, "B.w0", worker.pid, status, lines)
        error = future.exception(timeout=GUARD)
    assert isinstance(error, WorkerLost), error
    assert (error.host, error.worker, error.pid) == (socket.gethostname(), "B.w0", worker.pid)
    assert error.exit_status == -9 and error.signal == 9
    assert error.stderr_tail[-1] == "B.w0 goes"
    assert error.reason == "killed by SIGKILL (its supervisor saw it end)"
    b.process.wait_for(r"<worker B.w0 on .*> lost: killed by SIGKILL \(its supervisor saw it end\)")
