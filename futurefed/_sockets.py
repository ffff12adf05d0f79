"""Socket helpers shared by the agent, the broker and the worker."""

from __future__ import annotations

from typing import Any, Iterator, List

import zmq

__all__ = ["drain", "send_nowait", "task_socket"]


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
        if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return
        yield sock.recv_multipart(zmq.NOBLOCK, copy=False)


def send_nowait(sock: Any, frames: List[Any]) -> bool:
    """Send on a DEALER without ever blocking; False if it was dropped.

    With no high-water mark a DEALER queues without limit while its peer is
    away, so this can only fail when the socket has no connection at all:
    ZeroMQ drops a connection whose security handshake failed (a wrong or
    missing key) and retries it, and a blocking send would wait for ever.
    """
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True
