"""Who may talk to a federation: CurveZMQ keys and the broker's authenticator.

A federation shares one CurveZMQ key pair, its *federation key*. Every broker
serves its task and meta sockets with it (``curve_server``); every worker,
origin and peer broker connects with it as its client key and the same
public key as the server key it expects. A ZAP authenticator on each broker
admits exactly that client key, so a process holds the federation key or is
refused before a single byte of its messages is read. Traffic is encrypted
and authenticated by CurveZMQ (docs/security.md).

The key lives in a file in ZeroMQ's certificate format, readable only by its
owner, named by ``FUTUREFED_KEY_FILE`` (``fedkeys FILE`` makes one; fedrun
makes one per run and hands it to its hosts over ssh).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .errors import ConfigError

__all__ = [
    "KEY_FILE_VARIABLE", "FederationKey", "FederationAuthenticator", "is_loopback",
    "HandshakeWatch", "KeyFile", "monitor_socket", "key_from_environ", "make_client", "make_server",
    "describe_handshake_failure",
]

logger = logging.getLogger(__name__)

KEY_FILE_VARIABLE = "FUTUREFED_KEY_FILE"
ZAP_DOMAIN = "futurefed"
#: A refused client is logged at most once per this many seconds per address.
REFUSAL_LOG_INTERVAL = 60.0

_CERTIFICATE = """\
#   ****  futurefed federation key  ****
#   ZeroMQ CURVE **Secret** Certificate
#   Whoever can read this file can run code on the federation's workers.

metadata
curve
    public-key = "{public}"
    secret-key = "{secret}"
"""

_Z85_KEY = re.compile(rb"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True)
class FederationKey:
    """A CurveZMQ key pair, Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        for name in ("public", "secret"):
            if not _Z85_KEY.match(getattr(self, name)):
                raise ValueError(f"the {name} key is not 40 characters of Z85")
        if zmq.curve_public(self.secret) != self.public:
            raise ValueError("the public key does not belong to the secret key")

    def __repr__(self) -> str:  # never print the secret
        return f"FederationKey(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> "FederationKey":
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str, variable: str = KEY_FILE_VARIABLE) -> "FederationKey":
        """Read a key file, refusing one that other users could read.

        Raises:
            ConfigError: naming ``variable`` and what is wrong with the file.
        """
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ConfigError(f"{variable}={path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{variable}={path} is readable by other users (mode {stat.S_IMODE(mode):04o});"
                f" run: chmod 600 {path}"
            )
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{variable}={path} is not a key file: {exc}") from None
        if secret is None:
            raise ConfigError(f"{variable}={path} holds no secret key")
        try:
            return cls(public, secret)
        except ValueError as exc:
            raise ConfigError(f"{variable}={path}: {exc}") from None

    def save(self, path: str) -> None:
        """Write the key file (ZeroMQ's certificate format, which
        ``zmq.auth.load_certificate`` reads) with mode 0600, atomically."""
        text = _CERTIFICATE.format(public=self.public.decode(), secret=self.secret.decode())
        partial = f"{path}.{os.getpid()}.partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.replace(partial, path)
        except BaseException:
            if os.path.exists(partial):
                os.unlink(partial)
            raise

    def text(self) -> str:
        """One line for a trusted channel (fedrun's ssh stdin)."""
        return f"{self.public.decode()} {self.secret.decode()}"

    @classmethod
    def from_text(cls, line: str) -> "FederationKey":
        public, _, secret = line.strip().partition(" ")
        return cls(public.encode(), secret.encode())


#: The reaper of a KeyFile: it waits for end-of-file on its stdin, which
#: comes when the process holding the other end exits, however it ends.
_REAPER = "import os, shutil, sys\nos.read(0, 1)\nshutil.rmtree(sys.argv[1], ignore_errors=True)"


class KeyFile:
    """``key`` in a file of a fresh directory only this user may enter, for
    child processes to read through ``FUTUREFED_KEY_FILE``; removed with
    the directory by :meth:`close` (or at the end of a ``with`` block).

    A small reaper process removes the directory if this process is killed
    before it can (fedrun or a host agent ended by SIGKILL): a key must not
    outlive the run it was made for.
    """

    def __init__(self, key: FederationKey) -> None:
        self.directory = tempfile.mkdtemp(prefix="futurefed-key-")  # mode 0700
        self.path = os.path.join(self.directory, "federation.key")
        self._reaper: Optional["subprocess.Popen[bytes]"] = None
        self._lifeline = -1
        try:
            key.save(self.path)
            self._start_reaper()
        except BaseException:
            self.close()
            raise

    def _start_reaper(self) -> None:
        read_end, self._lifeline = os.pipe()  # not inherited by other children
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _REAPER, self.directory],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to our group must not end it first
            )
        finally:
            os.close(read_end)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lifeline != -1:
            os.close(self._lifeline)
            self._lifeline = -1
        if self._reaper is not None:
            self._reaper.wait()  # at once: it has nothing left to remove
            self._reaper = None

    def __enter__(self) -> "KeyFile":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def key_from_environ(
    environ: Optional[Mapping[str, str]] = None, override: Optional[str] = None
) -> Optional[FederationKey]:
    """The key named by ``override`` (a ``--key-file`` flag) or else by
    ``FUTUREFED_KEY_FILE``; None if neither names one."""
    if override:
        return FederationKey.load(override, "--key-file")
    env = os.environ if environ is None else environ
    path = env.get(KEY_FILE_VARIABLE, "").strip()
    return FederationKey.load(path) if path else None


def make_server(sock: Any, key: Optional[FederationKey]) -> None:
    """Make a socket that will bind serve CurveZMQ with ``key`` (no-op
    without a key); its ZAP domain routes handshakes to the authenticator."""
    if key is None:
        return
    sock.curve_server = True
    sock.curve_publickey = key.public
    sock.curve_secretkey = key.secret
    sock.zap_domain = ZAP_DOMAIN.encode()


def make_client(sock: Any, key: Optional[FederationKey]) -> None:
    """Make a socket that will connect speak CurveZMQ with ``key`` and accept
    only a server holding it (no-op without a key)."""
    if key is None:
        return
    sock.curve_serverkey = key.public
    sock.curve_publickey = key.public
    sock.curve_secretkey = key.secret


class FederationAuthenticator(ThreadAuthenticator):
    """The broker's ZAP handler: admits the federation key and nothing else,
    and logs refused clients (once a minute per address)."""

    def __init__(self, context: Any, key: FederationKey, owner: str) -> None:
        super().__init__(context, log=logger)
        self.key = key
        self.owner = owner
        self.refused = 0
        self._peer = "?"
        self._logged: Dict[str, float] = {}

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    async def handle_zap_message(self, msg: list) -> None:  # type: ignore[type-arg]
        # The key check below learns the client's key but not its address.
        self._peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """The credentials check ``zmq.auth`` calls with a Z85 client key."""
        if client_key == self.key.public:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._logged.get(self._peer, -REFUSAL_LOG_INTERVAL) >= REFUSAL_LOG_INTERVAL:
            self._logged[self._peer] = now
            logger.warning(
                "%s: refused a connection from %s: its key is not the federation's"
                " (%d refused so far)", self.owner, self._peer, self.refused,
            )
        return False


def is_loopback(address: str) -> bool:
    """True if only this host can reach ``address`` (loopback tcp, ipc, inproc)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address[len("tcp://"):].rpartition(":")[0].strip("[]") if address.startswith("tcp://") else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, a wildcard or an interface: reachable from outside


#: What a client's socket monitor says when the broker will not have it.
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused our key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "spoke a different security mechanism",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed the security handshake",
}
HANDSHAKE_EVENTS = sum(_HANDSHAKE_FAILURES)


def describe_handshake_failure(event: Mapping[str, Any], key: Optional[FederationKey]) -> Optional[str]:
    """One sentence for a socket-monitor event, if it is a failed handshake."""
    what = _HANDSHAKE_FAILURES.get(event.get("event", 0))
    if what is None:
        return None
    if key is None:
        hint = f"does it need the federation's key? set {KEY_FILE_VARIABLE}"
    else:
        hint = f"is {KEY_FILE_VARIABLE} the federation's key file, and does the broker use one?"
    return f"the broker at {event.get('endpoint', b'?').decode(errors='replace')} {what} ({hint})"


_monitor_ids = itertools.count()


def monitor_socket(sock: Any, events: int) -> Any:
    """``sock.get_monitor_socket(events)`` on an address of its own.

    pyzmq's default address is derived from the socket's file descriptor,
    which the next socket reuses while libzmq may still hold the closed
    socket's monitor endpoint: binding it again would fail.
    """
    address = f"inproc://futurefed-monitor-{os.getpid()}-{next(_monitor_ids)}"
    return sock.get_monitor_socket(events, address)


class HandshakeWatch:
    """Watches a socket that connects to a broker for a failed security
    handshake, which ZeroMQ otherwise retries in silence. Create it before
    ``connect``; poll :attr:`monitor` and call :meth:`check` when readable;
    :meth:`close` it once the broker has answered (before closing ``sock``)."""

    def __init__(self, sock: Any, key: Optional[FederationKey]) -> None:
        self.key = key
        self.sock = sock
        self.monitor = monitor_socket(sock, HANDSHAKE_EVENTS)
        #: The last failure seen, as one sentence, or None.
        self.problem: Optional[str] = None

    def check(self) -> Optional[str]:
        """Read the events waiting; the failure, if this call saw a new one."""
        new = None
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            problem = describe_handshake_failure(event, self.key)
            if problem is not None and problem != self.problem:
                self.problem = new = problem
        return new

    def close(self) -> None:
        if not self.sock.closed:
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
