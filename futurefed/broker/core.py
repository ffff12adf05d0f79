"""The broker process: one poll loop around :class:`BrokerState`.

Each turn polls the ROUTER task socket (and the lifeline, if any), drains up
to :data:`MAX_DRAIN` messages into the state, then sends what
:meth:`BrokerState.pump` returns. Draining before pumping is what coalesces
many small messages into few large ones under load.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any, Optional

import zmq

from .._sockets import drain, task_socket

from .state import BrokerState

__all__ = ["Broker"]

logger = logging.getLogger(__name__)

MAX_DRAIN = 512
POLL_SECONDS = 1.0


class _Stop(Exception):
    """Raised by the SIGTERM handler to leave the poll loop."""


class Broker:
    """Binds ``address`` and serves until the lifeline closes or SIGTERM."""

    def __init__(
        self,
        address: str,
        name: str = "broker",
        *,
        lifeline: Optional[int] = None,
        ready_fd: Optional[int] = None,
        context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
    ) -> None:
        self.address = address
        self.name = name
        self.lifeline = lifeline
        self.ready_fd = ready_fd
        self.ctx = context or zmq.Context.instance()
        self.state = BrokerState(name)
        self.router: Any = None
        self.endpoint = ""

    def bind(self) -> str:
        """Bind the task socket; returns the endpoint actually bound (a port
        of 0 or ``*`` picks a free one)."""
        self.router = task_socket(self.ctx, zmq.ROUTER, linger_ms=1000)
        address = self.address
        if address.startswith("tcp://") and address.endswith(":0"):
            address = address[:-1] + "*"
        self.router.bind(address)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.ready_fd is not None:
            os.write(self.ready_fd, json.dumps({"task": self.endpoint}).encode() + b"\n")
            os.close(self.ready_fd)
            self.ready_fd = None
        logger.info("broker %s bound %s", self.name, self.endpoint)
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

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        if self.lifeline is not None:
            poller.register(self.lifeline, zmq.POLLIN)
        router, state = self.router, self.state
        while True:
            check = state.next_check()
            timeout = POLL_SECONDS if check is None else min(POLL_SECONDS, check)
            events = dict(poller.poll(timeout * 1000))
            if self.lifeline is not None and self.lifeline in events:
                logger.info("broker %s: lifeline closed", self.name)
                return
            for frames in drain(router, MAX_DRAIN):
                try:
                    state.receive(frames[0].bytes, frames[1:])
                except Exception:  # a bug must not take the broker down with it
                    logger.exception("broker %s: error handling a message", self.name)
            for ident, frames in state.pump():
                router.send_multipart([ident, *frames], copy=False)

    def close(self) -> None:
        if self.router is None:
            return
        for ident, frames in self.state.drop_all():
            try:
                self.router.send_multipart([ident, *frames], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the worker is gone already; its lifeline ends it anyway
        self.router.close()
        self.router = None
