"""The embedded local federation: one broker and N workers on loopback.

Started by a :class:`~futurefed.FederatedExecutor` that has no federation to
join. Every child process holds the read end of a *lifeline* pipe whose only
write end stays in this process: when this process exits, however it dies
(even SIGKILL), the children read end-of-file and exit. No orphans.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Dict, List, Optional

from .errors import BrokenFederation

__all__ = ["LocalFederation"]

START_TIMEOUT = 60.0  # deadlock guard: a broker binds loopback in well under a second
STOP_TIMEOUT = 5.0


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


class LocalFederation:
    """Processes of an embedded federation; :meth:`close` ends them."""

    def __init__(self, workers: int, *, python: str = sys.executable) -> None:
        self.processes: List[subprocess.Popen] = []  # type: ignore[type-arg]
        lifeline_r, self._lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            name = f"local-{os.getpid()}"
            broker = subprocess.Popen(
                [python, "-m", "futurefed.broker", "--address", "tcp://127.0.0.1:0",
                 "--name", name, "--lifeline", str(lifeline_r), "--ready-fd", str(ready_w)],
                pass_fds=(lifeline_r, ready_w),
                env=child_environment({"BROKER_NAME": name}),
            )
            self.processes.append(broker)
            os.close(ready_w)
            ready_w = -1
            self.address = self._read_address(ready_r, broker)
            for index in range(workers):
                worker_name = f"{name}.w{index}"
                self.processes.append(subprocess.Popen(
                    [python, "-m", "futurefed.worker", "--address", self.address,
                     "--name", worker_name, "--lifeline", str(lifeline_r)],
                    pass_fds=(lifeline_r,),
                    env=child_environment({
                        "IS_ORIGIN": "0",
                        "WORKER_NAME": worker_name,
                        "BROKER_NAME": name,
                        "BROKER_ADDRESS": self.address,
                    }),
                ))
        except BaseException:
            self.close()
            raise
        finally:
            os.close(lifeline_r)
            os.close(ready_r)
            if ready_w != -1:
                os.close(ready_w)

    @staticmethod
    def _read_address(ready_r: int, broker: "subprocess.Popen[bytes]") -> str:
        deadline = time.monotonic() + START_TIMEOUT
        data = b""
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([ready_r], [], [], max(0.0, remaining))
            if not readable:
                raise BrokenFederation(f"the local broker did not start within {START_TIMEOUT:.0f} s")
            chunk = os.read(ready_r, 4096)
            if not chunk:
                raise BrokenFederation(
                    f"the local broker exited with status {broker.wait()} before it was ready"
                )
            data += chunk
        return str(json.loads(data)["task"])

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """End every process: close the lifeline, wait, then kill stragglers."""
        if self._lifeline_w != -1:
            os.close(self._lifeline_w)
            self._lifeline_w = -1
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def pids(self) -> List[int]:
        return [process.pid for process in self.processes]

    def __del__(self) -> None:
        fd: Optional[int] = getattr(self, "_lifeline_w", -1)
        if fd is not None and fd != -1:
            os.close(fd)
