"""The wire protocol: every message futurefed sends, encoded and decoded here.

A message is a list of ZeroMQ frames. Frame 0 is a 4-byte header::

    b"FF" | version (1 byte) | command (1 byte)

followed by the command's body frames. ``docs/protocol.md`` gives the grammar
in ABNF; this module is its only implementation. It is pure: it imports no
socket library and never unpickles. Payload frames (pickled calls, results,
out-of-band buffers, function blobs) pass through as opaque objects, so the
broker can route them without touching their bytes.

Decoders validate everything a peer controls (header, frame counts, index
sizes, JSON metadata) and raise :class:`RemoteProtocolError` on the first
violation; callers log and drop the message.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Type

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DIGEST_SIZE",
    "MAGIC",
    "NO_INIT",
    "VERSION",
    "Bye",
    "Cancel",
    "Command",
    "Credit",
    "Heartbeat",
    "Hello",
    "Kill",
    "Load",
    "Message",
    "Refuse",
    "ResultRecord",
    "Results",
    "Shutdown",
    "Started",
    "Status",
    "Submit",
    "TaskRecord",
    "Tasks",
    "Welcome",
    "WorkerExit",
    "decode",
    "dispatch",
    "encode",
    "is_endpoint",
]

MAGIC = b"FF"
VERSION = 2
DIGEST_SIZE = 16
NO_INIT = bytes(DIGEST_SIZE)  # the init digest of a task whose executor has no initializer

# Limits on what a peer may make us allocate or parse.
MAX_JSON_BYTES = 64 * 1024
MAX_IDS = 1_000_000
MAX_BATCH = 1_000_000
#: A WORKER_EXIT names at most this many stderr lines, each at most
#: MAX_LINE characters (senders keep fewer: ``WorkerExit.of``).
MAX_TAIL_LINES = 100
MAX_LINE = 4096
MAX_NAME = 200
#: At most this many peer addresses in a WELCOME, each at most MAX_ADDRESS long.
MAX_WELCOME_PEERS = 64
MAX_ADDRESS = 300

_ENDPOINT = re.compile(r"(?:tcp|ipc)://[!-~]+")  # printable ASCII, no spaces

_HEADER = struct.Struct("!2sBB")
_COUNT = struct.Struct("!I")
_BATCH_PREFIX = struct.Struct("!II")  # number of blobs, number of tasks
_TASK = struct.Struct(f"!Q{DIGEST_SIZE}s{DIGEST_SIZE}sI")  # id, fn digest, init digest, frames
_RESULT = struct.Struct("!QBI")  # id, status, frames
_RESULTS_PREFIX = struct.Struct("!III")  # records, started ids, credit
_ID = struct.Struct("!Q")

#: A frame as handed to or received from the socket layer: ``bytes``, a
#: ``memoryview`` or a ``zmq.Frame``. Header and index frames must support
#: ``bytes(frame)``; payload frames are never inspected.
Frame = Any


class Command(enum.IntEnum):
    """The message types; the value is the header's command byte."""

    HELLO = 1  # peer -> broker: who I am (role, name, host, pid, versions)
    WELCOME = 2  # broker -> peer: accepted
    REFUSE = 3  # broker -> peer: not accepted, with the reason
    SUBMIT = 4  # origin -> broker: a batch of tasks
    TASKS = 5  # broker -> worker: a batch of tasks to run
    CREDIT = 6  # worker -> broker: send me this many more tasks
    RESULTS = 7  # worker -> broker -> origin: finished tasks
    STARTED = 8  # worker -> broker -> origin: these tasks began running
    CANCEL = 9  # origin -> broker -> worker: drop these tasks if not started
    HEARTBEAT = 10  # either way: proof of life when there is nothing else to say
    BYE = 11  # peer -> broker: leaving, forget me
    SHUTDOWN = 12  # broker -> worker: exit now
    LOAD = 13  # broker -> everyone, on the meta socket: my load and my peers
    KILL = 14  # origin -> broker -> worker: stop these tasks, even if they are running
    WORKER_EXIT = 17  # supervisor -> broker: a worker process I started has ended


class Status(enum.IntEnum):
    """How a task ended, in a :class:`ResultRecord`."""

    OK = 0  # payload: the pickled return value
    ERROR = 1  # payload: the pickled exception (see serialize.dump_exception)
    CANCELLED = 2  # no payload: dropped before it started
    INIT_FAILED = 3  # payload: the initializer's pickled exception
    REJECTED = 4  # payload: one UTF-8 frame, why the broker could not run it
    LOST = 5  # payload: one JSON frame, the worker lost while running it (max_retries times)


#: Status by value: a dict lookup costs a fraction of ``Status(value)``.
_STATUSES: Dict[int, Status] = {status.value: status for status in Status}


def _as_bytes(frame: Frame) -> bytes:
    """The bytes of a header or index frame (a zmq.Frame exposes ``.bytes``)."""
    raw = getattr(frame, "bytes", frame)
    return raw if isinstance(raw, bytes) else bytes(raw)


@dataclass(frozen=True)
class Message:
    """Base of every message; subclasses set ``command`` and code their body."""

    command: ClassVar[Command]

    def encode_body(self) -> List[Frame]:
        return []

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> "Message":
        _expect_frames(cls, frames, 0)
        return cls()


_REGISTRY: Dict[int, Type[Message]] = {}


def _register(cls: Type[Message]) -> Type[Message]:
    _REGISTRY[cls.command] = cls
    return cls


def _expect_frames(cls: type, frames: Sequence[Frame], count: int) -> None:
    if len(frames) != count:
        raise RemoteProtocolError(f"{cls.__name__}: expected {count} body frames, got {len(frames)}")


def _decode_json(cls: type, frame: Frame) -> Dict[str, Any]:
    raw = _as_bytes(frame)
    if len(raw) > MAX_JSON_BYTES:
        raise RemoteProtocolError(f"{cls.__name__}: metadata of {len(raw)} bytes is too large")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested JSON, which json.loads cannot parse
        raise RemoteProtocolError(f"{cls.__name__}: metadata is not JSON: {exc!r}"[:200]) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{cls.__name__}: metadata is not a JSON object")
    return value


def _encode_json(value: Dict[str, Any]) -> bytes:
    raw = json.dumps(value, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_JSON_BYTES:
        raise LocalProtocolError(f"metadata of {len(raw)} bytes is too large")
    return raw


@dataclass(frozen=True)
class _MetaMessage(Message):
    meta: Dict[str, Any] = field(default_factory=dict)

    def encode_body(self) -> List[Frame]:
        return [_encode_json(self.meta)]

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        return cls(_decode_json(cls, frames[0]))


@_register
@dataclass(frozen=True)
class Hello(_MetaMessage):
    """A peer introduces itself: ``role`` (``origin``, ``worker`` or
    ``broker``), ``name``, ``host`` and ``pid``; a broker adds its ``task``
    and ``meta`` addresses.

    HELLO and REFUSE are the same in every protocol version, so that peers
    of different versions can still meet and part: ``version`` is the
    protocol version in the header, which is accepted whatever it is."""

    command = Command.HELLO
    version: int = VERSION


def is_endpoint(value: Any) -> bool:
    """True for an address a peer may tell us to connect to: ``tcp://`` or
    ``ipc://``, printable ASCII without spaces, at most MAX_ADDRESS long."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_ADDRESS
        and _ENDPOINT.fullmatch(value) is not None
    )


def _check_peers(error: Type[Exception], meta: Dict[str, Any]) -> None:
    """WELCOME's optional ``peers``: a list of at most MAX_WELCOME_PEERS endpoints."""
    if "peers" not in meta:
        return
    peers = meta["peers"]
    if not isinstance(peers, list) or len(peers) > MAX_WELCOME_PEERS:
        raise error(f"Welcome: peers must be a list of at most {MAX_WELCOME_PEERS} addresses")
    for address in peers:
        if not is_endpoint(address):
            raise error(f"Welcome: peer {str(address)[:80]!r} is not a tcp:// or ipc:// address")


@_register
@dataclass(frozen=True)
class Welcome(_MetaMessage):
    """The broker accepted a HELLO: ``broker`` (its name), ``task`` and
    ``meta`` (its addresses) and, if it knows any, ``peers``: the task
    addresses of the other brokers of the federation, which its workers join
    if it is lost. A broker sends WELCOME again to its workers when that list
    changes. ``peers`` is checked strictly, the other keys are not."""

    command = Command.WELCOME

    @property
    def peers(self) -> List[str]:
        """The peer brokers' task addresses (empty if the broker named none)."""
        return list(self.meta.get("peers", ()))

    def encode_body(self) -> List[Frame]:
        _check_peers(LocalProtocolError, self.meta)
        return super().encode_body()

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        meta = _decode_json(cls, frames[0])
        _check_peers(RemoteProtocolError, meta)
        return cls(meta)


@_register
@dataclass(frozen=True)
class Refuse(Message):
    """The broker refused a HELLO, saying why; ``version`` is the protocol
    version of its header: a broker refuses a peer of another version in
    that peer's version, which is all the peer can read (see Hello)."""

    command = Command.REFUSE
    reason: str = ""
    version: int = VERSION

    def encode_body(self) -> List[Frame]:
        reason = self.reason.encode("utf-8", errors="replace")  # it may quote a peer's text
        if len(reason) > MAX_JSON_BYTES:
            reason = reason[: MAX_JSON_BYTES - 3] + b"..."
        return [reason]

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        raw = _as_bytes(frames[0])
        if len(raw) > MAX_JSON_BYTES:
            raise RemoteProtocolError("Refuse: reason too long")
        return cls(raw.decode("utf-8", errors="replace"))


@dataclass
class TaskRecord:
    """One task: its id (unique per sender), the digests of its function and
    of its executor's initializer call, and its payload frames: the pickled
    ``(args, kwargs)`` followed by that pickle's out-of-band buffers."""

    __slots__ = ("task_id", "fn", "init", "frames")

    task_id: int
    fn: bytes
    init: bytes
    frames: List[Frame]


@dataclass(frozen=True)
class _TaskBatch(Message):
    """A batch of tasks plus the function blobs the receiver lacks.

    Body: an index frame, then one frame per blob, then each task's frames.
    """

    tasks: List[TaskRecord] = field(default_factory=list)
    blobs: Dict[bytes, Frame] = field(default_factory=dict)

    def encode_body(self) -> List[Frame]:
        index = [_BATCH_PREFIX.pack(len(self.blobs), len(self.tasks))]
        index.extend(self.blobs)
        frames: List[Frame] = [b""]
        frames.extend(self.blobs.values())
        for task in self.tasks:
            if not task.frames:
                raise LocalProtocolError(f"task {task.task_id} has no payload frame")
            index.append(_TASK.pack(task.task_id, task.fn, task.init, len(task.frames)))
            frames.extend(task.frames)
        frames[0] = b"".join(index)
        return frames

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        if not frames:
            raise RemoteProtocolError(f"{cls.__name__}: missing index frame")
        index = _as_bytes(frames[0])
        if len(index) < _BATCH_PREFIX.size:
            raise RemoteProtocolError(f"{cls.__name__}: index frame too short")
        n_blobs, n_tasks = _BATCH_PREFIX.unpack_from(index)
        if n_blobs > MAX_BATCH or n_tasks > MAX_BATCH:
            raise RemoteProtocolError(f"{cls.__name__}: batch too large")
        expected = _BATCH_PREFIX.size + n_blobs * DIGEST_SIZE + n_tasks * _TASK.size
        if len(index) != expected:
            raise RemoteProtocolError(
                f"{cls.__name__}: index of {len(index)} bytes, expected {expected}"
            )
        pos = _BATCH_PREFIX.size
        digests = [index[pos + i * DIGEST_SIZE : pos + (i + 1) * DIGEST_SIZE] for i in range(n_blobs)]
        pos += n_blobs * DIGEST_SIZE
        if len(frames) < 1 + n_blobs:
            raise RemoteProtocolError(f"{cls.__name__}: missing blob frames")
        blobs = dict(zip(digests, frames[1 : 1 + n_blobs]))
        cursor = 1 + n_blobs
        tasks = []
        for task_id, fn, init, n_frames in _TASK.iter_unpack(index[pos:]):
            if n_frames < 1 or cursor + n_frames > len(frames):
                raise RemoteProtocolError(f"{cls.__name__}: task {task_id} frame count is wrong")
            tasks.append(TaskRecord(task_id, fn, init, list(frames[cursor : cursor + n_frames])))
            cursor += n_frames
        if cursor != len(frames):
            raise RemoteProtocolError(f"{cls.__name__}: {len(frames) - cursor} stray frames")
        return cls(tasks, blobs)


@_register
@dataclass(frozen=True)
class Submit(_TaskBatch):
    """An origin hands tasks to its broker."""

    command = Command.SUBMIT


@_register
@dataclass(frozen=True)
class Tasks(_TaskBatch):
    """A broker hands tasks to a worker (ids are then the broker's own)."""

    command = Command.TASKS


@_register
@dataclass(frozen=True)
class Credit(Message):
    """A worker asks for ``count`` more tasks."""

    command = Command.CREDIT
    count: int = 0

    def encode_body(self) -> List[Frame]:
        return [_COUNT.pack(self.count)]

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        raw = _as_bytes(frames[0])
        if len(raw) != _COUNT.size:
            raise RemoteProtocolError("Credit: count frame must be 4 bytes")
        (count,) = _COUNT.unpack(raw)
        if count > MAX_BATCH:
            raise RemoteProtocolError(f"Credit: {count} is more than {MAX_BATCH}")
        return cls(count)


@dataclass
class ResultRecord:
    """How one task ended and its payload (see :class:`Status`)."""

    __slots__ = ("task_id", "status", "frames")

    task_id: int
    status: Status
    frames: List[Frame]


@_register
@dataclass(frozen=True)
class Results(Message):
    """A report on tasks, flowing back from worker to broker to origin:
    the tasks that finished, those that ``started`` since the last report
    (as a STARTED would say), and, from a worker, ``credit`` for more tasks
    (as a CREDIT would). One message instead of three is one wake-up of the
    broker instead of three when a task ends and the next one starts."""

    command = Command.RESULTS
    results: List[ResultRecord] = field(default_factory=list)
    started: List[int] = field(default_factory=list)
    credit: int = 0

    def encode_body(self) -> List[Frame]:
        index = [_RESULTS_PREFIX.pack(len(self.results), len(self.started), self.credit)]
        frames: List[Frame] = [b""]
        for result in self.results:
            index.append(_RESULT.pack(result.task_id, result.status, len(result.frames)))
            frames.extend(result.frames)
        if self.started:
            index.append(struct.pack(f"!{len(self.started)}Q", *self.started))
        frames[0] = b"".join(index)
        return frames

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        if not frames:
            raise RemoteProtocolError("Results: missing index frame")
        index = _as_bytes(frames[0])
        if len(index) < _RESULTS_PREFIX.size:
            raise RemoteProtocolError("Results: index frame too short")
        count, n_started, credit = _RESULTS_PREFIX.unpack_from(index)
        if n_started > MAX_IDS or credit > MAX_BATCH:
            raise RemoteProtocolError("Results: too many started ids or too much credit")
        records_end = _RESULTS_PREFIX.size + count * _RESULT.size
        if len(index) != records_end + n_started * _ID.size:
            raise RemoteProtocolError("Results: index size does not match its counts")
        cursor = 1
        results = []
        records = index[_RESULTS_PREFIX.size : records_end]
        for task_id, status, n_frames in _RESULT.iter_unpack(records):
            known = _STATUSES.get(status)
            if known is None:
                raise RemoteProtocolError(f"Results: unknown status {status}")
            status = known
            if cursor + n_frames > len(frames):
                raise RemoteProtocolError(f"Results: task {task_id} frame count is wrong")
            results.append(ResultRecord(task_id, status, list(frames[cursor : cursor + n_frames])))
            cursor += n_frames
        if cursor != len(frames):
            raise RemoteProtocolError(f"Results: {len(frames) - cursor} stray frames")
        started = [task_id for (task_id,) in _ID.iter_unpack(index[records_end:])]
        return cls(results, started, credit)


@dataclass(frozen=True)
class _IdList(Message):
    ids: List[int] = field(default_factory=list)

    def encode_body(self) -> List[Frame]:
        return [struct.pack(f"!{len(self.ids)}Q", *self.ids)]

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        raw = _as_bytes(frames[0])
        if len(raw) % _ID.size or len(raw) > MAX_IDS * _ID.size:
            raise RemoteProtocolError(f"{cls.__name__}: id frame of {len(raw)} bytes")
        return cls([task_id for (task_id,) in _ID.iter_unpack(raw)])


@_register
@dataclass(frozen=True)
class Started(_IdList):
    """These tasks began running; the origin marks their futures running."""

    command = Command.STARTED


@_register
@dataclass(frozen=True)
class Cancel(_IdList):
    """Drop these tasks if they have not started."""

    command = Command.CANCEL


@_register
@dataclass(frozen=True)
class Kill(_IdList):
    """Stop these tasks wherever they are: dropped if queued, stopped if
    running (a worker stops a task that holds it by replacing itself).
    Each is answered with a CANCELLED result, or with its real result if
    that went out first."""

    command = Command.KILL


@_register
@dataclass(frozen=True)
class Heartbeat(Message):
    """Proof of life when there is nothing else to send."""

    command = Command.HEARTBEAT


@_register
@dataclass(frozen=True)
class Bye(Message):
    """The sender is leaving: forget it and its work."""

    command = Command.BYE


@_register
@dataclass(frozen=True)
class Shutdown(Message):
    """The broker is stopping: a worker receiving this exits."""

    command = Command.SHUTDOWN


@_register
@dataclass(frozen=True)
class Load(_MetaMessage):
    """A broker's load and peers, published on its meta socket (see
    docs/federation.md for the keys)."""

    command = Command.LOAD


@_register
@dataclass(frozen=True)
class WorkerExit(Message):
    """A worker's supervisor (fedrun's host agent, the embedded federation)
    saw the process end: by exit ``status`` or by ``signal`` (exactly one is
    set), with its last ``stderr`` lines. The body is one JSON object with
    exactly the keys ``worker``, ``pid``, ``status``, ``signal``, ``stderr``.
    """

    command = Command.WORKER_EXIT
    worker: str = ""
    pid: int = 0
    status: Optional[int] = None
    signal: Optional[int] = None
    stderr: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, worker: str, pid: int, returncode: int, stderr: Sequence[str],
           lines: int = 20, width: int = 1000) -> "WorkerExit":
        """The notice for a process that ended with ``returncode`` (as
        ``subprocess`` gives it: negative for a signal), keeping the last
        ``lines`` lines of ``stderr``, each cut to ``width`` characters."""
        tail = [line[:width] for line in list(stderr)[-lines:]] if lines > 0 else []
        if returncode < 0:
            return cls(worker[:MAX_NAME], pid, None, -returncode, tail)
        return cls(worker[:MAX_NAME], pid, returncode, None, tail)

    def encode_body(self) -> List[Frame]:
        why = _worker_exit_problem(self.worker, self.pid, self.status, self.signal, self.stderr)
        if why is not None:
            raise LocalProtocolError(f"WorkerExit: {why}")
        return [_encode_json({
            "worker": self.worker, "pid": self.pid, "status": self.status,
            "signal": self.signal, "stderr": list(self.stderr),
        })]

    @classmethod
    def decode_body(cls, frames: Sequence[Frame]) -> Message:
        _expect_frames(cls, frames, 1)
        meta = _decode_json(cls, frames[0])
        keys = {"worker", "pid", "status", "signal", "stderr"}
        if set(meta) != keys:
            raise RemoteProtocolError(f"WorkerExit: keys must be {sorted(keys)}")
        why = _worker_exit_problem(
            meta["worker"], meta["pid"], meta["status"], meta["signal"], meta["stderr"]
        )
        if why is not None:
            raise RemoteProtocolError(f"WorkerExit: {why}")
        return cls(meta["worker"], meta["pid"], meta["status"], meta["signal"], meta["stderr"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _worker_exit_problem(
    worker: Any, pid: Any, status: Any, signal: Any, stderr: Any
) -> Optional[str]:
    """What is wrong with a WORKER_EXIT's fields, or None."""
    if not isinstance(worker, str) or not 0 < len(worker) <= MAX_NAME:
        return f"worker must be a name of 1 to {MAX_NAME} characters"
    if not _is_int(pid) or not 0 < pid < 2**31:
        return "pid must be a positive integer"
    if (status is None) == (signal is None):
        return "exactly one of status and signal must be given"
    if status is not None and not (_is_int(status) and 0 <= status <= 255):
        return "status must be an integer from 0 to 255"
    if signal is not None and not (_is_int(signal) and 0 < signal < 128):
        return "signal must be an integer from 1 to 127"
    if not isinstance(stderr, list) or len(stderr) > MAX_TAIL_LINES:
        return f"stderr must be a list of at most {MAX_TAIL_LINES} lines"
    if not all(isinstance(line, str) and len(line) <= MAX_LINE for line in stderr):
        return f"stderr lines must be strings of at most {MAX_LINE} characters"
    return None


def encode(message: Message) -> List[Frame]:
    """The frames of ``message``, header first."""
    version = getattr(message, "version", VERSION)  # HELLO and REFUSE may say another
    if version == VERSION:
        header = _HEADER_OF[message.command]
    elif isinstance(version, int) and 0 < version < 256:
        header = _HEADER.pack(MAGIC, version, message.command)
    else:
        raise LocalProtocolError(f"protocol version {version!r} is not one byte from 1 to 255")
    return [header, *message.encode_body()]


def decode_header(frame: Frame) -> Command:
    """The command of a header frame, checking magic and protocol version."""
    command, version = _header(frame)
    if version != VERSION:
        raise RemoteProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    return command


def _header(frame: Frame) -> "tuple[Command, int]":
    """The command and protocol version of a header frame: a command of
    this version, or HELLO or REFUSE of any (see :class:`Hello`)."""
    raw = _as_bytes(frame)
    known = _HEADERS.get(raw)
    if known is not None:
        return known, VERSION
    if len(raw) != _HEADER.size:
        raise RemoteProtocolError(f"header of {len(raw)} bytes, expected {_HEADER.size}")
    magic, version, command = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise RemoteProtocolError(f"not a futurefed message (magic {magic!r})")
    if version == 0:
        raise RemoteProtocolError("protocol version 0")
    if version != VERSION and command not in _ANY_VERSION:
        raise RemoteProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    try:
        return Command(command), version
    except ValueError:
        raise RemoteProtocolError(f"unknown command {command}") from None


#: The header frame of each command, and back (the fast path of decode_header).
_HEADER_OF: Dict[Command, bytes] = {c: _HEADER.pack(MAGIC, VERSION, c) for c in Command}
_HEADERS: Dict[bytes, Command] = {header: c for c, header in _HEADER_OF.items()}


def dispatch(frames: Sequence[Frame], handlers: Dict[Command, Any], receiver: str) -> None:
    """Decode ``frames`` and call the handler of its command; a message
    ``receiver`` has no handler for is a RemoteProtocolError too."""
    message = decode(frames)
    handler = handlers.get(message.command)
    if handler is None:
        raise RemoteProtocolError(f"{message.command.name} is not for {receiver}")
    handler(message)


def decode(frames: Sequence[Frame]) -> Message:
    """The message in ``frames`` (header first); raises RemoteProtocolError."""
    if not frames:
        raise RemoteProtocolError("empty message")
    command, version = _header(frames[0])
    message = _REGISTRY[command].decode_body(frames[1:])
    if version != VERSION:  # a HELLO or REFUSE of another version
        message = dataclasses.replace(message, version=version)
    return message


#: Commands whose messages every protocol version writes alike.
_ANY_VERSION = frozenset({Command.HELLO, Command.REFUSE})


