"""Heartbeats, lost peers and retries in BrokerState, on a clock that moves
only when told (docs/protocol.md, HEARTBEAT)."""

from __future__ import annotations

import json

import pytest

from futurefed import protocol as p
from futurefed.broker.state import LIVENESS

from test_broker_state import BLOBS, Broker, ok, only, task, to

BEAT = 1.0


@pytest.fixture
def fed():
    broker = Broker(heartbeat=BEAT, max_retries=2)
    broker.connect(b"o", "origin")
    broker.connect(b"w1", "worker", host="h1", pid=11)
    broker.connect(b"w2", "worker", host="h2", pid=22)
    return broker


def beats(out):
    return sorted(ident for ident, message in out if isinstance(message, p.Heartbeat))


def test_quiet_peers_get_a_heartbeat_each_interval(fed):
    fed.tick(BEAT / 2)
    assert fed.pump() == []
    fed.tick(BEAT / 2)
    assert beats(fed.pump()) == [b"o", b"w1", b"w2"]
    fed.tick(BEAT / 4)
    assert fed.pump() == []  # not again so soon


def test_a_peer_we_talk_to_needs_no_heartbeat(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    fed.credit(b"w1", 1)
    fed.tick(BEAT * 0.9)
    fed.pump()  # TASKS to w1
    fed.tick(BEAT * 0.35)  # checks run four times an interval
    assert beats(fed.pump()) == [b"o", b"w2"]


def test_any_message_is_proof_of_life(fed):
    for _ in range(LIVENESS * 2):
        fed.tick(BEAT)
        fed.send(b"w1", p.Heartbeat())
        fed.credit(b"w2", 0)
        fed.send(b"o", p.Submit([], {}))
        fed.pump()
    assert fed.load()["workers"] == 2


def test_a_silent_worker_is_lost_and_its_tasks_run_elsewhere(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    fed.credit(b"w1", 2)
    assert len(only(fed.pump(), b"w1", p.Tasks).tasks) == 2
    for _ in range(LIVENESS):
        fed.tick(BEAT)
        fed.send(b"o", p.Heartbeat())
        fed.send(b"w2", p.Heartbeat())
        fed.pump()
    assert fed.load()["workers"] == 2  # exactly LIVENESS intervals: not yet
    fed.tick(BEAT / 2)
    fed.send(b"o", p.Heartbeat())
    fed.send(b"w2", p.Heartbeat())
    fed.pump()
    assert fed.load()["workers"] == 1 and fed.load()["queued"] == 2
    fed.credit(b"w2", 2)
    again = only(fed.pump(), b"w2", p.Tasks).tasks
    assert sorted(t.frames[0] for t in again) == [b"call-1", b"call-2"]
    fed.results(b"w2", *[ok(t.task_id) for t in again])
    assert sorted(r.task_id for r in only(fed.pump(), b"o", p.Results).results) == [1, 2]


def lose(fed, ident, keep):
    """Let ``ident`` fall silent for good while ``keep`` go on talking."""
    for _ in range(LIVENESS + 1):
        fed.tick(BEAT)
        for other in keep:
            fed.send(other, p.Heartbeat())
        out = fed.pump()
    return out


def test_a_task_that_keeps_losing_its_worker_fails_with_lost(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    for attempt, worker in enumerate([b"w1", b"w2", b"w3"]):
        if worker not in fed.state.peers:
            fed.connect(worker, "worker", host="h3", pid=33)
        fed.credit(worker, 1)
        out = fed.pump()
        assert len(only(out, worker, p.Tasks).tasks) == 1
        others = [ident for ident in fed.state.peers if ident != worker]
        out = lose(fed, worker, others)
    # max_retries=2: three runs, three losses
    (record,) = only(out, b"o", p.Results).results
    assert record.status is p.Status.LOST
    info = json.loads(bytes(record.frames[0]))
    assert info["worker"] == "w3" and info["host"] == "h3" and info["pid"] == 33
    assert info["attempts"] == 3 and "silent" in info["reason"]
    assert fed.load()["queued"] == 0 and fed.load()["done"] == 1


def test_a_worker_that_leaves_does_not_use_up_retries(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    for _ in range(5):
        fed.credit(b"w1", 1)
        only(fed.pump(), b"w1", p.Tasks)
        fed.send(b"w1", p.Bye())  # a clean goodbye: requeued, not counted
        fed.connect(b"w1", "worker")
    assert fed.state.tasks[(b"o", 1)].attempts == 0


def test_a_silent_origin_is_lost_and_its_work_dropped(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    fed.credit(b"w1", 1)
    (t,) = only(fed.pump(), b"w1", p.Tasks).tasks
    out = lose(fed, b"o", [b"w1", b"w2"])
    assert only(out, b"w1", p.Cancel).ids == [t.task_id]
    assert fed.load()["queued"] == 0 and b"o" not in fed.state.peers
    assert to(out, b"o") == []


def test_a_killed_task_whose_worker_is_lost_is_cancelled_not_retried(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    fed.credit(b"w1", 2)
    assert len(only(fed.pump(), b"w1", p.Tasks).tasks) == 2
    fed.send(b"o", p.Kill([1]))
    fed.pump()
    out = lose(fed, b"w1", [b"o", b"w2"])
    assert only(out, b"o", p.Results).results == [p.ResultRecord(1, p.Status.CANCELLED, [])]
    assert fed.state.tasks[(b"o", 2)].attempts == 1  # lost with its worker: an attempt
    assert (b"o", 1) not in fed.state.tasks
    fed.credit(b"w2", 2)
    assert [t.frames[0] for t in only(fed.pump(), b"w2", p.Tasks).tasks] == [b"call-2"]
