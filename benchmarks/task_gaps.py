"""Where the ``cpu`` scenario's time goes: 200 tasks that each spin for 20 ms
on 2 workers, with every task stamping when it started and ended on its
worker, for futurefed, ProcessPoolExecutor and the ZeroMQ floor
(``zmq_floor.FloorExecutor``), in one run.

    python benchmarks/task_gaps.py [--repeat 5] [--executors fed,ppe,floor]

A task spins on the clock, so whatever else runs on its CPU meanwhile does
not make it longer; the run is longer than 200 × 20 ms / 2 only by the time
each worker spends not running a task. That time is split, summed over the
workers, into the *head* (from the first submit to a worker's first task),
the *gaps* (between one task's end and the next one's start on a worker:
sending the result, getting the next task) and the *tail* (from a worker's
last task to the last result). Medians of ``--repeat`` runs, in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zmq_floor  # noqa: E402  (this directory)

TASKS = 200
TASK_SECONDS = 0.02
WORKERS = 2


def stamped_spin(index: int) -> Tuple[int, float, float]:
    """Spin for TASK_SECONDS; (pid, start, end) on the monotonic clock."""
    started = time.monotonic()
    deadline = time.perf_counter() + TASK_SECONDS
    while time.perf_counter() < deadline:
        pass
    return os.getpid(), started, time.monotonic()


def noop(x: object = None) -> object:
    return x


def one_run(executor: Executor) -> Tuple[float, float, float, float]:
    """Wall time (s), and head, gaps and tail (ms, summed over workers)."""
    list(executor.map(noop, range(2 * WORKERS)))
    begun = time.monotonic()
    futures = [executor.submit(stamped_spin, i) for i in range(TASKS)]
    stamps = [future.result(timeout=120) for future in futures]
    ended = time.monotonic()
    first: Dict[int, float] = {}
    last: Dict[int, float] = {}
    busy: Dict[int, float] = {}
    for pid, start, end in stamps:
        first[pid] = min(first.get(pid, start), start)
        last[pid] = max(last.get(pid, end), end)
        busy[pid] = busy.get(pid, 0.0) + end - start
    head = sum(start - begun for start in first.values())
    gaps = sum(last[pid] - first[pid] - busy[pid] for pid in busy)
    tail = sum(ended - end for end in last.values())
    return ended - begun, head * 1e3, gaps * 1e3, tail * 1e3


def make_futurefed() -> Executor:
    from futurefed import FederatedExecutor

    return FederatedExecutor(max_workers=WORKERS)


MAKERS: Dict[str, Tuple[str, Callable[[], Executor]]] = {
    "ppe": ("ProcessPoolExecutor", lambda: ProcessPoolExecutor(max_workers=WORKERS)),
    "floor": ("ZeroMQ floor", lambda: zmq_floor.FloorExecutor(WORKERS)),
    "fed": ("futurefed", make_futurefed),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--executors", default="ppe,floor,fed",
                        help="comma-separated, from: ppe, floor, fed (forking ones first)")
    args = parser.parse_args()
    keys = args.executors.split(",")
    unknown = set(keys) - set(MAKERS)
    if unknown:
        parser.error(f"unknown executors: {', '.join(sorted(unknown))}")
    ideal = TASKS * TASK_SECONDS / WORKERS
    print(f"{TASKS} tasks x {TASK_SECONDS * 1e3:.0f} ms on {WORKERS} workers"
          f" (ideal {ideal:.3f} s), cpus={os.cpu_count()}, medians of {args.repeat}")
    print(f"{'':20s} {'wall s':>7s} {'head ms':>8s} {'gaps ms':>8s} {'tail ms':>8s}"
          f" {'gap per task µs':>16s}")
    for key in keys:
        label, make = MAKERS[key]
        executor = make()
        try:
            runs: List[Tuple[float, float, float, float]] = [
                one_run(executor) for _ in range(args.repeat)
            ]
        finally:
            executor.shutdown()
        wall, head, gaps, tail = (statistics.median(column) for column in zip(*runs))
        per_gap = gaps / (TASKS - WORKERS) * 1e3
        print(f"{label:20s} {wall:7.3f} {head:8.1f} {gaps:8.1f} {tail:8.1f} {per_gap:16.0f}")


if __name__ == "__main__":
    main()
