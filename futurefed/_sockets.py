"""Socket helpers shared by the agent, the broker and the worker."""

from __future__ import annotations

from typing import Any, Iterator, List

import zmq

__all__ = ["drain", "readable", "recv_frames", "send_frames", "send_nowait", "task_socket"]

# The hot paths call the compiled backend's methods with plain int flags:
# pyzmq's Python layer adds keyword handling and enum arithmetic (several
# microseconds per message) that a broker pays on every message it routes.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: bytes shorter than this are copied into the message (pyzmq's own
#: copy_threshold): cheaper than tracking a zero-copy buffer
COPY_BELOW = 65536


def task_socket(ctx: Any, kind: int, linger_ms: int) -> Any:
    """A ROUTER or DEALER for tasks and results, with no high-water mark.

    Credit bounds what a worker receives, and an origin receives only what
    it asked for; with a high-water mark a ROUTER would silently drop
    results instead.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def drain(sock: Any, limit: int) -> Iterator[List[Any]]:
    """Yield up to ``limit`` messages already waiting on ``sock``.

    Checks ZMQ_EVENTS before each read instead of catching ``zmq.Again``: the
    exception costs several microseconds on every wake-up of a hot loop.
    """
    for _ in range(limit):
        if not readable(sock):
            return
        yield recv_frames(sock)


def readable(sock: Any) -> bool:
    """Whether a message waits on ``sock`` (``sock.poll(0)``, minus a Poller)."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def recv_frames(sock: Any, flags: int = _NOBLOCK) -> List[Any]:
    """``sock.recv_multipart(flags, copy=False)``: every frame as a
    zmq.Frame, so large payloads are never copied."""
    frames = [_recv(sock, flags, False, False)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, flags, False, False))
    return frames


def send_frames(sock: Any, frames: List[Any], flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags, copy=False)``: small bytes are
    copied, everything else (received Frames, pickle buffers) goes zero-copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = type(frame) is bytes and len(frame) < COPY_BELOW
        _send(sock, frame, flags | _SNDMORE if i < last else flags, copy, False)


def send_nowait(sock: Any, frames: List[Any]) -> bool:
    """Send on a DEALER without ever blocking; False if it was dropped.

    With no high-water mark a DEALER queues without limit while its peer is
    away, so this can only fail when the socket has no connection at all:
    ZeroMQ drops a connection whose security handshake failed (a wrong or
    missing key) and retries it, and a blocking send would wait for ever.
    """
    try:
        send_frames(sock, frames, _NOBLOCK)
    except zmq.Again:
        return False
    return True
