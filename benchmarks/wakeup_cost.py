"""What waking another thread or process costs on this machine, and what
the first calls after a 20 ms task cost: the two things that set the floor
of futurefed's latency and of its cost per task (benchmarks/README.md,
"Where the time goes").

    python benchmarks/wakeup_cost.py [--rounds 300]

Prints medians in microseconds:

- round trips between two processes over pipes, free to run on any CPU and
  pinned to one CPU (waking a sleeping process on an idle CPU versus on the
  CPU that is about to sleep);
- the cost to the caller, right after 20 ms of computing and back to back,
  of a system call, a pipe write that wakes a sleeping thread, a ZeroMQ send
  (which wakes ZeroMQ's I/O thread) and pickling a small tuple.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import threading
import time
from typing import Callable, List, Optional, Set

import zmq


def spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def ping_pong(rounds: int, cpus: Optional[Set[int]]) -> float:
    """Median round trip (µs) of one byte between two processes over pipes."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo process
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        while True:
            byte = os.read(to_child_r, 1)
            if byte in (b"", b"q"):
                os._exit(0)
            os.write(to_parent_w, byte)
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    samples = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            os.write(to_child_w, b"x")
            os.read(to_parent_r, 1)
            samples.append(time.perf_counter() - started)
    finally:
        os.write(to_child_w, b"q")
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, before)
        for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
            os.close(fd)
    return statistics.median(samples[rounds // 10:]) * 1e6


def cost(operation: Callable[[], object], rounds: int, after_work: bool) -> float:
    """Median µs of ``operation``, each right after 20 ms of computing or
    right after the previous one."""
    samples: List[float] = []
    for _ in range(rounds):
        if after_work:
            spin(0.02)
        started = time.perf_counter()
        operation()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    rounds = args.rounds
    one_cpu = {min(os.sched_getaffinity(0))}
    print(f"cpus={os.cpu_count()}  rounds={rounds}  (medians, µs)")
    print(f"process round trip over pipes, any CPU     {ping_pong(rounds * 5, None):8.1f}")
    print(f"process round trip over pipes, one CPU     {ping_pong(rounds * 5, one_cpu):8.1f}")

    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    port = sender.bind_to_random_port("tcp://127.0.0.1")
    receiver.connect(f"tcp://127.0.0.1:{port}")
    sender.send(b"x")
    receiver.recv()
    drain_stop = threading.Event()

    def drain() -> None:  # keeps the receiving side empty, in C mostly
        while not drain_stop.is_set():
            if receiver.poll(100):
                receiver.recv_multipart()

    pipe_r, pipe_w = os.pipe()
    reader = threading.Thread(target=lambda: [os.read(pipe_r, 4096) for _ in iter(int, 1)],
                              daemon=True)
    reader.start()
    draining = threading.Thread(target=drain, daemon=True)
    draining.start()
    operations = {
        "getppid() system call": os.getppid,
        "pipe write waking a sleeping thread": lambda: os.write(pipe_w, b"x" * 64),
        "ZeroMQ send (wakes its I/O thread)": lambda: sender.send_multipart([b"h", b"x" * 64]),
        "pickle.dumps((1, {'a': 1}))": lambda: pickle.dumps((1, {"a": 1}), protocol=5),
    }
    print(f"{'':43s}{'after 20 ms':>12s}{'back to back':>14s}")
    for name, operation in operations.items():
        cold = cost(operation, rounds, after_work=True)
        hot = cost(operation, rounds, after_work=False)
        print(f"{name:43s}{cold:12.1f}{hot:14.1f}")
    drain_stop.set()
    draining.join()
    sender.close(linger=0)
    receiver.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
