"""How long the workers of a lost broker take to work again elsewhere, with
the default heartbeat (FUTUREFED_HEARTBEAT, 1 s; a peer is lost after 3).

    python benchmarks/worker_failover.py [--runs 3]

Three brokers, each a process started by environment variables: A (the
origin's, no workers), B (2 workers) and C (1 worker). This process, the
origin, keeps A busy with 20 ms tasks; B is SIGKILLed (its connections
close) or SIGSTOPped (it falls silent). For each, the seconds from the
signal to:

* joined: both of B's workers have joined A or C (their log lines; the
  later of the two);
* first task: one of them starts a task there (the task reports when it
  started).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
GUARD = 60.0
BOUND = re.compile(r"bound (tcp://\S+) \(meta (tcp://\S+)\)")
JOINED = re.compile(r"^(\S+ \S+) fedworker WARNING worker (\S+): joined broker (\S+) at")


def report(_: int) -> Tuple[str, float]:
    """Where and when a task started (pickled by value: no import needed)."""
    started = time.time()
    time.sleep(0.02)
    return os.environ["WORKER_NAME"], started


class Proc:
    """A started process whose stderr lines are kept."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            list(argv), env={**os.environ, **env}, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
        )
        self.lines: List[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stderr:  # type: ignore[union-attr]
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, regex: "re.Pattern[str]") -> "re.Match[str]":
        def found():
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self.changed:
            if not self.changed.wait_for(lambda: found() is not None, GUARD):
                raise SystemExit(f"never saw {regex.pattern!r}:\n{''.join(self.lines)}")
            return found()  # type: ignore[return-value]

    def end(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
        try:
            self.popen.wait(GUARD)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def run_once(sig: signal.Signals) -> Tuple[float, float]:
    """(signal -> last of B's workers joined, signal -> first task there)."""
    from futurefed import FederatedExecutor

    procs: List[Proc] = []
    python = [sys.executable, "-m"]
    try:
        brokers: Dict[str, Tuple[str, Proc]] = {}
        for name in "ABC":
            peers = " ".join(task for task, _ in brokers.values())
            broker = Proc(python + ["futurefed.broker", "-v"], {
                "BROKER_NAME": name, "BROKER_ADDRESS": "tcp://127.0.0.1:0",
                "BROKER_ADDRESSES": peers,
            })
            procs.append(broker)
            brokers[name] = (broker.wait_for(BOUND).group(1), broker)
        workers = []
        for name in ("B.w0", "B.w1", "C.w0"):
            task, broker = brokers[name[0]]
            worker = Proc(python + ["futurefed.worker", "-v"], {
                "IS_ORIGIN": "0", "WORKER_NAME": name, "BROKER_ADDRESS": task,
                "PYTHONPATH": str(ROOT),
            })
            procs.append(worker)
            worker.wait_for(re.compile(rf"worker {re.escape(name)}: joined broker"))
            workers.append(worker)
        with FederatedExecutor(address=brokers["A"][0]) as executor:
            fs = [executor.submit(report, i) for i in range(2000)]
            signalled = 0.0
            for done, _ in enumerate(cf.as_completed(fs, timeout=GUARD)):
                if done == 100:
                    signalled = time.time()
                    os.kill(brokers["B"][1].popen.pid, sig)
            results = [f.result() for f in fs]
        joins = []
        for worker in workers[:2]:
            stamp = worker.wait_for(JOINED).group(1)
            when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            joins.append(when - signalled)
        first = min(t for name, t in results if name.startswith("B.") and t > signalled)
        return max(joins), first - signalled
    finally:
        for proc in reversed(procs):
            proc.end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"heartbeat {os.environ.get('FUTUREFED_HEARTBEAT', '1')} s, liveness 3,"
          f" {args.runs} runs; A (origin, no workers), B (2 workers), C (1 worker)")
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        runs = [run_once(sig) for _ in range(args.runs)]
        for index, what in enumerate(("both B workers joined A/C", "first task of one there")):
            times = [run[index] for run in runs]
            print(f"B {sig.name} -> {what:27s} median {statistics.median(times):.3f} s"
                  f"  ({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
