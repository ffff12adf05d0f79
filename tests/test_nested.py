"""Tasks that submit tasks and wait on them never deadlock, even with one
worker: a waiting task parks its greenlet and the worker runs others."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from futurefed import FederatedExecutor

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
