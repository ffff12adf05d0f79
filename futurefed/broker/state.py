"""The broker's scheduling state, sans I/O: frames in, frames out.

:meth:`BrokerState.receive` takes one message from a peer (its ROUTER
identity and frames) and updates the state; :meth:`BrokerState.pump` hands
queued tasks to workers that have credit and returns every message to send,
coalescing results and start notices per origin. Tests drive it with plain
lists of frames; ``core.py`` connects it to sockets.

The broker reads headers and indexes only. Payload frames (pickled calls,
results, function blobs) are forwarded as the very objects received, so a
zero-copy frame stays zero-copy and nothing is ever unpickled here.

Task ids are hop-local: an origin numbers its own tasks, the broker gives every
dispatched task a fresh id of its own and maps the worker's answer back.

Peer brokers (docs/federation.md) take part with two roles. A broker that
connected to our task socket is a *borrower* (role ``broker``): like a
worker it sends CREDIT and gets TASKS, but its credit is a one-shot request
that we always answer, if need be with an empty TASKS. Our own DEALER to a
peer is a *link* (role ``link``): through it we ask for work when our
workers idle and the peer's published load shows queued tasks, and the work
we get arrives as if an origin had submitted it there.

A *supervisor* (role ``supervisor``: fedrun's host agent, the embedded
federation) is the parent of some workers. When one of them ends it sends
WORKER_EXIT, and the worker is lost at once, without waiting for LIVENESS
silent heartbeats; how it ended goes into the LOST records of its tasks.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from .. import protocol as p
from .._versions import local_versions, mismatch
from ..errors import RemoteProtocolError

__all__ = ["BrokerState", "Peer", "QueuedTask"]

logger = logging.getLogger(__name__)

Outgoing = Tuple[bytes, List[Any]]

ORIGIN = "origin"
WORKER = "worker"
BROKER = "broker"  # a peer broker that borrows work from us
LINK = "link"  # our connection to a peer broker we borrow from
SUPERVISOR = "supervisor"  # the parent of some workers: says when one ended
ROLES = (ORIGIN, WORKER, BROKER, SUPERVISOR)  # what a HELLO may claim
#: What a supervisor may send: it submits and runs nothing.
SUPERVISOR_COMMANDS = frozenset({
    p.Command.HELLO, p.Command.WORKER_EXIT, p.Command.HEARTBEAT, p.Command.BYE,
})

#: A task that has waited this long in a worker's queue without starting is
#: taken back (CANCEL, then requeued) when another worker has nothing to do.
REVOKE_AFTER = 0.05
#: A request for work that a peer has not answered within this long is
#: forgotten, so that we may ask again (the peer may be gone).
BORROW_TIMEOUT = 1.0
#: Seconds between heartbeats: a peer we have sent nothing to for this long
#: gets a HEARTBEAT, and one we have heard nothing from for LIVENESS of them
#: is lost.
HEARTBEAT = 1.0
LIVENESS = 3
#: How many times a task whose worker was lost runs again before its future
#: fails with WorkerLost.
MAX_RETRIES = 3
#: A peer broker we borrow from and lost is sent HELLO again after LIVENESS
#: heartbeats, then after twice, four times... as long, at most this long.
LINK_RETRY_MAX = 60.0
#: At most this many peers (and hosts) are read from or put in a LOAD message.
MAX_PEERS = 256
#: A task whose worker was lost (a *suspect*: it may be what killed it) is
#: not sent to a worker that holds another suspect, for this long at most
#: after the loss. So a task that kills workers takes the tasks that shared
#: its worker along at most once; after that they run apart from it.
ISOLATE_FOR = 1.0


#: Bytes of JSON that the hosts and the peers of a LOAD may take at most, so
#: that a LOAD always fits in protocol.MAX_JSON_BYTES (the first MAX_PEERS
#: entries that fit are sent).
HOSTS_BUDGET = 16 * 1024
PEERS_BUDGET = 40 * 1024


def _within(pairs: Iterable[Tuple[Any, Any]], budget: int) -> Iterator[Tuple[Any, Any]]:
    """The first pairs (at most MAX_PEERS) whose JSON takes at most ``budget`` bytes."""
    for count, pair in enumerate(pairs):
        budget -= len(json.dumps(pair)) + 8  # with the separators and key of a LOAD entry
        if count >= MAX_PEERS or budget < 0:
            return
        yield pair


def _count(value: Any) -> int:
    """A non-negative count from a peer's JSON, 0 if it is not one."""
    return value if isinstance(value, int) and value > 0 else 0


class Peer:
    """A connected origin or worker (a worker is also an origin when its
    tasks submit tasks)."""

    __slots__ = (
        "ident", "role", "name", "host", "pid", "credit", "known", "inflight", "cancels", "kills",
        "task_address", "meta_address", "answer_due",
        "asked", "asked_at", "asked_seq", "got_nothing", "load", "load_seq",
        "last_heard", "last_sent", "ended", "told_peers", "lost_streak",
    )

    def __init__(self, ident: bytes, meta: Dict[str, Any], now: float = 0.0) -> None:
        self.ident = ident
        self.role = str(meta.get("role"))
        self.name = str(meta.get("name", "?"))[:200]
        self.host = str(meta.get("host", "?"))[:200]
        pid = meta.get("pid")
        self.pid = pid if isinstance(pid, int) else None
        self.credit = 0
        self.known: Set[bytes] = set()  # function blobs this worker already has
        self.inflight: Dict[int, "QueuedTask"] = {}  # broker id -> task at this worker
        self.cancels: List[int] = []  # broker ids to cancel at this worker
        self.kills: List[int] = []  # broker ids to stop at this worker, even if running
        # a peer broker's addresses, as it advertises them
        self.task_address = _address(meta.get("task"))
        self.meta_address = _address(meta.get("meta"))
        # borrower: it asked for work this turn and must get an answer
        self.answer_due = False
        # link: our open request for work, and the peer's last published load
        self.asked = 0
        self.asked_at = 0.0
        self.asked_seq = -1  # the load message our last request was based on
        self.got_nothing = False  # our last request was answered with no task
        self.load: Dict[str, Any] = {}
        self.load_seq = -1
        self.last_heard = now  # liveness: any message counts
        self.last_sent = now
        # how the process ended, as its supervisor said: LOST records carry it
        self.ended: Optional[Dict[str, Any]] = None
        # worker: the peers our last WELCOME named, where it goes if we are lost
        self.told_peers: List[str] = []
        # link: times lost in a row without a word from it since (retries back off)
        self.lost_streak = 0

    def __repr__(self) -> str:
        return f"<{self.role} {self.name} on {self.host} pid {self.pid}>"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _address(value: Any) -> Optional[str]:
    """A peer's advertised address, if it is one we may connect to
    (``tcp://`` or ``ipc://``, printable ASCII: protocol.is_endpoint)."""
    return value if p.is_endpoint(value) else None


class QueuedTask:
    """A task the broker holds: queued, or dispatched to ``worker`` under
    broker id ``bid``. A task moved off a worker (see ``_revoke_stranded``)
    stays in that worker's ``inflight`` under its old id, as a stale copy:
    ``worker``/``bid`` always name the live one, ``stale`` the others."""

    __slots__ = (
        "origin", "task_id", "fn", "init", "frames",
        "worker", "bid", "cancelled", "started", "done", "dispatched_at", "handed_out", "avoid",
        "attempts", "lost_at", "killed", "stale",
    )

    def __init__(self, origin: bytes, record: p.TaskRecord) -> None:
        self.origin = origin
        self.task_id = record.task_id
        self.fn = record.fn
        self.init = record.init
        self.frames = record.frames
        self.worker: Optional[bytes] = None
        self.bid = 0
        self.cancelled = False  # by its origin: nobody wants the result
        self.started = False  # its current worker said STARTED
        self.done = False  # its result went to the origin
        self.dispatched_at = 0.0
        self.handed_out = False  # ever dispatched: its origin can no longer cancel it
        self.avoid: Optional[bytes] = None  # revoked from this worker: not back to it this turn
        self.attempts = 0  # runs whose worker was lost
        self.lost_at = 0.0  # when it last lost its worker: a *suspect* for ISOLATE_FOR
        self.killed = False  # its origin asked KILL while a worker held it: never run again
        self.stale: Optional[List[Tuple[bytes, int]]] = None  # (worker, bid) of revoked copies


class BrokerState:
    """Queue, credits and routing tables of one broker."""

    def __init__(
        self,
        name: str = "broker",
        clock: Callable[[], float] = time.monotonic,
        *,
        address: str = "",
        meta_address: str = "",
        identity: Optional[Dict[str, Any]] = None,
        heartbeat: float = HEARTBEAT,
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self.name = name
        self.clock = clock
        self.heartbeat = heartbeat
        self.max_retries = max_retries
        self._next_liveness = 0.0
        self.address = address  # our task socket, as peers should connect to it
        self.meta_address = meta_address
        self.identity = dict(identity or {})  # host and pid, for our HELLOs to peers
        self.brokers: Dict[str, Optional[str]] = {}  # every peer we know: task -> meta address
        self._peers_full_logged = False
        self.links: Dict[str, Peer] = {}  # our links, by each address the peer goes by
        self._to_connect: List[Tuple[str, Optional[str]]] = []
        self._link_resets: List[bytes] = []
        self.seq = 0  # counts our LOAD messages: a liveness counter for peers
        self.peers: Dict[bytes, Peer] = {}
        self.queue: Deque[QueuedTask] = deque()
        self.queued = 0  # live (not cancelled) tasks in ``queue``
        self.tasks: Dict[Tuple[bytes, int], QueuedTask] = {}  # (origin, origin's id) -> task
        self.blobs: Dict[bytes, Any] = {}
        self.ready: Dict[bytes, Peer] = {}  # workers with credit, in service order
        self.done = 0
        self._next_bid = 1
        self._out: List[Outgoing] = []
        self._results: Dict[bytes, List[p.ResultRecord]] = {}
        self._started: Dict[bytes, List[int]] = {}
        self._revoked: List[QueuedTask] = []  # revoked in this pump
        self._exits: List[Tuple[Peer, str]] = []  # workers reported ended, lost in the next pump
        self._handlers: Dict[p.Command, Callable[[bytes, Any], None]] = {
            p.Command.HELLO: self._on_hello,
            p.Command.SUBMIT: self._on_submit,
            p.Command.CREDIT: self._on_credit,
            p.Command.RESULTS: self._on_results,
            p.Command.STARTED: self._on_started,
            p.Command.CANCEL: self._on_cancel,
            p.Command.KILL: self._on_kill,
            p.Command.HEARTBEAT: self._on_heartbeat,
            p.Command.BYE: self._on_bye,
            p.Command.WORKER_EXIT: self._on_worker_exit,
        }
        # messages that come to us through a link, from the peer we borrow from
        self._link_handlers: Dict[p.Command, Callable[[bytes, Any], None]] = {
            p.Command.WELCOME: self._on_link_welcome,
            p.Command.REFUSE: self._on_link_refuse,
            p.Command.TASKS: self._on_link_tasks,
            p.Command.CANCEL: self._on_cancel,
            p.Command.KILL: self._on_kill,
            p.Command.HEARTBEAT: self._on_heartbeat,
            p.Command.SHUTDOWN: self._on_heartbeat,  # a peer's end is not ours
        }

    # -- input ---------------------------------------------------------------

    def receive(self, ident: bytes, frames: List[Any]) -> None:
        """Take one message from peer ``ident``; malformed input is logged and
        dropped, never raised."""
        try:
            message = p.decode(frames)
            peer = self.peers.get(ident)
            if peer is not None and peer.role == LINK:
                handler = self._link_handlers.get(message.command)
            else:
                handler = self._handlers.get(message.command)
            if handler is None:
                raise RemoteProtocolError(f"{message.command.name} is not for a broker")
            if message.command is not p.Command.HELLO and peer is None:
                raise RemoteProtocolError(f"{message.command.name} before HELLO")
            if (peer is not None and peer.role == SUPERVISOR
                    and message.command not in SUPERVISOR_COMMANDS):
                raise RemoteProtocolError(f"{message.command.name} from a supervisor")
            if peer is not None:
                peer.last_heard = self.clock()
                peer.lost_streak = 0
            handler(ident, message)
        except RemoteProtocolError as exc:
            logger.warning("dropped a message from %s: %s", self._describe(ident), exc)

    def _describe(self, ident: bytes) -> str:
        peer = self.peers.get(ident)
        return repr(peer) if peer is not None else f"unknown peer {ident.hex()}"

    def _on_hello(self, ident: bytes, message: p.Hello) -> None:
        # A peer of another protocol version can read only a REFUSE in its own.
        theirs = message.version
        why = mismatch(message.meta.get("versions"))
        if why is None and theirs != p.VERSION:
            why = (f"version mismatch: the peer has protocol {theirs};"
                   f" this broker has protocol {p.VERSION}")
        if why is not None:
            self._send(ident, p.Refuse(why, theirs))
            raise RemoteProtocolError(f"HELLO refused: {why}")
        role = message.meta.get("role")
        if role not in ROLES:
            shown = repr(role)[:80]
            self._send(ident, p.Refuse(f"unknown role {shown}"))
            raise RemoteProtocolError(f"HELLO with unknown role {shown}")
        peer = Peer(ident, message.meta, self.clock())
        if role == BROKER:
            if peer.task_address is None or peer.task_address == self.address:
                self._send(ident, p.Refuse("a broker must name its own task address"))
                raise RemoteProtocolError(f"HELLO from broker {peer.name} with a bad task address")
            self.learn(peer.task_address, peer.meta_address)
        if ident in self.peers:
            self._drop_peer(ident)
        self.peers[ident] = peer
        logger.info("%s joined", peer)
        self._welcome(ident, peer, self.peer_addresses())

    def _welcome(self, ident: bytes, peer: Peer, peers: List[str]) -> None:
        """WELCOME ``peer``, naming the brokers it may join if we are lost."""
        meta: Dict[str, Any] = {
            "broker": self.name, "task": self.address, "meta": self.meta_address,
        }
        if peers:
            meta["peers"] = peers
        peer.told_peers = peers
        self._send(ident, p.Welcome(meta))

    def peer_addresses(self) -> List[str]:
        """The task addresses of the peer brokers we know, in the order we
        learnt them, as many as a WELCOME may carry."""
        addresses = [
            task for task in self.brokers if task != self.address and p.is_endpoint(task)
        ]
        return addresses[: p.MAX_WELCOME_PEERS]

    def _tell_workers_peers(self) -> None:
        """WELCOME again each worker whose list of peers is out of date."""
        peers = self.peer_addresses()
        for ident, peer in self.peers.items():
            if peer.role == WORKER and peer.told_peers != peers:
                self._welcome(ident, peer, peers)

    def _on_submit(self, ident: bytes, message: p.Submit) -> None:
        if self.peers[ident].role == BROKER:
            raise RemoteProtocolError("SUBMIT from a peer broker")
        self.blobs.update(message.blobs)
        for record in message.tasks:
            key = (ident, record.task_id)
            if key in self.tasks:
                logger.warning("%s reused task id %d", self._describe(ident), record.task_id)
                continue
            task = QueuedTask(ident, record)
            missing = [d for d in (task.fn, task.init) if d != p.NO_INIT and d not in self.blobs]
            if missing:
                self._reject(task, f"the broker has no function blob {missing[0].hex()}")
                continue
            self.tasks[key] = task
            self.queue.append(task)
            self.queued += 1

    def _on_credit(self, ident: bytes, message: p.Credit) -> None:
        self._add_credit(ident, message.count)

    def _add_credit(self, ident: bytes, count: int) -> None:
        peer = self.peers[ident]
        if peer.role == BROKER:  # a request for work, answered in the next pump
            peer.credit = count
            peer.answer_due = True
            if peer.credit > 0:
                self.ready[ident] = peer
            return
        if peer.role != WORKER:
            raise RemoteProtocolError("credit from a non-worker")
        peer.credit += count
        if peer.credit > 0:
            self.ready[ident] = peer

    def _on_results(self, ident: bytes, message: p.Results) -> None:
        """Start notices first, as a STARTED before the RESULTS would be;
        then the records; then the credit, as a CREDIT after them would be."""
        if message.started:
            self._mark_started(ident, message.started)
        self._take_results(ident, message.results)
        if message.credit:
            self._add_credit(ident, message.credit)

    def _take_results(self, ident: bytes, records: List[p.ResultRecord]) -> None:
        peer = self.peers[ident]
        for record in records:
            bid = record.task_id
            task = peer.inflight.pop(bid, None)
            if task is None or task.done or task.cancelled:
                continue  # unknown, already answered, or nobody waits for it
            live = task.worker == ident and task.bid == bid
            if not live:
                if record.status is p.Status.CANCELLED:
                    continue  # a revoked copy handed back unstarted, as asked
                self._forget_live_copy(task)  # the revoked copy ran after all: it wins
            task.done = True
            self.done += 1
            del self.tasks[(task.origin, task.task_id)]
            record.task_id = task.task_id
            self._results.setdefault(task.origin, []).append(record)

    def _on_started(self, ident: bytes, message: p.Started) -> None:
        self._mark_started(ident, message.ids)

    def _mark_started(self, ident: bytes, bids: List[int]) -> None:
        inflight = self.peers[ident].inflight
        for bid in bids:
            task = inflight.get(bid)
            if (
                task is not None and not (task.cancelled or task.done)
                and task.worker == ident and task.bid == bid
            ):
                task.started = True
                self._started.setdefault(task.origin, []).append(task.task_id)

    def _on_cancel(self, ident: bytes, message: p.Cancel) -> None:
        """Answer for every task we still hold: CANCELLED if no worker has had
        it, else STARTED (it runs). The others' RESULTS went out already."""
        for task_id in message.ids:
            task = self.tasks.get((ident, task_id))
            if task is None:
                continue
            if task.handed_out:
                self._started.setdefault(ident, []).append(task_id)
                continue
            del self.tasks[(ident, task_id)]
            self._cancel(task)
            record = p.ResultRecord(task_id, p.Status.CANCELLED, [])
            self._results.setdefault(ident, []).append(record)

    def _on_kill(self, ident: bytes, message: p.Kill) -> None:
        """Stop every task we still hold, even a running one (a forced
        cancel): one no worker holds now is dropped and answered CANCELLED
        at once; the worker holding one is told to stop it, and answers.
        Revoked copies are stopped too. The others' RESULTS went out."""
        for task_id in message.ids:
            task = self.tasks.get((ident, task_id))
            if task is None or task.killed:
                continue
            for worker, bid in task.stale or ():
                peer = self.peers.get(worker)
                if peer is not None and peer.inflight.get(bid) is task:
                    peer.kills.append(bid)
            if task.worker is None:
                del self.tasks[(ident, task_id)]
                self._cancel(task)
                record = p.ResultRecord(task_id, p.Status.CANCELLED, [])
                self._results.setdefault(ident, []).append(record)
            else:
                task.killed = True
                self.peers[task.worker].kills.append(task.bid)

    # -- peer brokers ----------------------------------------------------------

    def learn(self, task: Optional[str], meta: Optional[str]) -> None:
        """Note a peer broker; one we had not heard of is to be connected."""
        if task is None or task == self.address or task in self.brokers:
            return
        if len(self.brokers) >= MAX_PEERS:
            if not self._peers_full_logged:
                self._peers_full_logged = True
                logger.warning("broker %s knows %d peer brokers already; ignoring %s and any more",
                               self.name, MAX_PEERS, task)
            return
        self.brokers[task] = meta
        self._to_connect.append((task, meta))

    def take_link_resets(self) -> List[bytes]:
        """Links lost since the last call, whose DEALERs are to be closed
        and opened again before this pump's messages are sent."""
        resets, self._link_resets = self._link_resets, []
        return resets

    def take_new_brokers(self) -> List[Tuple[str, Optional[str]]]:
        """Peers learned since the last call: (task, meta) addresses to connect."""
        found, self._to_connect = self._to_connect, []
        return found

    def add_link(self, ident: bytes, task: str, meta: Optional[str]) -> None:
        """Our DEALER ``ident`` now connects to the peer at ``task``: say HELLO."""
        link = Peer(ident, {"role": LINK, "name": task, "task": task, "meta": meta}, self.clock())
        self.peers[ident] = link
        self.links[task] = link
        self.brokers.setdefault(task, meta)
        self._send(ident, p.Hello({
            **self.identity, "role": BROKER, "name": self.name,
            "task": self.address, "meta": self.meta_address, "versions": local_versions(),
        }))

    def _on_link_welcome(self, ident: bytes, message: p.Welcome) -> None:
        link = self.peers[ident]
        link.name = str(message.meta.get("broker", link.name))[:200]
        advertised = _address(message.meta.get("task"))
        if advertised is not None and advertised not in self.links:
            # the peer calls itself otherwise than we called it: know both
            self.links[advertised] = link
            self.brokers.setdefault(advertised, link.meta_address)
        meta = _address(message.meta.get("meta"))
        if meta is not None and meta != link.meta_address:
            # we guessed its meta socket wrong: subscribe to the one it names
            link.meta_address = meta
            self._to_connect.append((link.task_address or link.name, meta))

    def _on_link_refuse(self, ident: bytes, message: p.Refuse) -> None:
        logger.warning("peer broker at %s refused us: %s", self.peers[ident].task_address, message.reason)

    def _on_link_tasks(self, ident: bytes, message: p.Tasks) -> None:
        """Work we asked for: queued as if submitted here by the link."""
        link = self.peers[ident]
        link.asked = 0
        link.got_nothing = not message.tasks
        self._on_submit(ident, message)

    def on_load(self, meta: Dict[str, Any]) -> None:
        """A LOAD message from a peer's meta socket."""
        task = _address(meta.get("task"))
        if task is None or task == self.address:
            return
        self.learn(task, _address(meta.get("meta")))
        peers = meta.get("peers")
        if isinstance(peers, list):
            for entry in peers[:MAX_PEERS]:
                if isinstance(entry, dict):
                    self.learn(_address(entry.get("task")), _address(entry.get("meta")))
        link = self.links.get(task)
        seq = meta.get("seq")
        if link is not None and isinstance(seq, int):
            link.load = meta
            link.load_seq = seq

    def _borrow(self) -> None:
        """Ask peers with queued work for as many tasks as our workers can
        take now and have no queued task for (see docs/federation.md)."""
        links = [peer for peer in self.peers.values() if peer.role == LINK]
        if not links:
            return
        now = self.clock()
        for link in links:
            if link.asked and now - link.asked_at > BORROW_TIMEOUT:
                link.asked = 0
        idle = sum(w.credit for w in self.ready.values() if w.role == WORKER)
        idle -= self.queued + sum(link.asked for link in links)
        if idle <= 0:
            return
        offers = [
            (_count(link.load.get("stealable", link.load.get("queued"))), link) for link in links
            if not link.asked and (link.load_seq != link.asked_seq or not link.got_nothing)
        ]
        for queued, link in sorted(offers, key=lambda offer: -offer[0]):
            if queued <= 0 or idle <= 0:
                break
            count = min(idle, queued)
            self._send(link.ident, p.Credit(count))
            link.asked, link.asked_at, link.asked_seq = count, now, link.load_seq
            idle -= count

    def _on_worker_exit(self, ident: bytes, message: p.WorkerExit) -> None:
        """A supervisor saw one of its workers end. It may speak only for a
        worker connected here that said HELLO with the same host and the
        named name and pid (a replacement has the name, not the pid); any
        other is ignored. The loss itself waits for the next pump, so that
        what the worker sent before it died and we have already received is
        handled first."""
        supervisor = self.peers[ident]
        if supervisor.role != SUPERVISOR:
            raise RemoteProtocolError(f"WORKER_EXIT from a {supervisor.role}")
        worker = next((
            peer for peer in self.peers.values()
            if peer.role == WORKER and peer.name == message.worker and peer.pid == message.pid
            and peer.host == supervisor.host
        ), None)
        if worker is None:
            logger.info("%s says worker %s (pid %d) ended; no such worker here: ignored",
                        supervisor, message.worker[:200], message.pid)
            return
        if message.signal is not None:
            how = f"killed by {_signal_name(message.signal)}"
        else:
            how = f"exited with status {message.status}"
        worker.ended = {
            "status": message.status, "signal": message.signal, "stderr": list(message.stderr),
        }
        self._exits.append((worker, f"{how} (its supervisor saw it end)"))

    def _lose_ended(self) -> None:
        """Lose the workers whose supervisors said they ended (see
        :meth:`_on_worker_exit`), unless they have left meanwhile."""
        exits, self._exits = self._exits, []
        for worker, reason in exits:
            if self.peers.get(worker.ident) is worker:
                self._lose_peer(worker.ident, reason)

    def _on_heartbeat(self, ident: bytes, message: p.Message) -> None:
        pass  # nothing to do: a peer may send it when it has nothing else to say

    def _on_bye(self, ident: bytes, message: p.Message) -> None:
        self._drop_peer(ident)

    # -- state changes -------------------------------------------------------

    def _cancel(self, task: QueuedTask) -> None:
        """Forget ``task``; a worker holding it is asked to drop it."""
        task.cancelled = True
        self._forget_live_copy(task)

    def _forget_live_copy(self, task: QueuedTask) -> None:
        """Unqueue ``task``, or ask the worker holding it to drop it."""
        if task.worker is None:
            self.queued -= 1
            return
        worker = self.peers.get(task.worker)
        if worker is not None:
            worker.cancels.append(task.bid)

    def _requeue(self, task: QueuedTask) -> None:
        """Put a task back at the head of the queue, to be dispatched anew."""
        task.worker = None
        task.started = False
        self.queue.appendleft(task)
        self.queued += 1

    def _revoke_stranded(self) -> None:
        """Move tasks waiting behind a long one to a worker that idles.

        A worker holds a few tasks beyond the one it runs. If that one runs
        long, they wait although another worker may have nothing to do. Such
        a task is requeued at once, and its old worker asked to drop it
        (CANCEL): the old worker reads that CANCEL before it starts another
        task, so the task normally runs once. If the two crossed and it ran
        on both, the first result is delivered and the other dropped.

        A peer broker asking for work (docs/federation.md) counts as an idle
        worker here: stranded tasks are what we advertise to peers as
        ``stealable`` besides our queue.
        """
        if self.queued or not self.ready:
            return
        budget = sum(
            peer.credit for peer in self.ready.values()
            if peer.role == BROKER or (peer.role == WORKER and not peer.inflight)
        )
        if not budget:
            return
        for ident, bid, task in list(self._stranded()):
            self.peers[ident].cancels.append(bid)
            if task.stale is None:
                task.stale = []
            task.stale.append((ident, bid))
            self._requeue(task)
            task.avoid = ident
            self._revoked.append(task)
            budget -= 1
            if not budget:
                return

    def _stranded(self) -> Iterator[Tuple[bytes, int, QueuedTask]]:
        """(worker, broker id, task) of every task that has waited at a busy
        worker for REVOKE_AFTER without starting."""
        deadline = self.clock() - REVOKE_AFTER
        for ident, worker in self.peers.items():
            if worker.role != WORKER or len(worker.inflight) < 2:
                continue
            for bid, task in list(worker.inflight.items()):
                if not (
                    task.started or task.done or task.cancelled or task.killed or task.bid != bid
                    or task.worker != ident or task.dispatched_at > deadline
                ):
                    yield ident, bid, task

    def stealable(self) -> int:
        """Tasks a peer may borrow from us: the queue and stranded tasks."""
        return self.queued + sum(1 for _ in self._stranded())

    def publish_interval(self, idle_interval: float) -> float:
        """How often LOAD is due: ``idle_interval``, or REVOKE_AFTER while
        tasks may become stranded and a peer could take them."""
        if any(peer.role == BROKER for peer in self.peers.values()) and any(
            peer.role == WORKER and len(peer.inflight) > 1 for peer in self.peers.values()
        ):
            return min(idle_interval, REVOKE_AFTER)
        return idle_interval

    def next_check(self) -> Optional[float]:
        """Seconds until :meth:`pump` may have something to do unprompted: a
        task to revoke, an unanswered request for work to forget, or a
        suspect whose isolation ends."""
        checks = []
        if any(link.asked for link in self.peers.values() if link.role == LINK):
            checks.append(BORROW_TIMEOUT)
        if (
            not self.queued
            and any(w.role == WORKER and not w.inflight for w in self.ready.values())
            and any(w.role == WORKER and len(w.inflight) > 1 for w in self.peers.values())
        ):
            checks.append(REVOKE_AFTER)
        isolated = self._isolation_ends()
        if isolated is not None:
            checks.append(isolated)
        return min(checks) if checks else None

    def _reject(self, task: QueuedTask, reason: str) -> None:
        record = p.ResultRecord(task.task_id, p.Status.REJECTED, [reason.encode()])
        self._results.setdefault(task.origin, []).append(record)

    def _lose_peer(self, ident: bytes, reason: str) -> None:
        """A peer fell silent. A worker's or a borrowing broker's tasks run
        again elsewhere, each at most ``max_retries`` times; a lender's link
        is kept, to be used again if it comes back."""
        peer = self.peers[ident]
        if peer.role == LINK:
            if not peer.lost_streak:
                logger.warning("%s lost: %s", peer, reason)
            peer.lost_streak += 1
            for key in [key for key in self.tasks if key[0] == ident]:
                self._cancel(self.tasks.pop(key))
            peer.asked, peer.load, peer.last_heard = 0, {}, self.clock()
            # What waits for it on our DEALER is moot now (it requeues what
            # it lent us; we dropped what we borrowed): the connection starts
            # afresh, so nothing piles up for a peer that stays away.
            self._link_resets.append(ident)
            self._send(ident, p.Hello({
                **self.identity, "role": BROKER, "name": self.name,
                "task": self.address, "meta": self.meta_address, "versions": local_versions(),
            }))
            return
        logger.warning("%s lost: %s", peer, reason)
        for bid, task in peer.inflight.items():
            live = task.worker == ident and task.bid == bid
            if live and not (task.cancelled or task.done or task.killed):
                task.attempts += 1
                task.lost_at = self.clock()
        self._drop_peer(ident, lost=reason)

    def _answer(self, task: QueuedTask, status: p.Status, frames: List[Any]) -> None:
        """End ``task`` with a record of our own for its origin."""
        task.done = True
        self.done += 1
        del self.tasks[(task.origin, task.task_id)]
        record = p.ResultRecord(task.task_id, status, frames)
        self._results.setdefault(task.origin, []).append(record)

    def _fail_lost(self, task: QueuedTask, peer: Peer, reason: str) -> None:
        """``task`` lost its worker once too often: its origin gets LOST."""
        detail = json.dumps({
            "host": peer.host, "worker": peer.name, "pid": peer.pid, "reason": reason,
            "attempts": task.attempts, **(peer.ended or {}),
        })
        self._answer(task, p.Status.LOST, [detail.encode()])

    def _drop_peer(self, ident: bytes, lost: Optional[str] = None) -> None:
        """A peer left (or was ``lost``): requeue the tasks it was running
        (a task being killed is answered CANCELLED instead; one lost too
        often fails), forget the tasks it submitted."""
        peer = self.peers.get(ident)
        if peer is None:
            return
        del self.peers[ident]
        logger.info("%s left", peer)
        if peer.role == LINK:
            for address in [a for a, link in self.links.items() if link is peer]:
                del self.links[address]
        self.ready.pop(ident, None)
        for bid, task in peer.inflight.items():
            if task.worker != ident or task.bid != bid or task.cancelled or task.done:
                continue  # a stale copy, or nobody waits for it
            if task.killed:
                self._answer(task, p.Status.CANCELLED, [])
            elif lost is not None and task.attempts > self.max_retries:
                self._fail_lost(task, peer, lost)
            else:
                self._requeue(task)  # it did nothing wrong: not an attempt
        peer.inflight.clear()
        self._results.pop(ident, None)  # answers for the peer itself, as an origin
        self._started.pop(ident, None)
        for key in [key for key in self.tasks if key[0] == ident]:
            self._cancel(self.tasks.pop(key))

    def drop_all(self) -> List[Outgoing]:
        """Shutting down: tell every worker to exit and every peer we
        borrowed from that we leave (it requeues what it lent us)."""
        for ident, peer in self.peers.items():
            if peer.role == WORKER:
                self._send(ident, p.Shutdown())
            elif peer.role == LINK:
                self._send(ident, p.Bye())
        out, self._out = self._out, []
        return out

    # -- output --------------------------------------------------------------

    def _send(self, ident: bytes, message: p.Message) -> None:
        self._out.append((ident, p.encode(message)))
        peer = self.peers.get(ident)
        if peer is not None:
            peer.last_sent = self.clock()

    def _check_liveness(self) -> None:
        """Tell workers of new peers; heartbeat the peers we have been quiet
        to; lose the silent ones. Runs at most four times per heartbeat
        interval."""
        now = self.clock()
        if now < self._next_liveness:
            return
        self._next_liveness = now + self.heartbeat / 4
        self._tell_workers_peers()
        limit = self.heartbeat * LIVENESS
        for ident, peer in list(self.peers.items()):
            silent = now - peer.last_heard
            if peer.lost_streak:  # a link silent since we lost it: HELLO, less and less often
                if silent > min(LINK_RETRY_MAX, limit * 2**peer.lost_streak):
                    self._lose_peer(ident, f"silent for {silent:.1f} s")
            elif silent > limit:
                self._lose_peer(ident, f"silent for {silent:.1f} s")
            elif now - peer.last_sent >= self.heartbeat:
                self._send(ident, p.Heartbeat())

    def pump(self) -> List[Outgoing]:
        """Dispatch what can be dispatched; return every message to send."""
        self._lose_ended()
        self._check_liveness()
        self._revoke_stranded()
        self._dispatch()
        if self._revoked:  # what no other taker took may go back now
            for task in self._revoked:
                task.avoid = None
            self._revoked.clear()
            self._dispatch()
        self._borrow()
        for ident, peer in self.peers.items():
            if peer.role == BROKER and (peer.answer_due or peer.credit):
                if peer.answer_due:  # we had nothing for it: say so
                    self._send(ident, p.Tasks([], {}))
                    peer.answer_due = False
                peer.credit = 0  # a request is answered once
                self.ready.pop(ident, None)
            if peer.kills:
                # not those answered meanwhile (their result crossed the KILL),
                # nor the live copy of a task whose revoked copy's result won
                inflight = peer.inflight
                kills = [bid for bid in peer.kills if bid in inflight and not inflight[bid].done]
                if kills:
                    self._send(ident, p.Kill(kills))
                peer.kills = []
            if peer.cancels:
                self._send(ident, p.Cancel(peer.cancels))
                peer.cancels = []
        # one message per origin: its start notices ride with its results
        started, results = self._started, self._results
        for origin, ids in started.items():
            if origin not in results:
                self._send(origin, p.Started(ids))
        for origin, records in results.items():
            self._send(origin, p.Results(records, started.get(origin, [])))
        started.clear()
        results.clear()
        out, self._out = self._out, []
        return out

    def _dispatch(self) -> None:
        """Spread the queue over workers with credit, each taking at most an
        even share per pass; served workers go to the back of the line.
        Borrowing brokers get what our own workers leave."""
        ready = self.ready
        for role in (WORKER, BROKER):
            while self.queued:
                takers = [(ident, peer) for ident, peer in ready.items() if peer.role == role]
                if not takers:
                    break
                share = -(-self.queued // len(takers))  # ceil
                sent = 0
                for ident, peer in takers:
                    if not self.queued:
                        break
                    del ready[ident]
                    sent += self._send_batch(ident, peer, min(peer.credit, share))
                    if peer.credit > 0:
                        ready[ident] = peer
                if not sent:
                    break  # all that is left avoids these takers
        queue = self.queue
        while queue and (queue[0].cancelled or queue[0].done):
            queue.popleft()

    def _send_batch(self, ident: bytes, worker: Peer, count: int) -> int:
        """Send up to ``count`` queued tasks to ``worker``; how many went."""
        queue = self.queue
        batch: List[p.TaskRecord] = []
        blobs: Dict[bytes, Any] = {}
        skipped: List[QueuedTask] = []
        now = self.clock()
        holds_suspect: Optional[bool] = None  # worked out when a suspect comes up
        while queue and len(batch) < count:
            task = queue.popleft()
            if task.cancelled or task.done:
                continue
            if task.avoid == ident:
                skipped.append(task)
                continue
            if task.attempts and now - task.lost_at < ISOLATE_FOR:
                if holds_suspect is None:
                    holds_suspect = self._holds_suspect(ident, worker, now)
                if holds_suspect:
                    skipped.append(task)
                    continue
                holds_suspect = True
            self.queued -= 1
            task.worker, task.bid, task.dispatched_at = ident, self._next_bid, now
            task.handed_out = True
            self._next_bid += 1
            worker.inflight[task.bid] = task
            for blob in (task.fn, task.init):
                if blob != p.NO_INIT and blob not in worker.known:
                    blobs[blob] = self.blobs[blob]
                    worker.known.add(blob)
            batch.append(p.TaskRecord(task.bid, task.fn, task.init, task.frames))
        queue.extendleft(reversed(skipped))
        worker.credit -= len(batch)
        if batch:
            worker.answer_due = False
            self._send(ident, p.Tasks(batch, blobs))
        return len(batch)

    @staticmethod
    def _holds_suspect(ident: bytes, worker: Peer, now: float) -> bool:
        """Whether ``worker`` has the live copy of a task still isolated
        after losing its worker (see ISOLATE_FOR)."""
        return any(
            task.attempts and now - task.lost_at < ISOLATE_FOR and task.worker == ident
            and task.bid == bid and not (task.cancelled or task.done)
            for bid, task in worker.inflight.items()
        )

    def _isolation_ends(self) -> Optional[float]:
        """Seconds until the first queued suspect that waits for a worker
        without one may go anyway; None if none waits."""
        if not self.queued or not self.ready:
            return None
        now = self.clock()
        ends = [
            task.lost_at + ISOLATE_FOR - now for task in self.queue
            if task.attempts and now - task.lost_at < ISOLATE_FOR
            and not (task.cancelled or task.done)
        ]
        return max(0.0, min(ends)) if ends else None

    # -- reporting -----------------------------------------------------------

    def load(self) -> Dict[str, int]:
        """Numbers for the meta socket and status queries."""
        workers = [peer for peer in self.peers.values() if peer.role == WORKER]
        return {
            "queued": self.queued,
            "running": sum(len(w.inflight) for w in workers),
            "lent": sum(len(b.inflight) for b in self.peers.values() if b.role == BROKER),
            "done": self.done,
            "credit": sum(w.credit for w in workers),
            "workers": len(workers),
            "hosts": len({w.host for w in workers}),
        }

    def load_key(self) -> Tuple[int, int, int, int]:
        """What peers act on: a LOAD is due when this changes."""
        credit = sum(w.credit for w in self.ready.values() if w.role == WORKER)
        workers = sum(1 for peer in self.peers.values() if peer.role == WORKER)
        return (self.queued, credit, workers, len(self.brokers))

    def meta(self) -> Dict[str, Any]:
        """The next LOAD message's body (docs/federation.md)."""
        self.seq += 1
        workers = [peer for peer in self.peers.values() if peer.role == WORKER]
        hosts: Dict[str, int] = {}
        for worker in workers:
            hosts[worker.host] = hosts.get(worker.host, 0) + 1
        load = self.load()
        return {
            "name": self.name,
            "task": self.address,
            "meta": self.meta_address,
            "seq": self.seq,
            **load,
            "stealable": self.stealable(),
            "idle": max(0, load["credit"] - self.queued),
            "hosts": dict(_within(sorted(hosts.items()), HOSTS_BUDGET)),
            "peers": [
                {"task": task, "meta": meta}
                for task, meta in _within(self.brokers.items(), PEERS_BUDGET)
            ],
        }
