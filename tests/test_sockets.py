"""The socket helpers of the hot paths: frames in and out, never blocking."""

from __future__ import annotations

import pickle

import pytest
import zmq

from futurefed._sockets import COPY_BELOW, drain, readable, recv_frames, send_frames, send_nowait


@pytest.fixture
def pair():
    ctx = zmq.Context()
    left, right = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    left.bind("inproc://sockets-test")
    right.connect("inproc://sockets-test")
    yield left, right
    left.close(linger=0)
    right.close(linger=0)
    ctx.term()


def test_every_kind_of_frame_arrives_intact(pair):
    left, right = pair
    large = bytes(range(256)) * (COPY_BELOW // 256 + 1)
    frame = zmq.Frame(b"a received frame, forwarded")
    frames = [b"", b"small", large, memoryview(large)[1:100], bytearray(b"ba"),
              pickle.PickleBuffer(large).raw(), frame]
    send_frames(left, frames)
    received = recv_frames(right, 0)
    assert all(isinstance(part, zmq.Frame) for part in received)
    assert [part.bytes for part in received] == [bytes(part) for part in frames[:-1]] + [frame.bytes]


def test_drain_takes_what_waits_and_no_more(pair):
    left, right = pair
    assert not readable(right)
    assert list(drain(right, 10)) == []
    for i in range(3):
        send_frames(left, [b"m", str(i).encode()])
    taken = [[part.bytes for part in message] for message in drain(right, 2)]
    assert taken == [[b"m", b"0"], [b"m", b"1"]]
    assert readable(right)
    assert [[part.bytes for part in message] for message in drain(right, 10)] == [[b"m", b"2"]]
    assert not readable(right)


def test_send_nowait_reports_a_dealer_with_no_connection():
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        assert send_nowait(dealer, [b"nobody", b"listens"]) is False
    finally:
        dealer.close(linger=0)
        ctx.term()
