"""The broker process: one poll loop around :class:`BrokerState`.

Sockets:

* a ROUTER task socket that origins, workers and borrowing peer brokers
  connect to;
* a PUB meta socket on which it publishes its LOAD (docs/federation.md)
  every :data:`META_INTERVAL` and, at most every :data:`META_MIN_INTERVAL`,
  whenever what peers act on changes;
* per peer broker, a DEALER *link* to the peer's task socket, through which
  it borrows work, and one SUB connected to every peer's meta socket.

Each turn polls them all (and the lifeline, if any), drains up to
:data:`MAX_DRAIN` messages per socket into the state, then sends what
:meth:`BrokerState.pump` returns. Draining before pumping is what coalesces
many small messages into few large ones under load. Peers that the state
learns of (from a HELLO or a LOAD) are connected at the end of the turn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from .. import protocol as p
from .._sockets import drain, send_frames, send_nowait, task_socket
from ..config import meta_address_for
from ..errors import ConfigError, LocalProtocolError, RemoteProtocolError
from ..security import (
    REFUSAL_LOG_INTERVAL, FederationAuthenticator, FederationKey, make_client, make_server, monitor_socket,
)
from .state import BrokerState

__all__ = ["Broker", "BindError"]

logger = logging.getLogger(__name__)

MAX_DRAIN = 512
POLL_SECONDS = 1.0
META_INTERVAL = 0.25
META_MIN_INTERVAL = 0.002


class _Stop(BaseException):
    """Raised by the SIGTERM handler to leave the poll loop (a BaseException,
    so that the loop's guard against bugs in message handling cannot catch
    it)."""


class BindError(Exception):
    """A socket could not be bound; ``variable`` names the setting at fault."""

    def __init__(self, variable: str, address: str, error: zmq.ZMQError) -> None:
        super().__init__(f"cannot bind {variable}={address}: {error}")
        self.variable = variable


def _advertised(endpoint: str, host: Optional[str] = None) -> str:
    """The address peers should connect to for a bound ``endpoint``: ``host``
    if given, else a wildcard host (``0.0.0.0``, ``*``, ``[::]``) becomes
    this host's fully qualified name."""
    host_port = endpoint[len("tcp://"):] if endpoint.startswith("tcp://") else None
    if host_port is None:
        return endpoint
    bound, _, port = host_port.rpartition(":")
    if host is None and bound in ("0.0.0.0", "*", "[::]", "[::0]"):
        host = socket.getfqdn()
    return endpoint if host is None else f"tcp://{host}:{port}"


def _protocol_error_name(value: int) -> str:
    """``ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH`` and the like, by number."""
    for name in dir(zmq):
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name[len("PROTOCOL_ERROR_"):].lower()
    return f"error {value}"


def _bind_any_port(sock: Any, address: str) -> str:
    """Bind ``address`` (port 0 or ``*`` picks a free one); the endpoint bound."""
    if address.startswith("tcp://") and address.endswith(":0"):
        address = address[:-1] + "*"
    sock.bind(address)
    return str(sock.getsockopt(zmq.LAST_ENDPOINT).decode())


class Broker:
    """Binds its sockets and serves until the lifeline closes or SIGTERM.

    Args:
        address: the task socket to bind (``BROKER_ADDRESS``).
        name: the broker's name (``BROKER_NAME``).
        meta_address: the meta socket to bind (``META_ADDRESS``); by default
            the task port plus one, or any free port if the task port is 0.
        peers: ``(task, meta)`` addresses of peer brokers to connect to
            (``BROKER_ADDRESSES``/``META_ADDRESSES``); meta may be None for
            the task port plus one.
        advertise: the host name or address peers should use for this
            broker's sockets (default: as bound; a wildcard becomes the FQDN).
        key: the federation key: every socket speaks CurveZMQ and only
            holders of the key may connect (None: no authentication, which
            ``fedbroker`` allows on loopback only, or with ``--insecure``).
    """

    def __init__(
        self,
        address: str,
        name: str = "broker",
        *,
        meta_address: Optional[str] = None,
        peers: Sequence[Tuple[str, Optional[str]]] = (),
        advertise: Optional[str] = None,
        heartbeat: float = 1.0,
        max_retries: int = 3,
        lifeline: Optional[int] = None,
        ready_fd: Optional[int] = None,
        context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
        key: Optional[FederationKey] = None,
        runtime_dir: Optional[str] = None,
    ) -> None:
        self.address = address
        self.key = key
        self.runtime_dir = runtime_dir  # removed by close(): our ipc sockets' directory
        self.authenticator: Optional[FederationAuthenticator] = None
        self.monitor: Any = None
        self.meta_bind = meta_address
        self.name = name
        self.peers = list(peers)
        self.advertise = advertise
        self.lifeline = lifeline
        self.ready_fd = ready_fd
        self.ctx = context or zmq.Context.instance()
        self.state = BrokerState(
            name, identity={"host": socket.gethostname(), "pid": os.getpid()},
            heartbeat=heartbeat, max_retries=max_retries,
        )
        self.router: Any = None
        self.publisher: Any = None
        self.subscriber: Any = None
        self.links: Dict[bytes, Any] = {}  # state ident -> DEALER to a peer
        self.subscribed: Set[str] = set()  # meta sockets our SUB connects to
        self.endpoint = ""
        self.meta_endpoint = ""
        self._published_key: Any = None
        self._published_at = 0.0
        self._handshake_failures = 0
        self._handshake_logged: Dict[str, float] = {}  # protocol error -> when last logged

    def bind(self) -> str:
        """Bind the task and meta sockets; returns the task endpoint bound.

        Raises:
            BindError: naming BROKER_ADDRESS or META_ADDRESS.
        """
        if self.key is not None and self.authenticator is None:
            # ZAP must answer before the first client can connect
            self.authenticator = FederationAuthenticator(self.ctx, self.key, f"broker {self.name}")
            self.authenticator.start()
        self.router = task_socket(self.ctx, zmq.ROUTER, linger_ms=1000)
        make_server(self.router, self.key)
        self.monitor = monitor_socket(
            self.router, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        try:
            self.endpoint = _bind_any_port(self.router, self.address)
        except zmq.ZMQError as exc:
            self.close()
            raise BindError("BROKER_ADDRESS", self.address, exc) from None
        meta = self.meta_bind
        if meta is None:
            meta = meta_address_for(self.address)
        self.publisher = self.ctx.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.LINGER, 0)
        make_server(self.publisher, self.key)
        try:
            self.meta_endpoint = _bind_any_port(self.publisher, meta)
        except zmq.ZMQError as exc:
            self.close()
            raise BindError("META_ADDRESS", meta, exc) from None
        self.state.address = _advertised(self.endpoint, self.advertise)
        self.state.meta_address = _advertised(self.meta_endpoint, self.advertise)
        if self.ready_fd is not None:
            ready = {
                "task": self.endpoint, "meta": self.meta_endpoint,
                "advertised": self.state.address, "advertised_meta": self.state.meta_address,
            }
            os.write(self.ready_fd, json.dumps(ready).encode() + b"\n")
            os.close(self.ready_fd)
            self.ready_fd = None
        logger.info("broker %s bound %s (meta %s)", self.name, self.endpoint, self.meta_endpoint)
        return self.endpoint

    def run(self) -> int:
        """Bind if needed and serve; the process exit status."""
        if self.router is None:
            self.bind()

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            self.serve()
        except (_Stop, KeyboardInterrupt):
            logger.info("broker %s stopping", self.name)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close()
        return 0

    # -- peers ---------------------------------------------------------------------------

    def _connect_peers(self, poller: zmq.Poller, found: Iterable[Tuple[str, Optional[str]]]) -> None:
        for task, meta in found:
            try:
                meta = meta or meta_address_for(task)
            except ConfigError:
                meta = None  # not a tcp:// or ipc:// peer: no load, so no borrowing
            ident = b"link:" + task.encode()
            if ident in self.links:
                self._subscribe(meta)  # the peer named its real meta socket
                continue
            dealer = task_socket(self.ctx, zmq.DEALER, linger_ms=0)
            make_client(dealer, self.key)
            try:
                dealer.connect(task)
                self._subscribe(meta)
            except zmq.ZMQError as exc:
                dealer.close()
                logger.warning("broker %s: cannot connect to peer %s: %s", self.name, task, exc)
                continue
            self.links[ident] = dealer
            poller.register(dealer, zmq.POLLIN)
            self.state.add_link(ident, task, meta)
            logger.info("broker %s: linked to peer %s (meta %s)", self.name, task, meta)

    def _reset_link(self, poller: zmq.Poller, ident: bytes) -> None:
        """Close a lost peer's link, with what is queued on it, and open it anew."""
        old = self.links.get(ident)
        if old is None:
            return
        poller.unregister(old)
        old.close(linger=0)
        dealer = task_socket(self.ctx, zmq.DEALER, linger_ms=0)
        make_client(dealer, self.key)
        dealer.connect(ident[len(b"link:"):].decode())  # connected once: it is an address
        self.links[ident] = dealer
        poller.register(dealer, zmq.POLLIN)

    def _subscribe(self, meta: Optional[str]) -> None:
        if meta is not None and meta not in self.subscribed:
            try:
                self.subscriber.connect(meta)
            except zmq.ZMQError as exc:  # a peer named a meta socket we cannot use
                logger.warning("broker %s: cannot subscribe to %s: %s", self.name, meta, exc)
                return
            self.subscribed.add(meta)

    def _take_load(self) -> None:
        for frames in drain(self.subscriber, MAX_DRAIN):
            try:
                message = p.decode(frames)
                if not isinstance(message, p.Load):
                    raise RemoteProtocolError(f"{message.command.name} on a meta socket")
                self.state.on_load(message.meta)
            except RemoteProtocolError as exc:
                logger.warning("broker %s dropped a meta message: %s", self.name, exc)

    def _publish(self, now: float) -> Optional[float]:
        """Publish LOAD if due; seconds until the next one may be due."""
        since = now - self._published_at
        if not self.state.brokers:  # nobody acts on our load: the steady beat will do
            if since >= META_INTERVAL:
                self._send_load()
                self._published_at = now
                return META_INTERVAL
            return META_INTERVAL - since
        key = self.state.load_key()
        interval = self.state.publish_interval(META_INTERVAL)
        if since >= interval or (key != self._published_key and since >= META_MIN_INTERVAL):
            self._send_load()
            self._published_key, self._published_at = key, now
            return interval
        if key != self._published_key:
            return META_MIN_INTERVAL - since
        return interval - since

    def _send_load(self) -> None:
        try:
            frames = p.encode(p.Load(self.state.meta()))
        except LocalProtocolError as exc:  # a bug: the LOAD is kept within its limit
            logger.error("broker %s: cannot publish its load: %s", self.name, exc)
            return
        self.publisher.send_multipart(frames)

    # -- the loop ------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        self.subscriber = self.ctx.socket(zmq.SUB)
        self.subscriber.setsockopt(zmq.LINGER, 0)
        self.subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        make_client(self.subscriber, self.key)
        poller.register(self.subscriber, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        if self.lifeline is not None:
            poller.register(self.lifeline, zmq.POLLIN)
        router, state, links = self.router, self.state, self.links
        for task, meta in self.peers:
            state.learn(task, meta)
        self._connect_peers(poller, state.take_new_brokers())
        timeout: Optional[float] = 0.0
        while True:
            events = dict(poller.poll(None if timeout is None else timeout * 1000))
            if self.lifeline is not None and self.lifeline in events:
                logger.info("broker %s: lifeline closed", self.name)
                return
            for frames in drain(router, MAX_DRAIN):
                self._receive(frames[0].bytes, frames[1:])
            for ident, dealer in list(links.items()):
                if dealer in events:
                    for frames in drain(dealer, MAX_DRAIN):
                        self._receive(ident, frames)
            if self.subscriber in events:
                self._take_load()
            if self.monitor in events:
                self._log_handshake_failures()
            out = state.pump()
            for ident in state.take_link_resets():
                self._reset_link(poller, ident)
            for ident, frames in out:
                link = links.get(ident)
                if link is not None:
                    if not send_nowait(link, frames):  # its handshake failed: a wrong key
                        logger.debug("broker %s: no connection to a peer; dropped a message", self.name)
                else:
                    send_frames(router, [ident, *frames])
            found = state.take_new_brokers()
            if found:
                self._connect_peers(poller, found)
            timeout = min(POLL_SECONDS, state.heartbeat / 4, self._publish(time.monotonic()))
            check = state.next_check()
            if check is not None:
                timeout = min(timeout, check)

    def _log_handshake_failures(self) -> None:
        """A client that failed the handshake (no key where one is needed, a
        key where none is, or not ZeroMQ at all) never reached us; say so,
        at most once per REFUSAL_LOG_INTERVAL."""
        now = time.monotonic()
        for frames in drain(self.monitor, MAX_DRAIN):
            event = parse_monitor_message([frame.bytes for frame in frames])
            self._handshake_failures += 1
            error = (
                _protocol_error_name(event["value"])
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                else os.strerror(event["value"])
            )
            if now - self._handshake_logged.get(error, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
                continue
            self._handshake_logged[error] = now
            logger.warning(
                "broker %s: a client failed the handshake on %s (%s; %d failures so far): it"
                " has no key or another key, has one where none is used, or does not speak ZeroMQ",
                self.name, event["endpoint"].decode(errors="replace"), error,
                self._handshake_failures,
            )

    def _receive(self, ident: bytes, frames: List[Any]) -> None:
        try:
            self.state.receive(ident, frames)
        except Exception:  # a bug must not take the broker down with it
            logger.exception("broker %s: error handling a message", self.name)

    def close(self) -> None:
        if self.monitor is not None:
            self.router.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.router is not None:
            for ident, frames in self.state.drop_all():
                link = self.links.get(ident)
                try:
                    if link is not None:
                        link.send_multipart(frames, zmq.NOBLOCK)
                    else:
                        self.router.send_multipart([ident, *frames], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the peer is gone already (a worker's lifeline ends it anyway)
            self.router.close()
            self.router = None
        for sock in [self.publisher, self.subscriber, *self.links.values()]:
            if sock is not None:
                sock.close(linger=200)  # time for a BYE to leave
        self.publisher = self.subscriber = None
        self.links.clear()
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None
