"""The floor of futurefed's architecture: what its processes, threads and
ZeroMQ hops cost with none of futurefed's own work.

    python benchmarks/zmq_floor.py [--calls 3000]
    python benchmarks/bench.py --executors fed,ppe,floor   # every scenario

As a script it measures the latency floor of one broker hop (below). As a
module it also gives :class:`FloorExecutor`, which ``bench.py`` runs as the
``floor`` executor next to futurefed and ProcessPoolExecutor.

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
import collections
import itertools
import multiprocessing
import os
import pickle
import queue
import statistics
import struct
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

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


# -- FloorExecutor: futurefed's shape, none of its work ----------------------------------

#: Tasks each floor worker holds, as a futurefed worker does with tasks of 1 ms or more.
FLOOR_PREFETCH = 2
_ID = struct.Struct("!Q")


def _socket(ctx: Any, kind: int) -> Any:
    """No high-water marks, as futurefed's: a ROUTER would drop results."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def _floor_broker(address: str, workers: int, ready: "multiprocessing.Queue[str]") -> None:
    """A ROUTER that queues tasks and hands them to workers by credit, and
    routes results back: futurefed's broker minus its state machine."""
    router = _socket(zmq.Context(), zmq.ROUTER)
    router.bind(address)
    ready.put("bound")
    credit: Dict[bytes, int] = {}
    tasks: Deque[List[Any]] = collections.deque()
    client = b""
    while True:
        ident, kind, *rest = router.recv_multipart(copy=False)
        sender = ident.bytes
        command = kind.bytes
        if command == b"T":  # from the client: [id, payload]
            client = sender
            tasks.append(rest)
        elif command == b"R":  # from a worker: [id, status, payload]
            router.send_multipart([client, *rest], copy=False)
            credit[sender] += 1
        elif command == b"H":  # a worker says hello
            credit[sender] = FLOOR_PREFETCH
            if len(credit) == workers:
                ready.put("workers")
        while tasks:
            worker = max(credit, key=credit.__getitem__, default=None)
            if worker is None or not credit[worker]:
                break
            credit[worker] -= 1
            router.send_multipart([worker, *tasks.popleft()], copy=False)


def _floor_worker(address: str) -> None:
    """A DEALER that runs each ``(fn, args, kwargs)`` it gets and sends the
    outcome back: futurefed's worker minus greenlets, caches and limits."""
    dealer = _socket(zmq.Context(), zmq.DEALER)
    dealer.connect(address)
    dealer.send(b"H")
    while True:
        task_id, payload = dealer.recv_multipart(copy=False)
        fn, args, kwargs = pickle.loads(payload.buffer)
        try:
            status, outcome = b"K", fn(*args, **kwargs)
        except Exception as exc:  # the task's own error, for its future
            status, outcome = b"E", exc
        dealer.send_multipart([b"R", task_id, status, pickle.dumps(outcome, protocol=5)])


class FloorExecutor(Executor):
    """futurefed's processes, threads and sockets with none of its code: an
    agent thread owns a DEALER, woken over inproc, to a ROUTER broker process
    on an ipc socket, which hands tasks to DEALER worker processes by credit.
    Plain pickle (functions by reference: the workers are forked), no
    scheduling state, heartbeats, greenlets, blobs or zero-copy buffers.
    What futurefed costs beyond it is futurefed's own work."""

    def __init__(self, workers: int) -> None:
        fork = multiprocessing.get_context("fork")  # the children inherit __main__'s functions
        # Linux's abstract socket namespace: no file to remove, even when a
        # run that hung leaves with os._exit()
        address = f"ipc://@futurefed-floor-{os.getpid()}-{id(self)}"
        ready: "multiprocessing.Queue[str]" = fork.Queue()
        self._processes = [fork.Process(target=_floor_broker, args=(address, workers, ready),
                                        daemon=True)]
        self._processes[0].start()
        try:
            ready.get(timeout=30)
            for _ in range(workers):
                self._processes.append(fork.Process(target=_floor_worker, args=(address,),
                                                    daemon=True))
                self._processes[-1].start()
            ready.get(timeout=30)
        except BaseException:
            self._stop_processes()
            raise
        self._ctx = zmq.Context()
        self._commands: Deque[Optional[Tuple["Future[Any]", bytes]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.bind(f"inproc://floor-{id(self)}")
        self._agent = threading.Thread(target=self._serve, args=(address,), daemon=True)
        self._agent.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> "Future[Any]":
        future: "Future[Any]" = Future()
        payload = pickle.dumps((fn, args, kwargs), protocol=5)
        with self._lock:  # the wake socket is not thread-safe
            self._commands.append((future, payload))
            self._wake.send(b"")
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._agent.is_alive():
            with self._lock:
                self._commands.append(None)
                self._wake.send(b"")
            self._agent.join()
            self._wake.close()
            self._ctx.term()
        self._stop_processes()

    def _stop_processes(self) -> None:
        for process in self._processes:
            process.terminate()
            process.join()

    def _serve(self, address: str) -> None:
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(f"inproc://floor-{id(self)}")
        dealer = _socket(self._ctx, zmq.DEALER)
        dealer.connect(address)
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        pending: Dict[bytes, "Future[Any]"] = {}
        ids = itertools.count()
        stopping = False
        while not (stopping and not pending):
            events = dict(poller.poll())
            if wake in events:
                while wake.poll(0):
                    wake.recv()
                while self._commands:
                    command = self._commands.popleft()
                    if command is None:
                        stopping = True
                        continue
                    future, payload = command
                    if future.set_running_or_notify_cancel():
                        task_id = _ID.pack(next(ids))
                        pending[task_id] = future
                        dealer.send_multipart([b"T", task_id, payload], copy=False)
            while dealer.poll(0):
                task_id, status, payload = dealer.recv_multipart(copy=False)
                future = pending.pop(task_id.bytes)
                outcome = pickle.loads(payload.buffer)
                if status.bytes == b"E":
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        wake.close(linger=0)
        dealer.close(linger=0)


# -- the latency floor of one hop, two ways ------------------------------------------------


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
