"""A worker process: one DEALER socket to its broker, a hub of task greenlets.

The main greenlet is the hub. Each turn of :meth:`Worker.serve` sends what is
pending (credit, start notices, results, nested submissions), polls the socket
and the lifeline, handles what arrived, starts queued tasks and runs every
greenlet that is ready. A task that waits on a futurefed future parks (see
``green.py``); the worker then asks its broker for more work, so a task
waiting on its children never starves them, even with one worker.

Credit: the worker keeps about :data:`PREFETCH_SECONDS` of work in hand,
judged from a moving average of task durations, never fewer than two tasks
(one running, one ready) nor more than :data:`MAX_PREFETCH`; before its first
task has finished it takes one task only. Tasks still in its queue have not
started and can be cancelled.

A broker lost (silent for :data:`LIVENESS` heartbeats, or its connection
closed): the worker abandons every task it held for it, and joins another
broker of the federation, tried in turn (``search.py``): those the lost
broker's last WELCOME named, then ``fallbacks`` (``BROKER_ADDRESSES``). It
exits only when it knows none, or none answers within ``connect_timeout``
(docs/federation.md, "A broker lost").

Tasks may have a time limit and may be stopped by a forced cancel (KILL);
``stopping.py`` says how, and its watchdog thread stands in for the hub
while a task holds it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import select
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import greenlet
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import protocol as p
from .. import serialize
from .._future import CANCEL_TIMEOUT, TaskFuture
from .._versions import local_versions
from .._sockets import drain, readable, send_nowait, task_socket
from ..security import (
    HANDSHAKE_EVENTS, FederationKey, describe_handshake_failure, make_client, monitor_socket,
)
from ..outcome import resolve_future, run_chunk
from ..errors import FederationLost, RemoteProtocolError, SerializationError
from .green import GreenFuture, Hub, TaskGreenlet, Waiter
from .search import BrokerSearch, candidates
from .stopping import RunningTask, TaskStopper, Watchdog, replacement_argv

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

PREFETCH_SECONDS = 0.002
MAX_PREFETCH = 64
START_BATCH_SECONDS = 0.001
#: A function whose recent calls here took less than this is not announced
#: with STARTED: its result arrives about as soon as the notice would.
QUICK_SECONDS = 0.0002
MAX_DRAIN = 256  # messages handled per poll before running tasks again
#: Seconds a worker whose lifeline closed may take to finish on its own before
#: it is ended mid-task: its origin is gone, so nobody wants the result.
LIFELINE_GRACE = 1.0
#: The broker is lost after this many heartbeat intervals of silence; a
#: broker tried in its stead has as long to answer.
LIVENESS = 3
#: Seconds a worker whose broker was lost looks for another, when it has no
#: ``connect_timeout``.
REJOIN_TIMEOUT = 10.0
#: What the connection monitor reports: a connection refused (and retried),
#: which ends an attempt to join a broker, or an established one closed,
#: which ends the session with the broker: ZeroMQ would reconnect under a
#: new routing id, which the broker does not know.
_MONITORED = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED


def _watch_lifeline(fd: int) -> None:
    """End the process once the lifeline closes, even if a task never yields."""
    poller = select.poll()  # not select(): a task may have opened 1,024 files
    poller.register(fd, select.POLLIN)
    poller.poll()
    time.sleep(LIFELINE_GRACE)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # closed or broken: nothing more to save
    os._exit(1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class _InitState:
    """The outcome of one executor initializer in this worker."""

    __slots__ = ("error",)

    def __init__(self, error: Optional[List[Any]]) -> None:
        self.error = error  # dump_exception frames if it raised


class Worker:
    """Runs tasks from a broker until told to stop or the lifeline closes;
    joins another broker of the federation when its broker is lost.

    Args:
        address: the broker to join (``BROKER_ADDRESS``).
        name: this worker's name (``WORKER_NAME``).
        fallbacks: other brokers' task addresses (``BROKER_ADDRESSES``),
            tried when ``address`` does not answer and after a broker loss.
        connect_timeout: seconds to find a broker, at start and after a loss
            (None: wait for the first broker for ever, and
            :data:`REJOIN_TIMEOUT` after a loss).
    """

    def __init__(
        self,
        address: str,
        name: str,
        *,
        fallbacks: Sequence[str] = (),
        lifeline: Optional[int] = None,
        heartbeat: float = 1.0,
        connect_timeout: Optional[float] = None,
        context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
        key: Optional[FederationKey] = None,
        argv: Optional[Sequence[str]] = None,
    ) -> None:
        """``argv`` is the command line that starts a worker like this one:
        the worker ``exec``s it to replace itself (by default, its own)."""
        self.address = address  # the broker joined, or being tried
        self.key = key  # the federation key (CurveZMQ), if it uses one
        self.handshake_problem: Optional[str] = None  # why a broker would not have us
        self.name = name
        self.fallbacks = list(fallbacks)
        self.lifeline = lifeline
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.welcomed = False  # by the broker at ``address``
        self.gave_up = False  # no broker answered at start within connect_timeout
        self.broker_lost = False  # lost, and no other broker took us
        self.failure: Optional[str] = None  # why we exit with status 1
        # what the broker's WELCOME said: its name, its own idea of its
        # address, and the peer brokers to go to if it is lost
        self.broker_name = ""
        self.broker_task: Optional[str] = None
        self.peers: List[str] = []
        self.search: Optional[BrokerSearch] = None  # looking for a broker
        self.lost_at: Optional[float] = None  # when we last lost a broker
        # Counts broker sessions: a task of an earlier one sends no result.
        self.session = 0
        self._refused = False  # the broker tried answered REFUSE
        self._lost_name = ""  # the broker we lost last, for messages
        self.monitor: Any = None  # connection events of ``sock``
        self.poller = zmq.Poller()
        # The hub loop owns the socket; the watchdog thread borrows it, under
        # this lock, only while a long task keeps the loop from using it.
        self._sock_lock = threading.RLock()
        self._closed = threading.Event()
        self._watch = threading.Event()  # wakes the watchdog
        self.watch_dozing = False  # the watchdog sleeps long: no task was running
        self.last_sent = self.last_heard = time.monotonic()
        self.ctx = context or zmq.Context.instance()
        self.hub = Hub()
        self.hub.owner = self
        self.sock: Any = None
        self.stopping = False
        # server side: tasks from the broker
        self.queue: "OrderedDict[int, p.TaskRecord]" = OrderedDict()
        self._task_glets: Set[TaskGreenlet] = set()  # started in this session
        self.outstanding = 0  # credit granted to the broker, not yet used
        self.blobs: Dict[bytes, Any] = {}
        self.functions: Dict[bytes, Callable[..., Any]] = {}
        self.inits: Dict[bytes, _InitState] = {}
        self.main_namespace: Dict[str, Any] = {}  # the origins' __main__, shared
        self.ewma: Optional[float] = None  # seconds per task, all functions
        self.durations: Dict[bytes, float] = {}  # seconds per task, by function
        self._results: List[p.ResultRecord] = []
        self._started: List[int] = []  # broker ids of tasks started, to announce
        # stopping tasks (stopping.py)
        self._active: Dict[int, RunningTask] = {}  # broker id -> started, not finished
        self._to_stop: List[RunningTask] = []  # killed; stopped once the socket is free
        self._inbox: Deque[List[Any]] = deque()  # read by the watchdog for the hub
        self.stopper = TaskStopper(self)
        self.token = secrets.randbits(62)  # this incarnation, in its nested tasks' options
        self.argv = list(argv) if argv is not None else replacement_argv()
        self._environ = dict(os.environ)  # for the replacement, as we were started
        # client side: tasks our tasks submit
        self.pending: Dict[int, GreenFuture] = {}
        self._ids = itertools.count(1)
        self._sent_blobs: Set[bytes] = set()
        self._submits: List[p.TaskRecord] = []
        self._submit_blobs: Dict[bytes, Any] = {}
        self._cancels: List[int] = []
        self._kills: List[int] = []
        self._cancel_waits: List[Tuple[Sequence[TaskFuture], Waiter, bool]] = []
        self._handlers: Dict[p.Command, Callable[[Any], None]] = {
            p.Command.WELCOME: self._on_welcome,
            p.Command.REFUSE: self._on_refuse,
            p.Command.TASKS: self._on_tasks,
            p.Command.CANCEL: self._on_cancel,
            p.Command.KILL: self._on_kill,
            p.Command.RESULTS: self._on_results,
            p.Command.STARTED: self._on_started,
            p.Command.HEARTBEAT: lambda message: None,
            p.Command.SHUTDOWN: self._on_shutdown,
        }

    # -- phases: connect, serve, close ----------------------------------------

    def run(self) -> int:
        """Serve until stopped; the process exit status: 1 if no broker
        answered within ``connect_timeout``, a broker refused us, or our
        broker was lost and no other took us (``failure`` says which)."""
        self.connect()
        try:
            self.serve()
        except Exception:
            # A crash, not a departure (Ctrl-C is one): no BYE, so that the broker counts the
            # tasks we held as lost with us (max_retries, then WorkerLost)
            # instead of handing them out again for free, for ever, should
            # one of them be what crashes us.
            self.stopping = True
            raise
        finally:
            self.close()
        return 0 if self.welcomed and self.failure is None else 1

    def connect(self) -> None:
        """Start the helper threads and the search for our first broker."""
        if self.lifeline is not None:
            self.poller.register(self.lifeline, zmq.POLLIN)
            threading.Thread(
                target=_watch_lifeline, args=(self.lifeline,), name="lifeline", daemon=True
            ).start()
        self.poller.register(self.hub.wake_r, zmq.POLLIN)  # other threads' calls
        Watchdog(self).start()
        self.hub.install()
        serialize.set_process_label(self.name)
        self.search = BrokerSearch(  # serve() opens the first connection
            [self.address, *self.fallbacks], time.monotonic(), self.connect_timeout,
            LIVENESS * self.heartbeat,
        )

    def close(self) -> None:
        self.hub.uninstall()
        self.hub.close()
        self._closed.set()
        self._watch.set()
        with self._sock_lock:
            if self.sock is not None and not self.stopping:
                self._send(p.Bye())
        self._close_socket(linger_ms=1000)  # time for the BYE to leave

    def serve(self) -> None:
        while not self.stopping:
            if self.search is not None and not self._step_search(time.monotonic()):
                return
            if not self.queue and not self._tasks_waiting():
                # Nothing to start: results go out now. Otherwise (tasks are
                # queued, or the TASKS that came while a task ran wait on the
                # socket) they leave with the next batch's STARTED and our
                # credit, in one RESULTS (below): one wake-up of the broker.
                self._flush()
            timeout = 0.0 if self.queue else self.hub.next_timeout()
            if timeout is None or timeout > self.heartbeat:
                timeout = self.heartbeat
            if self.search is not None:
                until = self.search.timeout(time.monotonic())
                if until is not None:
                    timeout = min(timeout, until)
            with self._sock_lock:
                # what the watchdog read while we ran tasks comes first
                events = dict(self.poller.poll(0 if self._inbox else timeout * 1000))
                received = bool(self._inbox) or self.sock in events
                if received:
                    self._drain()
                self.stopper.unresolved.clear()  # the KILLs it read are handled now
            if self.hub.wake_r in events:
                self.hub.run_calls()
            if self._to_stop:
                self._flush()  # what ended goes out before stopped tasks unwind
                self.stopper.stop_killed()
            if self.lifeline is not None and self.lifeline in events:
                logger.info("worker %s: lifeline closed, exiting", self.name)
                return
            if received and self._cancel_waits:
                self._wake_cancellers()
            if self._refused:
                self._leave_refusing_broker()
            elif self.monitor is not None and self.monitor in events:
                if not self._on_connection_events():
                    return
            if not self._check_silence():
                return
            if self.hub.timer_due():
                self._flush()  # a timer may run task code (a time limit)
            self.hub.run_timers()
            self._start_tasks()
            self._flush()
            self.hub.run_ready()

    def _tasks_waiting(self) -> bool:
        """Whether messages wait on the socket (under its lock: the
        watchdog may be reading or closing it)."""
        with self._sock_lock:
            return self.sock is not None and readable(self.sock)

    # -- the connection: opening, losing, finding another broker ------------------------

    def _open(self, address: str) -> bool:
        """Connect a new DEALER to ``address``, say HELLO and ask for work
        (ZeroMQ queues both until the connection is up); False if
        ``address`` cannot even be connected to."""
        sock = task_socket(self.ctx, zmq.DEALER, linger_ms=0)
        make_client(sock, self.key)
        monitor = monitor_socket(sock, _MONITORED | HANDSHAKE_EVENTS)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close()
            logger.warning("worker %s: cannot connect to %s: %s", self.name, address, exc)
            return False
        with self._sock_lock:
            self.sock, self.monitor, self.address = sock, monitor, address
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(monitor, zmq.POLLIN)
            self.welcomed = False
            self.outstanding = 0
            self.last_sent = self.last_heard = time.monotonic()
            self._send(p.Hello({
                "role": "worker",
                "name": self.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "versions": local_versions(),
            }))
        return True

    def _close_socket(self, linger_ms: int = 0) -> None:
        """Close the connection to the broker joined or tried, if any."""
        with self._sock_lock:
            sock, monitor, self.sock, self.monitor = self.sock, self.monitor, None, None
            if sock is None:
                return
            self.poller.unregister(sock)
            self.poller.unregister(monitor)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=linger_ms)

    def _step_search(self, now: float) -> bool:
        """Move the search for a broker on: end an attempt that had no answer
        in time, start the next one when due; False when it has failed."""
        search = self.search
        if search is None:
            return True
        if search.failed(now):
            self._search_failed()
            return False
        if search.attempt_over(now):
            logger.info("worker %s: no answer from %s within %g s", self.name, search.current,
                        search.attempt)
            search.give_up_current(now)
            self._close_socket()
        while search.current is None:
            address = search.start(now)
            if address is None:
                return True  # pausing between rounds
            if not self._open(address):
                search.give_up_current(now, refused=True)
                if search.failed(now):
                    self._search_failed()
                    return False
        return True

    def _leave_refusing_broker(self) -> None:
        """The broker tried answered REFUSE: never try it again."""
        self._refused = False
        if self.search is not None:
            self.search.give_up_current(time.monotonic(), refused=True)
        self._close_socket()

    def _search_failed(self) -> None:
        """Record and log why no broker took us."""
        search = self.search
        tried = " ".join(search.tried) if search is not None and search.tried else "nowhere"
        if self.lost_at is None:
            self.gave_up = True
            waited = "" if self.connect_timeout is None else f" within {self.connect_timeout:g} s"
            self.failure = f"no broker answered at {tried}{waited}"
        else:
            self.broker_lost = True
            self.failure = (
                f"broker {self._lost_name} lost, and no broker took us within"
                f" {self._rejoin_timeout():g} s (tried {tried})"
            )
        logger.error("worker %s: %s; exiting", self.name, self.failure)

    def _on_connection_events(self) -> bool:
        """Connection events of the socket: a refused or closed connection
        ends an attempt, or loses the broker we had; False if we must exit."""
        events = 0
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            events |= event["event"]
            problem = describe_handshake_failure(event, self.key)
            if problem is not None and problem != self.handshake_problem:
                self.handshake_problem = problem
                logger.error("worker %s: %s", self.name, problem)
        if self.welcomed:
            # A retry reported here predates the WELCOME; a closed
            # connection ends the session, whenever it closed.
            if events & zmq.EVENT_DISCONNECTED:
                return self._lose_broker("its connection closed")
            return True
        if not events:
            return True
        if self.search is not None and self.search.connection_failed(time.monotonic()):
            logger.info("worker %s: connection to %s refused or closed", self.name, self.address)
            self._close_socket()
        return True

    def _check_silence(self) -> bool:
        """Lose a broker silent for LIVENESS heartbeats; False if we must exit."""
        silent = time.monotonic() - self.last_heard
        if self.welcomed and silent > LIVENESS * self.heartbeat:
            return self._lose_broker(f"silent for {silent:.1f} s")
        return True

    def _lose_broker(self, reason: str) -> bool:
        """Our broker is gone: abandon its work and look for another broker,
        or the same one back; False if the search ended at once (we exit)."""
        self._lost_name = f"{self.broker_name or '?'} at {self.address}"
        abandoned = self._abandon_session()
        self._close_socket()
        self.welcomed = False
        now = self.lost_at = time.monotonic()
        others = candidates(
            [self.address, *([self.broker_task] if self.broker_task else [])],
            self.peers, self.fallbacks, os.getpid(),
        )
        # Last, the lost broker itself: it may be back by then (a network
        # blip, a restart, or this worker was the one that stood still, and
        # was forgotten), and takes us again as a new session.
        logger.warning(
            "worker %s: broker %s lost (%s); abandoned %s; trying %s, then it again",
            self.name, self._lost_name, reason, _count(abandoned, "task"),
            _count(len(others), "other broker"),
        )
        others.append(self.address)
        self.search = BrokerSearch(others, now, self._rejoin_timeout(), LIVENESS * self.heartbeat)
        return self._step_search(now)

    def _rejoin_timeout(self) -> float:
        return REJOIN_TIMEOUT if self.connect_timeout is None else self.connect_timeout

    def _abandon_session(self) -> int:
        """Drop everything of the lost broker's session; how many tasks.

        Its task ids mean nothing to another broker, and the origins of its
        tasks run them again elsewhere (or have failed them), so: queued
        tasks are dropped, started ones ended (GreenletExit where they wait),
        and results, submissions and cancellations not yet sent are
        discarded. The futures of nested tasks sent through it fail with
        FederationLost. What the process has loaded (functions,
        initializers, ``__main__`` globals) stays.
        """
        self.session += 1  # from here on, a task of the old session sends nothing
        glets, self._task_glets = self._task_glets, set()
        abandoned = len(self.queue) + len(glets)
        self.queue.clear()
        self.hub.ready.clear()
        for glet in glets:
            if glet:  # started, and waiting in a park: end it there
                glet.throw(greenlet.GreenletExit)
        pending, self.pending = self.pending, {}
        lost = FederationLost(f"the broker at {self.address} was lost")
        # A greenlet ended above cannot be woken again (its waits are over),
        # but one that waits anew while it unwinds (a nested executor's
        # shutdown, say) is woken by these failures: those wake-ups stay.
        for future in pending.values():
            if not future.done():
                future.set_exception(lost)
        self._cancel_waits = []
        for task in self._active.values():  # their time limits go with them
            if task.timer is not None:
                task.timer.cancel()
        self._active.clear()
        self._to_stop, self._kills = [], []
        self._inbox.clear()  # what the watchdog read from the lost broker
        self._results, self._submits, self._submit_blobs, self._cancels = [], [], {}, []
        self._started = []
        self._sent_blobs = set()  # the next broker has none of our blobs
        self.outstanding = 0
        return abandoned

    # -- input ------------------------------------------------------------------

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            self._dispatch(inbox.popleft())
            if self.stopping or self._refused:
                return
        for frames in drain(self.sock, MAX_DRAIN):
            self.last_heard = time.monotonic()  # a message, not just a wake-up
            self._dispatch(frames)
            if self.stopping or self._refused:
                return

    def _dispatch(self, frames: List[Any]) -> None:
        try:
            p.dispatch(frames, self._handlers, "a worker")
        except RemoteProtocolError as exc:
            logger.warning("worker %s dropped a message: %s", self.name, exc)

    def _on_welcome(self, message: p.Welcome) -> None:
        self.peers = message.peers
        if self.welcomed:  # the broker's list of peers changed
            logger.info("worker %s: broker %s names other brokers: %s", self.name,
                        self.broker_name, " ".join(self.peers) or "none")
            return
        self.welcomed = True
        self.broker_name = str(message.meta.get("broker", "?"))[:200]
        task = message.meta.get("task")
        self.broker_task = task if p.is_endpoint(task) else None
        search, self.search = self.search, None
        if self.lost_at is not None:
            logger.warning(
                "worker %s: joined broker %s at %s, %.2f s after losing %s", self.name,
                self.broker_name, self.address, time.monotonic() - self.lost_at, self._lost_name,
            )
        elif search is not None and search.tried[0] != self.address:
            logger.warning("worker %s: joined broker %s at %s (no answer at %s)", self.name,
                           self.broker_name, self.address, " ".join(search.tried[:-1]))
        else:
            logger.info("worker %s: joined broker %s at %s", self.name, self.broker_name,
                        self.address)

    def _on_refuse(self, message: p.Refuse) -> None:
        if self.search is not None and not self.search.single:
            self._refused = True  # the serve loop tries the next broker
            logger.warning("worker %s: broker at %s refused us: %s", self.name, self.address,
                           message.reason)
            return
        logger.error("worker %s: broker refused us: %s", self.name, message.reason)
        self.failure = f"the broker at {self.address} refused us: {message.reason}"
        self.stopping = True

    def _on_shutdown(self, message: p.Shutdown) -> None:
        self.stopping = True

    def _on_tasks(self, message: p.Tasks) -> None:
        self.blobs.update(message.blobs)
        self.outstanding = max(0, self.outstanding - len(message.tasks))
        for record in message.tasks:
            self.queue[record.task_id] = record

    def _on_cancel(self, message: p.Cancel) -> None:
        for task_id in message.ids:
            if self.queue.pop(task_id, None) is not None:
                self._results.append(p.ResultRecord(task_id, p.Status.CANCELLED, []))

    def _on_kill(self, message: p.Kill) -> None:
        """Drop the named tasks still queued; stop those that started (they
        are parked: the hub runs, so no task holds it) once the socket is
        free, since task code runs when they unwind."""
        for task_id in message.ids:
            if self.queue.pop(task_id, None) is not None:
                self._results.append(p.ResultRecord(task_id, p.Status.CANCELLED, []))
                continue
            task = self._active.get(task_id)
            if task is not None and task.outcome is None:
                self.stopper.decide(task, killed=True, replaced=False)
                self._to_stop.append(task)

    def _on_results(self, message: p.Results) -> None:
        if message.started:
            self._mark_running(message.started)
        for record in message.results:
            future = self.pending.pop(record.task_id, None)
            if future is not None:
                resolve_future(future, record)

    def _on_started(self, message: p.Started) -> None:
        self._mark_running(message.ids)

    def _mark_running(self, task_ids: List[int]) -> None:
        for task_id in task_ids:
            future = self.pending.get(task_id)
            if future is not None and future.undecided():
                future.set_running_or_notify_cancel()

    # -- running tasks ------------------------------------------------------------

    def _start_tasks(self) -> None:
        """Start a batch of queued tasks: about START_BATCH_SECONDS of work
        by each function's recent durations (a function not yet seen here
        counts as a whole batch), and only when nothing else is ready, so
        that queued tasks stay where the broker can still take them back."""
        if not self.queue or self.hub.ready:
            return
        durations = self.durations
        queue = self.queue
        batch = []
        planned = 0.0
        while queue and planned < START_BATCH_SECONDS:
            try:
                record = queue.popitem(last=False)[1]
            except KeyError:  # the watchdog just dropped the last one (a KILL)
                break
            batch.append(record)
            planned += durations.get(record.fn, START_BATCH_SECONDS)
        announce = [r.task_id for r in batch if durations.get(r.fn, QUICK_SECONDS) >= QUICK_SECONDS]
        self._started.extend(announce)  # sent by the flush before they run
        for record in batch:
            glet = self.hub.spawn(self._run_task, record, record)
            self._task_glets.add(glet)
            # announced as started: a KILL from now on stops it
            self._active[record.task_id] = RunningTask(record, glet)
        if announce and self.watch_dozing:
            # the watchdog watches closely while tasks run, but it dozes
            # while none does; quick ones (not announced either) are over
            # before it would look
            self._watch.set()

    def _run_task(self, record: p.TaskRecord) -> None:
        session = self.session
        task = self._active[record.task_id]
        task.started = time.monotonic()
        started = time.perf_counter()
        try:
            try:
                status, frames = self._call(record, task)
            except greenlet.GreenletExit as exc:
                if task.outcome is not None or session != self.session:
                    raise  # stopped (and answered), or its broker was lost
                # the task's own GreenletExit, raised or let through: its error
                status, frames = p.Status.ERROR, serialize.dump_exception(exc)
        finally:
            if session == self.session:
                self._task_glets.discard(greenlet.getcurrent())
                self._active.pop(record.task_id, None)
            if task.timer is not None:
                task.timer.cancel()
        if session != self.session:
            return  # its broker was lost: its result can go nowhere
        elapsed = time.perf_counter() - started
        self.ewma = elapsed if self.ewma is None else 0.8 * self.ewma + 0.2 * elapsed
        previous = self.durations.get(record.fn)
        self.durations[record.fn] = elapsed if previous is None else 0.5 * previous + 0.5 * elapsed
        if task.outcome is None:  # else it was stopped, and has been answered
            self._results.append(p.ResultRecord(record.task_id, status, frames))

    def _call(self, record: p.TaskRecord, task: RunningTask) -> Tuple[p.Status, List[Any]]:
        # The call is unpickled first, for its time limit: the clock runs from
        # the start, initializer included. If that fails, the initializer may
        # be what it needs (a path, a module): it is tried again after it.
        call: Any = None
        try:
            call = self._load_call(record, task)
        except greenlet.GreenletExit:
            raise
        except BaseException:  # reported below, unless the retry succeeds
            call = None
        if record.init != p.NO_INIT:
            init = self._initialize(record.init)
            if init.error is not None:
                return p.Status.INIT_FAILED, init.error
        try:
            if call is None:
                call = self._load_call(record, task)
            fn = task.function = self._function(record.fn)
            args, kwargs = call
            if kwargs is None:  # a map chunk
                before_each = self._restart_clock(task) if task.timeout is not None else None
                task.partial = []
                result: Any = run_chunk(fn, args, task.partial, before_each)
            else:
                result = fn(*args, **kwargs)
        except greenlet.GreenletExit:
            raise
        except BaseException as exc:  # the task's own error, reported to its origin
            return p.Status.ERROR, serialize.dump_exception(exc)
        try:
            return p.Status.OK, serialize.dumps(result)
        except SerializationError as exc:
            return p.Status.ERROR, serialize.dump_exception(exc)

    def _load_call(self, record: p.TaskRecord, task: RunningTask) -> Tuple[Any, Any]:
        """``(args, kwargs)`` of a task (``(items, None)`` for a map chunk),
        applying its options: a time limit, and which task here submitted it
        (docs/protocol.md §9)."""
        call = serialize.loads(record.frames)
        if not isinstance(call, tuple) or len(call) not in (2, 3):
            raise SerializationError("malformed task payload: not (args, kwargs[, options])")
        if len(call) == 3:
            options = call[2]
            if not isinstance(options, dict):
                raise SerializationError("malformed task payload: options are not a dict")
            parent = options.get("parent")
            if isinstance(parent, tuple) and len(parent) == 2 and parent[0] == self.token:
                task.parent = parent[1]
            timeout = options.get("timeout")
            if timeout is not None:
                if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                        or not math.isfinite(timeout) or timeout <= 0:
                    raise SerializationError(f"malformed task payload: timeout {timeout!r}")
                self._limit(task, float(timeout))
        return call[0], call[1]

    def _limit(self, task: RunningTask, timeout: float) -> None:
        """Stop ``task`` once it has run ``timeout`` seconds: the hub's timer
        does it while the hub runs, the watchdog while a task holds it."""
        task.timeout = timeout
        task.deadline = (task.started or time.monotonic()) + timeout
        task.timer = self.hub.call_later(
            max(0.0, task.deadline - time.monotonic()), lambda: self.stopper.expire(task)
        )

    def _restart_clock(self, task: RunningTask) -> Callable[[], None]:
        """For a map chunk, the limit applies to each item."""
        def restart() -> None:
            task.deadline = time.monotonic() + (task.timeout or 0.0)
        return restart

    def _function(self, digest: bytes) -> Callable[..., Any]:
        fn = self.functions.get(digest)
        if fn is None:
            blob = self.blobs.get(digest)
            if blob is None:
                raise SerializationError(f"no function blob {digest.hex()} on this worker")
            fn = serialize.loads([blob])
            if isinstance(fn, tuple):  # an initializer and its arguments
                fn = (serialize.share_main_globals(fn[0], self.main_namespace), *fn[1:])
            else:
                fn = serialize.share_main_globals(fn, self.main_namespace)
            self.functions[digest] = fn
        return fn

    def _initialize(self, digest: bytes) -> _InitState:
        state = self.inits.get(digest)
        if state is None:
            try:
                initializer, initargs = self._function(digest)  # type: ignore[misc]
                initializer(*initargs)
            except greenlet.GreenletExit:
                raise
            except BaseException as exc:  # reported to every origin using it
                logger.critical("worker %s: initializer failed", self.name, exc_info=True)
                state = _InitState(serialize.dump_exception(exc))
            else:
                state = _InitState(None)
            self.inits[digest] = state
        return state

    # -- nested submission: this worker as an origin ----------------------------------

    def submit(
        self, fn: Tuple[bytes, bytes], init: Tuple[bytes, Optional[bytes]], frames: List[Any]
    ) -> GreenFuture:
        """Queue a task submitted by one of our tasks; sent on the next flush."""
        task_id = next(self._ids)
        future = GreenFuture(task_id, self)
        running = getattr(greenlet.getcurrent(), "context", None)
        future.parent = running.task_id if running is not None else None
        record = p.TaskRecord(task_id, fn[0], init[0], frames)
        if threading.get_ident() == self.hub.thread:
            self._queue_submit(future, record, (fn, init))
        else:  # a thread a task started: the hub takes it, woken
            self.hub.call_soon_threadsafe(lambda: self._queue_submit(future, record, (fn, init)))
        return future

    def _queue_submit(self, future: GreenFuture, record: p.TaskRecord,
                      blobs: Sequence[Tuple[bytes, Optional[bytes]]]) -> None:
        self.pending[record.task_id] = future
        for digest, blob in blobs:
            if blob is not None and digest not in self._sent_blobs:
                self._sent_blobs.add(digest)
                self._submit_blobs[digest] = blob
        self._submits.append(record)

    def nested_options(self) -> Dict[str, Any]:
        """Task options that name the task submitting (so that, should this
        worker be replaced to stop a task, the tasks here waiting on it are
        known: stopping.py)."""
        running = getattr(greenlet.getcurrent(), "context", None)
        if running is None:
            return {}
        return {"parent": (self.token, running.task_id)}

    def cancel_futures(self, fs: Sequence[TaskFuture], force: bool = False) -> None:
        """Ask the broker to cancel ``fs`` (``force``: KILL); a task calling
        this parks until the broker has answered for each (see
        ``_future.py``)."""
        ids = [future._futurefed_id for future in fs]
        if threading.get_ident() != self.hub.thread:  # a thread a task started
            self.hub.call_soon_threadsafe(lambda: self._ask_to_cancel(ids, force))
            return  # it does not wait: the answer settles them later
        self._ask_to_cancel(ids, force)
        if not self.hub.in_task():
            return  # the hub cannot wait for itself: the answer settles them later
        waiter = Waiter(self.hub)
        self._cancel_waits.append((fs, waiter, force))
        waiter.wait(CANCEL_TIMEOUT)

    def _ask_to_cancel(self, ids: List[int], force: bool) -> None:
        """Queue a CANCEL (KILL with ``force``) of ``ids`` for the next flush."""
        (self._kills if force else self._cancels).extend(ids)

    def _wake_cancellers(self) -> None:
        waits = []
        for fs, waiter, force in self._cancel_waits:
            if waiter.fired:
                continue  # timed out
            if any(not future.done() if force else future.undecided() for future in fs):
                waits.append((fs, waiter, force))
            else:
                waiter.wake()
        self._cancel_waits = waits

    def current_init(self) -> Tuple[bytes, Optional[bytes]]:
        """The initializer of the task running now, for tasks it submits."""
        current = greenlet.getcurrent()
        record = getattr(current, "context", None)
        if record is None or record.init == p.NO_INIT:
            return p.NO_INIT, None
        return record.init, self.blobs.get(record.init)

    # -- output -------------------------------------------------------------------------

    def _send(self, message: p.Message) -> None:
        frames = p.encode(message)
        with self._sock_lock:
            if not send_nowait(self.sock, frames):
                logger.debug("worker %s: no connection to the broker; dropped %s",
                             self.name, message.command.name)
        self.last_sent = time.monotonic()

    def _flush(self) -> None:
        if self.sock is None:
            return  # between two brokers
        if time.monotonic() - self.last_sent >= self.heartbeat:
            self._send(p.Heartbeat())
        if self._submits:
            submits, blobs = self._submits, self._submit_blobs
            self._submits, self._submit_blobs = [], {}
            self._send(p.Submit(submits, blobs))
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            self._send(p.Cancel(cancels))
        if self._kills:
            kills, self._kills = self._kills, []
            self._send(p.Kill(kills))
        target = self._target()
        # in hand: queued, and started but not parked (_active also holds the
        # batch just started, whose greenlets have not run yet)
        want = target - (len(self.queue) + len(self._active) - self.hub.parked) - self.outstanding
        # Ask in batches of half the target, unless we would otherwise run dry.
        if want >= max(1, target // 2) or (want > 0 and not self.queue and not self.outstanding):
            self.outstanding += want
        else:
            want = 0
        if self._results or self._started:
            # one RESULTS carries the results, the start notices and the credit
            results, started, self._results, self._started = self._results, self._started, [], []
            self._send(p.Results(results, started, want))
        elif want:
            self._send(p.Credit(want))

    def _target(self) -> int:
        """How many unparked tasks to hold: one until we know how long tasks
        take (a first task may block for good: nothing should wait behind
        it while another worker idles), then about PREFETCH_SECONDS of work,
        and at least one ready behind the running one."""
        if self.ewma is None:
            return 1
        return max(2, min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(self.ewma, 1e-6))))

