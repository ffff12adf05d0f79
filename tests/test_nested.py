"""Tasks that submit tasks and wait on them never deadlock, even with one
worker: a waiting task parks its greenlet and the worker runs others."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from futurefed import FederatedExecutor
from test_executor_contract import arrive_and_wait

GUARD = 120  # seconds; only reached on a deadlock


def fib(n: int) -> int:
    if n < 2:
        return n
    executor = FederatedExecutor()
    left, right = executor.submit(fib, n - 1), executor.submit(fib, n - 2)
    return left.result() + right.result()


def fib_stdlib_wait(n: int) -> int:
    if n < 2:
        return n
    executor = FederatedExecutor()
    fs = [executor.submit(fib_stdlib_wait, n - 1), executor.submit(fib_stdlib_wait, n - 2)]
    done, not_done = cf.wait(fs, return_when=cf.ALL_COMPLETED)
    assert not not_done
    return sum(f.result() for f in cf.as_completed(fs))


def squares_by_map(n: int) -> list:
    return list(FederatedExecutor().map(pow, range(n), [2] * n))


def wait_with_timeout() -> str:
    executor = FederatedExecutor()
    slow = executor.submit(fib, 16)  # about 3,000 nested tasks: far beyond 10 ms
    try:
        slow.result(timeout=0.01)
    except cf.TimeoutError:
        outcome = "timed out"
    else:
        outcome = "finished"
    return f"{outcome} {slow.result()}"


def first_completed() -> int:
    executor = FederatedExecutor()
    fs = [executor.submit(pow, 3, i) for i in range(4)]
    done, _ = cf.wait(fs, return_when=cf.FIRST_COMPLETED)
    assert done
    cf.wait(fs)
    return sum(f.result() for f in fs)


def record(path: str, tag: str, value: int) -> int:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{tag}\n")
    return value


def cancel_children(path: str, n: int) -> list:
    """Submit ``n`` children, cancel each at once; what cancel() said and
    what each child gave."""
    executor = FederatedExecutor()
    children = [executor.submit(record, path, f"c{i}", i) for i in range(n)]
    said = [child.cancel() for child in children]
    return [
        (told, child.cancelled(), None if child.cancelled() else child.result())
        for told, child in zip(said, children)
    ]


def cancel_behind_a_busy_worker(gate: tuple, path: str) -> tuple:
    # On a fresh 2-worker federation: this task holds one worker, the
    # blocker the other, so ``queued`` waits at the broker and can be cancelled.
    executor = FederatedExecutor()
    blocker = executor.submit(arrive_and_wait, gate, "blocker", "B")
    queued = executor.submit(record, path, "queued", 1)
    return queued.cancel(), queued.cancelled(), blocker.running() or not blocker.done()


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def executor(request):
    with FederatedExecutor(max_workers=request.param) as executor:
        yield executor


def test_recursive_fib_by_futures(executor):
    assert executor.submit(fib, 18).result(timeout=GUARD) == 2584


def test_stdlib_wait_and_as_completed_inside_tasks(executor):
    assert executor.submit(fib_stdlib_wait, 10).result(timeout=GUARD) == 55


def test_map_inside_a_task(executor):
    assert executor.submit(squares_by_map, 30).result(timeout=GUARD) == [i * i for i in range(30)]


def test_first_completed_inside_a_task(executor):
    assert executor.submit(first_completed).result(timeout=GUARD) == 1 + 3 + 9 + 27


def test_result_timeout_inside_a_task(executor):
    assert executor.submit(wait_with_timeout).result(timeout=GUARD) == "timed out 987"


def test_nested_lambdas_and_closures(executor):
    def outer(k):
        inner = FederatedExecutor()
        return sum(inner.map(lambda x: x * k, range(5)))

    assert list(executor.map(outer, range(4))) == [10 * k for k in range(4)]


def test_cancel_inside_a_task(executor, tmp_path):
    # The task parks while the broker answers each cancel(); what it is
    # told must be true: a cancelled child never runs, the others do.
    ran = tmp_path / "ran.txt"
    outcomes = executor.submit(cancel_children, str(ran), 20).result(timeout=GUARD)
    executor.shutdown(wait=True)
    tags_run = set(ran.read_text().split()) if ran.exists() else set()
    for i, (told, cancelled, value) in enumerate(outcomes):
        assert told is cancelled
        if told:
            assert f"c{i}" not in tags_run
        else:
            assert value == i and f"c{i}" in tags_run


def test_cancel_inside_a_task_of_a_queued_child(rendezvous, tmp_path):
    ran = tmp_path / "ran.txt"
    with FederatedExecutor(max_workers=2) as executor:
        parent = executor.submit(cancel_behind_a_busy_worker, rendezvous.address, str(ran))
        assert parent.result(timeout=GUARD) == (True, True, True)
        rendezvous.wait(1)
        rendezvous.release()
    assert not ran.exists(), "the cancelled child ran"


# -- found by review: other threads, the hub waiting, time limits, GreenletExit ---------


def submit_from_a_thread(n: int) -> int:
    """Submit ``n`` children from a thread of the task's own, then wait."""
    import threading

    executor = FederatedExecutor()
    futures: list = []
    thread = threading.Thread(target=lambda: futures.extend(executor.submit(abs, -i)
                                                            for i in range(n)))
    thread.start()
    thread.join()  # the worker's hub waits too: the submissions must not need it
    return sum(future.result() for future in futures)


def test_children_submitted_from_a_tasks_thread_all_run(executor):
    assert executor.submit(submit_from_a_thread, 3000).result(timeout=GUARD) == sum(range(3000))


def callback_that_waits_in_the_hub() -> tuple:
    from futurefed.worker.green import GreenFuture, current_hub

    executor = FederatedExecutor()
    never = GreenFuture(0, current_hub().owner)  # nothing behind it: pending for ever
    child = executor.submit(abs, -1)  # pending: this task holds the hub
    said: list = []

    def callback(_):  # run by the hub when the child's result comes
        try:
            never.result()
        except RuntimeError as exc:
            said.append(str(exc))

    child.add_done_callback(callback)
    return child.result(), said


def test_a_done_callback_waiting_in_the_hub_is_told_it_cannot(executor):
    result, said = executor.submit(callback_that_waits_in_the_hub).result(timeout=GUARD)
    assert result == 1
    assert said == ["the worker's hub cannot wait on a pending future (from a done-callback, say)"]


def raise_greenlet_exit() -> None:
    import greenlet

    raise greenlet.GreenletExit("the task's own")


def test_a_task_that_raises_greenlet_exit_fails_with_it(executor):
    import greenlet

    with pytest.raises(greenlet.GreenletExit, match="the task's own"):
        executor.submit(raise_greenlet_exit).result(timeout=GUARD)
    assert executor.submit(abs, -5).result(timeout=GUARD) == 5  # the worker goes on


def spam_children(seconds: float) -> int:
    """Submit children for ``seconds`` without ever parking."""
    import time

    executor = FederatedExecutor()
    end, count = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        executor.submit(abs, -1)
        count += 1
    return count


def test_a_time_limit_stops_a_task_that_submits_without_parking(executor):
    """The watchdog, which stops it, reads the children it submitted while
    the task goes on adding more: it must not trip over them."""
    from futurefed.errors import TaskTimeout

    with pytest.raises(TaskTimeout):
        executor.options(timeout=1).submit(spam_children, 60).result(timeout=GUARD)
    assert executor.submit(abs, -6).result(timeout=GUARD) == 6


def mixed_wait(seconds: float) -> float:
    """stdlib wait() on a futurefed future and a thread pool's: seconds it took."""
    import time

    with cf.ThreadPoolExecutor(1) as pool:
        executor = FederatedExecutor()
        started = time.monotonic()
        cf.wait([executor.submit(abs, -1), pool.submit(time.sleep, seconds)])
        return time.monotonic() - started


def test_a_wait_on_a_thread_pools_future_inside_a_task_ends_when_it_is_done(monkeypatch):
    """The pool's thread settles its future: the worker's hub is woken for
    it, not at its next heartbeat (20 s here)."""
    monkeypatch.setenv("FUTUREFED_HEARTBEAT", "20")
    with FederatedExecutor(max_workers=1) as executor:
        assert executor.submit(mixed_wait, 0.1).result(timeout=GUARD) < 10
