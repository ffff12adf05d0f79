"""The embedded federation lives and dies with its executor: no orphans on
shutdown, on ``with`` exit, at interpreter exit, on garbage collection, and
when the origin is killed with SIGKILL."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from futurefed import FederatedExecutor

from procs import wait_gone

GUARD = 60  # seconds; only reached on a deadlock
EXIT_BOUND = 10  # seconds within which children must be gone


def federation_pids(executor: FederatedExecutor) -> list:
    return list(executor._transport.federation.pids)


def run_origin(code: str, *, wait: bool = True) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_default_starts_one_broker_and_cpu_count_workers():
    with FederatedExecutor() as executor:
        pids = federation_pids(executor)
        assert len(pids) == 1 + os.cpu_count()
        worker_pids = set(executor.map(lambda _: os.getpid(), range(50)))
        assert worker_pids <= set(pids[1:])
    assert wait_gone(pids, EXIT_BOUND) == []


def test_shutdown_ends_every_process():
    executor = FederatedExecutor(max_workers=3)
    pids = federation_pids(executor)
    assert len(pids) == 4
    assert executor.submit(sum, [1, 2, 3]).result(timeout=GUARD) == 6
    executor.shutdown(wait=True)
    assert wait_gone(pids, EXIT_BOUND) == []


def test_shutdown_without_wait_finishes_work_then_ends_processes():
    executor = FederatedExecutor(max_workers=2)
    pids = federation_pids(executor)
    futures = [executor.submit(pow, 2, i) for i in range(100)]
    executor.shutdown(wait=False)
    assert [f.result(timeout=GUARD) for f in futures] == [2**i for i in range(100)]
    assert wait_gone(pids, EXIT_BOUND) == []


def test_garbage_collected_executor_ends_its_processes():
    executor = FederatedExecutor(max_workers=1)
    pids = federation_pids(executor)
    assert executor.submit(abs, -1).result(timeout=GUARD) == 1
    agent = executor._transport
    del executor
    gc.collect()
    agent.join(GUARD)
    assert not agent.is_alive()
    assert wait_gone(pids, EXIT_BOUND) == []


def test_interpreter_exit_finishes_work_and_ends_processes():
    origin = run_origin("""
        import json, os
        from futurefed import FederatedExecutor
        executor = FederatedExecutor(max_workers=2)
        print(json.dumps(executor._transport.federation.pids), flush=True)
        futures = [executor.submit(pow, 3, i) for i in range(20)]
        futures[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
        # no shutdown: interpreter exit must finish the work and clean up
    """)
    out, err = origin.communicate(timeout=GUARD)
    assert origin.returncode == 0, err
    lines = out.splitlines()
    pids = json.loads(lines[0])
    assert f"last {3**19}" in lines
    assert wait_gone(pids, EXIT_BOUND) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_origin_leaves_no_orphans(sig):
    origin = run_origin("""
        import json, os, sys, tempfile, time
        from futurefed import FederatedExecutor

        def sleep_forever(fifo):
            with open(fifo, "w") as signal:
                signal.write("asleep\\n")
            time.sleep(3600)

        fifo = os.path.join(tempfile.mkdtemp(), "fifo")
        os.mkfifo(fifo)
        executor = FederatedExecutor(max_workers=2)
        executor.submit(sleep_forever, fifo)
        with open(fifo) as signal:
            assert signal.readline() == "asleep\\n"  # a worker is inside the sleep
        federation = executor._transport.federation
        print(json.dumps([federation.pids, federation.runtime_dir]), flush=True)
        sys.stdin.read()  # until killed
    """)
    pids = []
    try:
        line = origin.stdout.readline()
        assert line, origin.stderr.read()
        pids, runtime_dir = json.loads(line)
        assert len(pids) == 3 and os.path.isdir(runtime_dir)
        os.kill(origin.pid, sig)
        origin.wait(GUARD)
        # One worker is inside time.sleep(3600): it must be ended all the same.
        leftovers = wait_gone(pids, EXIT_BOUND)
        assert leftovers == []
        # and the broker took the private directory of its sockets with it
        assert not os.path.exists(runtime_dir)
    finally:
        origin.kill()
        origin.communicate()
        for pid in wait_gone(pids, 0):
            os.kill(pid, signal.SIGKILL)


def test_join_existing_broker_by_address():
    with FederatedExecutor(max_workers=2) as owner:
        address = owner._transport.address
        with FederatedExecutor(address=address) as guest:
            assert guest._transport.federation is None
            assert list(guest.map(abs, [-1, -2, -3])) == [1, 2, 3]
        # the guest leaving does not stop the owner's federation
        assert owner.submit(abs, -4).result(timeout=GUARD) == 4


def test_no_lost_wakeup_between_bursts_and_round_trips(monkeypatch):
    # A lost wake-up leaves a submitted task waiting for the agent's poll
    # timeout; with that timeout made an hour, any lost wake-up trips the
    # guard. (The race once found here: the agent re-armed its wake-up before
    # draining the wake socket, so a submit in between went unnoticed.)
    from futurefed import _agent

    monkeypatch.setattr(_agent, "POLL_SECONDS", 3600)
    with FederatedExecutor(max_workers=2) as executor:
        for _ in range(3):
            assert list(executor.map(abs, range(-20_000, 0))) == list(range(20_000, 0, -1))
            for i in range(300):
                assert executor.submit(abs, -i).result(timeout=GUARD) == i


def test_a_forked_child_of_the_origin_does_not_keep_the_federation_alive():
    """The child inherits the lifeline's write end; it lets go of it at
    once, so the federation ends with shutdown() (not after a wait and a
    SIGKILL) and would end with the origin."""
    executor = FederatedExecutor(max_workers=1)
    assert executor.submit(abs, -1).result(timeout=GUARD) == 1
    federation = executor._transport.federation
    hold_r, hold_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits to be let go
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(hold_r)
    try:
        executor.shutdown()
        statuses = [process.wait(GUARD) for process in federation.processes]
        assert all(status >= 0 for status in statuses), statuses  # none killed
    finally:
        os.close(hold_w)  # end-of-file: the child exits
        os.waitpid(child, 0)


def test_a_program_with_more_than_1024_files_open_starts_a_federation():
    """select() cannot watch a descriptor above 1023: what waits on the
    broker's ready line (and a worker's lifeline) polls instead."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} open files allowed here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with FederatedExecutor(max_workers=1) as executor:
            assert executor.submit(abs, -2).result(timeout=GUARD) == 2
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
