"""The future of a task that may already be in a worker's hands.

``Future.cancel()`` must answer at once, but whether a task can still be
cancelled is known only to the broker holding it. So :meth:`TaskFuture.cancel`
asks: it sends CANCEL and waits for the broker's answer, which is one of

* RESULTS with status CANCELLED: the task was still queued; it will never run
  and ``cancel()`` returns True;
* STARTED: the task has been handed to a worker; the future is now running
  and ``cancel()`` returns False, as ``ProcessPoolExecutor`` does with the
  calls it has already queued for its processes;
* the task's RESULTS, sent before the CANCEL arrived: ``cancel()`` returns
  False.

A future is never cancelled on the origin's word alone, so a cancelled
future's task never runs.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any, Dict, Iterable, List, Protocol, Sequence

__all__ = ["Canceller", "TaskFuture", "cancel_all"]

#: How long ``cancel()`` waits for the broker's answer before it gives up and
#: returns False (the broker is gone or unresponsive; the task may still run).
CANCEL_TIMEOUT = 10.0


class Canceller(Protocol):
    """What sends a task's CANCEL: the origin's agent or a worker."""

    def cancel_futures(self, fs: Sequence["TaskFuture"]) -> None:
        """Ask the broker to cancel ``fs``; wait for its answer if the caller
        can wait."""


class TaskFuture(futures.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` whose ``cancel()`` asks the broker."""

    def __init__(self, task_id: int, canceller: Canceller) -> None:
        super().__init__()
        self._futurefed_id = task_id
        self._canceller = canceller

    def cancel(self) -> bool:
        """Cancel the task if no worker has it yet; True if it is cancelled.

        Waits for one round trip to the broker (not for the worker). Called
        where waiting is impossible (a done-callback run by the thread that
        receives results), it only sends the request and returns False.
        """
        if self.undecided():
            self._canceller.cancel_futures([self])
        return self.cancelled()

    def undecided(self) -> bool:
        """Neither running nor done: the broker may still cancel it."""
        with self._condition:
            return self._state == futures._base.PENDING  # type: ignore[attr-defined]

    def confirm_cancel(self) -> None:
        """The broker dropped the task: cancel and notify, as the stdlib
        executors do with what they drop, so that ``wait()`` counts it done."""
        futures.Future.cancel(self)
        self.set_running_or_notify_cancel()


def cancel_all(fs: Iterable["futures.Future[Any]"]) -> None:
    """Cancel many futures with one request per canceller (not one round
    trip each)."""
    groups: Dict[int, List[TaskFuture]] = {}
    cancellers: Dict[int, Canceller] = {}
    for future in fs:
        if isinstance(future, TaskFuture):
            if future.undecided():
                key = id(future._canceller)
                cancellers[key] = future._canceller
                groups.setdefault(key, []).append(future)
        else:
            future.cancel()
    for key, group in groups.items():
        cancellers[key].cancel_futures(group)
