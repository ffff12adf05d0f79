"""The embedded local federation: one broker and N workers on this host.

Started by a :class:`~futurefed.FederatedExecutor` that has no federation to
join. Its sockets are ``ipc://`` endpoints in a directory only this user can
enter (mode 0700), so the kernel admits no other user's process: the
federation is authenticated without CurveZMQ's per-byte cost, and has no TCP
port at all (docs/security.md). Every child process holds the read end of a *lifeline* pipe whose only
write end stays in this process: when this process exits, however it dies
(even SIGKILL), the children read end-of-file and exit. No orphans.

It supervises its workers as fedrun's host agent does: when one dies it
tells the broker at once (WORKER_EXIT, :mod:`futurefed.supervisor`), with
its exit status and last stderr lines, and starts another.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .errors import BrokenFederation
from .supervisor import STDERR_TAIL, report_exit

__all__ = ["LocalFederation"]

START_TIMEOUT = 60.0  # deadlock guard: a broker binds loopback in well under a second
STOP_TIMEOUT = 5.0
#: Dead workers replaced in the life of one federation, at most (a task
#: that kills every worker fails with WorkerLost long before this); then
#: the federation is broken and so is its executor.
MAX_REPLACEMENTS = 1000
#: A worker that dies within this many seconds of its start died quickly:
#: the next one in its place waits 0.1 s, then 0.2, 0.4... at most
#: MAX_BACKOFF, until one lives longer (a worker that cannot start at all
#: must not be restarted as fast as the machine can).
QUICK_DEATH = 2.0
MAX_BACKOFF = 5.0
#: Longest runtime directory whose ipc:// socket names fit in sun_path.
IPC_DIRECTORY_MAX = 90

logger = logging.getLogger(__name__)


def _relay_stderr(stream: Any, tail: "Deque[str]") -> None:
    """Copy a worker's stderr to ours, keeping its last lines."""
    for raw in stream:
        text = raw.decode("utf-8", errors="replace")
        tail.append(text.rstrip())
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # our stderr is gone: keep the tail anyway
    stream.close()


def _private_directory() -> str:
    """A new directory only this user may enter, with a path short enough
    for ipc:// socket names (at most 107 bytes on Linux)."""
    path = tempfile.mkdtemp(prefix="futurefed-")  # mode 0700
    if len(path) > IPC_DIRECTORY_MAX:
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="futurefed-", dir="/tmp")
    return path


def child_environment(extra: Dict[str, str]) -> Dict[str, str]:
    """This process's environment for a child, with our ``sys.path`` so that
    functions pickled by reference import there as they do here."""
    env = dict(os.environ)
    paths = [path or os.getcwd() for path in sys.path]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra)
    return env


def _wait_readable(fd: int, seconds: float) -> bool:
    """Whether ``fd`` became readable (or hung up) within ``seconds``
    (poll, not select: the program may hold more than 1,024 files open)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, seconds) * 1000))


#: The federations this process owns, let go of in a forked child.
_live: "weakref.WeakSet[LocalFederation]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for federation in list(_live):
        federation._let_go_in_child()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LocalFederation:
    """Processes of an embedded federation; :meth:`close` ends them. A
    worker that dies is replaced, so the pool keeps its size."""

    def __init__(self, workers: int, *, python: str = sys.executable) -> None:
        self._owner = os.getpid()  # a forked child neither holds nor ends it
        self.processes: List[subprocess.Popen] = []  # type: ignore[type-arg]
        self.replaced = 0
        #: Called, with why, once no worker will be started any more.
        self.on_broken: Optional[Callable[[str], None]] = None
        self._started: Dict[int, float] = {}  # worker index -> when its process started
        self._quick_deaths: Dict[int, int] = {}  # worker index -> quick deaths in a row
        self._tails: Dict[int, Deque[str]] = {}  # worker pid -> its last stderr lines
        self._closing = threading.Event()
        self._replacing = threading.Lock()
        self._python = python
        self.runtime_dir = _private_directory()
        lifeline_r, self._lifeline_w = os.pipe()
        _live.add(self)
        ready_r, ready_w = os.pipe()
        try:
            name = f"local-{os.getpid()}"
            broker = subprocess.Popen(
                [python, "-m", "futurefed.broker",
                 "--address", f"ipc://{os.path.join(self.runtime_dir, 'tasks')}",
                 "--runtime-dir", self.runtime_dir,
                 "--name", name, "--lifeline", str(lifeline_r), "--ready-fd", str(ready_w)],
                pass_fds=(lifeline_r, ready_w),
                env=child_environment({"BROKER_NAME": name}),
            )
            self.processes.append(broker)
            os.close(ready_w)
            ready_w = -1
            self.address, self.meta_address = self._read_address(ready_r, broker)
            self._name = name
            # kept open for replacements; closed with the write end in close()
            self._lifeline_r = lifeline_r
            lifeline_r = -1
            for index in range(workers):
                self._start_worker(index)
        except BaseException:
            self.close()
            raise
        finally:
            if lifeline_r != -1:
                os.close(lifeline_r)
            os.close(ready_r)
            if ready_w != -1:
                os.close(ready_w)

    def _start_worker(self, index: int) -> None:
        worker_name = f"{self._name}.w{index}"
        process = subprocess.Popen(
            [self._python, "-m", "futurefed.worker", "--address", self.address,
             "--name", worker_name, "--lifeline", str(self._lifeline_r)],
            pass_fds=(self._lifeline_r,), stderr=subprocess.PIPE,
            env=child_environment({
                "IS_ORIGIN": "0",
                "WORKER_NAME": worker_name,
                "BROKER_NAME": self._name,
                "BROKER_ADDRESS": self.address,
                "BROKER_ADDRESSES": "",  # no other broker: it ends with this one
            }),
        )
        self.processes.append(process)
        self._started[index] = time.monotonic()
        tail = self._tails[process.pid] = deque(maxlen=STDERR_TAIL)
        relay = threading.Thread(
            target=_relay_stderr, args=(process.stderr, tail), name=f"stderr-{worker_name}",
            daemon=True,
        )
        relay.start()
        threading.Thread(
            target=self._replace_when_gone, args=(index, process, relay),
            name=f"watch-{worker_name}", daemon=True,
        ).start()

    def exit_info(self, pid: int) -> Optional[Tuple[Optional[int], List[str]]]:
        """How worker ``pid`` ended (None: still running) and its last
        stderr lines; None for a pid this federation did not start."""
        if pid not in self._tails:
            return None
        process = next((p for p in self.processes if p.pid == pid), None)
        status = process.poll() if process is not None else None
        return status, list(self._tails[pid])

    def _replace_when_gone(self, index: int, process: "subprocess.Popen[bytes]",
                           relay: threading.Thread) -> None:
        status = process.wait()
        if self._closing.is_set() or self.processes[0].poll() is not None:
            return  # closing, or the broker is gone: nothing to replace it for
        relay.join(STOP_TIMEOUT)  # its last lines, up to end-of-file
        tail = list(self._tails[process.pid])
        report_exit(self.address, f"{self._name}.w{index}", process.pid, status, tail)
        quick = self._quick_deaths.get(index, 0)
        quick = quick + 1 if time.monotonic() - self._started[index] < QUICK_DEATH else 0
        self._quick_deaths[index] = quick
        if quick and self._closing.wait(min(MAX_BACKOFF, 0.1 * 2 ** (quick - 1))):
            return  # closed while we waited
        with self._replacing:
            if self._closing.is_set():
                return
            if self.replaced >= MAX_REPLACEMENTS:
                self._give_up(index, status, tail)
                return
            self.replaced += 1
            logger.warning("worker %d exited with status %d; starting another", index, status)
            self._start_worker(index)

    def _give_up(self, index: int, status: int, tail: List[str]) -> None:
        """No more replacements: say so, and break whoever relies on us."""
        why = (f"the embedded federation's workers died {self.replaced + 1} times; the last,"
               f" worker {index}, exited with status {status}")
        if tail:
            why += ": " + " | ".join(tail[-3:])
        logger.error("%s; no more are started", why)
        callback = self.on_broken
        if callback is not None:
            callback(why)

    @staticmethod
    def _read_address(ready_r: int, broker: "subprocess.Popen[bytes]") -> "tuple[str, str]":
        """The broker's task and meta addresses, from its ready line."""
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if not _wait_readable(ready_r, remaining):
                raise BrokenFederation(f"the local broker did not start within {START_TIMEOUT:.0f} s")
            chunk = os.read(ready_r, 4096)
            if not chunk:
                raise BrokenFederation(
                    f"the local broker exited with status {broker.wait()} before it was ready"
                )
            data += chunk
        ready = json.loads(data)
        return str(ready["task"]), str(ready["meta"])

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """End every process: close the lifeline, wait, then kill stragglers."""
        if os.getpid() != self._owner:
            return  # a forked child's copy: the processes are its parent's
        self._closing.set()
        with self._replacing:
            if self._lifeline_w != -1:
                os.close(self._lifeline_w)
                self._lifeline_w = -1
            if getattr(self, "_lifeline_r", -1) != -1:
                os.close(self._lifeline_r)
                self._lifeline_r = -1
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    @property
    def pids(self) -> List[int]:
        return [process.pid for process in self.processes]

    def _let_go_in_child(self) -> None:
        """In a child forked from the origin: close its copies of the
        lifeline, so that the federation still ends when the origin does
        (a long-lived child held it alive; shutdown() waited and killed)."""
        self._closing.set()
        for name in ("_lifeline_w", "_lifeline_r"):
            fd = getattr(self, name, -1)
            if fd != -1:
                try:
                    os.close(fd)
                except OSError:
                    pass  # closed already
                setattr(self, name, -1)

    def __del__(self) -> None:
        fd: Optional[int] = getattr(self, "_lifeline_w", -1)
        if fd is not None and fd != -1:
            os.close(fd)
