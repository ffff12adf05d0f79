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
import os
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
#: The timer heap is swept of cancelled timers when it reaches twice its
#: size after the last sweep, and at least this size.
MIN_PURGE = 256


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
        self.callback: Optional[Callable[[], None]] = callback
        self.cancelled = False

    def cancel(self) -> None:
        """It will not fire; what its callback refers to (a finished task's
        call, say) is let go at once, not when the timer leaves the heap."""
        self.cancelled = True
        self.callback = None


class Waiter:
    """One park of one task greenlet; woken at most once."""

    __slots__ = ("hub", "glet", "fired", "timer")

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub
        self.glet: Optional[greenlet.greenlet] = None
        self.fired = False
        self.timer: Optional[_Timer] = None

    def wake(self, value: bool = True) -> None:
        """Resume the parked greenlet (from the hub, another task, or
        another thread: then the hub does it, woken)."""
        if threading.get_ident() != self.hub.thread:
            self.hub.call_soon_threadsafe(lambda: self.wake(value))
            return
        if self.fired:
            return
        self.fired = True
        if self.timer is not None:
            self.timer.cancel()
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
                self.timer.cancel()


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
        self._purge_at = MIN_PURGE  # heap size at which cancelled timers are swept
        self._seq = itertools.count()
        self._idle: List[TaskGreenlet] = []  # greenlets whose task ended
        # Other threads (a task's own, a thread pool's future settling) hand
        # the hub work through a deque and wake its poll through a pipe.
        self._calls: Deque[Callable[[], None]] = deque()
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def install(self) -> None:
        """Make this the process's hub (one per worker process)."""
        global _hub
        _hub = self

    def uninstall(self) -> None:
        global _hub
        if _hub is self:
            _hub = None

    def close(self) -> None:
        """Close the wake-up pipe (the hub runs no more)."""
        for fd in (self.wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass  # closed already
        self.wake_r = self._wake_w = -1

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Have the hub call ``callback`` at its next turn; from any thread."""
        self._calls.append(callback)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the hub has been woken already
        except OSError:
            pass  # closed: the worker is ending

    def run_calls(self) -> None:
        """Call what other threads handed the hub (loop.py, after a poll
        reported ``wake_r`` readable)."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass  # drained
        calls = self._calls
        while calls:
            calls.popleft()()

    def spawn(self, fn: Callable[..., Any], context: Any, *args: Any) -> "TaskGreenlet":
        """Schedule ``fn(*args)`` in a task greenlet (a pooled one if any
        waits), and return it."""
        if self._idle:
            glet = self._idle.pop()
        else:
            # Started empty, it waits at once for its task as a pooled one
            # does: a task passed as the first switch's arguments would stay
            # referred to by that call for the greenlet's whole life.
            glet = TaskGreenlet(self._serve, parent=self.glet)
            glet.switch()
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

    def _serve(self) -> None:
        """A task greenlet's life: wait for a task, run it, wait in the pool
        for the next. A task stopped by GreenletExit ends its greenlet."""
        me = greenlet.getcurrent()
        while True:
            start = self.glet.switch()
            while type(start) is not tuple:
                # A wake-up meant for the task that just ended, which caught
                # the GreenletExit of a stop: it waits for nothing now.
                start = self.glet.switch()
            fn, args = start
            start = None
            fn(*args)
            fn = args = None  # type: ignore[assignment]  # keep nothing of it while idle
            me.context = None
            if len(self._idle) >= MAX_IDLE:
                return  # enough wait already (after many parked tasks): end
            self._idle.append(me)

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
        if len(self._timers) >= self._purge_at:
            # cancelled timers leave the heap only from its top: sweep them
            # now and then, so that a long-lived one at the top (a parked
            # parent's wait) does not keep thousands behind it
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._purge_at = max(MIN_PURGE, 2 * len(self._timers))
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
            callback = timer.callback
            if not timer.cancelled and callback is not None:
                callback()

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
        ends or parks again. A wake-up of it that is queued already is
        dropped: it was for the wait that ``error`` ends."""
        if any(ready is glet for ready, _ in self.ready):
            kept = [entry for entry in self.ready if entry[0] is not glet]
            self.ready.clear()
            self.ready.extend(kept)
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
        if threading.get_ident() != self._hub.thread:
            # a future settled by another thread (a thread pool's): the hub
            # sets us, so that a task checking then parking cannot miss it
            self._hub.call_soon_threadsafe(self.set)
            return
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
        if self.done() or hub is None:
            return
        if not hub.in_task():
            if threading.get_ident() == hub.thread and (timeout is None or timeout > 0):
                # the hub itself (a done-callback it runs) would wait for
                # ever: only the hub settles this future
                raise RuntimeError("the worker's hub cannot wait on a pending future"
                                   " (from a done-callback, say)")
            return  # another thread: it blocks until the hub settles it
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
