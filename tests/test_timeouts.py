"""Per-task time limits and forced cancels, with real processes on loopback.

A task that runs past its limit fails with TaskTimeout; one that holds its
worker is stopped by that worker replacing itself (``exec`` of its own command
line: the pid stays), and the worker's other tasks run again, at no retry's
cost. ``cancel(force=True)`` stops a running task the same way.

Tasks tell the test that they run through the ``rendezvous`` fixture; the
only timeouts are the limits under test and deadlock guards.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import pickle
import re
import socket
import time

import pytest

from futurefed import ExecutorView, FederatedExecutor, TaskTimeout
from futurefed.errors import FutureFedError, RemoteTraceback

from test_executor_contract import arrive, arrive_and_wait, echo_call, ran_tags, record
from test_faults import await_load

GUARD = 60  # seconds; only ever a deadlock guard
LIMIT = 1.0  # the time limit under test, in seconds
#: A stopped task's future fails at most this long after its limit passed
#: (the watchdog looks every 0.05 s; the machine may be busy).
BOUND = 2.0
BEAT = 0.2  # seconds: lost peers are noticed fast, should anything go wrong


@pytest.fixture(autouse=True)
def short_heartbeat(monkeypatch):
    monkeypatch.setenv("FUTUREFED_HEARTBEAT", str(BEAT))


# -- tasks (module level: the workers import them by name) ------------------------------


def sleep_after_arriving(address, tag):
    """Tell the test we run, then hold the worker (a blocking call)."""
    arrive(address, tag)
    time.sleep(1000)
    return tag


def spin_after_arriving(address, tag):
    """Tell the test we run, then hold the worker (pure Python, no call)."""
    arrive(address, tag)
    while True:
        pass


def pid_of(_=None):
    return os.getpid()


def record_start_and_end(path, tag, child_path):
    """A parent: note its start, wait on a child, note its end."""
    record(path, f"{tag}-start", None)
    child = FederatedExecutor().submit(record, child_path, f"{tag}-child", 7)
    value = child.result()
    record(path, f"{tag}-end", None)
    return value


def wait_on_limited_child(seconds):
    """A parent whose child has a time limit and holds its worker."""
    child = FederatedExecutor().options(timeout=seconds).submit(time.sleep, 1000)
    return child.result()


def wait_on_a_child(address):
    """A parent that waits on a child holding some worker."""
    return FederatedExecutor().submit(sleep_after_arriving, address, "child").result()


def sleep_after_telling_the_pid(address):
    sleep_after_arriving(address, f"child {os.getpid()}")


def park_on_a_child(address):
    """Tell the test our pid, then wait on a child that holds its worker."""
    arrive(address, f"parent {os.getpid()}")
    return FederatedExecutor().submit(sleep_after_telling_the_pid, address).result()


def parent_of_a_blocked_child(address, path):
    child = FederatedExecutor().submit(sleep_after_arriving, address, "child")
    child.result()
    record(path, "parent-end", None)


def ten_times_or_sleep(x):
    if x == 3:
        time.sleep(1000)
    return x * 10


# -- helpers ------------------------------------------------------------------------------


def worker_pids(executor):
    return [p.pid for p in executor._transport.federation.processes[1:]]


def workers_back(executor, count):
    """Run tasks until they have used a worker that joined after what went
    before, and the broker counts ``count`` workers again."""
    federation = executor._transport.federation
    assert sorted(executor.map(abs, range(-20, 0), timeout=GUARD)) == list(range(1, 21))
    done = await_load(federation.meta_address, lambda load: True)["done"]
    await_load(federation.meta_address,
               lambda load: load["workers"] == count and load["done"] >= done)


def expect_timeout(future, started, limit=LIMIT):
    """``future`` fails with TaskTimeout, not early and not much later than
    ``limit`` after ``started``; the error."""
    error = future.exception(timeout=GUARD)
    elapsed = time.monotonic() - started
    assert isinstance(error, TaskTimeout), repr(error)
    assert limit * 0.8 <= elapsed <= limit + BOUND, elapsed
    return error


# -- time limits ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("task", [sleep_after_arriving, spin_after_arriving])
def test_a_task_past_its_limit_fails_and_the_pool_goes_on(rendezvous, workers, task):
    with FederatedExecutor(max_workers=workers) as executor:
        pids = worker_pids(executor)
        limited = executor.options(timeout=LIMIT)
        future = limited.submit(task, rendezvous.address, "slow")
        rendezvous.wait(1)
        started = time.monotonic()
        error = expect_timeout(future, started)
        assert isinstance(error, TimeoutError) and isinstance(error, cf.TimeoutError)
        assert isinstance(error, FutureFedError)
        assert error.function == task.__name__ and error.timeout == LIMIT
        assert error.host == socket.gethostname() and error.pid in pids
        assert error.worker.startswith(f"local-{os.getpid()}.w")
        assert f"{task.__name__} ran longer than its time limit of 1 s" in str(error)
        assert "replacing that worker" in str(error)
        # the traceback shows where the task was when it was stopped
        assert isinstance(error.__cause__, RemoteTraceback)
        assert task.__name__ in error.__cause__.tb and f"pid {error.pid}" in error.__cause__.tb
        # the pool keeps its size: the worker replaced itself, same process
        workers_back(executor, workers)
        assert worker_pids(executor) == pids and executor._transport.federation.replaced == 0
        assert all(p.poll() is None for p in executor._transport.federation.processes)
        assert limited.submit(abs, -3).result(timeout=GUARD) == 3


def test_the_other_tasks_of_a_replaced_worker_complete_once(rendezvous, tmp_path, monkeypatch):
    """One worker holds a parked parent, the limited task and a queued one
    when the limit passes: the parent and the queued task run again and are
    answered once each; no retry is counted (max_retries=0 would make a
    counted one fail with WorkerLost)."""
    monkeypatch.setenv("FUTUREFED_MAX_RETRIES", "0")
    log, child_log = tmp_path / "parent.txt", tmp_path / "child.txt"
    with FederatedExecutor(max_workers=1) as executor:
        assert executor.submit(pid_of).result(timeout=GUARD) == worker_pids(executor)[0]
        parent = executor.submit(record_start_and_end, str(log), "P", str(child_log))
        limited = executor.options(timeout=LIMIT).submit(sleep_after_arriving, rendezvous.address, "T")
        queued = executor.submit(record, str(log), "Q", 5)
        rendezvous.wait(1)  # T holds the only worker; P waits on its child, queued behind T
        started = time.monotonic()
        assert ran_tags(log) == ["P-start"] and not parent.done()
        expect_timeout(limited, started)
        assert parent.result(timeout=GUARD) == 7
        assert queued.result(timeout=GUARD) == 5
        workers_back(executor, 1)
    tags = ran_tags(log)
    assert sorted(tags) == ["P-end", "P-start", "P-start", "Q"]  # P ran again, once to the end
    assert ran_tags(child_log) == ["P-child"]  # the first child never ran: cancelled with its parent


def test_the_executor_default_and_views(rendezvous):
    with FederatedExecutor(max_workers=1, task_timeout=LIMIT) as executor:
        assert executor.task_timeout == LIMIT
        future = executor.submit(sleep_after_arriving, rendezvous.address, "default")
        rendezvous.wait(1)
        expect_timeout(future, time.monotonic())
        # a view without a limit: this one may run longer than the default
        unlimited = executor.options(timeout=None)
        assert isinstance(unlimited, ExecutorView) and isinstance(unlimited, cf.Executor)
        assert unlimited.timeout is None and executor.options().timeout == LIMIT
        assert unlimited.submit(time.sleep, LIMIT * 1.5).result(timeout=GUARD) is None
        # a view of a view keeps its limit unless told; map has one per task
        longer = unlimited.options(timeout=LIMIT * 3).options()
        assert longer.timeout == LIMIT * 3
        assert list(longer.map(pow, [2, 3], [2, 2], timeout=GUARD)) == [4, 9]


def test_the_limit_counts_from_the_start_not_the_queue():
    """A limited task queued behind a long one is not timed while it waits."""
    with FederatedExecutor(max_workers=1) as executor:
        started = time.monotonic()
        blocker = executor.submit(time.sleep, LIMIT * 1.5)  # holds the only worker
        limited = executor.options(timeout=LIMIT).submit(time.sleep, LIMIT / 2)
        assert limited.result(timeout=GUARD) is None and blocker.done()
        assert time.monotonic() - started >= LIMIT * 2  # it waited longer than its limit


def test_keywords_named_timeout_reach_the_function():
    with FederatedExecutor(max_workers=1, task_timeout=30) as executor:
        assert executor.submit(echo_call, 1, timeout=5).result(timeout=GUARD) == ((1,), {"timeout": 5})
        view = executor.options(timeout=20)
        assert view.submit(echo_call, timeout=None).result(timeout=GUARD) == ((), {"timeout": None})
        assert list(view.map(echo_call, [1], timeout=GUARD)) == [((1,), {})]


@pytest.mark.parametrize(
    "bad", [0, -1, 0.0, -0.5, math.nan, math.inf, -math.inf, 10**400, "5", True, [1], b"1"],
    ids=repr,
)
def test_invalid_time_limits_raise_value_error(bad):
    with pytest.raises(ValueError, match="task_timeout"):
        FederatedExecutor(max_workers=1, task_timeout=bad)


def test_invalid_view_time_limits_raise_value_error():
    with FederatedExecutor(max_workers=1) as executor:
        for bad in (0, -2, math.nan, math.inf, "1", False):
            with pytest.raises(ValueError, match="timeout"):
                executor.options(timeout=bad)
        assert executor.options(timeout=1).timeout == 1.0
        assert executor.options(timeout=0.25).options(timeout=None).timeout is None


def test_a_map_chunk_past_its_limit_keeps_the_items_before():
    with FederatedExecutor(max_workers=1) as executor:
        results = executor.options(timeout=LIMIT).map(ten_times_or_sleep, range(6), chunksize=3)
        assert [next(results) for _ in range(3)] == [0, 10, 20]
        with pytest.raises(TaskTimeout) as caught:
            next(results)
        assert caught.value.function == "ten_times_or_sleep"
        assert list(executor.map(ten_times_or_sleep, [4, 5])) == [40, 50]


def test_a_parent_waiting_on_its_limited_child_on_one_worker_fails_too():
    """With one worker the child holds the worker its parent is parked on:
    the parent cannot be resumed, so it fails with the child's TaskTimeout
    (run again, it would only wait on a new child again)."""
    with FederatedExecutor(max_workers=1) as executor:
        started = time.monotonic()
        parent = executor.submit(wait_on_limited_child, LIMIT)
        error = expect_timeout(parent, started)
        assert error.function == "sleep" and "replacing that worker" in str(error)
        workers_back(executor, 1)


def test_a_limited_parent_waiting_on_a_child_is_stopped(rendezvous):
    """A parked task past its limit is stopped in place (or, if its child
    holds the same worker, by replacing that worker); its child goes too."""
    with FederatedExecutor(max_workers=2) as executor:
        started = time.monotonic()
        parent = executor.options(timeout=LIMIT * 2).submit(wait_on_a_child, rendezvous.address)
        rendezvous.wait(1)
        error = expect_timeout(parent, started, LIMIT * 2)
        assert error.function == "wait_on_a_child"
        workers_back(executor, 2)


@pytest.mark.parametrize("how", ["time limit", "force cancel"])
def test_a_parked_task_is_stopped_in_place(rendezvous, how):
    """A task waiting on a child that runs on the other worker is stopped
    without replacing its own worker (its child's worker is replaced)."""
    with FederatedExecutor(max_workers=2) as executor:
        federation = executor._transport.federation
        # both workers idle, fresh (one task each at a time): the child of a
        # task parked on one goes to the other
        await_load(federation.meta_address, lambda load: load["workers"] == 2 and load["credit"] == 2)
        started = time.monotonic()
        limit = LIMIT if how == "time limit" else None
        parent = executor.options(timeout=limit).submit(park_on_a_child, rendezvous.address)
        tags = dict(tag.split() for tag in rendezvous.wait(2))
        assert tags["parent"] != tags["child"], tags
        if how == "time limit":
            error = expect_timeout(parent, started)
            assert error.pid == int(tags["parent"]) and "replacing" not in str(error)
        else:
            assert parent.cancel(force=True) is True
        workers_back(executor, 2)  # the child was stopped too, by replacing its worker
        status, tail = federation.exit_info(int(tags["parent"]))
        assert status is None and not any("replacing" in line for line in tail), tail


# -- cancel(force=True) -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_force_cancel_of_a_running_task(rendezvous, workers):
    with FederatedExecutor(max_workers=workers) as executor:
        pids = worker_pids(executor)
        future = executor.submit(sleep_after_arriving, rendezvous.address, "running")
        called = []
        future.add_done_callback(called.append)
        rendezvous.wait(1)
        assert future.cancel() is False  # unforced: it runs, as before
        assert future.running()
        assert future.cancel(force=True) is True
        assert future.cancelled() and future.done() and not future.running()
        assert called == [future]
        with pytest.raises(cf.CancelledError):
            future.result(timeout=0)
        assert cf.wait([future], timeout=0).done == {future}
        assert future.cancel(force=True) is True  # again: harmless
        workers_back(executor, workers)
        assert worker_pids(executor) == pids and executor._transport.federation.replaced == 0
        assert called == [future]


def test_force_cancel_of_a_queued_task_is_a_cancel(rendezvous, tmp_path):
    """Queued behind a task that holds the only worker: dropped, nothing
    replaced, the running task finishes."""
    ran = tmp_path / "ran.txt"
    with FederatedExecutor(max_workers=1) as executor:
        blocker = executor.submit(arrive_and_wait, rendezvous.address, "blocker", "B")
        rendezvous.wait(1)
        queued = [executor.submit(record, str(ran), f"q{i}", i) for i in range(3)]
        assert queued[1].cancel(force=True) is True
        assert queued[1].cancelled()
        rendezvous.release()
        assert blocker.result(timeout=GUARD) == "B"  # not stopped
        assert queued[0].result(timeout=GUARD) == 0 and queued[2].result(timeout=GUARD) == 2
    assert sorted(ran_tags(ran)) == ["q0", "q2"]


def test_force_cancel_of_a_finished_task_returns_false():
    with FederatedExecutor(max_workers=1) as executor:
        future = executor.submit(abs, -1)
        assert future.result(timeout=GUARD) == 1
        assert future.cancel(force=True) is False
        assert not future.cancelled() and future.result() == 1


def test_force_cancel_of_a_parent_stops_its_child(rendezvous, tmp_path):
    ran = tmp_path / "ran.txt"
    with FederatedExecutor(max_workers=2) as executor:
        parent = executor.submit(parent_of_a_blocked_child, rendezvous.address, str(ran))
        assert rendezvous.wait(1) == ["child"]
        assert parent.cancel(force=True) is True
        assert parent.cancelled()
        # the child, stopped too, frees its worker: both serve again
        workers_back(executor, 2)
    assert ran_tags(ran) == []


def test_force_cancel_many_at_once(rendezvous):
    with FederatedExecutor(max_workers=2) as executor:
        running = [executor.submit(sleep_after_arriving, rendezvous.address, f"r{i}") for i in range(2)]
        rendezvous.wait(2)
        queued = [executor.submit(abs, -i) for i in range(3)]
        from futurefed._future import cancel_all

        cancel_all(running + queued, force=True)
        assert all(f.cancelled() for f in running + queued)
        workers_back(executor, 2)


# -- hand-launched workers, errors ---------------------------------------------------------


def test_a_hand_launched_worker_replaces_itself(federation, rendezvous):
    broker = federation.broker("A")
    worker = federation.worker("A.w0", broker)
    with FederatedExecutor(address=broker.task) as executor:
        future = executor.options(timeout=LIMIT).submit(sleep_after_arriving, rendezvous.address, "t")
        rendezvous.wait(1)
        error = expect_timeout(future, time.monotonic())
        assert error.pid == worker.pid and error.worker == "A.w0"
        assert executor.submit(pid_of).result(timeout=GUARD) == worker.pid
    assert worker.popen.poll() is None  # the same process, not a new one
    joined = re.compile(rf"<worker A\.w0 on .* pid {worker.pid}> joined")
    with broker.process._changed:  # the broker saw it join twice: before, and as its replacement
        assert broker.process._changed.wait_for(
            lambda: sum(1 for line in broker.process.lines if joined.search(line)) >= 2, GUARD,
        ), federation.log()


def test_task_timeout_pickles_with_its_attributes():
    error = TaskTimeout("f ran too long", function="f", timeout=2.5, host="h", worker="w", pid=9)
    again = pickle.loads(pickle.dumps(error))
    assert (again.function, again.timeout, again.host, again.worker, again.pid) == ("f", 2.5, "h", "w", 9)
    assert str(again) == "f ran too long" and isinstance(again, TimeoutError)
