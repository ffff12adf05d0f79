"""Socket helpers shared by the agent, the broker and the worker."""

from __future__ import annotations

from typing import Any, Iterator, List

import zmq

__all__ = ["drain", "task_socket"]


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
