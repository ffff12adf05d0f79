"""Stopping tasks: time limits, forced cancels, and replacing the worker.

A task is stopped when its time limit passes (``task_timeout``,
``options(timeout=...)``) or its origin cancels it with ``force=True``
(KILL). How depends on where the task is:

* still in the worker's queue: it is dropped;
* parked (waiting on futurefed futures): :class:`greenlet.GreenletExit` is
  thrown into its greenlet, which unwinds (its ``finally`` blocks run) and
  the worker goes on;
* holding the worker (computing, sleeping, blocked in a call): Python cannot
  interrupt it, so the worker *replaces itself*. It sends the stopped task's
  outcome and BYE (the broker requeues its other tasks, at no retry's cost),
  then ``exec``s its own command line: same pid, same lifeline, same parent,
  a fresh interpreter that joins the broker anew.

Only the worker's hub may run task code, so while a task holds it the
:class:`Watchdog` thread reads the socket in the hub's place (into an inbox
the hub handles later, in order) to see KILLs, and checks time limits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Dict, List, NoReturn, Optional, Sequence, Set

import greenlet

from .. import protocol as p
from .. import serialize
from .._sockets import drain
from ..errors import RemoteProtocolError, SerializationError, TaskTimeout

if TYPE_CHECKING:
    from .green import _Timer
    from .loop import Worker

__all__ = [
    "RunningTask", "TaskStopper", "Watchdog", "replace_process", "replacement_argv", "stop_error",
    "stopped_record", "task_stack",
]

logger = logging.getLogger(__name__)

#: While tasks run, the watchdog looks this often; it is also how late a
#: time limit may be noticed when a task holds the worker.
WATCH_TICK = 0.05
#: One task greenlet has held the hub this long: the watchdog reads for it.
BUSY_AFTER = 0.05
#: A parked task that was stopped in place but does not end (it caught the
#: GreenletExit and waits on, or computes) gets this long before the worker
#: is replaced anyway.
STOP_GRACE = 5.0
#: At most this long for the stopped task's outcome and BYE to leave before
#: the worker replaces itself.
LEAVE_SECONDS = 1.0
#: Messages the watchdog reads for the hub at a time.
MAX_DRAIN = 256
#: Exit status if ``exec`` fails: a supervisor (the embedded federation,
#: fedrun's host agent) then starts another worker.
EXEC_FAILED = 75


class RunningTask:
    """A task this worker has started (or is about to start, in this turn's
    start batch) and not finished."""

    __slots__ = (
        "record", "glet", "started", "timeout", "deadline", "timer", "function", "partial",
        "parent", "outcome",
    )

    def __init__(self, record: p.TaskRecord, glet: greenlet.greenlet) -> None:
        self.record = record
        self.glet = glet
        self.started: Optional[float] = None  # when its greenlet first ran
        self.timeout: Optional[float] = None  # its limit, in seconds
        self.deadline: Optional[float] = None  # monotonic; moved on by each item of a chunk
        self.timer: Optional["_Timer"] = None  # the hub's timer for the deadline
        self.function: Any = None  # the loaded function, once known
        self.partial: Optional[List[Any]] = None  # a map chunk's results so far
        self.parent: Optional[int] = None  # broker id of the task here that submitted it
        self.outcome: Optional[p.ResultRecord] = None  # set once it is stopped

    @property
    def task_id(self) -> int:
        return self.record.task_id

    def function_name(self) -> str:
        fn = self.function
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        if name is None:
            name = "the task" if fn is None else repr(fn)[:200]
        return str(name)


def task_stack(task: RunningTask, main_thread: int) -> List[traceback.FrameSummary]:
    """Where ``task`` is now: its greenlet's frames, read from the main
    thread if that is where it runs at this moment."""
    glet = task.glet
    if task.started is None or glet.context is not task.record:
        return []  # not started yet, or over: its greenlet runs no part of it
    frame = glet.gr_frame
    if frame is None and glet:  # started, not dead, not suspended: it is running
        frame = sys._current_frames().get(main_thread)
    if frame is None:
        return []
    return list(traceback.extract_stack(frame))


def replacement_argv() -> List[str]:
    """This process's command line, to start its replacement with."""
    original = getattr(sys, "orig_argv", None)  # Python 3.10+: with interpreter flags
    if original:
        return [sys.executable, *original[1:]]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m ...
        return [sys.executable, "-m", spec.name, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def replace_process(argv: Sequence[str], environ: Dict[str, str]) -> NoReturn:
    """Become a fresh worker: ``exec`` the same command line (the pid,
    the lifeline and the parent stay); exit if that fails."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken: nothing more to save
    try:
        os.execve(argv[0], list(argv), environ)
    except OSError as exc:
        logger.critical("cannot restart the worker as %s: %s; exiting", argv, exc)
        os._exit(EXEC_FAILED)


class Watchdog(threading.Thread):
    """The worker's second thread: heartbeats while the hub is busy, reads
    the socket for it while a task holds it (to act on KILL), and stops
    tasks whose time limit passed while the hub could not."""

    def __init__(self, worker: "Worker") -> None:
        super().__init__(name="watchdog", daemon=True)
        self.worker = worker

    def run(self) -> None:
        worker = self.worker
        while not worker._closed.is_set():
            # Woken early when tasks start while it dozes (loop.py). Dozing is
            # said before _active is read: a task started after that read
            # sees it and wakes us.
            worker.watch_dozing = True
            interval = self._interval()
            worker.watch_dozing = interval > WATCH_TICK
            worker._watch.wait(interval)
            worker.watch_dozing = False
            worker._watch.clear()
            if worker._closed.is_set():
                return
            try:
                self._tick()
            except Exception:  # a bug must not end the thread that enforces time limits
                logger.exception("worker %s: the watchdog failed at a tick", worker.name)

    def _tick(self) -> None:
        worker = self.worker
        self._heartbeat()
        since = worker.hub.task_since
        if since is None or time.monotonic() - since < BUSY_AFTER:
            return  # the hub reads, and keeps time, itself
        worker.stopper.read_while_busy(WATCH_TICK)
        now = time.monotonic()
        late = [
            task for task in list(worker._active.values())
            if task.deadline is not None and task.deadline <= now
        ]
        if late and worker.hub.task_since is not None:
            worker.stopper.replace(late)

    def _interval(self) -> float:
        worker = self.worker
        if worker._active:
            return min(WATCH_TICK, worker.heartbeat / 2)
        return worker.heartbeat / 2

    def _heartbeat(self) -> None:
        """Prove we are alive while a long task keeps the hub from sending."""
        worker = self.worker
        if time.monotonic() - worker.last_sent < worker.heartbeat:
            return
        if not worker._sock_lock.acquire(timeout=worker.heartbeat):
            return  # the hub is polling: it sends its own heartbeat
        try:
            if worker.sock is not None and not worker._closed.is_set():
                worker._send(p.Heartbeat())
        finally:
            worker._sock_lock.release()


def stop_error(task: RunningTask, killed: bool, worker_name: str, host: str,
               replaced: bool) -> BaseException:
    """Why ``task`` (or a task waiting on it) was stopped."""
    where = f"worker {worker_name} on {host} (pid {os.getpid()})"
    how = ", by replacing that worker" if replaced else ""
    if killed:
        return concurrent.futures.CancelledError(
            f"{task.function_name()} was stopped by cancel(force=True) on {where}{how}"
        )
    return TaskTimeout(
        f"{task.function_name()} ran longer than its time limit of {task.timeout:g} s on"
        f" {where}; it was stopped{how}",
        function=task.function_name(), timeout=task.timeout, host=host, worker=worker_name,
        pid=os.getpid(),
    )


def stopped_record(task: RunningTask, error: Optional[BaseException],
                   main_thread: int) -> p.ResultRecord:
    """The outcome of a stopped task: CANCELLED for a forced cancel (``error``
    None); else ``error`` with where the task was, or for a map chunk the
    results it had and then ``error``."""
    if error is None:
        return p.ResultRecord(task.task_id, p.Status.CANCELLED, [])
    text = serialize.remote_traceback_text(error, task_stack(task, main_thread))
    if task.partial is not None:
        try:
            frames = serialize.dumps((list(task.partial), error, text))
        except SerializationError:
            pass  # a result it had cannot be pickled: report the error alone
        else:
            return p.ResultRecord(task.task_id, p.Status.OK, frames)
    return p.ResultRecord(task.task_id, p.Status.ERROR, serialize.dump_exception(error, text))


def _kill_ids(frames: List[Any]) -> List[int]:
    """The ids of a KILL message, or none if ``frames`` is something else
    (or malformed: the hub logs it when it handles the message)."""
    try:
        message = p.decode(frames)
    except RemoteProtocolError:
        return []
    return message.ids if isinstance(message, p.Kill) else []


class TaskStopper:
    """What stops a :class:`~futurefed.worker.loop.Worker`'s tasks; it
    works on the worker's queue, tasks and socket."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self._replacing = threading.Lock()
        #: ids of KILLs the watchdog read for tasks it found neither queued
        #: nor started (the hub was starting them): looked for again while
        #: the hub is busy, until the hub handles those KILLs itself
        self.unresolved: Set[int] = set()

    # -- the hub's side --------------------------------------------------------------

    def stop_killed(self) -> None:
        """Stop the started tasks that a KILL named (parked: the hub runs)."""
        w = self.worker
        tasks, w._to_stop = w._to_stop, []
        for task in tasks:
            self.answer_stopped(task)
        for task in tasks:
            self.unwind(task)

    def expire(self, task: RunningTask) -> None:
        """The hub's timer for ``task``'s deadline fired."""
        w = self.worker
        if w._active.get(task.task_id) is not task or task.deadline is None:
            return  # finished meanwhile
        left = task.deadline - time.monotonic()
        if left > 0:  # a chunk's next item moved it on
            task.timer = w.hub.call_later(left, lambda: self.expire(task))
            return
        if task.outcome is not None:  # stopped, but it did not end within STOP_GRACE
            self.replace([task])
            return
        self.decide(task, killed=False, replaced=False)
        self.answer_stopped(task)
        self.unwind(task)

    def answer_stopped(self, task: RunningTask) -> None:
        """Queue the outcome decided for ``task``, and a KILL for its children."""
        w = self.worker
        if task.outcome is not None:
            w._results.append(task.outcome)
        w._kills.extend(self.children_of({task.task_id}))

    def unwind(self, task: RunningTask) -> None:
        """End a parked (or not yet started) task in place: GreenletExit is
        thrown into it. If it does not end, the worker is replaced after
        STOP_GRACE (by the hub's timer, or by the watchdog if it computes)."""
        w = self.worker
        glet = task.glet
        if glet.dead or glet.context is not task.record:
            return  # it ended; its greenlet may run another task by now
        if task.started is None:  # not started: it never runs
            w.hub.unspawn(glet)
            w._task_glets.discard(glet)
            w._active.pop(task.task_id, None)
            return
        if task.timer is not None:
            task.timer.cancel()
        task.deadline = time.monotonic() + STOP_GRACE
        task.timer = w.hub.call_later(STOP_GRACE, lambda: self.expire(task))
        w.hub.throw(glet, greenlet.GreenletExit())

    def decide(self, task: RunningTask, killed: bool, replaced: bool) -> p.ResultRecord:
        """Settle how ``task`` ends: CANCELLED if killed, else TaskTimeout."""
        w = self.worker
        error = None if killed else stop_error(task, False, w.name, socket.gethostname(), replaced)
        task.outcome = stopped_record(task, error, w.hub.thread)
        return task.outcome

    def children_of(self, task_ids: Set[int]) -> List[int]:
        """Our nested tasks, not yet answered, that these tasks submitted.
        (A snapshot first: the watchdog calls this while a task, in the
        main thread, may be submitting.)"""
        pending = list(self.worker.pending.items())
        return [tid for tid, future in pending if future.parent in task_ids]

    # -- the watchdog's side, while a task holds the hub --------------------------------

    def read_while_busy(self, timeout: float) -> None:
        """Read the socket for the hub, into its inbox, and act on KILLs."""
        w = self.worker
        if not w._sock_lock.acquire(timeout=timeout):
            return
        try:
            if w.hub.task_since is None or w.sock is None:
                return  # the hub is back: it reads for itself
            kills: List[int] = list(self.unresolved)
            for frames in drain(w.sock, MAX_DRAIN):
                w.last_heard = time.monotonic()
                w._inbox.append(frames)
                kills += _kill_ids(frames)
            if kills:
                self.kill_while_busy(kills)
        finally:
            w._sock_lock.release()

    def kill_while_busy(self, task_ids: List[int]) -> None:
        """A KILL while a task holds the hub: drop the queued tasks it names
        (the hub cannot start any meanwhile: it needs the socket lock
        first); a started one can only be stopped by replacing the worker."""
        w = self.worker
        dropped: List[p.ResultRecord] = []
        stop: List[RunningTask] = []
        for task_id in task_ids:
            self.unresolved.discard(task_id)
            if w.queue.pop(task_id, None) is not None:
                dropped.append(p.ResultRecord(task_id, p.Status.CANCELLED, []))
                continue
            task = w._active.get(task_id)
            if task is None:
                self.unresolved.add(task_id)  # finished, unknown, or being started
            elif task.outcome is None:
                stop.append(task)
        if stop:
            self.replace(stop, killed=True, answered=dropped)
        elif dropped:
            w._send(p.Results(dropped))

    # -- replacing the worker ------------------------------------------------------------

    def replace(self, tasks: Sequence[RunningTask], killed: bool = False,
                answered: Sequence[p.ResultRecord] = ()) -> None:
        """Stop ``tasks`` by replacing this worker; does not return (unless
        the other thread is replacing it already, in the watchdog).

        The tasks here that wait on a stopped one (its parent, and so on up)
        cannot be resumed: they fail with the same error. Every other task
        goes back to the broker's queue with the BYE, at no retry's cost.
        """
        w = self.worker
        if not self._replacing.acquire(blocking=False):
            if threading.get_ident() == w.hub.thread:
                threading.Event().wait()  # the watchdog replaces the process
            return
        w._sock_lock.acquire()  # for good: nothing else is sent from this process
        try:
            self._last_words(tasks, killed, answered)
        except Exception:  # a bug: the process is replaced all the same
            logger.critical("worker %s: could not say its last words", w.name, exc_info=True)
        replace_process(w.argv, w._environ)

    def _last_words(self, tasks: Sequence[RunningTask], killed: bool,
                    answered: Sequence[p.ResultRecord]) -> None:
        """Answer the stopped tasks and those waiting on them, stop their
        children, hand back the rest (BYE), and close the socket."""
        w = self.worker
        records = list(answered)
        doomed: Dict[int, RunningTask] = {}
        for task in tasks:
            if task.outcome is None:
                records.append(self.decide(task, killed, replaced=True))
            doomed[task.task_id] = task
            error = None
            waiting = w._active.get(task.parent) if task.parent is not None else None
            while waiting is not None and waiting.task_id not in doomed:
                if error is None:
                    error = stop_error(task, killed, w.name, socket.gethostname(), True)
                if waiting.outcome is None:
                    waiting.outcome = stopped_record(waiting, error, w.hub.thread)
                    records.append(waiting.outcome)
                doomed[waiting.task_id] = waiting
                waiting = w._active.get(waiting.parent) if waiting.parent is not None else None
        kills = w._kills + self.children_of(set(doomed))
        records += w._results
        w._results = []
        logger.warning(
            "worker %s: stopping %s; replacing this worker (pid %d stays)", w.name,
            ", ".join(f"{task.function_name()} ({'cancelled' if killed else 'time limit'})"
                      for task in tasks), os.getpid(),
        )
        self.leave(kills, records)

    def leave(self, kills: List[int], records: List[p.ResultRecord]) -> None:
        """Send our last words (children to stop, answers, BYE) and close,
        waiting at most LEAVE_SECONDS for them to leave."""
        w = self.worker
        sock = w.sock
        if sock is None:
            return
        if kills:
            sock.send_multipart(p.encode(p.Kill(kills)))
        if records:
            sock.send_multipart(p.encode(p.Results(records)), copy=False)
        sock.send_multipart(p.encode(p.Bye()))
        sock.close(linger=int(LEAVE_SECONDS * 1000))
        w.sock = None
        # term() returns once what we sent has left (or the linger passed);
        # a socket a task left open would hold it: do not wait for that.
        term = threading.Thread(target=w.ctx.term, name="leave", daemon=True)
        term.start()
        term.join(LEAVE_SECONDS + 0.5)
