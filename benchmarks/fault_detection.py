"""How long failures take to be noticed, on the embedded federation with the
default heartbeat (FUTUREFED_HEARTBEAT, 1 s; a peer is lost after 3).

    python benchmarks/fault_detection.py [--runs 3]

Prints, for each failure, the seconds from the signal to the moment it is
noticed: a worker SIGKILLed or SIGSTOPped (the broker's LOAD stops counting
it), and the broker SIGKILLed (a pending future fails with FederationLost).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from typing import Callable, Dict

import zmq

from futurefed import FederatedExecutor, FederationLost
from futurefed import protocol as p

GUARD = 60.0


def await_load(meta_address: str, condition: Callable[[Dict], bool]) -> None:
    """Wait for the first LOAD the broker publishes that meets ``condition``."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(meta_address)
    deadline = time.monotonic() + GUARD
    try:
        while sub.poll(max(0.0, deadline - time.monotonic()) * 1000):
            if condition(p.decode(sub.recv_multipart()).meta):
                return
    finally:
        sub.close()
    raise SystemExit(f"no LOAD met the condition within {GUARD:g} s")


def worker_failure(sig: signal.Signals) -> float:
    with FederatedExecutor(max_workers=2) as executor:
        federation = executor._transport.federation
        await_load(federation.meta_address, lambda load: load["workers"] == 2)
        victim = federation.processes[1].pid
        started = time.monotonic()
        os.kill(victim, sig)
        if sig == signal.SIGKILL:  # replaced at once: 2 -> 3 (the new one joins) -> 2 (the dead one lost)
            await_load(federation.meta_address, lambda load: load["workers"] == 3)
            await_load(federation.meta_address, lambda load: load["workers"] == 2)
        else:
            await_load(federation.meta_address, lambda load: load["workers"] == 1)
        took = time.monotonic() - started
        if sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGCONT)
        return took


def broker_failure() -> float:
    executor = FederatedExecutor(max_workers=1)
    try:
        federation = executor._transport.federation
        future = executor.submit(time.sleep, 30)
        await_load(federation.meta_address, lambda load: load["running"] == 1)
        started = time.monotonic()
        os.kill(federation.processes[0].pid, signal.SIGKILL)
        try:
            future.result(GUARD)
        except FederationLost:
            return time.monotonic() - started
        raise SystemExit("the future did not fail")
    finally:
        executor.shutdown(wait=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cases = {
        "worker SIGKILL -> lost by its broker": lambda: worker_failure(signal.SIGKILL),
        "worker SIGSTOP -> lost by its broker": lambda: worker_failure(signal.SIGSTOP),
        "broker SIGKILL -> pending future fails": broker_failure,
    }
    print(f"heartbeat {os.environ.get('FUTUREFED_HEARTBEAT', '1')} s, liveness 3, {args.runs} runs")
    for name, case in cases.items():
        times = [case() for _ in range(args.runs)]
        print(f"{name:42s} median {statistics.median(times):.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
