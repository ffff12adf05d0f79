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

``cancel(force=True)`` also stops a task that is running: it sends KILL and
waits until the future is done, CANCELLED once the broker (or the worker that
stopped the task) confirms, or FINISHED if the result came first.
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

    def cancel_futures(self, fs: Sequence["TaskFuture"], force: bool = False) -> None:
        """Ask the broker to cancel ``fs`` (with ``force``, to stop them even
        if running); wait for its answer if the caller can wait."""


class TaskFuture(futures.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` whose ``cancel()`` asks the broker."""

    def __init__(self, task_id: int, canceller: Canceller) -> None:
        super().__init__()
        self._futurefed_id = task_id
        self._canceller = canceller

    def cancel(self, *, force: bool = False) -> bool:
        """Cancel the task if no worker has it yet; True if it is cancelled.

        Waits for one round trip to the broker (not for the worker). Called
        where waiting is impossible (a done-callback run by the thread that
        receives results), it only sends the request and returns False.

        With ``force=True`` a task that has started is stopped too: its
        worker drops it, stops it in place if it is parked waiting on
        futures, or else replaces itself (docs/architecture.md §4.5). This
        waits until the task is stopped or has finished, at most
        :data:`CANCEL_TIMEOUT`; True if the future is then cancelled, False
        if it finished (or no answer came). A task that submitted tasks has
        those stopped as well.
        """
        if force:
            if not self.done():
                self._canceller.cancel_futures([self], force=True)
        elif self.undecided():
            self._canceller.cancel_futures([self])
        return self.cancelled()

    def undecided(self) -> bool:
        """Neither running nor done: the broker may still cancel it."""
        with self._condition:
            return self._state == futures._base.PENDING  # type: ignore[attr-defined]

    def confirm_cancel(self) -> None:
        """The task was dropped or stopped: cancel and notify, as the stdlib
        executors do with what they drop, so that ``wait()`` counts it done.
        A forced cancel may stop a task whose future is RUNNING already,
        which ``Future.cancel()`` refuses; the state is set here instead."""
        base = futures._base  # type: ignore[attr-defined]
        with self._condition:
            if self._state in (base.FINISHED, base.CANCELLED_AND_NOTIFIED):
                return
            called_back = self._state == base.CANCELLED
            self._state = base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        if not called_back:
            self._invoke_callbacks()  # type: ignore[attr-defined]


def cancel_all(fs: Iterable["futures.Future[Any]"], *, force: bool = False) -> None:
    """Cancel many futures with one request per canceller (not one round
    trip each); ``force`` as for :meth:`TaskFuture.cancel`."""
    groups: Dict[int, List[TaskFuture]] = {}
    cancellers: Dict[int, Canceller] = {}
    for future in fs:
        if isinstance(future, TaskFuture):
            if not future.done() if force else future.undecided():
                key = id(future._canceller)
                cancellers[key] = future._canceller
                groups.setdefault(key, []).append(future)
        else:
            future.cancel()
    for key, group in groups.items():
        cancellers[key].cancel_futures(group, force=force)
