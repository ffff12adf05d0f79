"""Federations of separate broker and worker processes for tests, started
the way a user starts them by hand: ``bin/fedbroker`` and ``bin/fedworker``
configured by the environment variables of DESIGN.md §1.3 only.

Brokers bind port 0 (no port races) and report what they bound on stderr
(``-v``); a thread keeps reading each process's stderr so that no pipe ever
fills, and keeps the lines for assertions and failure reports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
GUARD = 60  # seconds; only ever a deadlock guard
STOP_GUARD = 15  # seconds a process may take to end after SIGTERM

_BOUND = re.compile(r"bound (tcp://\S+) \(meta (tcp://\S+)\)")


def command(name: str) -> List[str]:
    return [sys.executable, os.path.join(ROOT, "bin", name)]


class Process:
    """One started process and the stderr lines it has written so far."""

    def __init__(self, name: str, popen: "subprocess.Popen[str]") -> None:
        self.name = name
        self.popen = popen
        self.lines: List[str] = []
        self.eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stderr:  # type: ignore[union-attr]
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = GUARD) -> "re.Match[str]":
        """The first match of ``pattern`` in a stderr line, waiting for it."""
        regex = re.compile(pattern)

        def found() -> "Optional[re.Match[str]]":
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
            return None

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self.eof, timeout)
            match = found()
        if match is None:
            raise AssertionError(f"{self.name} never wrote {pattern!r}:\n{''.join(self.lines)}")
        return match

    def close(self) -> None:
        self._reader.join(GUARD)
        if self.popen.stderr is not None:
            self.popen.stderr.close()

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class BrokerInfo:
    name: str
    task: str
    meta: str
    process: Process


class Federation:
    """Brokers and workers as separate processes; :meth:`close` ends them all."""

    def __init__(self, env: Optional[Dict[str, str]] = None) -> None:
        self.processes: List[Process] = []
        self.brokers: Dict[str, BrokerInfo] = {}
        self.env = dict(env or {})  # for every process, e.g. FUTUREFED_KEY_FILE

    def _start(self, name: str, argv: Sequence[str], env: Dict[str, str]) -> Process:
        popen = subprocess.Popen(
            list(argv), env={**os.environ, **self.env, **env}, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
        )
        process = Process(name, popen)
        self.processes.append(process)
        return process

    def broker(self, name: str, peers: Sequence[BrokerInfo] = (), meta_addresses: bool = True) -> BrokerInfo:
        """Start ``fedbroker`` named ``name`` peering with ``peers``; returns
        once it has bound its sockets."""
        env = {
            "BROKER_NAME": name,
            "BROKER_ADDRESS": "tcp://127.0.0.1:0",
            "BROKER_ADDRESSES": " ".join(peer.task for peer in peers),
        }
        if meta_addresses:
            env["META_ADDRESSES"] = " ".join(peer.meta for peer in peers)
        process = self._start(name, command("fedbroker") + ["-v"], env)
        match = process.wait_for(_BOUND.pattern)
        info = BrokerInfo(name, match.group(1), match.group(2), process)
        self.brokers[name] = info
        return info

    def worker(
        self, name: str, broker: BrokerInfo, wait: bool = True, args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> Process:
        """Start ``fedworker`` named ``name`` for ``broker`` (with extra
        command-line ``args`` and environment ``env``); with ``wait``,
        return once the broker has welcomed it."""
        process = self._start(name, command("fedworker") + list(args), {
            "IS_ORIGIN": "0",
            "WORKER_NAME": name,
            "BROKER_NAME": broker.name,
            "BROKER_ADDRESS": broker.task,
            # as a user points workers at their code: our task functions
            "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        })
        if wait:
            broker.process.wait_for(rf"<worker {re.escape(name)} on .* pid {process.pid}> joined")
        return process

    def log(self) -> str:
        """Every process's stderr, for failure messages."""
        return "\n".join(f"--- {p.name} ---\n{''.join(p.lines)}" for p in self.processes)

    def stop(self, process: Process, sig: int = signal.SIGTERM) -> Optional[int]:
        """End one process (SIGTERM by default) and reap it; its status."""
        if process.popen.poll() is None:
            process.popen.send_signal(sig)
        try:
            return process.popen.wait(GUARD)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
            raise AssertionError(f"{process.name} ignored signal {sig}") from None

    def close(self) -> None:
        """End workers first, then brokers; kill what does not go."""
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        stuck = []
        for process in self.processes:
            try:
                process.popen.wait(STOP_GUARD)
            except subprocess.TimeoutExpired:
                stuck.append(f"{process.name} (pid {process.pid}): {_where(process.pid)}")
                if os.environ.get("FEDPROCS_PYSPY"):
                    subprocess.run(["py-spy", "dump", "--pid", str(process.pid)])
                process.popen.kill()
                process.popen.wait()
            process.close()
        if stuck:
            raise AssertionError("ignored SIGTERM: " + "; ".join(stuck) + "\n" + self.log())


def _where(pid: int) -> str:
    """What a stuck process waits in, from /proc (for failure reports)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{pid}/status") as f:
            state = next(line.split(None, 1)[1].strip() for line in f if line.startswith("State:"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, StopIteration):
        return "gone"
    return f"state {state}, waiting in {wchan or '?'}, {threads} threads"
