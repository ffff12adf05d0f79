"""Process helpers for tests: wait for any pid to exit without sleeping, and
list the children a process has left behind."""

from __future__ import annotations

import os
import select
from typing import Iterable, List


def children(pid: int) -> List[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def wait_gone(pids: Iterable[int], timeout: float) -> List[int]:
    """Wait (pidfd, no polling loop) until every pid has exited; return the
    pids still alive after ``timeout`` seconds."""
    alive = []
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
    try:
        for pid, fd in fds.items():
            readable, _, _ = select.select([fd], [], [], timeout)
            if not readable:
                alive.append(pid)
    finally:
        for fd in fds.values():
            os.close(fd)
    return alive
