"""Failures on the embedded federation, with real processes and signals:
nothing is lost, nothing is delivered twice, and each failure is noticed
within LIVENESS heartbeats (FUTUREFED_HEARTBEAT is short here)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import time

import pytest

from futurefed import FederatedExecutor, FederationLost, WorkerLost

from procs import wait_gone

GUARD = 60
BEAT = 0.2  # seconds; a peer silent for 3 beats is lost


@pytest.fixture(autouse=True)
def short_heartbeat(monkeypatch):
    monkeypatch.setenv("FUTUREFED_HEARTBEAT", str(BEAT))


def slow_square(x: int) -> tuple:
    time.sleep(0.005)
    return x * x, os.getpid()


def kill_self(x: int) -> int:
    os._exit(7)


def square_or_die(x: int) -> int:
    if x == 3:
        print(f"dying of {x}", file=sys.stderr, flush=True)
        os._exit(7)
    return x * x


def worker_pids(executor) -> list:
    federation = executor._transport.federation
    return [p.pid for p in federation.processes[1:] if p.poll() is None]


def test_sigkill_of_workers_during_a_map_loses_nothing():
    with FederatedExecutor(max_workers=2) as executor:
        fs = [executor.submit(slow_square, i) for i in range(600)]
        killed = []
        for done, future in enumerate(cf.as_completed(fs, timeout=GUARD)):
            if done in (100, 300) and len(killed) < 2:
                victim = worker_pids(executor)[0]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        assert sorted(f.result()[0] for f in fs) == sorted(i * i for i in range(600))
        ran_on = {f.result()[1] for f in fs}
        assert ran_on - set(killed)  # the survivors and the replacements did the rest
        assert len(worker_pids(executor)) == 2  # the pool kept its size
        assert executor._transport.federation.replaced == 2


def await_load(meta_address: str, condition, timeout: float = GUARD) -> dict:
    """The first LOAD the broker publishes that meets ``condition``."""
    from futurefed.status import await_load as first_load

    load = first_load(meta_address, condition, timeout)
    if load is None:
        raise AssertionError(f"no LOAD from {meta_address} met the condition within {timeout} s")
    return load


def test_a_hung_worker_is_noticed_and_its_tasks_run_elsewhere():
    with FederatedExecutor(max_workers=2) as executor:
        federation = executor._transport.federation
        await_load(federation.meta_address, lambda load: load["workers"] == 2)
        assert sorted(executor.map(abs, range(-20, 0))) == list(range(1, 21))
        victim = worker_pids(executor)[0]
        # work in flight at both workers when one hangs
        fs = [executor.submit(slow_square, i) for i in range(200)]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await_load(federation.meta_address, lambda load: load["workers"] == 1)
            detected = time.monotonic() - stopped
            assert [f.result(timeout=GUARD)[0] for f in fs] == [i * i for i in range(200)]
        finally:
            os.kill(victim, signal.SIGCONT)
        # noticed within a few heartbeats (LIVENESS = 3), not at GUARD
        assert detected < BEAT * 3 * 3, detected
        # the woken worker hears nothing from a broker that dropped it, and
        # joins it again as a new session (its old tasks ran elsewhere): the
        # pool is whole again without a replacement
        await_load(federation.meta_address, lambda load: load["workers"] == 2)
        assert victim in worker_pids(executor) and federation.replaced == 0
        assert sorted(executor.map(abs, range(-20, 0))) == list(range(1, 21))


def test_a_task_that_kills_every_worker_fails_with_worker_lost(monkeypatch):
    monkeypatch.setenv("FUTUREFED_MAX_RETRIES", "1")
    with FederatedExecutor(max_workers=2) as executor:
        results = list(executor.map(abs, range(10)))
        assert results == list(range(10))
        fs = [executor.submit(square_or_die, i) for i in range(6)]
        for i, future in enumerate(fs):
            if i == 3:
                with pytest.raises(WorkerLost) as caught:
                    future.result(timeout=GUARD)
                error = caught.value
                assert error.pid in executor._transport.federation.pids
                assert error.worker.startswith("local-") and error.host == os.uname().nodename
                assert "2 times" in str(error)
                # the embedded federation started it, saw it end and told the
                # broker at once: how it ended, its last words
                assert error.exit_status == 7 and "exited with status 7" in str(error)
                assert error.reason.endswith("(its supervisor saw it end)")
                assert error.stderr_tail[-1] == "dying of 3"
            else:
                assert future.result(timeout=GUARD) == i * i
        assert executor.submit(abs, -5).result(timeout=GUARD) == 5  # the pool goes on


def break_the_workers_loop() -> None:
    """Make this worker's own loop fail (a bug in futurefed, as it were)
    before it sends this task's result."""
    from futurefed.worker.green import current_hub

    def fail() -> None:
        raise RuntimeError("a bug in the worker's loop")

    current_hub().owner._flush = fail


class Unprintable(Exception):
    """An error that can be neither pickled nor printed."""

    def __reduce__(self):
        raise RuntimeError("not picklable")

    def __str__(self):
        raise ValueError("not printable")


def raise_unprintable() -> None:
    raise Unprintable()


def test_a_task_that_breaks_its_workers_loop_is_not_handed_out_for_ever(monkeypatch):
    """A worker whose loop fails leaves without BYE, so the tasks it held
    count as lost with it: after max_retries they fail with WorkerLost
    instead of crashing one worker after another."""
    monkeypatch.setenv("FUTUREFED_MAX_RETRIES", "1")
    with FederatedExecutor(max_workers=1) as executor:
        with pytest.raises(WorkerLost, match="2 times"):
            executor.submit(break_the_workers_loop).result(timeout=GUARD)
        assert executor.submit(abs, -5).result(timeout=GUARD) == 5  # the pool goes on


def test_an_error_neither_picklable_nor_printable_fails_only_its_future():
    from futurefed.errors import SerializationError

    with FederatedExecutor(max_workers=1) as executor:
        with pytest.raises(SerializationError, match=r"the task raised Unprintable\(<Unprintable"):
            executor.submit(raise_unprintable).result(timeout=GUARD)
        assert executor.submit(abs, -6).result(timeout=GUARD) == 6


def test_losing_the_broker_fails_every_pending_future_promptly():
    executor = FederatedExecutor(max_workers=1)
    try:
        blocked = [executor.submit(time.sleep, 30) for _ in range(3)]
        broker = executor._transport.federation.processes[0]
        started = time.monotonic()
        os.kill(broker.pid, signal.SIGKILL)
        for future in blocked:
            with pytest.raises(FederationLost, match="silent"):
                future.result(timeout=GUARD)
        assert time.monotonic() - started < 3 * BEAT * 5
        with pytest.raises(FederationLost):
            executor.submit(abs, 1)
    finally:
        executor.shutdown(wait=True)
    assert wait_gone(executor._transport.federation.pids, GUARD) == []


def test_a_worker_killed_every_second_loses_nothing():
    results = {}
    with FederatedExecutor(max_workers=2) as executor:
        federation = executor._transport.federation
        await_load(federation.meta_address, lambda load: load["workers"] == 2)
        done = __import__("threading").Event()
        killed = []

        def killer():
            while not done.wait(1.0):  # the failure schedule, not a synchronisation
                alive = worker_pids(executor)
                if alive:
                    os.kill(alive[0], signal.SIGKILL)
                    killed.append(alive[0])

        thread = __import__("threading").Thread(target=killer, daemon=True)
        thread.start()
        try:
            for i, (square, _) in enumerate(executor.map(slow_square, range(2000), timeout=GUARD)):
                results[i] = square
        finally:
            done.set()
            thread.join(GUARD)
    assert results == {i: i * i for i in range(2000)}
    assert len(killed) >= 2, killed


def test_a_peer_broker_killed_mid_map(federation, monkeypatch):
    """A (the origin's broker, no workers) lends to B and C; B dies by
    SIGKILL: A notices within a few heartbeats and C runs B's share."""
    monkeypatch.setenv("FUTUREFED_HEARTBEAT", str(BEAT))
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    c = federation.broker("C", peers=[a, b])
    for broker in (b, c):
        federation.worker(f"{broker.name}.w0", broker)
        federation.worker(f"{broker.name}.w1", broker)
    with FederatedExecutor(address=a.task) as executor:
        fs = [executor.submit(slow_square, i) for i in range(600)]
        for done, future in enumerate(cf.as_completed(fs, timeout=GUARD)):
            if done == 100:
                os.kill(b.process.pid, signal.SIGKILL)
        assert [f.result()[0] for f in fs] == [i * i for i in range(600)]
    a.process.wait_for(r"<broker B on .*> lost: silent for")


def test_workers_that_cannot_start_are_restarted_ever_more_slowly_then_break_the_executor(
        monkeypatch):
    """A worker that dies at once is replaced after 0.1 s, 0.2 s, 0.4 s...;
    when no more will be started, pending and later work fail with
    BrokenFederation instead of waiting for ever."""
    import time

    from futurefed import BrokenFederation, local

    monkeypatch.setattr(local, "MAX_REPLACEMENTS", 3)
    with FederatedExecutor(max_workers=1) as executor:
        assert executor.submit(abs, -1).result(timeout=GUARD) == 1
        federation = executor._transport.federation
        federation._python = "/bin/false"  # every replacement dies at once
        started = time.monotonic()
        os.kill(worker_pids(executor)[0], signal.SIGKILL)
        future = executor.submit(abs, -2)
        with pytest.raises(BrokenFederation, match="workers died 4 times"):
            future.result(timeout=GUARD)
        assert time.monotonic() - started >= 0.1 + 0.2  # two waits before the last two
        with pytest.raises(BrokenFederation):
            executor.submit(abs, -3)
