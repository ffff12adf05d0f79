"""A test that plays the broker: a ROUTER on a random loopback port that
speaks in protocol messages, to read exactly what a real worker process or
an origin's agent says, and to answer as the test pleases."""

from __future__ import annotations

from typing import List, Tuple

import zmq

from fedprocs import GUARD, BrokerInfo
from futurefed import protocol as p


class FakeBroker:
    """A ROUTER bound to a random port on 127.0.0.1."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"

    @property
    def info(self) -> BrokerInfo:
        """What ``fedprocs.Federation.worker(..., wait=False)`` needs."""
        return BrokerInfo("fake", self.address, "", None)  # type: ignore[arg-type]

    def receive_frames(self) -> Tuple[bytes, List[bytes]]:
        if not self.router.poll(GUARD * 1000):
            raise AssertionError(f"the peer said nothing for {GUARD} s")
        ident, *frames = self.router.recv_multipart()
        return ident, frames

    def receive(self) -> Tuple[bytes, p.Message]:
        ident, frames = self.receive_frames()
        return ident, p.decode(frames)

    def receive_a(self, kind: type) -> Tuple[bytes, p.Message]:
        """The next message of type ``kind``, skipping heartbeats and credit."""
        while True:
            ident, message = self.receive()
            if isinstance(message, kind):
                return ident, message
            if not isinstance(message, (p.Heartbeat, p.Credit)):
                raise AssertionError(f"expected {kind.__name__}, got {message!r}")

    def send(self, ident: bytes, message: p.Message) -> None:
        self.router.send_multipart([ident, *p.encode(message)])

    def close(self) -> None:
        self.router.close()
        self.ctx.term()
