"""The wire protocol (futurefed/protocol.py): every message type survives an
encode/decode round trip, and every hostile input a peer can send is rejected
with RemoteProtocolError, never with any other exception."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from futurefed import protocol as p
from futurefed.errors import LocalProtocolError, RemoteProtocolError

# decode must never hang: a generous per-test bound (pytest-timeout).
pytestmark = pytest.mark.timeout(60)

# -- helpers ---------------------------------------------------------------------------

FN = b"F" * p.DIGEST_SIZE
FN2 = b"G" * p.DIGEST_SIZE
INIT = b"I" * p.DIGEST_SIZE

TASK = struct.Struct(f"!Q{p.DIGEST_SIZE}s{p.DIGEST_SIZE}sI")
RESULT = struct.Struct("!QBI")


def header(command, version=p.VERSION, magic=p.MAGIC):
    return struct.pack("!2sBB", magic, version, int(command))


def roundtrip(message):
    return p.decode(p.encode(message))


def rejected(frames):
    """``decode(frames)`` raises RemoteProtocolError and nothing else."""
    try:
        message = p.decode(frames)
    except RemoteProtocolError:
        return True
    raise AssertionError(f"decoded hostile input as {message!r}")


def batch_index(n_blobs, n_tasks, digests=(), tasks=()):
    """A SUBMIT/TASKS index frame; ``tasks`` are (id, fn, init, n_frames)."""
    raw = struct.pack("!II", n_blobs, n_tasks) + b"".join(digests)
    return raw + b"".join(TASK.pack(*t) for t in tasks)


def results_index(count, records=(), started=(), n_started=None, credit=0):
    """A RESULTS index frame; ``records`` are (id, status, n_frames),
    ``started`` ids (``n_started`` of them, unless said otherwise)."""
    n_started = len(started) if n_started is None else n_started
    return (
        struct.pack("!III", count, n_started, credit)
        + b"".join(RESULT.pack(*r) for r in records)
        + b"".join(struct.pack("!Q", i) for i in started)
    )


def sample_messages():
    """One non-trivial message of every type, every record with >= 1 frame."""
    return [
        p.Hello({"role": "worker", "name": "w1", "host": "h", "pid": 42, "versions": {"py": "3.11"}}),
        p.Welcome({"broker": "b", "peers": ["tcp://10.0.0.2:5555", "ipc:///tmp/ff.sock"]}),
        p.Refuse("go away"),
        p.Submit(
            [p.TaskRecord(1, FN, p.NO_INIT, [b"call"]), p.TaskRecord(2, FN, INIT, [b"c", b"buf"])],
            {FN: b"fnblob", INIT: b"initblob"},
        ),
        p.Tasks([p.TaskRecord(7, FN, INIT, [b"c", b"b1", b"b2"])], {FN: b"fnblob"}),
        p.Credit(3),
        p.Results(
            [
                p.ResultRecord(1, p.Status.OK, [b"value", b"oob"]),
                p.ResultRecord(2, p.Status.ERROR, [b"exc"]),
            ],
            [3, 4],
            2,
        ),
        p.Started([1, 2, 3]),
        p.Cancel([4, 5]),
        p.Kill([6, 7]),
        p.Heartbeat(),
        p.Bye(),
        p.Load({"name": "b", "task": "tcp://127.0.0.1:5555", "seq": 3, "queued": 9,
                "peers": [{"task": "tcp://127.0.0.1:5557", "meta": "tcp://127.0.0.1:5558"}]}),
        p.Shutdown(),
        p.WorkerExit("node1.w0", 4242, None, 9, ["Traceback (most recent call last):", "  \u2603"]),
    ]


SAMPLES = sample_messages()
SAMPLE_IDS = [type(m).__name__ for m in SAMPLES]


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_roundtrip_every_message_type(message):
    frames = p.encode(message)
    assert bytes(frames[0]) == header(message.command)
    decoded = p.decode(frames)
    assert type(decoded) is type(message)
    assert decoded == message


def test_every_command_has_a_sample():
    assert {m.command for m in SAMPLES} == set(p.Command)


@pytest.mark.parametrize("version", [1, p.VERSION + 1, 255])
@pytest.mark.parametrize(
    "message", [p.Hello({"role": "worker", "versions": {"protocol": "1"}}), p.Refuse("no")],
    ids=["HELLO", "REFUSE"],
)
def test_hello_and_refuse_of_any_version_are_read_and_keep_it(message, version):
    other = dataclasses.replace(message, version=version)
    frames = p.encode(other)
    assert bytes(frames[0]) == header(message.command, version=version)
    decoded = p.decode(frames)
    assert decoded == other and decoded.version == version
    assert decoded != message  # the version is part of the message


@pytest.mark.parametrize(
    "command", [c for c in p.Command if c not in (p.Command.HELLO, p.Command.REFUSE)],
    ids=lambda c: c.name,
)
def test_other_commands_of_another_version_are_rejected(command):
    message = next(m for m in SAMPLES if m.command is command)
    frames = [header(command, version=p.VERSION - 1), *p.encode(message)[1:]]
    with pytest.raises(RemoteProtocolError, match=f"protocol version {p.VERSION - 1}"):
        p.decode(frames)


@pytest.mark.parametrize("version", [0, 256, -1, "2"])
def test_hello_of_an_impossible_version_is_not_sent(version):
    with pytest.raises(LocalProtocolError):
        p.encode(p.Hello({}, version))


@pytest.mark.parametrize(
    "message",
    [
        p.Hello(),
        p.Hello({"role": "origin", "unicode": "h\u00e9llo \u2603", "nested": [1, [2, {"x": None}]]}),
        p.Welcome(),
        p.Welcome({"peers": []}),
        p.Welcome({"peers": ["tcp://[::1]:5555"] * p.MAX_WELCOME_PEERS}),
        p.Welcome({"peers": ["tcp://" + "h" * (p.MAX_ADDRESS - 11) + ":5555"]}),
        p.Refuse(""),
        p.Refuse("unknown role 'x' \u2603"),
        p.Submit(),
        p.Tasks(),
        p.Submit([], {FN: b"only a blob"}),
        p.Submit([p.TaskRecord(2**64 - 1, FN, p.NO_INIT, [b""])]),
        p.Tasks([p.TaskRecord(i, FN2 if i % 2 else FN, p.NO_INIT, [b"x"] * (i + 1)) for i in range(5)]),
        p.Credit(0),
        p.Credit(p.MAX_BATCH),
        p.Results(),
        p.Results([p.ResultRecord(9, p.Status.CANCELLED, [])]),
        p.Results([p.ResultRecord(i, s, [b"f"] * i) for i, s in enumerate(p.Status)]),
        p.Results([p.ResultRecord(1, p.Status.REJECTED, ["no blob".encode()])]),
        p.Results([], [1, 2**64 - 1]),
        p.Results([], [], p.MAX_BATCH),
        p.Results([p.ResultRecord(5, p.Status.CANCELLED, [])], [6], 1),
        p.Started([]),
        p.Started([0, 2**64 - 1]),
        p.Cancel([]),
        p.Cancel(list(range(1000))),
        p.WorkerExit("w", 1, 0, None, []),
        p.WorkerExit("w" * p.MAX_NAME, 2**31 - 1, 255, None, ["x" * p.MAX_LINE] * 10),
        p.WorkerExit("w", 7, None, 127, [""] * p.MAX_TAIL_LINES),
        p.Kill([]),
        p.Kill([0, 2**64 - 1]),
    ],
    ids=lambda m: type(m).__name__,
)
def test_roundtrip_edge_cases(message):
    assert roundtrip(message) == message


def test_batch_roundtrip_keeps_frame_order_and_blobs():
    tasks = [p.TaskRecord(i, FN, INIT, [f"t{i}f{j}".encode() for j in range(i + 1)]) for i in range(4)]
    blobs = {FN: b"fn", INIT: b"init", FN2: b"unused"}
    for cls in (p.Submit, p.Tasks):
        decoded = roundtrip(cls(tasks, blobs))
        assert [t.frames for t in decoded.tasks] == [t.frames for t in tasks]
        assert decoded.blobs == blobs
        assert list(decoded.blobs) == list(blobs)


def test_payload_frames_are_passed_through_not_copied():
    payload = [zmq.Frame(b"call"), zmq.Frame(b"oob")]
    blob = zmq.Frame(b"fnblob")
    message = p.Submit([p.TaskRecord(1, FN, p.NO_INIT, payload)], {FN: blob})
    frames = p.encode(message)
    assert frames[2] is blob and frames[3] is payload[0] and frames[4] is payload[1]
    decoded = p.decode(frames)
    assert decoded.tasks[0].frames[0] is payload[0]
    assert decoded.tasks[0].frames[1] is payload[1]
    assert decoded.blobs[FN] is blob


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
def test_roundtrip_with_zmq_frames(message):
    """What ``recv_multipart(copy=False)`` hands over: every frame a zmq.Frame."""
    frames = [zmq.Frame(bytes(f)) for f in p.encode(message)]
    decoded = p.decode(frames)
    assert type(decoded) is type(message)
    # payload frames come back as the very zmq.Frame objects received
    for rec in getattr(decoded, "tasks", []) + getattr(decoded, "results", []):
        assert all(isinstance(f, zmq.Frame) for f in rec.frames)
        assert all(any(f is g for g in frames) for f in rec.frames)
    assert _as_plain(decoded) == message


@pytest.mark.parametrize("message", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("kind", [memoryview, bytearray])
def test_roundtrip_with_buffer_frames(message, kind):
    frames = [kind(bytes(f)) for f in p.encode(message)]
    decoded = p.decode(frames)
    assert _as_plain(decoded) == message


def test_zmq_frame_payloads_encode():
    message = p.Results([p.ResultRecord(3, p.Status.OK, [zmq.Frame(b"v"), memoryview(b"buf")])])
    frames = p.encode(message)
    decoded = p.decode(frames)
    assert decoded.results[0].frames[0] is message.results[0].frames[0]
    assert decoded.results[0].frames[1] is message.results[0].frames[1]


def _as_plain(message):
    """``message`` with every payload frame turned into bytes, for comparison."""
    if isinstance(message, p._TaskBatch):
        return type(message)(
            [p.TaskRecord(t.task_id, t.fn, t.init, [bytes(f) for f in t.frames]) for t in message.tasks],
            {d: bytes(b) for d, b in message.blobs.items()},
        )
    if isinstance(message, p.Results):
        return p.Results(
            [p.ResultRecord(r.task_id, r.status, [bytes(f) for f in r.frames])
             for r in message.results],
            message.started, message.credit,
        )
    return message


def test_encode_refuses_task_without_payload():
    with pytest.raises(LocalProtocolError):
        p.encode(p.Submit([p.TaskRecord(1, FN, p.NO_INIT, [])]))


def test_encode_refuses_oversized_metadata():
    with pytest.raises(LocalProtocolError):
        p.encode(p.Hello({"x": "y" * p.MAX_JSON_BYTES}))


# -- hostile inputs --------------------------------------------------------------------

H = header  # short alias for the table below


def _missing_and_extra_cases():
    """For every command: its body with one frame dropped, with one extra
    frame, and (when it needs one) with no body at all."""
    cases = []
    for message in SAMPLES:
        frames = p.encode(message)
        name = type(message).__name__
        cases.append((f"{name}-extra-frame", frames + [b"extra"]))
        cases.append((f"{name}-extra-empty-frame", frames + [b""]))
        if len(frames) > 1:
            cases.append((f"{name}-missing-last-frame", frames[:-1]))
            cases.append((f"{name}-header-only", frames[:1]))
        if len(frames) > 2:
            cases.append((f"{name}-missing-first-body-frame", frames[:1] + frames[2:]))
    return cases


def _b(obj):
    return json.dumps(obj).encode()


def _exit_fields(**changes):
    """The fields of a valid WORKER_EXIT body, with ``changes``."""
    fields = {"worker": "node1.w0", "pid": 42, "status": 3, "signal": None, "stderr": ["boom"]}
    return {**fields, **changes}


def _exit(**changes):
    return _b(_exit_fields(**changes))


HOSTILE = [
    # framing and header
    ("empty-message", []),
    ("empty-header", [b""]),
    ("header-3-bytes", [b"FF\x01"]),
    ("header-5-bytes", [H(p.Command.HEARTBEAT) + b"\x00"]),
    ("header-long", [H(p.Command.HEARTBEAT) * 4]),
    ("wrong-magic", [H(p.Command.HEARTBEAT, magic=b"GG")]),
    ("lowercase-magic", [H(p.Command.HEARTBEAT, magic=b"ff")]),
    ("zmtp-like-magic", [b"\xff\x00\x00\x00"]),
    ("version-0", [H(p.Command.HEARTBEAT, version=0)]),
    ("old-version", [H(p.Command.HEARTBEAT, version=p.VERSION - 1)]),
    ("future-version", [H(p.Command.HEARTBEAT, version=p.VERSION + 1)]),
    ("version-255", [H(p.Command.HEARTBEAT, version=255)]),
    ("command-0", [H(0)]),
    ("command-after-the-last", [H(max(p.Command) + 1)]),
    ("command-255", [H(255)]),
    ("unknown-command-with-body", [H(200), b"body"]),
    # batches: index frame sizes and counts
    ("submit-no-index", [H(p.Command.SUBMIT)]),
    ("submit-index-too-short", [H(p.Command.SUBMIT), b"\x00\x00\x00\x00"]),
    ("submit-index-empty", [H(p.Command.SUBMIT), b""]),
    ("submit-index-one-byte-long", [H(p.Command.SUBMIT), batch_index(0, 0) + b"\x00"]),
    (
        "submit-index-one-byte-short",
        [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 1)])[:-1], b"x"],
    ),
    (
        "submit-claims-two-tasks-has-one-entry",
        [H(p.Command.SUBMIT), batch_index(0, 2, tasks=[(1, FN, p.NO_INIT, 1)]), b"x"],
    ),
    (
        "submit-claims-two-tasks-has-one-frame",
        [H(p.Command.SUBMIT), batch_index(0, 2, tasks=[(1, FN, p.NO_INIT, 1), (2, FN, p.NO_INIT, 1)]), b"x"],
    ),
    ("submit-claims-blob-no-digest", [H(p.Command.SUBMIT), batch_index(1, 0), b"blob"]),
    ("submit-claims-blob-no-frame", [H(p.Command.SUBMIT), batch_index(1, 0, digests=[FN])]),
    (
        "submit-claims-two-blobs-has-one-frame",
        [H(p.Command.SUBMIT), batch_index(2, 0, digests=[FN, FN2]), b"blob"],
    ),
    (
        "submit-blob-frame-missing-under-task",
        [H(p.Command.SUBMIT), batch_index(1, 1, digests=[FN], tasks=[(1, FN, p.NO_INIT, 1)]), b"x"],
    ),
    (
        "submit-task-claims-more-frames",
        [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 3)]), b"a", b"b"],
    ),
    (
        "submit-task-claims-2**32-1-frames",
        [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 2**32 - 1)]), b"a"],
    ),
    ("submit-task-zero-frames", [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 0)])]),
    (
        "submit-task-zero-frames-then-stray",
        [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 0)]), b"x"],
    ),
    (
        "submit-second-task-zero-frames",
        [
            H(p.Command.SUBMIT),
            batch_index(0, 2, tasks=[(1, FN, p.NO_INIT, 1), (2, FN, p.NO_INIT, 0)]),
            b"x",
        ],
    ),
    (
        "submit-stray-trailing-frame",
        [H(p.Command.SUBMIT), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 1)]), b"x", b"stray"],
    ),
    ("submit-empty-batch-stray-frame", [H(p.Command.SUBMIT), batch_index(0, 0), b"stray"]),
    ("submit-huge-task-count", [H(p.Command.SUBMIT), batch_index(0, 2**32 - 1)]),
    ("submit-huge-blob-count", [H(p.Command.SUBMIT), batch_index(2**32 - 1, 0)]),
    ("submit-both-counts-huge", [H(p.Command.SUBMIT), struct.pack("!II", 2**32 - 1, 2**32 - 1)]),
    ("submit-count-max-batch-plus-one", [H(p.Command.SUBMIT), batch_index(0, p.MAX_BATCH + 1)]),
    ("submit-blobs-max-batch-plus-one", [H(p.Command.SUBMIT), batch_index(p.MAX_BATCH + 1, 0)]),
    (
        "submit-count-max-batch-short-index",
        [H(p.Command.SUBMIT), batch_index(0, p.MAX_BATCH, tasks=[(1, FN, p.NO_INIT, 1)]), b"x"],
    ),
    ("tasks-task-zero-frames", [H(p.Command.TASKS), batch_index(0, 1, tasks=[(1, FN, p.NO_INIT, 0)])]),
    ("tasks-huge-task-count", [H(p.Command.TASKS), batch_index(0, 2**31)]),
    ("tasks-index-wrong-size", [H(p.Command.TASKS), batch_index(0, 0) + b"\x00" * 7]),
    (
        "tasks-stray-trailing-frame",
        [H(p.Command.TASKS), batch_index(1, 0, digests=[FN]), b"blob", b"stray"],
    ),
    # results
    ("results-no-index", [H(p.Command.RESULTS)]),
    ("results-index-empty", [H(p.Command.RESULTS), b""]),
    ("results-index-too-short", [H(p.Command.RESULTS), b"\x00\x00\x00"]),
    ("results-index-version-1", [H(p.Command.RESULTS), struct.pack("!I", 0)]),
    ("results-index-no-credit", [H(p.Command.RESULTS), struct.pack("!II", 0, 0)]),
    (
        "results-started-count-claims-more",
        [H(p.Command.RESULTS), results_index(0, started=[1], n_started=2)],
    ),
    (
        "results-started-count-claims-fewer",
        [H(p.Command.RESULTS), results_index(0, started=[1, 2], n_started=1)],
    ),
    ("results-started-id-cut-short", [H(p.Command.RESULTS), results_index(0, started=[1])[:-1]]),
    ("results-huge-started-count", [H(p.Command.RESULTS), results_index(0, n_started=2**32 - 1)]),
    (
        "results-credit-over-the-limit",
        [H(p.Command.RESULTS), results_index(0, credit=p.MAX_BATCH + 1)],
    ),
    ("results-credit-2**32-1", [H(p.Command.RESULTS), results_index(0, credit=2**32 - 1)]),
    (
        "results-started-before-records",
        [
            H(p.Command.RESULTS),
            struct.pack("!III", 1, 1, 0) + struct.pack("!Q", 9) + RESULT.pack(1, 0, 1),
            b"v",
        ],
    ),
    ("results-index-one-byte-long", [H(p.Command.RESULTS), results_index(0) + b"\x00"]),
    (
        "results-index-one-byte-short",
        [H(p.Command.RESULTS), results_index(1, [(1, 0, 1)])[:-1], b"v"],
    ),
    ("results-count-claims-more", [H(p.Command.RESULTS), results_index(3, [(1, 0, 1)]), b"v"]),
    ("results-count-claims-fewer", [H(p.Command.RESULTS), results_index(0, [(1, 0, 1)]), b"v"]),
    ("results-huge-count", [H(p.Command.RESULTS), results_index(2**32 - 1)]),
    ("results-huge-count-with-record", [H(p.Command.RESULTS), results_index(2**32 - 1, [(1, 0, 0)])]),
    ("results-claims-more-frames", [H(p.Command.RESULTS), results_index(1, [(1, 0, 2)]), b"v"]),
    ("results-claims-2**32-1-frames", [H(p.Command.RESULTS), results_index(1, [(1, 0, 2**32 - 1)])]),
    ("results-stray-trailing-frame", [H(p.Command.RESULTS), results_index(1, [(1, 0, 1)]), b"v", b"x"]),
    ("results-empty-stray-frame", [H(p.Command.RESULTS), results_index(0), b"x"]),
    ("results-unknown-status-6", [H(p.Command.RESULTS), results_index(1, [(1, 6, 1)]), b"v"]),
    ("results-unknown-status-255", [H(p.Command.RESULTS), results_index(1, [(1, 255, 0)])]),
    (
        "results-second-record-unknown-status",
        [H(p.Command.RESULTS), results_index(2, [(1, 0, 0), (2, max(p.Status) + 1, 0)])],
    ),
    # HELLO / WELCOME metadata
    ("hello-no-body", [H(p.Command.HELLO)]),
    ("hello-two-frames", [H(p.Command.HELLO), b"{}", b"{}"]),
    ("hello-empty-frame", [H(p.Command.HELLO), b""]),
    ("hello-not-utf8", [H(p.Command.HELLO), b'{"role": "\xff\xfe"}']),
    ("hello-lone-continuation-byte", [H(p.Command.HELLO), b"\x80"]),
    ("hello-utf16", [H(p.Command.HELLO), '{"role":"worker"}'.encode("utf-16")]),
    ("hello-not-json", [H(p.Command.HELLO), b"{role: worker}"]),
    ("hello-truncated-json", [H(p.Command.HELLO), b'{"role": "wor']),
    ("hello-trailing-garbage", [H(p.Command.HELLO), b'{"role": "worker"} x']),
    ("hello-bom", [H(p.Command.HELLO), b"\xef\xbb\xbf{}"]),
    ("hello-json-array", [H(p.Command.HELLO), _b([1, 2])]),
    ("hello-json-string", [H(p.Command.HELLO), _b("worker")]),
    ("hello-json-number", [H(p.Command.HELLO), b"1"]),
    ("hello-json-null", [H(p.Command.HELLO), b"null"]),
    ("hello-json-true", [H(p.Command.HELLO), b"true"]),
    ("hello-huge-int", [H(p.Command.HELLO), b'{"pid": ' + b"9" * 5000 + b"}"]),
    (
        "hello-oversized",
        [H(p.Command.HELLO), _b({"role": "worker", "pad": "x" * p.MAX_JSON_BYTES})],
    ),
    ("hello-oversized-whitespace", [H(p.Command.HELLO), b"{}" + b" " * p.MAX_JSON_BYTES]),
    ("welcome-not-json", [H(p.Command.WELCOME), b"\x00\x01"]),
    ("welcome-non-object", [H(p.Command.WELCOME), b"[]"]),
    ("welcome-oversized", [H(p.Command.WELCOME), _b({"b": "x" * (p.MAX_JSON_BYTES + 1)})]),
    # WELCOME's peers: a list of at most MAX_WELCOME_PEERS tcp:// or ipc:// addresses
    ("welcome-peers-null", [H(p.Command.WELCOME), _b({"peers": None})]),
    ("welcome-peers-string", [H(p.Command.WELCOME), _b({"peers": "tcp://a:1"})]),
    ("welcome-peers-object", [H(p.Command.WELCOME), _b({"peers": {"tcp://a:1": 1}})]),
    ("welcome-peers-number", [H(p.Command.WELCOME), _b({"peers": 3})]),
    ("welcome-peer-number", [H(p.Command.WELCOME), _b({"peers": [5555]})]),
    ("welcome-peer-null", [H(p.Command.WELCOME), _b({"peers": ["tcp://a:1", None]})]),
    ("welcome-peer-object", [H(p.Command.WELCOME), _b({"peers": [{"task": "tcp://a:1"}]})]),
    ("welcome-peer-list", [H(p.Command.WELCOME), _b({"peers": [["tcp://a:1"]]})]),
    ("welcome-peer-empty", [H(p.Command.WELCOME), _b({"peers": [""]})]),
    ("welcome-peer-no-scheme", [H(p.Command.WELCOME), _b({"peers": ["a:1"]})]),
    ("welcome-peer-scheme-only", [H(p.Command.WELCOME), _b({"peers": ["tcp://"]})]),
    ("welcome-peer-inproc", [H(p.Command.WELCOME), _b({"peers": ["inproc://x"]})]),
    ("welcome-peer-udp", [H(p.Command.WELCOME), _b({"peers": ["udp://a:1"]})]),
    ("welcome-peer-upper-scheme", [H(p.Command.WELCOME), _b({"peers": ["TCP://a:1"]})]),
    ("welcome-peer-space", [H(p.Command.WELCOME), _b({"peers": ["tcp://a b:1"]})]),
    ("welcome-peer-newline", [H(p.Command.WELCOME), _b({"peers": ["tcp://a:1\ntcp://b:2"]})]),
    ("welcome-peer-nul", [H(p.Command.WELCOME), _b({"peers": ["tcp://a\u0000:1"]})]),
    ("welcome-peer-non-ascii", [H(p.Command.WELCOME), _b({"peers": ["tcp://h\u00e9:1"]})]),
    ("welcome-peer-leading-space", [H(p.Command.WELCOME), _b({"peers": [" tcp://a:1"]})]),
    (
        "welcome-peer-too-long",
        [H(p.Command.WELCOME), _b({"peers": ["tcp://" + "h" * (p.MAX_ADDRESS - 10) + ":5555"]})],
    ),
    (
        "welcome-too-many-peers",
        [H(p.Command.WELCOME), _b({"peers": ["tcp://a:1"] * (p.MAX_WELCOME_PEERS + 1)})],
    ),
    (
        "welcome-one-bad-peer-among-good",
        [H(p.Command.WELCOME), _b({"peers": ["tcp://a:1"] * 10 + ["tcp://a :1"] + ["tcp://b:2"]})],
    ),
    ("refuse-no-body", [H(p.Command.REFUSE)]),
    ("refuse-oversized", [H(p.Command.REFUSE), b"x" * (p.MAX_JSON_BYTES + 1)]),
    # id lists
    ("started-7-bytes", [H(p.Command.STARTED), b"\x00" * 7]),
    ("started-9-bytes", [H(p.Command.STARTED), b"\x00" * 9]),
    ("cancel-1-byte", [H(p.Command.CANCEL), b"\x01"]),
    ("cancel-15-bytes", [H(p.Command.CANCEL), b"\x00" * 15]),
    ("cancel-no-body", [H(p.Command.CANCEL)]),
    ("cancel-two-frames", [H(p.Command.CANCEL), b"\x00" * 8, b"\x00" * 8]),
    ("cancel-more-than-max-ids", [H(p.Command.CANCEL), b"\x00" * (8 * (p.MAX_IDS + 1))]),
    ("kill-no-body", [H(p.Command.KILL)]),
    ("kill-1-byte", [H(p.Command.KILL), b"\x01"]),
    ("kill-12-bytes", [H(p.Command.KILL), b"\x00" * 12]),
    ("kill-two-frames", [H(p.Command.KILL), b"\x00" * 8, b"\x00" * 8]),
    ("kill-empty-and-stray-frame", [H(p.Command.KILL), b"", b""]),
    ("kill-more-than-max-ids", [H(p.Command.KILL), b"\x00" * (8 * (p.MAX_IDS + 1))]),
    # credit
    ("credit-empty", [H(p.Command.CREDIT), b""]),
    ("credit-3-bytes", [H(p.Command.CREDIT), b"\x00\x00\x01"]),
    ("credit-5-bytes", [H(p.Command.CREDIT), b"\x00\x00\x00\x00\x01"]),
    ("credit-8-bytes", [H(p.Command.CREDIT), struct.pack("!Q", 1)]),
    ("credit-no-body", [H(p.Command.CREDIT)]),
    ("credit-max-batch-plus-one", [H(p.Command.CREDIT), struct.pack("!I", p.MAX_BATCH + 1)]),
    ("credit-huge", [H(p.Command.CREDIT), struct.pack("!I", 2**32 - 1)]),
    # WORKER_EXIT: one JSON object, exactly its five keys, each checked
    ("worker-exit-no-body", [H(p.Command.WORKER_EXIT)]),
    ("worker-exit-two-frames", [H(p.Command.WORKER_EXIT), _exit(), _exit()]),
    ("worker-exit-not-json", [H(p.Command.WORKER_EXIT), b"{worker: w}"]),
    ("worker-exit-json-array", [H(p.Command.WORKER_EXIT), _b([_exit_fields()])]),
    ("worker-exit-oversized", [H(p.Command.WORKER_EXIT), _exit(stderr=["x" * 4000] * 17)]),
    ("worker-exit-deep-json", [H(p.Command.WORKER_EXIT), b'{"worker":' + b"[" * 5000]),
    (
        "worker-exit-missing-key",
        [H(p.Command.WORKER_EXIT), _b({k: v for k, v in _exit_fields().items() if k != "stderr"})],
    ),
    ("worker-exit-extra-key", [H(p.Command.WORKER_EXIT), _exit(host="elsewhere")]),
    ("worker-exit-empty-name", [H(p.Command.WORKER_EXIT), _exit(worker="")]),
    ("worker-exit-long-name", [H(p.Command.WORKER_EXIT), _exit(worker="w" * (p.MAX_NAME + 1))]),
    ("worker-exit-name-not-str", [H(p.Command.WORKER_EXIT), _exit(worker=["w"])]),
    ("worker-exit-name-null", [H(p.Command.WORKER_EXIT), _exit(worker=None)]),
    ("worker-exit-pid-str", [H(p.Command.WORKER_EXIT), _exit(pid="42")]),
    ("worker-exit-pid-bool", [H(p.Command.WORKER_EXIT), _exit(pid=True)]),
    ("worker-exit-pid-float", [H(p.Command.WORKER_EXIT), _exit(pid=42.0)]),
    ("worker-exit-pid-0", [H(p.Command.WORKER_EXIT), _exit(pid=0)]),
    ("worker-exit-pid-negative", [H(p.Command.WORKER_EXIT), _exit(pid=-1)]),
    ("worker-exit-pid-huge", [H(p.Command.WORKER_EXIT), _exit(pid=2**31)]),
    (
        "worker-exit-pid-bigint",
        [H(p.Command.WORKER_EXIT),
         b'{"worker":"w","pid":' + b"9" * 4000 + b',"status":0,"signal":null,"stderr":[]}'],
    ),
    ("worker-exit-no-exit", [H(p.Command.WORKER_EXIT), _exit(status=None, signal=None)]),
    ("worker-exit-both-status-and-signal", [H(p.Command.WORKER_EXIT), _exit(status=1, signal=9)]),
    ("worker-exit-status-negative", [H(p.Command.WORKER_EXIT), _exit(status=-9)]),
    ("worker-exit-status-256", [H(p.Command.WORKER_EXIT), _exit(status=256)]),
    ("worker-exit-status-bool", [H(p.Command.WORKER_EXIT), _exit(status=False)]),
    ("worker-exit-status-str", [H(p.Command.WORKER_EXIT), _exit(status="3")]),
    ("worker-exit-signal-0", [H(p.Command.WORKER_EXIT), _exit(status=None, signal=0)]),
    ("worker-exit-signal-128", [H(p.Command.WORKER_EXIT), _exit(status=None, signal=128)]),
    ("worker-exit-signal-float", [H(p.Command.WORKER_EXIT), _exit(status=None, signal=9.0)]),
    ("worker-exit-stderr-str", [H(p.Command.WORKER_EXIT), _exit(stderr="boom")]),
    ("worker-exit-stderr-object", [H(p.Command.WORKER_EXIT), _exit(stderr={"0": "boom"})]),
    ("worker-exit-stderr-non-str-line", [H(p.Command.WORKER_EXIT), _exit(stderr=["ok", 7])]),
    ("worker-exit-stderr-null-line", [H(p.Command.WORKER_EXIT), _exit(stderr=[None])]),
    (
        "worker-exit-stderr-too-many-lines",
        [H(p.Command.WORKER_EXIT), _exit(stderr=[""] * (p.MAX_TAIL_LINES + 1))],
    ),
    ("worker-exit-long-line", [H(p.Command.WORKER_EXIT), _exit(stderr=["x" * (p.MAX_LINE + 1)])]),
    # bodiless commands with a body
    ("heartbeat-with-body", [H(p.Command.HEARTBEAT), b""]),
    ("bye-with-body", [H(p.Command.BYE), b"x"]),
    ("shutdown-with-body", [H(p.Command.SHUTDOWN), b"x", b"y"]),
] + _missing_and_extra_cases()


def test_hostile_case_names_unique():
    names = [name for name, _ in HOSTILE]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("frames", [f for _, f in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_hostile_input_rejected(frames):
    assert rejected(frames)


@pytest.mark.parametrize("frames", [f for _, f in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_hostile_input_rejected_as_zmq_frames(frames):
    assert rejected([zmq.Frame(bytes(f)) for f in frames])


@pytest.mark.parametrize("command", list(p.Command), ids=lambda c: c.name)
def test_missing_header_body_for_every_command_is_rejected_or_empty(command):
    """A bare header is valid only for the bodiless commands."""
    try:
        message = p.decode([header(command)])
    except RemoteProtocolError:
        assert command not in (p.Command.HEARTBEAT, p.Command.BYE, p.Command.SHUTDOWN)
    else:
        assert command in (p.Command.HEARTBEAT, p.Command.BYE, p.Command.SHUTDOWN)
        assert message.command is command


def test_refuse_reason_not_utf8_is_replaced_not_raised():
    assert p.decode([header(p.Command.REFUSE), b"bad \xff"]).reason == "bad \ufffd"


def test_json_metadata_at_the_size_limit_is_accepted():
    raw = b'{"pad":"' + b"x" * (p.MAX_JSON_BYTES - 10) + b'"}'
    assert len(raw) == p.MAX_JSON_BYTES
    assert p.decode([header(p.Command.HELLO), raw]).meta["pad"] == "x" * (p.MAX_JSON_BYTES - 10)


@pytest.mark.parametrize("command", [p.Command.STARTED, p.Command.CANCEL, p.Command.KILL],
                         ids=lambda c: c.name)
def test_max_ids_accepted(command):
    raw = bytes(8 * p.MAX_IDS)
    assert len(p.decode([header(command), raw]).ids) == p.MAX_IDS


# Regression: json.loads raises RecursionError (not ValueError) on deep nesting,
# and a ~1000-deep array fits far inside MAX_JSON_BYTES; _decode_json once let
# it escape, so one 5 kB HELLO frame could crash a broker.
@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b'{"a":' * 5000, b"[" * 50000 + b"]" * 10000, b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}"],
    ids=["arrays", "objects", "near-limit", "balanced"],
)
@pytest.mark.parametrize("command", [p.Command.HELLO, p.Command.WELCOME], ids=lambda c: c.name)
def test_deeply_nested_json_metadata_is_rejected(raw, command):
    assert len(raw) <= p.MAX_JSON_BYTES
    assert rejected([header(command), raw])


def test_moderately_nested_json_metadata_is_accepted():
    raw = b'{"a":' + b"[" * 50 + b"]" * 50 + b"}"
    assert p.decode([header(p.Command.HELLO), raw]).meta == {"a": json.loads(b"[" * 50 + b"]" * 50)}


@pytest.mark.parametrize("reason", ["x" * (p.MAX_JSON_BYTES + 10), "\u00e9" * p.MAX_JSON_BYTES], ids=["ascii", "two-byte"])
def test_refuse_with_a_long_reason_still_decodes(reason):
    """What the broker sends must be something its peer can read."""
    frames = p.encode(p.Refuse(reason))
    assert len(bytes(frames[1])) <= p.MAX_JSON_BYTES
    decoded = p.decode(frames)
    assert isinstance(decoded, p.Refuse)
    assert decoded.reason[:100] == reason[:100]


def test_welcome_without_peers_names_none():
    assert roundtrip(p.Welcome({"broker": "b"})).peers == []


def test_welcome_peers_keep_their_order_and_duplicates():
    peers = ["tcp://c:3", "tcp://a:1", "tcp://c:3"]
    assert roundtrip(p.Welcome({"peers": peers})).peers == peers


@pytest.mark.parametrize("peers", [None, "tcp://a:1", ["nope"], ["tcp://a:1"] * (p.MAX_WELCOME_PEERS + 1)])
def test_welcome_with_bad_peers_is_not_sent(peers):
    """What a broker sends must be something its workers accept."""
    with pytest.raises(LocalProtocolError):
        p.encode(p.Welcome({"peers": peers}))


@pytest.mark.parametrize(
    "value, ok",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://node-1.cluster.example:5555", True),
        ("tcp://[fe80::1]:5555", True),
        ("ipc:///tmp/futurefed.sock", True),
        ("tcp://", False),
        ("inproc://x", False),
        ("tcp://a b:1", False),
        ("", False),
        (None, False),
        (b"tcp://a:1", False),
        ("tcp://" + "h" * p.MAX_ADDRESS, False),
    ],
)
def test_is_endpoint(value, ok):
    assert p.is_endpoint(value) is ok


# -- properties ------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ids = st.integers(0, 2**64 - 1)
digests = st.one_of(st.sampled_from([FN, FN2, INIT, p.NO_INIT]), st.binary(min_size=16, max_size=16))
payload = st.binary(max_size=24)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
task_records = st.builds(p.TaskRecord, ids, digests, digests, st.lists(payload, min_size=1, max_size=4))
result_records = st.builds(p.ResultRecord, ids, st.sampled_from(p.Status), st.lists(payload, max_size=4))
batches = st.tuples(
    st.lists(task_records, max_size=5), st.dictionaries(digests, payload, max_size=3)
)

messages = st.one_of(
    st.builds(p.Hello, metas),
    st.builds(p.Welcome, metas.map(lambda meta: {k: v for k, v in meta.items() if k != "peers"})),
    st.builds(
        lambda meta, peers: p.Welcome({**meta, "peers": peers}),
        metas,
        st.lists(
            st.from_regex(r"(tcp|ipc)://[!-~]{1,40}", fullmatch=True),
            max_size=p.MAX_WELCOME_PEERS,
        ),
    ),
    st.builds(p.Refuse, st.text(max_size=40)),
    batches.map(lambda b: p.Submit(*b)),
    batches.map(lambda b: p.Tasks(*b)),
    st.builds(p.Credit, st.integers(0, p.MAX_BATCH)),
    st.builds(p.Results, st.lists(result_records, max_size=5), st.lists(ids, max_size=8),
              st.integers(0, p.MAX_BATCH)),
    st.builds(p.Started, st.lists(ids, max_size=8)),
    st.builds(p.Cancel, st.lists(ids, max_size=8)),
    st.builds(p.Kill, st.lists(ids, max_size=8)),
    st.just(p.Heartbeat()),
    st.just(p.Bye()),
    st.just(p.Shutdown()),
    st.builds(
        p.WorkerExit.of,
        st.text(min_size=1, max_size=p.MAX_NAME),
        st.integers(1, 2**31 - 1),
        st.one_of(st.integers(0, 255), st.integers(-127, -1)),
        st.lists(st.text(max_size=30), max_size=30),
    ),
)


def decodes_or_rejects(frames):
    """The contract of decode on anything a peer may send."""
    try:
        message = p.decode(frames)
    except RemoteProtocolError:
        return None
    assert isinstance(message, p.Message)
    return message


@PROPERTY
@given(messages)
def test_property_roundtrip(message):
    assert roundtrip(message) == message


# Random frames: some with a valid header so that the body decoders get
# exercised, some wholly random.
random_frame = st.binary(max_size=64)
valid_header = st.builds(header, st.sampled_from(list(p.Command)))
near_header = st.builds(
    lambda m, v, c: struct.pack("!2sBB", m, v, c),
    st.sampled_from([p.MAGIC, b"FG", b"\x00\x00"]),
    st.sampled_from([0, p.VERSION, p.VERSION + 1, 255]),
    st.integers(0, 255),
)
plausible_index = st.one_of(
    st.builds(
        lambda nb, nt, rest: struct.pack("!II", nb, nt) + rest,
        st.integers(0, 4),
        st.integers(0, 4),
        st.binary(max_size=120),
    ),
    st.builds(lambda n, rest: struct.pack("!I", n) + rest, st.integers(0, 4), st.binary(max_size=60)),
    st.builds(
        lambda n, k, c, rest: struct.pack("!III", n, k, c) + rest,
        st.integers(0, 4), st.integers(0, 4), st.integers(0, 2**32 - 1), st.binary(max_size=80),
    ),
    st.builds(lambda n: struct.pack("!I", n), st.integers(0, 2**32 - 1)),
)


@PROPERTY
@given(st.lists(random_frame, max_size=8))
def test_property_random_frames(frames):
    decodes_or_rejects(frames)


@PROPERTY
@given(
    st.one_of(valid_header, near_header, random_frame),
    st.lists(st.one_of(plausible_index, random_frame), max_size=8),
)
def test_property_random_bodies(head, body):
    decodes_or_rejects([head, *body])


@PROPERTY
@given(st.one_of(valid_header, near_header), st.lists(random_frame, max_size=6))
def test_property_random_bodies_as_zmq_frames(head, body):
    decodes_or_rejects([zmq.Frame(head), *(zmq.Frame(f) for f in body)])


def _mutate(frames, data):
    """Apply a few random mutations to a list of frames (of bytes)."""
    frames = [bytes(f) for f in frames]
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(
            st.sampled_from(["flip", "drop", "dup", "truncate", "extend", "insert", "swap", "set"]),
            label="op",
        )
        if not frames:
            frames.append(data.draw(random_frame, label="new"))
            continue
        i = data.draw(st.integers(0, len(frames) - 1), label="frame")
        f = frames[i]
        if op == "flip" and f:
            j = data.draw(st.integers(0, len(f) - 1), label="byte")
            mask = data.draw(st.integers(1, 255), label="mask")
            frames[i] = f[:j] + bytes([f[j] ^ mask]) + f[j + 1 :]
        elif op == "set" and f:
            j = data.draw(st.integers(0, len(f) - 1), label="byte")
            frames[i] = f[:j] + bytes([data.draw(st.sampled_from([0, 1, 0x7F, 0xFF]))]) + f[j + 1 :]
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, f)
        elif op == "truncate":
            frames[i] = f[: data.draw(st.integers(0, max(len(f) - 1, 0)), label="len")]
        elif op == "extend":
            frames[i] = f + data.draw(st.binary(min_size=1, max_size=16), label="tail")
        elif op == "insert":
            frames.insert(i, data.draw(random_frame, label="new"))
        elif op == "swap" and len(frames) > 1:
            j = data.draw(st.integers(0, len(frames) - 1), label="other")
            frames[i], frames[j] = frames[j], frames[i]
    return frames


@PROPERTY
@given(messages, st.data())
def test_property_mutated_encodings(message, data):
    frames = _mutate(p.encode(message), data)
    decodes_or_rejects(frames)


@PROPERTY
@given(messages, st.data())
def test_property_mutated_encodings_as_memoryviews(message, data):
    frames = _mutate(p.encode(message), data)
    decodes_or_rejects([memoryview(f) for f in frames])


@settings(max_examples=300, deadline=None)
@given(messages, st.integers(0, 10))
def test_property_every_strict_prefix_or_extension_is_rejected(message, extra):
    """Every body frame is accounted for by the header or an index, so dropping
    trailing frames or adding stray ones always yields a rejected message."""
    frames = p.encode(message)
    assert rejected(frames + [b"stray"] * (extra + 1))
    if len(frames) > 1:
        assert rejected(frames[: max(1, len(frames) - 1 - extra)])


# -- WORKER_EXIT ------------------------------------------------------------------------


def test_worker_exit_body_is_valid_at_its_limits():
    raw = _exit(worker="w" * p.MAX_NAME, pid=2**31 - 1, status=None, signal=127,
                stderr=["\u00e9" * 100] * p.MAX_TAIL_LINES)
    message = p.decode([header(p.Command.WORKER_EXIT), raw])
    assert (message.worker, message.pid) == ("w" * p.MAX_NAME, 2**31 - 1)
    assert (message.status, message.signal) == (None, 127)


@pytest.mark.parametrize("returncode, status, signal", [
    (0, 0, None), (3, 3, None), (-9, None, 9), (-15, None, 15),
])
def test_worker_exit_of_a_returncode(returncode, status, signal):
    lines = [f"line {i}" for i in range(50)] + ["x" * 5000]
    message = p.WorkerExit.of("h.w1", 99, returncode, lines)
    assert (message.status, message.signal) == (status, signal)
    assert message.stderr == [f"line {i}" for i in range(31, 50)] + ["x" * 1000]  # the last 20, cut
    assert roundtrip(message) == message


@pytest.mark.parametrize("fields", [
    {"worker": ""}, {"pid": 0}, {"status": None}, {"status": 1, "signal": 2},
    {"stderr": ["x" * (p.MAX_LINE + 1)]},
])
def test_worker_exit_that_breaks_the_protocol_is_not_sent(fields):
    args = {**_exit_fields(), **fields}
    with pytest.raises(LocalProtocolError):
        p.encode(p.WorkerExit(**args))
