#!/usr/bin/env python3
"""How promptly futurefed stops a task: a time limit (``task_timeout``) on a
sleeping and on a spinning task, and ``cancel(force=True)`` of a running one.

Run ``python benchmarks/task_stop.py [--runs N]``; prints medians. After each
stop, a map over both workers checks that the pool is whole again.
"""

from __future__ import annotations

import argparse
import statistics
import time

from futurefed import FederatedExecutor, TaskTimeout

LIMIT = 0.5


def spin(seconds: float) -> float:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return seconds


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _ms(values: list) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms ({', '.join(f'{v * 1000:.0f}' for v in values)})"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--runs", type=int, default=5)
    runs = cli.parse_args().runs
    with FederatedExecutor(2, task_timeout=LIMIT) as executor:
        executor.submit(abs, 1).result()
        for fn in (sleepy, spin):
            late = []
            for _ in range(runs):
                started = time.monotonic()
                try:
                    executor.submit(fn, 30).result(60)
                except TaskTimeout:
                    late.append(time.monotonic() - started - LIMIT)
                assert list(executor.map(abs, range(-10, 0))) == list(range(10, 0, -1))
            print(f"{fn.__name__:>6}: TaskTimeout after the {LIMIT} s limit, {_ms(late)}")
        waits = []
        for _ in range(runs):
            future = executor.options(timeout=None).submit(spin, 30)
            while not future.running():  # STARTED arrives within a few ms
                time.sleep(0.005)
            started = time.monotonic()
            stopped = future.cancel(force=True)
            waits.append(time.monotonic() - started)
            assert stopped and future.cancelled()
            assert list(executor.map(abs, range(-10, 0))) == list(range(10, 0, -1))
        print(f"cancel(force=True) of a spinning task returned True, {_ms(waits)}")


if __name__ == "__main__":
    main()
