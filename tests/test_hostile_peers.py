"""A peer broker that says strange things does not take a broker down: a
real ``fedbroker`` process links to a test that plays its peer (a ROUTER for
tasks and an XPUB for load, which tells us when the broker has subscribed)
and answers and publishes what no broker would."""

from __future__ import annotations

import re

import pytest
import zmq

from fedprocs import GUARD, BrokerInfo
from futurefed import protocol as p
from futurefed._versions import local_versions

LONG = "h" * 280


class FakePeer:
    """A peer broker's task (ROUTER) and meta (XPUB) sockets."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router, self.publisher = self.ctx.socket(zmq.ROUTER), self.ctx.socket(zmq.XPUB)
        for sock in (self.router, self.publisher):
            sock.setsockopt(zmq.LINGER, 0)
        task = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        meta = f"tcp://127.0.0.1:{self.publisher.bind_to_random_port('tcp://127.0.0.1')}"
        self.info = BrokerInfo("fake", task, meta, None)  # type: ignore[arg-type]

    def hello(self) -> bytes:
        """The routing id of the broker's link, once it has said HELLO."""
        assert self.router.poll(GUARD * 1000), "the broker never linked to its peer"
        ident, *frames = self.router.recv_multipart()
        assert isinstance(p.decode(frames), p.Hello)
        return ident

    def subscribed(self) -> None:
        """Wait until the broker's SUB has subscribed to our load."""
        assert self.publisher.poll(GUARD * 1000), "the broker never subscribed to its peer"
        assert self.publisher.recv() == b"\x01"

    def close(self) -> None:
        self.router.close()
        self.publisher.close()
        self.ctx.term()


@pytest.fixture
def fake_peer():
    peer = FakePeer()
    try:
        yield peer
    finally:
        peer.close()


def still_serves(address: str) -> None:
    """The broker at ``address`` welcomes a new origin."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(address)
        dealer.send_multipart(p.encode(p.Hello({"role": "origin", "name": "probe",
                                                "versions": local_versions()})))
        assert dealer.poll(GUARD * 1000), "the broker no longer answers"
        assert isinstance(p.decode(dealer.recv_multipart()), p.Welcome)
    finally:
        dealer.close()
        ctx.term()


@pytest.mark.parametrize("welcome", [
    {"broker": "F", "meta": "bogus://x"},
    {"broker": "F", "meta": "tcp://no-port"},
    {"broker": "F", "task": "tcp://\ud800:1", "meta": "tcp://\ud800:2"},
], ids=["bad-scheme", "no-port", "lone-surrogate"])
def test_a_peer_welcome_with_bad_addresses(federation, fake_peer, welcome):
    broker = federation.broker("B", [fake_peer.info])
    fake_peer.router.send_multipart([fake_peer.hello(), *p.encode(p.Welcome(welcome))])
    still_serves(broker.task)
    assert broker.process.popen.poll() is None


def test_peer_loads_naming_unusable_or_too_many_long_addresses(federation, fake_peer):
    """Unusable addresses are not learnt; no more than MAX_PEERS peers are;
    and the broker's own LOAD, which lists them, stays within its limit."""
    broker = federation.broker("B", [fake_peer.info])
    fake_peer.subscribed()
    task, meta = fake_peer.info.task, fake_peer.info.meta
    loads = [{"name": "F", "task": task, "meta": meta, "seq": 1,
              "peers": [{"task": "tcp://\ud800:1"}, {"task": "bogus://x"}]}]
    loads += [{"name": "F", "task": task, "meta": meta, "seq": 2 + k, "peers": [
        {"task": f"tcp://{LONG}{k}-{i}:1", "meta": f"tcp://{LONG}{k}-{i}:2"} for i in range(100)
    ]} for k in range(3)]
    for load in loads:
        fake_peer.publisher.send_multipart(p.encode(p.Load(load)))
    broker.process.wait_for(r"knows 256 peer brokers already")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        sub.connect(broker.meta)
        while True:  # its LOADs: the first ones may list fewer
            assert sub.poll(GUARD * 1000), "the broker stopped publishing its load"
            own = p.decode(sub.recv_multipart())
            if len(own.meta["peers"]) > 60:
                break
    finally:
        sub.close()
        ctx.term()
    assert len(own.meta["peers"]) < 256  # as many as fit in a LOAD
    still_serves(broker.task)
    assert broker.process.popen.poll() is None
    lines = "".join(broker.process.lines)
    assert "Traceback" not in lines
    assert not re.search(r"linked to peer \S*(\ud800|bogus)", lines)
