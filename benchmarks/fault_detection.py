"""How long failures take to be noticed, with the default heartbeat
(FUTUREFED_HEARTBEAT, 1 s; a silent peer is lost after 3).

    python benchmarks/fault_detection.py [--runs 3]

Prints, for each failure, the seconds from the signal to the moment it is
noticed:

- a task SIGKILLs its worker, with FUTUREFED_MAX_RETRIES=0: until its future
  fails with WorkerLost in the origin, on the embedded federation and under
  fedrun (its supervisor reports the death, WORKER_EXIT);
- a worker SIGSTOPped (still alive, so only silence tells): until the
  broker's LOAD stops counting it;
- the broker SIGKILLed: until a pending future fails with FederationLost.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict


from futurefed import FederatedExecutor, FederationLost, WorkerLost
from futurefed.status import await_load as first_load

GUARD = 60.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def await_load(meta_address: str, condition: Callable[[Dict], bool]) -> None:
    """Wait for the first LOAD the broker publishes that meets ``condition``."""
    if first_load(meta_address, condition, GUARD) is None:
        raise SystemExit(f"no LOAD met the condition within {GUARD:g} s")


def kill_own_worker() -> None:
    """A task that SIGKILLs its worker, saying when on stderr."""
    print(f"killing myself at {time.time():.6f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def seconds_to(error: WorkerLost) -> float:
    """From the kill (the task's last stderr line) to now."""
    return time.time() - float(error.stderr_tail[-1].rsplit(" ", 1)[1])


def worker_killed_embedded() -> float:
    os.environ["FUTUREFED_MAX_RETRIES"] = "0"
    try:
        with FederatedExecutor(max_workers=2) as executor:
            meta = executor._transport.federation.meta_address
            await_load(meta, lambda load: load["workers"] == 2)
            try:
                executor.submit(kill_own_worker).result(GUARD)
            except WorkerLost as error:
                return seconds_to(error)
            raise SystemExit("the future did not fail")
    finally:
        del os.environ["FUTUREFED_MAX_RETRIES"]


FEDRUN_PROGRAM = """\
import os, signal, sys, time
from futurefed import FederatedExecutor, WorkerLost

def kill_own_worker():
    print(f"killing myself at {time.time():.6f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

with FederatedExecutor() as executor:
    executor.submit(abs, 1).result()
    try:
        executor.submit(kill_own_worker).result(60)
    except WorkerLost as error:
        print(time.time() - float(error.stderr_tail[-1].rsplit(" ", 1)[1]))
"""


def worker_killed_fedrun() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "prog.py")
        with open(program, "w") as f:
            f.write(FEDRUN_PROGRAM)
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bin", "fedrun"), "-N", "2",
             "--env", "FUTUREFED_MAX_RETRIES=0", program],
            capture_output=True, text=True, timeout=GUARD,
        )
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"fedrun failed ({result.returncode}): {result.stderr[-2000:]}") from None


def worker_stopped() -> float:
    with FederatedExecutor(max_workers=2) as executor:
        federation = executor._transport.federation
        await_load(federation.meta_address, lambda load: load["workers"] == 2)
        victim = federation.processes[1].pid
        started = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        await_load(federation.meta_address, lambda load: load["workers"] == 1)
        took = time.monotonic() - started
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
        "worker SIGKILL -> WorkerLost (embedded)": worker_killed_embedded,
        "worker SIGKILL -> WorkerLost (fedrun -N 2)": worker_killed_fedrun,
        "worker SIGSTOP -> lost by its broker": worker_stopped,
        "broker SIGKILL -> pending future fails": broker_failure,
    }
    print(f"heartbeat {os.environ.get('FUTUREFED_HEARTBEAT', '1')} s, liveness 3, {args.runs} runs")
    for name, case in cases.items():
        times = [case() for _ in range(args.runs)]
        each = ", ".join(f"{t:.3f}" for t in times)
        print(f"{name:44s} median {statistics.median(times):.3f} s  ({each})")


if __name__ == "__main__":
    main()
