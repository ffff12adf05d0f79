"""The PEP 3148 ``concurrent.futures.Executor`` contract.

Every test here takes the ``flavour`` fixture (see conftest.py) and so runs
against both ``concurrent.futures.ProcessPoolExecutor`` ("ppe", which keeps
the tests honest) and ``futurefed.FederatedExecutor`` ("futurefed"). Tests
decorated with ``futurefed_only`` check promises ProcessPoolExecutor does not
make (lambdas, closures, RemoteTraceback, SerializationError, 256 MiB).

Rules the tests follow:

* No ``time.sleep`` in the test process to wait for something: tasks signal
  the test through the ``rendezvous`` fixture (a local TCP gate) or a file,
  and the test waits on that, on futures, or on threading events. Sleeps only
  appear inside tasks, to make them slow.
* Every timeout is a deadlock guard (``GUARD``) except where the test is
  about timeouts, and then the task is made slow or blocked far beyond it.
* Task functions live at module level so ProcessPoolExecutor's workers (fresh
  "spawn" interpreters) can import them by name.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import hashlib
import itertools
import os
import pickle
import random
import re
import socket
import threading
import time
import uuid
import weakref
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    BrokenExecutor,
    CancelledError,
    Future,
)
from concurrent.futures.process import BrokenProcessPool

import pytest

GUARD = 60  # seconds; only ever a deadlock guard

PPE = "ppe"
FUTUREFED = "futurefed"

#: Run a test against futurefed only (overrides the ``flavour`` fixture).
futurefed_only = pytest.mark.parametrize("flavour", [FUTUREFED])


def ff_errors():
    """``futurefed.errors``, imported only once a futurefed test really runs."""
    import futurefed.errors

    return futurefed.errors


# --------------------------------------------------------------------------
# Task functions and helpers that cross into the workers (module level).
# --------------------------------------------------------------------------


class CustomError(Exception):
    """An exception class the worker can only know by importing this module."""

    def __init__(self, message, code):
        super().__init__(message, code)


class Token:
    """A small weak-referenceable object to pass as an argument or result."""

    def __init__(self, value):
        self.value = value
        self.padding = bytearray(64 * 1024)


def add(a, b=0):
    return a + b


def square(x):
    return x * x


def power(base, exp):
    return base**exp


def identity(x):
    return x


def identity_kw(*, x):
    return x


def echo_call(*args, **kwargs):
    return args, kwargs


def sleep_then_return(seconds, value):
    time.sleep(seconds)
    return value


def fail_at(x, bad):
    if x == bad:
        raise CustomError("bad item", x)
    return x * 10


def raise_custom(message, code):
    raise CustomError(message, code)


def divide(a, b):
    return a / b


def lookup(mapping, key):
    return mapping[key]


def return_lock():
    return threading.Lock()


def token_value(token):
    return token.value


def make_token(value):
    return Token(value)


def checked_echo(data, digest):
    """Return ``data`` after checking it arrived intact."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError("argument corrupted in transit")
    return data


def checked_reverse(data, digest):
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError("argument corrupted in transit")
    return data[::-1]


def record(path, tag, value):
    """Append ``tag`` to the file at ``path`` (proof the task ran), return ``value``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{tag}\n")
    return value


def ran_tags(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def _rendezvous_connect(address, tag):
    sock = socket.create_connection(tuple(address), timeout=GUARD)
    sock.sendall(f"{tag}\n".encode())
    return sock


def arrive(address, tag, value=None):
    """Tell the test's rendezvous that this task runs; return ``value``."""
    _rendezvous_connect(address, tag).close()
    return value


def arrive_and_wait(address, tag, value=None):
    """Arrive at the rendezvous, block until the test releases it, return ``value``."""
    with _rendezvous_connect(address, tag) as sock:
        sock.recv(1)  # b"" once the test releases (closes) the gate
    return value


_INIT_CALLS: dict = {}


def init_record(token, value):
    """Initializer: remember ``value`` under ``token`` in this worker process."""
    _INIT_CALLS.setdefault(token, []).append(value)


def init_fail(message):
    raise CustomError(message, -1)


def report_init(token):
    return os.getpid(), list(_INIT_CALLS.get(token, []))


def report_init_at_rendezvous(address, token):
    arrive_and_wait(address, f"init-{os.getpid()}")
    return report_init(token)


def raise_custom_identifying(path):
    """Write this worker's hostname and pid to ``path``, then raise."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{socket.gethostname()}\n{os.getpid()}\n")
    raise CustomError("identified", 7)


def make_adder(n):
    def adder(x):
        return x + n

    return adder


def expected_broken_type(flavour):
    if flavour == PPE:
        return BrokenProcessPool
    return ff_errors().InitializerFailed


def flush(ex, tasks=1):
    """Submit ``tasks`` more tasks and wait until one of them has finished.

    The executor has then handled a message that was sent after everything
    that happened before this call, so bookkeeping for earlier tasks is
    finished (used instead of sleeping). With a task blocked on one worker,
    pass several: one may be queued behind the blocked task.
    """
    futures = [ex.submit(add, i, 1) for i in range(tasks)]
    done, _ = concurrent.futures.wait(futures, timeout=GUARD, return_when=FIRST_COMPLETED)
    assert done, "no flush task finished"
    for fut in done:
        assert fut.result() == futures.index(fut) + 1


# --------------------------------------------------------------------------
# Constructor
# --------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [0, -1])
def test_invalid_max_workers_raises_value_error(executor_factory, max_workers):
    with pytest.raises(ValueError):
        ex = executor_factory(max_workers)
        ex.shutdown(wait=False)  # only reached if the constructor wrongly accepted it


def test_default_max_workers_works(make_executor):
    ex = make_executor(max_workers=None)
    assert ex.submit(square, 9).result(timeout=GUARD) == 81


# --------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------


def test_submit_returns_stdlib_future(executor):
    fut = executor.submit(add, 2, 3)
    assert isinstance(fut, Future)
    assert fut.result(timeout=GUARD) == 5


def test_submit_passes_args_and_kwargs(executor):
    fut = executor.submit(echo_call, 1, "two", three=3, four=[4])
    assert fut.result(timeout=GUARD) == ((1, "two"), {"three": 3, "four": [4]})


def test_submit_fn_is_positional_only(executor):
    fut = executor.submit(echo_call, 1, fn="goes to the function", self="too")
    assert fut.result(timeout=GUARD) == ((1,), {"fn": "goes to the function", "self": "too"})


def test_module_level_function(executor):
    futures = [executor.submit(power, 2, n) for n in range(50)]
    assert [f.result(timeout=GUARD) for f in futures] == [2**n for n in range(50)]


def test_functools_partial(executor):
    assert executor.submit(functools.partial(add, b=100), 1).result(timeout=GUARD) == 101
    assert executor.submit(functools.partial(power, 3), 4).result(timeout=GUARD) == 81
    assert list(executor.map(functools.partial(power, exp=2), range(5))) == [0, 1, 4, 9, 16]


@futurefed_only
def test_lambda(executor):
    assert executor.submit(lambda x: x * 2, 21).result(timeout=GUARD) == 42
    assert list(executor.map(lambda x, y: x - y, [10, 20], [1, 2])) == [9, 18]
    assert executor.submit(functools.partial(lambda a, b: a + b, 40), 2).result(GUARD) == 42


@futurefed_only
def test_closure(executor):
    offset = 1000

    def local_function(x):
        return x + offset

    assert executor.submit(local_function, 1).result(timeout=GUARD) == 1001
    assert executor.submit(make_adder(5), 1).result(timeout=GUARD) == 6
    assert list(executor.map(make_adder(10), range(3))) == [10, 11, 12]


# --------------------------------------------------------------------------
# map
# --------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_results_in_input_order(executor, chunksize):
    # Early items sleep longest, so they finish last, yet come out first.
    delays = [0.08, 0.06, 0.04, 0.02, 0.0, 0.0, 0.0, 0.0]
    values = list(range(len(delays)))
    results = executor.map(sleep_then_return, delays, values, timeout=GUARD, chunksize=chunksize)
    assert list(results) == values


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_several_iterables_shortest_wins(executor, chunksize):
    assert list(executor.map(add, [1, 2, 3], [10, 20], chunksize=chunksize)) == [11, 22]
    assert list(executor.map(add, range(5), itertools.count(100), chunksize=chunksize)) == [
        100,
        102,
        104,
        106,
        108,
    ]
    assert list(executor.map(power, itertools.count(), [2, 2, 2], chunksize=chunksize)) == [
        0,
        1,
        4,
    ]


def test_map_chunksize_gives_same_results(executor):
    xs = list(range(103))
    ys = [x * 7 for x in xs]
    expected = [x + y for x, y in zip(xs, ys)]
    for chunksize in (1, 2, 7, 50, 1000):
        assert list(executor.map(add, xs, ys, timeout=GUARD, chunksize=chunksize)) == expected


@pytest.mark.parametrize("chunksize", [1, 5])
def test_map_empty_iterables(executor, chunksize):
    assert list(executor.map(square, [], chunksize=chunksize)) == []
    assert list(executor.map(add, [], [1, 2, 3], chunksize=chunksize)) == []
    assert list(executor.map(add, iter(()), itertools.count(), chunksize=chunksize)) == []


def test_map_collects_iterables_immediately(executor):
    consumed = []

    def numbers():
        for i in range(6):
            consumed.append(i)
            yield i

    results = executor.map(square, numbers())
    assert consumed == list(range(6))  # before the first result is asked for
    assert list(results) == [0, 1, 4, 9, 16, 25]


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_chunksize_below_one_raises_value_error(executor, chunksize):
    with pytest.raises(ValueError):
        executor.map(square, [1, 2, 3], chunksize=chunksize)


@pytest.mark.parametrize(
    ("chunksize", "bad"),
    [(1, 0), (1, 5), (3, 4), (3, 5), (3, 6), (4, 9)],
)
def test_map_error_raised_at_its_position(executor, flavour, chunksize, bad):
    n = 10
    results = executor.map(fail_at, range(n), itertools.repeat(bad), chunksize=chunksize)
    yielded = []
    with pytest.raises(CustomError) as info:
        for value in results:
            yielded.append(value)
    assert info.value.args == ("bad item", bad)
    if flavour == PPE and chunksize > 1:
        # Stdlib quirk: a failing chunk's result list is lost as a whole, so
        # ProcessPoolExecutor only yields the items of the chunks before it.
        good = bad - bad % chunksize
    else:
        good = bad
    assert yielded == [x * 10 for x in range(good)]


def test_map_timeout_raises(executor):
    # The task sleeps 5x the timeout, so its result cannot be ready in time.
    results = executor.map(sleep_then_return, [0.5], ["late"], timeout=0.1)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)


def test_map_timeout_not_hit_by_fast_tasks(executor):
    assert list(executor.map(square, range(20), timeout=GUARD)) == [x * x for x in range(20)]


def test_map_with_many_items(executor):
    n = 2000
    assert list(executor.map(add, range(n), range(n), chunksize=64)) == [2 * x for x in range(n)]


# --------------------------------------------------------------------------
# shutdown and the context manager
# --------------------------------------------------------------------------


def test_shutdown_wait_true_waits_for_pending_work(executor):
    futures = [executor.submit(sleep_then_return, 0.1, i) for i in range(6)]
    executor.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(6))


def test_shutdown_wait_false_returns_promptly_and_work_completes(executor, rendezvous):
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "blocker", "B")
    rendezvous.wait(1)
    queued = [executor.submit(square, i) for i in range(8)]

    # shutdown(wait=False) must return while a task is still blocked.
    returned = threading.Event()

    def call_shutdown():
        executor.shutdown(wait=False)
        returned.set()

    threading.Thread(target=call_shutdown, daemon=True).start()
    assert returned.wait(GUARD), "shutdown(wait=False) blocked on running work"
    assert not blocker.done()

    rendezvous.release()
    assert blocker.result(timeout=GUARD) == "B"
    assert [f.result(timeout=GUARD) for f in queued] == [i * i for i in range(8)]


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_cancel_futures_cancels_queued_work(executor, rendezvous, tmp_path, wait):
    ran = tmp_path / "ran.txt"
    blockers = [
        executor.submit(arrive_and_wait, rendezvous.address, f"blocker{i}", f"B{i}")
        for i in range(2)
    ]
    rendezvous.wait(2)  # both workers are now busy
    queued = [executor.submit(record, str(ran), f"q{i}", i) for i in range(20)]
    majority = len(queued) // 2 + 1

    # Release the blockers only once most queued futures are cancelled, so the
    # cancellation cannot race with the queue draining (no sleeping needed).
    cancelled_count = 0
    enough_cancelled = threading.Event()
    count_lock = threading.Lock()

    def on_done(fut):
        nonlocal cancelled_count
        if fut.cancelled():
            with count_lock:
                cancelled_count += 1
                if cancelled_count >= majority:
                    enough_cancelled.set()

    for fut in queued:
        fut.add_done_callback(on_done)

    def release_when_cancelled():
        enough_cancelled.wait(GUARD)
        rendezvous.release()

    releaser = threading.Thread(target=release_when_cancelled, daemon=True)
    releaser.start()

    executor.shutdown(wait=wait, cancel_futures=True)
    if wait:
        assert all(f.done() for f in blockers + queued)
    # Not concurrent.futures.wait(): the stdlib executors never "notify" the
    # futures shutdown cancels, so wait() would not count them as done
    # (CPython gh-109934, see test_wait_sees_futures_cancelled_by_shutdown).
    # result() does wake up on cancel().
    assert [f.result(timeout=GUARD) for f in blockers] == ["B0", "B1"]
    for i, fut in enumerate(queued):
        try:
            assert fut.result(timeout=GUARD) == i
        except CancelledError:
            pass
    releaser.join(GUARD)
    assert all(f.done() for f in blockers + queued)
    cancelled = [f for f in queued if f.cancelled()]
    assert len(cancelled) >= majority, f"only {len(cancelled)} of {len(queued)} cancelled"
    for i, fut in enumerate(queued):
        if not fut.cancelled():
            assert fut.result() == i
    executor.shutdown(wait=True)
    tags_run = ran_tags(ran)
    for i, fut in enumerate(queued):
        if fut.cancelled():
            assert f"q{i}" not in tags_run, f"cancelled task q{i} ran anyway"


@futurefed_only
def test_wait_sees_futures_cancelled_by_shutdown(executor, rendezvous):
    """wait() and as_completed() count futures cancelled by
    shutdown(cancel_futures=True) as done, as documented.

    futurefed only: the stdlib executors cancel them with Future.cancel()
    and never call set_running_or_notify_cancel(), so wait() puts them in
    not_done and as_completed() never yields them (CPython gh-109934,
    gh-87893). futurefed should notify them.
    """
    blockers = [
        executor.submit(arrive_and_wait, rendezvous.address, f"b{i}", i) for i in range(2)
    ]
    rendezvous.wait(2)
    queued = [executor.submit(square, i) for i in range(20)]
    executor.shutdown(wait=False, cancel_futures=True)
    rendezvous.release()
    assert [f.result(timeout=GUARD) for f in blockers] == [0, 1]
    executor.shutdown(wait=True)
    assert all(f.done() for f in queued)
    assert any(f.cancelled() for f in queued)
    done, not_done = concurrent.futures.wait(blockers + queued, timeout=0)
    assert not not_done, f"{len(not_done)} done futures reported as not done"
    seen = list(concurrent.futures.as_completed(blockers + queued, timeout=GUARD))
    assert len(seen) == len(blockers + queued)


def test_submit_after_shutdown_raises_runtime_error(executor):
    assert executor.submit(square, 2).result(timeout=GUARD) == 4
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square, 3)
    with pytest.raises(RuntimeError):
        executor.map(square, [1, 2])


def test_submit_after_shutdown_without_wait_raises_runtime_error(executor):
    executor.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        executor.submit(square, 3)


def test_shutdown_twice_is_fine(executor):
    fut = executor.submit(square, 5)
    executor.shutdown()
    executor.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    assert fut.result() == 25


def test_shutdown_unused_executor(executor):
    executor.shutdown()


def test_context_manager_shuts_down(make_executor):
    ex = make_executor()
    with ex as entered:
        assert entered is ex
        futures = [ex.submit(sleep_then_return, 0.05, i) for i in range(4)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(4))
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


# --------------------------------------------------------------------------
# initializer / initargs
# --------------------------------------------------------------------------


def test_initializer_runs_once_in_every_worker_before_tasks(make_executor, rendezvous):
    token = uuid.uuid4().hex
    ex = make_executor(initializer=init_record, initargs=(token, "configured"))

    # Two tasks that are running at the same time are on two workers.
    both = [ex.submit(report_init_at_rendezvous, rendezvous.address, token) for _ in range(2)]
    rendezvous.wait(2)
    rendezvous.release()
    results = [f.result(timeout=GUARD) for f in both]
    assert len({pid for pid, _ in results}) == 2
    assert all(calls == ["configured"] for _, calls in results), results

    more = [ex.submit(report_init, token) for _ in range(20)]
    for pid, calls in (f.result(timeout=GUARD) for f in more):
        assert calls == ["configured"], (pid, calls)


def test_failing_initializer_breaks_the_executor(make_executor, flavour):
    ex = make_executor(initializer=init_fail, initargs=("initializer exploded",))
    pending = [ex.submit(square, i) for i in range(4)]
    broken_type = expected_broken_type(flavour)
    for fut in pending:
        exc = fut.exception(timeout=GUARD)
        assert isinstance(exc, BrokenExecutor), repr(exc)
        assert isinstance(exc, broken_type), repr(exc)
        with pytest.raises(BrokenExecutor):
            fut.result()
    with pytest.raises(BrokenExecutor):
        ex.submit(square, 1)


# --------------------------------------------------------------------------
# Future state: cancel, done, running, cancelled, callbacks
# --------------------------------------------------------------------------


def test_running_future_state(executor, rendezvous):
    fut = executor.submit(arrive_and_wait, rendezvous.address, "running", "finished")
    rendezvous.wait(1)
    # A task submitted and finished after ours started: the executor has
    # heard by now that ours started.
    flush(executor, tasks=4)
    assert fut.running()
    assert not fut.done()
    assert not fut.cancelled()
    assert fut.cancel() is False
    assert fut.running() and not fut.cancelled()

    rendezvous.release()
    assert fut.result(timeout=GUARD) == "finished"
    assert fut.done()
    assert not fut.running()
    assert not fut.cancelled()
    assert fut.cancel() is False
    assert fut.exception() is None


def test_cancel_queued_future(executor, rendezvous, tmp_path):
    ran = tmp_path / "ran.txt"
    blockers = [
        executor.submit(arrive_and_wait, rendezvous.address, f"b{i}", i) for i in range(2)
    ]
    rendezvous.wait(2)  # both workers busy, so the work below is queued
    queued = [executor.submit(record, str(ran), f"q{i}", i) for i in range(10)]
    victim = queued[-1]

    calls = []
    victim.add_done_callback(calls.append)
    assert not victim.running()
    assert not victim.done()
    assert victim.cancel() is True
    assert victim.cancelled()
    assert victim.done()
    assert not victim.running()
    assert calls == [victim]  # cancel() runs the callbacks
    assert victim.cancel() is True  # cancelling again is harmless
    with pytest.raises(CancelledError):
        victim.result(timeout=0)
    with pytest.raises(CancelledError):
        victim.exception(timeout=0)

    rendezvous.release()
    assert [f.result(timeout=GUARD) for f in blockers] == [0, 1]
    assert [f.result(timeout=GUARD) for f in queued[:-1]] == list(range(9))
    executor.shutdown(wait=True)
    assert calls == [victim]
    tags_run = ran_tags(ran)
    assert "q9" not in tags_run, "a cancelled task ran anyway"
    assert sorted(tags_run) == sorted(f"q{i}" for i in range(9))


@pytest.mark.parametrize("round_", range(3))
def test_cancel_tells_the_truth_under_a_race(executor, tmp_path, round_):
    """Cancel tasks right at the edge of what the workers are taking:
    cancel() is True exactly for the futures that end cancelled, and no
    cancelled task ever runs."""
    ran = tmp_path / "ran.txt"
    list(executor.map(abs, range(200)))  # every worker up and taking work
    fs = [executor.submit(record, str(ran), f"t{i}", i) for i in range(300)]
    said = {}
    for i in range(0, len(fs), 3):
        concurrent.futures.wait([fs[i]], timeout=GUARD)
        for j in (i + 1, i + 2):
            said[j] = fs[j].cancel()
    executor.shutdown(wait=True)
    tags_run = set(ran_tags(ran))
    for j, told in said.items():
        fut = fs[j]
        assert fut.done()
        assert told is fut.cancelled(), f"t{j}: cancel() said {told}"
        if told:
            assert f"t{j}" not in tags_run, f"cancelled task t{j} ran anyway"
        else:
            assert fut.result() == j and f"t{j}" in tags_run


def test_cancel_from_a_done_callback(executor, rendezvous, tmp_path):
    """Cancelling other futures from a done-callback (run by the executor's
    own thread) neither deadlocks nor lets a cancelled task run."""
    ran = tmp_path / "ran.txt"
    first = executor.submit(arrive_and_wait, rendezvous.address, "first", "F")
    rendezvous.wait(1)
    rest = [executor.submit(record, str(ran), f"r{i}", i) for i in range(30)]
    callback_done = threading.Event()

    def cancel_rest(_):
        for fut in rest:
            fut.cancel()
        callback_done.set()

    first.add_done_callback(cancel_rest)
    rendezvous.release()
    assert first.result(timeout=GUARD) == "F"
    assert callback_done.wait(GUARD)
    executor.shutdown(wait=True)
    tags_run = set(ran_tags(ran))
    for i, fut in enumerate(rest):
        assert fut.done()
        if fut.cancelled():
            assert f"r{i}" not in tags_run, f"cancelled task r{i} ran anyway"
        else:
            assert fut.result() == i and f"r{i}" in tags_run


def test_done_callback_called_once_with_the_future(executor, rendezvous):
    calls = []
    called = threading.Event()

    def callback(fut):
        calls.append(fut)
        called.set()

    fut = executor.submit(arrive_and_wait, rendezvous.address, "cb", 42)
    rendezvous.wait(1)
    fut.add_done_callback(callback)
    assert not fut.done() and calls == []  # added while still pending
    rendezvous.release()
    assert fut.result(timeout=GUARD) == 42
    assert called.wait(GUARD)

    failing_calls = []
    failing_called = threading.Event()

    def failing_callback(f):
        failing_calls.append(f)
        failing_called.set()

    failing = executor.submit(raise_custom, "cb", 1)
    failing.add_done_callback(failing_callback)
    assert isinstance(failing.exception(timeout=GUARD), CustomError)
    assert failing_called.wait(GUARD)

    executor.shutdown(wait=True)
    assert len(calls) == 1 and calls[0] is fut
    assert len(failing_calls) == 1 and failing_calls[0] is failing


def test_done_callback_added_after_completion_is_called_at_once(executor):
    fut = executor.submit(square, 6)
    assert fut.result(timeout=GUARD) == 36
    calls = []
    fut.add_done_callback(calls.append)
    assert len(calls) == 1 and calls[0] is fut


# --------------------------------------------------------------------------
# concurrent.futures.wait and as_completed
# --------------------------------------------------------------------------


def test_wait_first_completed(executor, rendezvous):
    fast = executor.submit(square, 2)
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "w", None)
    done, not_done = concurrent.futures.wait(
        [blocker, fast], timeout=GUARD, return_when=FIRST_COMPLETED
    )
    assert fast in done
    assert blocker in not_done
    assert done | not_done == {blocker, fast}


def test_wait_first_exception(executor, rendezvous):
    ok = executor.submit(square, 3)
    bad = executor.submit(raise_custom, "first", 1)
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "w", None)
    done, not_done = concurrent.futures.wait(
        [ok, bad, blocker], timeout=GUARD, return_when=FIRST_EXCEPTION
    )
    assert bad in done
    assert blocker in not_done
    assert done | not_done == {ok, bad, blocker}


def test_wait_first_exception_without_exceptions_waits_for_all(executor):
    futures = [executor.submit(sleep_then_return, 0.01 * (i % 3), i) for i in range(8)]
    done, not_done = concurrent.futures.wait(futures, timeout=GUARD, return_when=FIRST_EXCEPTION)
    assert done == set(futures)
    assert not not_done


def test_wait_all_completed(executor):
    futures = [executor.submit(sleep_then_return, 0.01 * (i % 3), i) for i in range(8)]
    futures.append(executor.submit(raise_custom, "all", 2))
    done, not_done = concurrent.futures.wait(futures, timeout=GUARD, return_when=ALL_COMPLETED)
    assert done == set(futures)
    assert not not_done
    assert [f.result() for f in futures[:-1]] == list(range(8))


def test_wait_timeout(executor, rendezvous):
    fast = executor.submit(square, 4)
    assert fast.result(timeout=GUARD) == 16
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "w", None)
    done, not_done = concurrent.futures.wait([fast, blocker], timeout=0.2)
    assert done == {fast}
    assert not_done == {blocker}
    done, not_done = concurrent.futures.wait(
        [blocker], timeout=0.05, return_when=FIRST_COMPLETED
    )
    assert done == set()
    assert not_done == {blocker}


def test_as_completed_yields_every_future_once(executor):
    futures = [executor.submit(sleep_then_return, 0.01 * (i % 4), i) for i in range(30)]
    futures.append(executor.submit(raise_custom, "as_completed", 3))
    seen = list(concurrent.futures.as_completed(futures + futures[:5], timeout=GUARD))
    assert len(seen) == len(futures)
    assert set(seen) == set(futures)


def test_as_completed_yields_in_completion_order(executor, rendezvous):
    fast = executor.submit(square, 3)
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "ac", "slow")
    iterator = concurrent.futures.as_completed([blocker, fast], timeout=GUARD)
    assert next(iterator) is fast
    rendezvous.release()
    assert next(iterator) is blocker
    assert blocker.result() == "slow"
    with pytest.raises(StopIteration):
        next(iterator)


def test_as_completed_timeout(executor, rendezvous):
    fast = executor.submit(square, 5)
    assert fast.result(timeout=GUARD) == 25
    blocker = executor.submit(arrive_and_wait, rendezvous.address, "ac", None)
    iterator = concurrent.futures.as_completed([blocker, fast], timeout=0.2)
    assert next(iterator) is fast
    with pytest.raises(concurrent.futures.TimeoutError):
        next(iterator)


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


EXCEPTION_CASES = [
    pytest.param(raise_custom, ("custom", 42), CustomError, ("custom", 42), id="custom"),
    pytest.param(divide, (1, 0), ZeroDivisionError, ("division by zero",), id="zerodivision"),
    pytest.param(lookup, ({}, "missing"), KeyError, ("missing",), id="keyerror"),
]


@pytest.mark.parametrize(("fn", "args", "exc_type", "exc_args"), EXCEPTION_CASES)
def test_exception_keeps_type_and_args(executor, fn, args, exc_type, exc_args):
    fut = executor.submit(fn, *args)
    exc = fut.exception(timeout=GUARD)
    assert type(exc) is exc_type
    assert exc.args == exc_args
    with pytest.raises(exc_type) as info:
        fut.result()
    assert info.value.args == exc_args
    # The worker's traceback rides along as the cause.
    assert exc.__cause__ is not None
    assert fn.__name__ in str(exc.__cause__)
    # A failing task does not hurt the executor.
    assert executor.submit(add, 1, 2).result(timeout=GUARD) == 3


@futurefed_only
def test_remote_traceback_names_function_host_and_pid(executor, tmp_path):
    where = tmp_path / "where.txt"
    fut = executor.submit(raise_custom_identifying, str(where))
    exc = fut.exception(timeout=GUARD)
    assert type(exc) is CustomError
    assert exc.args == ("identified", 7)
    cause = exc.__cause__
    assert isinstance(cause, ff_errors().RemoteTraceback), repr(cause)
    text = str(cause)
    host, pid = where.read_text(encoding="utf-8").split()
    assert "raise_custom_identifying" in text
    assert host in text
    assert re.search(rf"\b{pid}\b", text), f"worker pid {pid} not in:\n{text}"


# --------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_unpicklable_argument(executor, flavour, how):
    lock = threading.Lock()
    try:
        if how == "positional":
            fut = executor.submit(identity, lock)
        else:
            fut = executor.submit(identity_kw, x=lock)
    except Exception as exc:  # noqa: BLE001
        error, raised_by_submit = exc, True
    else:
        error, raised_by_submit = fut.exception(timeout=GUARD), False
    assert isinstance(error, (pickle.PicklingError, TypeError)), repr(error)
    if flavour == FUTUREFED:
        assert raised_by_submit, "futurefed must refuse the argument in submit()"
        assert isinstance(error, ff_errors().SerializationError), repr(error)
    # The executor keeps working.
    assert executor.submit(add, 20, 22).result(timeout=GUARD) == 42
    assert list(executor.map(square, range(4))) == [0, 1, 4, 9]


def test_unpicklable_result_fails_only_that_future(executor, flavour):
    before = executor.submit(square, 3)
    bad = executor.submit(return_lock)
    error = bad.exception(timeout=GUARD)
    assert isinstance(error, (pickle.PicklingError, TypeError)), repr(error)
    if flavour == FUTUREFED:
        assert isinstance(error, ff_errors().SerializationError), repr(error)
    assert before.result(timeout=GUARD) == 9
    assert [executor.submit(square, i).result(timeout=GUARD) for i in range(3)] == [0, 1, 4]


# --------------------------------------------------------------------------
# Object lifetime
# --------------------------------------------------------------------------


def test_finished_task_argument_is_not_kept_alive(executor):
    arg = Token(17)
    ref = weakref.ref(arg)
    fut = executor.submit(token_value, arg)
    assert fut.result(timeout=GUARD) == 17
    del arg, fut
    flush(executor)
    gc.collect()
    assert ref() is None, "the executor still references a finished task's argument"


def test_finished_task_result_is_not_kept_alive(executor):
    fut = executor.submit(make_token, 23)
    result = fut.result(timeout=GUARD)
    assert isinstance(result, Token) and result.value == 23
    ref = weakref.ref(result)
    del result, fut
    flush(executor)
    gc.collect()
    assert ref() is None, "the executor still references a finished task's result"


def test_finished_map_arguments_and_results_are_not_kept_alive(executor):
    args = [Token(i) for i in range(5)]
    arg_refs = [weakref.ref(a) for a in args]
    assert list(executor.map(token_value, args)) == list(range(5))
    results = list(executor.map(make_token, range(5)))
    result_refs = [weakref.ref(r) for r in results]
    del args, results
    flush(executor)
    gc.collect()
    assert all(r() is None for r in arg_refs)
    assert all(r() is None for r in result_refs)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_lets_go_of_a_result_once_the_caller_drops_it(executor, chunksize):
    results = executor.map(make_token, range(5), chunksize=chunksize, timeout=GUARD)
    first = next(results)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None, "map's iterator still holds a result it has handed out"
    assert [token.value for token in results] == [1, 2, 3, 4]


def _executor_dropped(make_cycle):
    """Submit through an executor nothing else refers to, and return the
    future and the executor's agent."""
    import futurefed

    executor = futurefed.FederatedExecutor(max_workers=1)
    agent = executor._transport
    future = executor.submit(power, 2, 3)
    if make_cycle:
        executor.cycle = executor
    return future, agent


@futurefed_only
@pytest.mark.parametrize("make_cycle", [False, True], ids=["plain", "in-a-cycle"])
def test_a_dropped_executor_ends_its_federation_though_its_future_lives(flavour, make_cycle):
    """As with ProcessPoolExecutor, a future does not keep its executor
    alive: once the executor is collected (even from a reference cycle), its
    agent finishes the work and ends the embedded federation's processes."""
    future, agent = _executor_dropped(make_cycle)
    assert future.result(timeout=GUARD) == 8
    gc.collect()
    agent.join(GUARD)
    assert not agent.is_alive(), "the agent of a collected executor is still running"
    assert all(process.poll() is not None for process in agent.federation.processes)
    assert future.result() == 8


# --------------------------------------------------------------------------
# Large payloads
# --------------------------------------------------------------------------


def test_large_16mib_argument_and_result(executor):
    data = random.Random(16).randbytes(16 << 20)
    digest = hashlib.sha256(data).hexdigest()
    result = executor.submit(checked_reverse, data, digest).result(timeout=GUARD)
    assert type(result) is bytes
    assert len(result) == len(data)
    assert result == data[::-1]


@futurefed_only
def test_large_256mib_bytes_round_trip_futurefed_only(executor):
    rng = random.Random(256)
    data = b"".join(rng.randbytes(1 << 20) for _ in range(256))  # randbytes caps below 256 MiB
    digest = hashlib.sha256(data).hexdigest()
    fut = executor.submit(checked_echo, data, digest)
    result = fut.result(timeout=GUARD)
    del fut
    assert type(result) is bytes
    assert len(result) == len(data)
    assert hashlib.sha256(result).hexdigest() == digest
