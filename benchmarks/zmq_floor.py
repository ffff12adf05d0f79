"""The latency floor of one broker hop in Python: what futurefed's
round trip could cost with no scheduling, pickling or bookkeeping at all.

    python benchmarks/zmq_floor.py [--calls 3000]

A client sends one small message through a minimal ROUTER broker process to a
DEALER echo worker process and waits for the echo, as futurefed's
``submit().result()`` does, measured two ways:

- ``direct``: the calling thread owns the socket and blocks in ``recv``;
- ``agent``: as in futurefed, a background thread owns the socket, woken over
  inproc, and hands the reply back through a ``concurrent.futures.Future``.

Median and p99 in microseconds. Compare with ``bench.py --only latency`` run
just before or after: the difference is futurefed's own overhead.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, List

import zmq


def broker(ports: "multiprocessing.Queue[int]") -> None:
    router = zmq.Context().socket(zmq.ROUTER)
    ports.put(router.bind_to_random_port("tcp://127.0.0.1"))
    worker = client = b""
    while True:
        ident, *frames = router.recv_multipart()
        if frames == [b"ready"]:
            worker = ident
            ports.put(0)  # the echo worker is connected: calls can start
        elif ident == worker:
            router.send_multipart([client, *frames])
        else:
            client = ident
            router.send_multipart([worker, *frames])


def echo_worker(port: int) -> None:
    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"ready")
    while True:
        dealer.send_multipart(dealer.recv_multipart())


def direct_caller(ctx: Any, address: str) -> Callable[[], None]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(address)

    def call() -> None:
        dealer.send(b"x")
        dealer.recv()

    return call


def agent_caller(ctx: Any, address: str) -> Callable[[], None]:
    pending: "queue.SimpleQueue[Future[None]]" = queue.SimpleQueue()
    wake = ctx.socket(zmq.PAIR)
    wake.bind("inproc://floor-agent")

    def agent() -> None:
        wake_rx = ctx.socket(zmq.PAIR)
        wake_rx.connect("inproc://floor-agent")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(address)
        poller = zmq.Poller()
        poller.register(wake_rx, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        waiting: List["Future[None]"] = []
        while True:
            events = dict(poller.poll())
            if wake_rx in events:
                wake_rx.recv()
                waiting.append(pending.get())
                dealer.send(b"x")
            if dealer in events:
                dealer.recv()
                waiting.pop(0).set_result(None)

    threading.Thread(target=agent, daemon=True).start()

    def call() -> None:
        future: "Future[None]" = Future()
        pending.put(future)
        wake.send(b"")
        future.result()

    return call


def measure(call: Callable[[], None], calls: int) -> List[float]:
    for _ in range(200):  # warm up, and let the connections settle
        call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    ports: "multiprocessing.Queue[int]" = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=broker, args=(ports,), daemon=True)]
    processes[0].start()
    port = ports.get(timeout=30)
    processes.append(multiprocessing.Process(target=echo_worker, args=(port,), daemon=True))
    processes[1].start()
    ports.get(timeout=30)
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{port}"
    try:
        for name, make in (("direct", direct_caller), ("agent", agent_caller)):
            samples = sorted(measure(make(ctx, address), args.calls))
            p99 = samples[int(len(samples) * 0.99)]
            print(f"{name:7s} median {statistics.median(samples):6.0f} µs   p99 {p99:6.0f} µs")
    finally:
        for process in processes:
            process.terminate()
            process.join()


if __name__ == "__main__":
    main()
