"""Where a round trip's CPU goes: CPU time per sequential
``submit(noop).result()``, per process and thread, for futurefed (1 worker),
the bare ZeroMQ broker-hop floor (``zmq_floor.py``'s ``agent`` path) and
ProcessPoolExecutor (1 worker), in one run.

    python benchmarks/round_trip_cpu.py [--calls 5000] [--repeat 3]

Reads utime and stime of every thread from /proc (Linux only) before and
after ``--calls`` round trips, and prints microseconds per round trip, the
median of ``--repeat`` runs, with the p50 latency of each run. Thread names
say who did the work: ``python`` threads run Python (in the origin, the first
is the caller and the second futurefed's agent or the executor's manager),
``ZMQbg/IO/0`` is ZeroMQ's I/O thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Dict, List, Tuple

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zmq_floor  # noqa: E402  (this directory)

from futurefed import FederatedExecutor  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
Threads = Dict[str, Tuple[float, float]]  # "process/thread" -> (user s, system s)


def noop() -> None:
    return None


def thread_times(processes: Dict[str, int]) -> Threads:
    """User and system seconds of every thread of the named processes."""
    times: Threads = {}
    for label, pid in processes.items():
        names: Dict[str, int] = {}
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                    text = stat.read()
            except OSError:
                continue  # the thread ended meanwhile
            name = text[text.index("(") + 1 : text.rindex(")")]
            names[name] = names.get(name, 0) + 1
            fields = text.rsplit(")", 1)[1].split()
            key = f"{label} {name}#{names[name]}"
            times[key] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return times


def measure(call: Callable[[], None], processes: Dict[str, int], calls: int,
            repeat: int) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    """Median p50 latency (µs) and median CPU µs per call of each thread."""
    for _ in range(300):  # warm up: imports, connections, function blobs
        call()
    latencies: List[float] = []
    per_thread: Dict[str, List[Tuple[float, float]]] = {}
    for _ in range(repeat):
        before = thread_times(processes)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        after = thread_times(processes)
        latencies.append(statistics.median(samples) * 1e6)
        for key, (user, system) in after.items():
            user0, system0 = before.get(key, (0.0, 0.0))
            per_thread.setdefault(key, []).append(
                ((user - user0) / calls * 1e6, (system - system0) / calls * 1e6)
            )
    cpu = {
        key: (statistics.median(u for u, _ in runs), statistics.median(s for _, s in runs))
        for key, runs in per_thread.items()
    }
    return statistics.median(latencies), cpu


def report(name: str, p50: float, cpu: Dict[str, Tuple[float, float]]) -> None:
    total = sum(u + s for u, s in cpu.values())
    print(f"\n{name}: p50 {p50:.0f} µs, CPU {total:.0f} µs per round trip")
    for key, (user, system) in sorted(cpu.items()):
        if user + system >= 1.0:
            print(f"  {key:28s} user {user:6.1f}  sys {system:6.1f}  µs/round trip")


def children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def run_futurefed(calls: int, repeat: int) -> None:
    with FederatedExecutor(max_workers=1) as executor:
        worker = executor.submit(os.getpid).result()
        (broker,) = [pid for pid in children(os.getpid()) if pid != worker]
        processes = {"origin": os.getpid(), "broker": broker, "worker": worker}
        report("futurefed", *measure(lambda: executor.submit(noop).result(), processes,
                                     calls, repeat))


def run_floor(calls: int, repeat: int) -> None:
    ports: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    broker = multiprocessing.Process(target=zmq_floor.broker, args=(ports,), daemon=True)
    broker.start()
    port = ports.get(timeout=30)
    worker = multiprocessing.Process(target=zmq_floor.echo_worker, args=(port,), daemon=True)
    worker.start()
    ports.get(timeout=30)
    ctx = zmq.Context()
    try:
        call = zmq_floor.agent_caller(ctx, f"tcp://127.0.0.1:{port}")
        processes = {"origin": os.getpid(), "broker": broker.pid, "worker": worker.pid}
        report("floor (zmq_floor.py agent)", *measure(call, processes, calls, repeat))
    finally:
        for process in (broker, worker):
            process.terminate()
            process.join()


def run_ppe(calls: int, repeat: int) -> None:
    executor: Executor
    with ProcessPoolExecutor(max_workers=1) as executor:
        worker = executor.submit(os.getpid).result()
        processes = {"origin": os.getpid(), "worker": worker}
        report("ProcessPoolExecutor", *measure(lambda: executor.submit(noop).result(),
                                               processes, calls, repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir("/proc/self/task"):
        sys.exit("round_trip_cpu.py: needs Linux's /proc")
    run_futurefed(args.calls, args.repeat)
    run_floor(args.calls, args.repeat)
    run_ppe(args.calls, args.repeat)


if __name__ == "__main__":
    main()
