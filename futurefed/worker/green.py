"""Greenlet scheduling inside a worker: tasks that wait never block the worker.

Every task runs in a :class:`TaskGreenlet` of its own while it runs. A
greenlet whose task has ended waits in the hub's pool for the next task: a new
greenlet costs a fresh Python data stack (an mmap and munmap per task, about
25 µs of a no-op task's 35 in a worker), a pooled one a switch. When a task waits on a
futurefed future (``result()``, ``exception()``, or the stdlib
``concurrent.futures.wait``/``as_completed``), it *parks*: it switches back to
the hub, which goes on receiving messages and running other tasks, and
switches into the parked task again once the future is done or the wait timed
out. This is what makes nested submission deadlock-free with one worker.

The stdlib ``wait``/``as_completed`` block on ``waiter.event.wait()``, a
``threading.Event``. :class:`GreenFuture` keeps its waiters in a list that
swaps each new waiter's event for a :class:`GreenEvent`, so those functions
park instead of blocking the thread. Nothing is monkey-patched.

This module never touches a socket; ``loop.py`` drives the hub.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

import greenlet

from .._future import Canceller, TaskFuture

__all__ = ["GreenEvent", "GreenFuture", "Hub", "TaskGreenlet", "current_hub"]

_hub: Optional["Hub"] = None

#: At most this many task greenlets wait in a hub's pool for a task.
MAX_IDLE = 64


def current_hub() -> Optional["Hub"]:
    """The hub of this worker process, or None outside a worker."""
    return _hub


class TaskGreenlet(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet that runs tasks, one at a time; ``context`` is the task it
    runs now (None while it waits in its hub's pool)."""

    context: Any = None


class _Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False


class Waiter:
    """One park of one task greenlet; woken at most once."""

    __slots__ = ("hub", "glet", "fired", "timer")

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub
        self.glet: Optional[greenlet.greenlet] = None
        self.fired = False
        self.timer: Optional[_Timer] = None

    def wake(self, value: bool = True) -> None:
        """Resume the parked greenlet (from the hub or another task)."""
        if self.fired:
            return
        self.fired = True
        if self.timer is not None:
            self.timer.cancelled = True
        if self.glet is not None:
            self.hub.ready.append((self.glet, value))

    def wait(self, timeout: Optional[float]) -> bool:
        """Park the calling task; True if woken, False if the timeout passed."""
        if self.fired:
            return True
        if timeout is not None:
            if timeout <= 0:
                return False
            self.timer = self.hub.call_later(timeout, lambda: self.wake(False))
        self.glet = greenlet.getcurrent()
        try:
            return bool(self.hub.park())
        finally:
            # Ended by an exception thrown in (the task was stopped): a later
            # wake must not resume this greenlet, which may run another task.
            self.fired = True
            if self.timer is not None:
                self.timer.cancelled = True


class Hub:
    """The cooperative scheduler of one worker process.

    ``loop.py`` calls :meth:`run_ready` and :meth:`run_timers` between polls
    and uses :meth:`next_timeout` as its poll timeout.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.glet = greenlet.getcurrent()
        self.thread = threading.get_ident()
        self.ready: Deque[Tuple[greenlet.greenlet, Any]] = deque()
        self.parked = 0
        self.owner: Any = None  # the Worker this hub schedules for
        #: When the task greenlet running now was switched into (None: the
        #: hub runs). Read by the worker's watchdog thread: a task that holds
        #: the hub for long cannot be stopped in place.
        self.task_since: Optional[float] = None
        self._timers: List[Tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._idle: List[TaskGreenlet] = []  # greenlets whose task ended

    def install(self) -> None:
        """Make this the process's hub (one per worker process)."""
        global _hub
        _hub = self

    def uninstall(self) -> None:
        global _hub
        if _hub is self:
            _hub = None

    def spawn(self, fn: Callable[..., Any], context: Any, *args: Any) -> "TaskGreenlet":
        """Schedule ``fn(*args)`` in a task greenlet (a pooled one if any
        waits), and return it."""
        glet = self._idle.pop() if self._idle else TaskGreenlet(self._serve, parent=self.glet)
        glet.context = context
        self.ready.append((glet, (fn, args)))
        return glet

    def unspawn(self, glet: "TaskGreenlet") -> None:
        """Take back a spawned task that has not started: it never runs."""
        for i, (ready, value) in enumerate(self.ready):
            if ready is glet and type(value) is tuple:  # its start, not a wake-up
                del self.ready[i]
                break
        glet.context = None
        if glet:  # a pooled greenlet, waiting for a task again
            self._idle.append(glet)

    def _serve(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        """A task greenlet's life: run a task, wait in the pool for the
        next. A task stopped by GreenletExit ends its greenlet with it."""
        me = greenlet.getcurrent()
        while True:
            fn(*args)
            me.context = None
            if len(self._idle) >= MAX_IDLE:
                return  # enough wait already (after many parked tasks): end
            self._idle.append(me)
            fn, args = self.glet.switch()

    def in_task(self) -> bool:
        """True when called from a task greenlet of this hub (not from the
        hub itself, nor from another thread)."""
        return threading.get_ident() == self.thread and greenlet.getcurrent() is not self.glet

    def park(self) -> Any:
        """Switch from the current task back to the hub until woken."""
        if not self.in_task():
            raise RuntimeError("the worker's hub cannot wait on a future")
        self.parked += 1
        try:
            return self.glet.switch()
        finally:
            self.parked -= 1

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.clock() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    def next_timeout(self) -> Optional[float]:
        """Seconds until the next timer, 0 if tasks are ready, None if idle."""
        if self.ready:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - self.clock())

    def timer_due(self) -> bool:
        """Whether :meth:`run_timers` has a timer to fire now."""
        return bool(self._timers) and self._timers[0][0] <= self.clock()

    def run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def run_ready(self) -> None:
        """Run every ready greenlet until it finishes or parks."""
        ready = self.ready
        clock = self.clock
        try:
            while ready:
                glet, value = ready.popleft()
                self.task_since = clock()
                if isinstance(value, tuple):
                    glet.switch(*value)
                else:
                    glet.switch(value)
        finally:
            self.task_since = None

    def throw(self, glet: greenlet.greenlet, error: BaseException) -> None:
        """Raise ``error`` in a suspended task greenlet and run it until it
        ends or parks again."""
        self.task_since = self.clock()
        try:
            glet.throw(error)
        finally:
            self.task_since = None


class GreenEvent:
    """A ``threading.Event`` look-alike that parks task greenlets."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._flag = False
        self._waiters: List[Waiter] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.wake()

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._flag:
            return True
        waiter = Waiter(self._hub)
        self._waiters.append(waiter)
        waiter.wait(timeout)
        return self._flag


class _GreenWaiterList(list):  # type: ignore[type-arg]
    """``Future._waiters`` whose new waiters get a :class:`GreenEvent`.

    ``concurrent.futures.wait`` and ``as_completed`` install a waiter on each
    future and then block on ``waiter.event``; swapping the event here, while
    a task greenlet is installing it, makes them park instead.
    """

    def append(self, waiter: Any) -> None:
        hub = _hub
        if hub is not None and hub.in_task() and not isinstance(waiter.event, GreenEvent):
            waiter.event = GreenEvent(hub)
        super().append(waiter)


class GreenFuture(TaskFuture):
    """The future a task gets when it submits work: waiting on it parks the
    task greenlet instead of blocking the worker."""

    def __init__(self, task_id: int, canceller: Canceller) -> None:
        super().__init__(task_id, canceller)
        self._waiters = _GreenWaiterList()
        #: the broker id of the task (on this worker) that submitted it
        self.parent: Optional[int] = None

    def _park_until_done(self, timeout: Optional[float]) -> None:
        hub = _hub
        if self.done() or hub is None or not hub.in_task():
            return
        waiter = Waiter(hub)
        self.add_done_callback(lambda _: waiter.wake())
        waiter.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> Any:
        self._park_until_done(timeout)
        return super().result(timeout=self._remaining(timeout))

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._park_until_done(timeout)
        return super().exception(timeout=self._remaining(timeout))

    def _remaining(self, timeout: Optional[float]) -> Optional[float]:
        # After a park the future is done or the timeout has passed; in a task
        # greenlet a blocking wait on the Condition would freeze the worker.
        hub = _hub
        if hub is not None and hub.in_task():
            return 0
        return timeout
