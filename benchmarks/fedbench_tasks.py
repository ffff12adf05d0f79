"""Task functions for ``bench_federation.py``.

They live in their own small module (not in the script's ``__main__``) so that
they are pickled *by reference*, the way a user's own code normally travels:
the benchmark starts every futurefed worker with this directory on its
PYTHONPATH, exactly as a user points hand-started workers at their code, and
ProcessPoolExecutor's forked workers simply inherit the import.

Keep them module-level, small and free of imports beyond the standard library.
"""

from __future__ import annotations

import os
from typing import Any


def noop(x: Any = None) -> Any:
    return x


def burn(iterations: int) -> int:
    """A fixed amount of pure-Python CPU work: ``iterations`` loop turns.

    Unlike spinning on the clock until a deadline, the work done does not
    depend on how much CPU the process gets, so with more workers than cores
    the contention shows up as a longer wall time instead of being hidden.
    """
    acc = 0
    for i in range(iterations):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def cpu_task(iterations: int) -> tuple[str | None, int, int]:
    """``burn(iterations)``, tagged with who ran it.

    Returns ``(WORKER_NAME or None, pid, checksum)``: futurefed workers have
    ``WORKER_NAME`` set; ProcessPoolExecutor's workers are told apart by pid.
    """
    return os.environ.get("WORKER_NAME"), os.getpid(), burn(iterations)
