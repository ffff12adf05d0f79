"""The origin's agent thread: the only owner of the origin's DEALER socket.

User threads never touch a socket. ``submit`` appends a command to a deque
and wakes the agent through an inproc PAIR socket (coalesced: one wake-up per
batch of commands). The agent sends tasks in one SUBMIT per wake-up, matches
RESULTS to futures, marks futures running on STARTED, and breaks the executor
when an initializer fails. It stops once asked to and every future is done,
then says BYE and closes the embedded federation it owns, if any.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from concurrent import futures
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from ._sockets import drain, readable, send_nowait, task_socket

from . import protocol as p
from ._future import CANCEL_TIMEOUT, TaskFuture
from ._versions import local_versions
from .errors import BrokenFederation, FederationLost, RemoteProtocolError
from .outcome import initializer_failure, resolve_future
from .security import FederationKey, HandshakeWatch, make_client

__all__ = ["Agent", "BrokenState"]

logger = logging.getLogger(__name__)

MAX_DRAIN = 512
POLL_SECONDS = 1.0
#: We send HEARTBEAT after this long without sending; the broker is lost
#: after LIVENESS of these without a word from it.
HEARTBEAT = 1.0
LIVENESS = 3

_SUBMIT, _CANCEL, _STOP, _BROKEN = range(4)


class BrokenState:
    """Shared between an executor and its agent: the shutdown lock and why
    the executor is broken, if it is."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.broken: Optional[BrokenFederation] = None


class Agent(threading.Thread):
    """Moves tasks and results between an executor and one broker."""

    _wake_ids = itertools.count()

    def __init__(
        self,
        address: str,
        shared: BrokenState,
        *,
        federation: Any = None,
        context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
        heartbeat: float = HEARTBEAT,
        key: Optional[FederationKey] = None,
    ) -> None:
        super().__init__(name="futurefed-agent", daemon=True)
        self.address = address
        self.key = key
        #: Why the broker would not complete the security handshake, if it would not.
        self.handshake_problem: Optional[str] = None
        self.shared = shared
        self.federation = federation  # closed by the agent when it ends
        self.ctx = context or zmq.Context.instance()
        self.pending: Dict[int, TaskFuture] = {}
        self._ids = itertools.count(1)
        self._commands: Deque[Tuple[Any, ...]] = deque()
        self._wake_address = f"inproc://futurefed-agent-{os.getpid()}-{next(self._wake_ids)}"
        self._wake_lock = threading.Lock()
        self._woken = False
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(self._wake_address)
        self._stopping = False
        self._ended = False
        self._last_sent = self._last_heard = time.monotonic()
        self.heartbeat = heartbeat
        self._exit_info = getattr(federation, "exit_info", None)
        if federation is not None:
            federation.on_broken = self._federation_broken
        # Threads in cancel() wait on this for the broker's answer.
        self._cancel_answered = threading.Condition()
        self._cancel_waiters = 0
        self._sent_blobs: Set[bytes] = set()
        #: Set once the broker answered our HELLO (welcomed or refused us).
        self.answered = threading.Event()
        #: A weak reference to the executor that stops us when it goes.
        self.owner: Optional["weakref.ref[Any]"] = None
        self._handlers: Dict[p.Command, Callable[[Any], None]] = {
            p.Command.WELCOME: self._on_welcome,
            p.Command.REFUSE: self._on_refuse,
            p.Command.RESULTS: self._on_results,
            p.Command.STARTED: self._on_started,
            p.Command.HEARTBEAT: lambda message: None,
        }

    # -- called from user threads ------------------------------------------------

    def submit(
        self, fn: Tuple[bytes, bytes], init: Tuple[bytes, Optional[bytes]], frames: List[Any]
    ) -> TaskFuture:
        """A new future for a task that the agent will send."""
        task_id = next(self._ids)
        future = TaskFuture(task_id, self)
        with self._wake_lock:
            # Appended while the thread runs, a command is taken by it or,
            # if the thread is on its way out, failed by it (run()).
            if self._wake_tx is None:
                raise self._ended_error()
            self._commands.append((_SUBMIT, task_id, future, fn, init, frames))
            self._wake_locked()
        return future

    def _ended_error(self) -> Exception:
        """What a submission to an agent whose thread has ended raises."""
        broken = self.shared.broken
        if broken is not None:
            error = type(broken)(*broken.args)
            error.__cause__ = broken.__cause__
            return error
        return RuntimeError("cannot schedule new futures after shutdown")

    def cancel_futures(self, fs: Sequence[TaskFuture], force: bool = False) -> None:
        """Ask the broker to cancel ``fs`` and wait until it has answered for
        each (see ``_future.py``); the agent thread itself cannot wait. With
        ``force`` (KILL), wait until each is done: stopped, or finished."""
        ids = [future._futurefed_id for future in fs]
        if threading.current_thread() is self:
            self._commands.append((_CANCEL, ids, force))
            return
        if force:
            def answered() -> bool:
                return self._ended or all(future.done() for future in fs)
        else:
            def answered() -> bool:
                return self._ended or not any(future.undecided() for future in fs)
        with self._cancel_answered:
            self._cancel_waiters += 1
        try:
            self._commands.append((_CANCEL, ids, force))
            self._wake()
            with self._cancel_answered:
                answered_in_time = self._cancel_answered.wait_for(answered, CANCEL_TIMEOUT)
        finally:
            with self._cancel_answered:
                self._cancel_waiters -= 1
        if not answered_in_time:
            logger.warning(
                "no answer from the broker at %s to a cancellation within %.0f s;"
                " the tasks may still run", self.address, CANCEL_TIMEOUT,
            )

    def stop(self) -> None:
        """Finish the pending work, then close (does not wait)."""
        self._commands.append((_STOP,))
        self._wake()

    def _federation_broken(self, why: str) -> None:
        """The embedded federation starts no more workers (any thread)."""
        self._commands.append((_BROKEN, why))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._woken or self._wake_tx is None:
            return
        self._woken = True
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # the thread failed before it could listen: it ends anyway
            pass

    # -- the thread ------------------------------------------------------------------

    def run(self) -> None:
        wake_rx = self.ctx.socket(zmq.PAIR)
        wake_rx.bind(self._wake_address)
        dealer = task_socket(self.ctx, zmq.DEALER, linger_ms=2000)
        self._dealer = dealer
        self._handshake: Optional[HandshakeWatch] = None
        self._poller: Optional[zmq.Poller] = None
        try:
            make_client(dealer, self.key)
            # watched until WELCOME: ZeroMQ retries a failed handshake in silence
            self._handshake = HandshakeWatch(dealer, self.key)
            dealer.connect(self.address)
            self._send(p.Hello({
                "role": "origin",
                "name": f"origin-{os.getpid()}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "versions": local_versions(),
            }))
            self._serve(wake_rx)
            self._send(p.Bye())
        except Exception as exc:  # a bug here must not leave futures hanging
            logger.exception("futurefed agent failed")
            self._break(FederationLost(f"the agent thread failed: {exc!r}"))
        finally:
            with self._wake_lock:
                self._wake_tx.close()
                self._wake_tx = None
                left = list(self._commands)  # queued after the last turn took them
                self._commands.clear()
            self._fail_submissions(left)
            with self._cancel_answered:
                self._ended = True
                self._cancel_answered.notify_all()
            self.answered.set()  # nothing more will come: a constructor waiting goes on
            wake_rx.close()
            self._stop_watching()
            dealer.close()
            if self.federation is not None:
                self.federation.close()

    def _serve(self, wake_rx: Any) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(wake_rx, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        if self._handshake is not None:
            poller.register(self._handshake.monitor, zmq.POLLIN)
        while True:
            events = dict(poller.poll(min(POLL_SECONDS, self.heartbeat) * 1000))
            if self._handshake is not None and self._handshake.monitor in events:
                problem = self._handshake.check()
                if problem is not None:
                    self.handshake_problem = problem
                    logger.error("%s", problem)
            if wake_rx in events:
                # Drain, then re-arm, under the lock: a command queued after
                # this sends a fresh wake-up; one queued before is taken below.
                with self._wake_lock:
                    while readable(wake_rx):
                        wake_rx.recv()
                    self._woken = False
            self._take_commands()
            if self._dealer in events:
                self._drain()
                if self._commands:  # a done-callback's cancel(): send it now
                    self._take_commands()
            if self._cancel_waiters:
                with self._cancel_answered:
                    self._cancel_answered.notify_all()
            if self._stopping and not self.pending:
                return
            now = time.monotonic()
            if now - self._last_sent >= self.heartbeat:
                self._send(p.Heartbeat())
            silent = now - self._last_heard
            # a broker we joined has answered (the executor waited for it); an
            # embedded one was up before we started
            known = self.answered.is_set() or self.federation is not None
            if known and silent > LIVENESS * self.heartbeat:
                self._break(FederationLost(
                    f"the broker at {self.address} has been silent for {silent:.1f} s"
                ))
                return

    def _fail_submissions(self, commands: List[Tuple[Any, ...]]) -> None:
        """Fail the futures of SUBMIT commands the thread will never send."""
        for command in commands:
            if command[0] == _SUBMIT:
                try:
                    command[2].set_exception(self._ended_error())
                except futures.InvalidStateError:
                    pass  # cancelled by the user meanwhile

    def _take_commands(self) -> None:
        submits: List[p.TaskRecord] = []
        blobs: Dict[bytes, Any] = {}
        cancels: List[int] = []
        kills: List[int] = []
        commands = self._commands
        while commands:
            command = commands.popleft()
            kind = command[0]
            if kind == _SUBMIT:
                _, task_id, future, fn, init, frames = command
                if self.shared.broken is not None:
                    future.set_exception(self.shared.broken)
                    continue
                self.pending[task_id] = future
                for digest, blob in (fn, init):
                    if blob is not None and digest not in self._sent_blobs:
                        self._sent_blobs.add(digest)
                        blobs[digest] = blob
                submits.append(p.TaskRecord(task_id, fn[0], init[0], frames))
            elif kind == _CANCEL:
                _, ids, force = command
                pending = self.pending
                for task_id in ids:
                    future = pending.get(task_id)
                    if future is None:
                        continue  # settled: its result came first
                    if force:
                        kills.append(task_id)
                    elif future.undecided():
                        cancels.append(task_id)
            elif kind == _BROKEN:
                self._break(BrokenFederation(command[1]))
                submits = []  # failed with the rest: not worth sending
            else:
                self._stopping = True
        if submits:
            self._send(p.Submit(submits, blobs))
        if cancels:
            self._send(p.Cancel(cancels))
        if kills:
            self._send(p.Kill(kills))

    def _drain(self) -> None:
        for frames in drain(self._dealer, MAX_DRAIN):
            self._last_heard = time.monotonic()  # a message, not just a wake-up
            try:
                p.dispatch(frames, self._handlers, "an origin")
            except RemoteProtocolError as exc:
                logger.warning("origin dropped a message from its broker: %s", exc)

    def _on_welcome(self, message: p.Welcome) -> None:
        self.answered.set()
        self._stop_watching()

    def _stop_watching(self) -> None:
        """The handshake is done: monitoring the socket has no more to say."""
        if self._handshake is not None:
            if self._poller is not None:
                self._poller.unregister(self._handshake.monitor)
            self._handshake.close()
            self._handshake = None

    def _send(self, message: p.Message) -> None:
        if not send_nowait(self._dealer, p.encode(message)):
            logger.debug("no connection to the broker at %s; dropped %s",
                         self.address, message.command.name)
        self._last_sent = time.monotonic()

    # -- messages from the broker ------------------------------------------------------

    def _on_refuse(self, message: p.Refuse) -> None:
        self._break(FederationLost(f"the broker at {self.address} refused us: {message.reason}"))
        self.answered.set()

    def _on_started(self, message: p.Started) -> None:
        self._mark_running(message.ids)

    def _mark_running(self, task_ids: List[int]) -> None:
        for task_id in task_ids:
            future = self.pending.get(task_id)
            if future is not None and future.undecided():
                future.set_running_or_notify_cancel()

    def _on_results(self, message: p.Results) -> None:
        if message.started:
            self._mark_running(message.started)
        failure: Optional[BrokenFederation] = None
        for record in message.results:
            future = self.pending.pop(record.task_id, None)
            if future is None:
                continue
            if record.status is p.Status.INIT_FAILED:
                # broken, but the results that came with it are the users'
                self.pending[record.task_id] = future
                if failure is None:
                    failure = initializer_failure(record.frames)
                continue
            resolve_future(future, record, self._exit_info)
        if failure is not None:
            self._break(failure)

    def _break(self, error: BrokenFederation) -> None:
        """Fail every pending future with ``error``; later submits raise it."""
        with self.shared.lock:
            if self.shared.broken is None:
                self.shared.broken = error
        pending, self.pending = self.pending, {}
        for future in pending.values():
            try:
                future.set_exception(error)
            except futures.InvalidStateError:
                pass  # cancelled or finished by the user meanwhile


def watch_executor(executor: Any, agent: Agent) -> None:
    """Stop ``agent`` once ``executor`` is garbage-collected.

    The weak reference is kept by the agent, not by the executor: CPython
    calls no callback of a weak reference that is itself garbage, as one
    held by an executor in a reference cycle would be. The callback closes
    over the agent only, so that it keeps no executor alive."""
    agent.owner = weakref.ref(executor, lambda _: agent.stop())
