"""Heartbeats, lost peers and retries in BrokerState, on a clock that moves
only when told (docs/protocol.md, HEARTBEAT)."""

from __future__ import annotations

import json
import logging

import pytest

from futurefed import protocol as p
from futurefed.broker.state import ISOLATE_FOR, LIVENESS

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
    assert sorted(run_apart(fed, b"w2", 2)) == [b"call-1", b"call-2"]


def run_apart(fed, worker, count):
    """Let ``worker`` run ``count`` suspects, which it gets one at a time
    (ISOLATE_FOR); their payloads, and each result reached the origin."""
    ran = []
    out = fed.pump()
    for _ in range(count):
        (t,) = only(out, worker, p.Tasks).tasks
        ran.append(t.frames[0])
        fed.results(worker, ok(t.task_id))
        out = fed.pump()
        assert len(only(out, b"o", p.Results).results) == 1
    return ran


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


# -- WORKER_EXIT: a supervisor says a worker ended ---------------------------------------


@pytest.fixture
def sup(fed):
    """``fed`` plus a supervisor ``s`` on host h1 (w1's host)."""
    fed.connect(b"s", "supervisor", host="h1", pid=99)
    return fed


def exited(worker="w1", pid=11, returncode=-9, stderr=("Traceback ...", "MemoryError")):
    return p.WorkerExit.of(worker, pid, returncode, list(stderr))


def test_a_notice_loses_the_worker_at_once_and_its_tasks_run_elsewhere(sup):
    sup.submit(b"o", [task(1), task(2)], BLOBS)
    sup.credit(b"w1", 2)
    assert len(only(sup.pump(), b"w1", p.Tasks).tasks) == 2
    sup.send(b"s", exited())
    assert sup.load()["workers"] == 2  # handled in the next pump, not on receipt
    out = sup.pump()  # no time has passed: no heartbeat is missed
    assert b"w1" not in sup.state.peers and to(out, b"w1") == []
    assert sup.load()["workers"] == 1 and sup.load()["queued"] == 2
    assert [sup.state.tasks[(b"o", i)].attempts for i in (1, 2)] == [1, 1]
    sup.credit(b"w2", 2)
    assert sorted(run_apart(sup, b"w2", 2)) == [b"call-1", b"call-2"]


def test_a_task_lost_once_too_often_carries_how_its_last_worker_ended(sup):
    sup.submit(b"o", [task(1)], BLOBS)
    ends = [(b"w1", "h1", 11, 3), (b"w3", "h1", 33, -11), (b"w4", "h1", 44, -9)]
    for ident, host, pid, returncode in ends:
        if ident not in sup.state.peers:
            sup.connect(ident, "worker", host=host, pid=pid)
        sup.credit(ident, 1)
        assert len(only(sup.pump(), ident, p.Tasks).tasks) == 1
        sup.send(b"s", exited(ident.decode(), pid, returncode, [f"last words of {pid}"]))
        out = sup.pump()
    # max_retries=2: three runs, three losses, each noticed at once
    (record,) = only(out, b"o", p.Results).results
    assert record.status is p.Status.LOST
    info = json.loads(bytes(record.frames[0]))
    assert (info["worker"], info["host"], info["pid"], info["attempts"]) == ("w4", "h1", 44, 3)
    assert info["status"] is None and info["signal"] == 9
    assert info["stderr"] == ["last words of 44"]
    assert info["reason"] == "killed by SIGKILL (its supervisor saw it end)"
    assert sup.load()["queued"] == 0 and sup.load()["done"] == 1


def test_an_exit_status_reaches_the_lost_record():
    broker = Broker(heartbeat=BEAT, max_retries=0)
    broker.connect(b"o", "origin")
    broker.connect(b"w", "worker", host="h", pid=5)
    broker.connect(b"s", "supervisor", host="h")
    broker.submit(b"o", [task(1)], BLOBS)
    broker.credit(b"w", 1)
    broker.pump()
    broker.send(b"s", exited("w", 5, 3, ["dying of 3"]))
    (record,) = only(broker.pump(), b"o", p.Results).results
    info = json.loads(bytes(record.frames[0]))
    assert (info["status"], info["signal"], info["stderr"]) == (3, None, ["dying of 3"])
    assert info["reason"] == "exited with status 3 (its supervisor saw it end)"


def test_results_received_before_the_pump_are_handled_first(sup):
    """The worker's last RESULTS, drained in the same turn as the notice,
    settle their tasks: nothing is requeued or counted as an attempt."""
    sup.submit(b"o", [task(1), task(2)], BLOBS)
    sup.credit(b"w1", 2)
    sent = only(sup.pump(), b"w1", p.Tasks).tasks
    sup.send(b"s", exited())
    sup.results(b"w1", ok(sent[0].task_id))
    out = sup.pump()
    assert [r.task_id for r in only(out, b"o", p.Results).results] == [1]
    assert sup.load()["queued"] == 1 and sup.state.tasks[(b"o", 2)].attempts == 1


@pytest.mark.parametrize("notice", [
    exited(worker="w9"),  # no such worker
    exited(pid=12),  # w1's name, another pid: a replacement, say
    exited(worker="w2", pid=22),  # w2 is on h2, the supervisor on h1
])
def test_a_notice_for_no_worker_of_ours_is_ignored(sup, notice, caplog):
    caplog.set_level(logging.INFO, logger="futurefed.broker.state")
    sup.submit(b"o", [task(1)], BLOBS)
    sup.credit(b"w1", 1)
    sup.pump()
    sup.send(b"s", notice)
    assert sup.pump() == []
    assert sup.load()["workers"] == 2 and sup.load()["running"] == 1
    assert "no such worker here: ignored" in caplog.text


@pytest.mark.parametrize("sender", [b"o", b"w2", b"w1", b"stranger"])
def test_only_a_supervisor_may_send_a_notice(sup, sender, caplog):
    sup.send(sender, exited())
    assert sup.pump() == []
    assert sup.load()["workers"] == 2
    assert "dropped a message" in caplog.text


@pytest.mark.parametrize("message", [
    p.Submit([task(1)], BLOBS), p.Credit(5), p.Results([ok(1)]), p.Started([1]), p.Cancel([1]),
])
def test_a_supervisor_submits_and_runs_nothing(sup, message):
    before = sup.load()
    sup.send(b"s", message)
    assert sup.pump() == []
    assert sup.load() == before and not sup.state.tasks and b"s" not in sup.state.ready


def test_a_second_notice_for_the_same_worker_changes_nothing(sup):
    sup.submit(b"o", [task(1)], BLOBS)
    sup.credit(b"w1", 1)
    sup.pump()
    sup.send(b"s", exited())
    sup.send(b"s", exited())
    sup.pump()
    sup.send(b"s", exited())
    assert sup.pump() == []
    assert sup.state.tasks[(b"o", 1)].attempts == 1


def test_a_worker_that_left_before_the_pump_is_not_lost(sup):
    sup.submit(b"o", [task(1)], BLOBS)
    sup.credit(b"w1", 1)
    sup.pump()
    sup.send(b"s", exited())
    sup.send(b"w1", p.Bye())  # said goodbye after all (same turn)
    sup.pump()
    assert sup.state.tasks[(b"o", 1)].attempts == 0


def test_a_supervisor_that_says_bye_is_forgotten(sup):
    sup.send(b"s", exited())
    sup.send(b"s", p.Bye())
    sup.pump()
    assert b"s" not in sup.state.peers and b"w1" not in sup.state.peers
    assert sup.load()["workers"] == 1


# -- the origin's WorkerLost, from a LOST record ---------------------------------------------


def lost_record(**fields):
    info = {"host": "h1", "worker": "h1.w0", "pid": 11, "reason": "silent for 3.1 s", "attempts": 4}
    info.update(fields)
    return [json.dumps(info).encode()]


def test_worker_lost_names_how_the_worker_ended_as_the_record_says():
    from futurefed.outcome import worker_lost

    error = worker_lost(lost_record(
        reason="killed by SIGKILL (its supervisor saw it end)", status=None, signal=9,
        stderr=["Traceback (most recent call last):", "MemoryError"],
    ))
    assert (error.host, error.worker, error.pid) == ("h1", "h1.w0", 11)
    assert error.exit_status == -9 and error.signal == 9
    assert error.stderr_tail == ["Traceback (most recent call last):", "MemoryError"]
    assert str(error) == (
        "the task's worker was lost each of the 4 times it ran; the last was h1.w0 on h1 (pid 11):"
        " killed by SIGKILL (its supervisor saw it end); its last lines on stderr:\n"
        "  Traceback (most recent call last):\n  MemoryError"
    )
    exited = worker_lost(lost_record(status=3, signal=None, stderr=[]))
    assert exited.exit_status == 3 and exited.signal is None and exited.stderr_tail == []


def test_worker_lost_asks_exit_info_only_when_the_record_does_not_say():
    from futurefed.outcome import worker_lost

    asked = []

    def exit_info(pid):
        asked.append(pid)
        return 7, ["dying of 3"]

    error = worker_lost(lost_record(), exit_info)
    assert asked == [11] and error.exit_status == 7 and error.stderr_tail == ["dying of 3"]
    assert "; it exited with status 7; its last lines on stderr:\n  dying of 3" in str(error)
    error = worker_lost(lost_record(status=None, signal=15, stderr=["bye"]), exit_info)
    assert asked == [11] and error.exit_status == -15 and error.stderr_tail == ["bye"]


@pytest.mark.parametrize("fields", [
    {}, {"status": True}, {"status": -1}, {"signal": 0}, {"signal": "9"},
    {"status": None, "signal": None}, {"status": 1.5},
])
def test_worker_lost_without_a_usable_exit_has_none(fields):
    from futurefed.outcome import worker_lost

    error = worker_lost(lost_record(stderr=["x"], **fields))
    assert error.exit_status is None and error.signal is None and error.stderr_tail == []


@pytest.mark.parametrize("stderr, kept", [
    ("not a list", []),
    ([1, "a", None, "b"], ["a", "b"]),
    ([str(i) for i in range(300)], [str(i) for i in range(200, 300)]),
])
def test_worker_lost_keeps_only_string_lines(stderr, kept):
    from futurefed.outcome import worker_lost

    assert worker_lost(lost_record(status=1, stderr=stderr)).stderr_tail == kept


@pytest.mark.parametrize("frames", [[], [b"not json"], [b"[1]"], [b"\xff"]])
def test_worker_lost_from_a_malformed_record(frames):
    from futurefed.outcome import worker_lost

    error = worker_lost(frames)
    assert error.worker == "?" and error.exit_status is None


# -- suspects run apart ----------------------------------------------------------------------


def lose_with(sup, worker, pid, ids):
    """``worker`` takes tasks ``ids`` and dies (its supervisor says so)."""
    sup.submit(b"o", [task(i) for i in ids], BLOBS)
    sup.credit(worker, len(ids))
    assert len(only(sup.pump(), worker, p.Tasks).tasks) == len(ids)
    sup.send(b"s", exited(worker.decode(), pid))
    return sup.pump()


def test_tasks_that_lost_their_worker_go_to_different_workers(sup):
    lose_with(sup, b"w1", 11, [1, 2, 3])
    sup.credit(b"w2", 5)
    (first,) = only(sup.pump(), b"w2", p.Tasks).tasks
    sup.connect(b"w3", "worker", host="h1", pid=33)
    sup.credit(b"w3", 5)
    (second,) = only(sup.pump(), b"w3", p.Tasks).tasks
    assert {first.frames[0], second.frames[0]} < {b"call-1", b"call-2", b"call-3"}
    assert sup.load()["queued"] == 1  # the third waits for a worker without a suspect
    sup.submit(b"o", [task(4)], BLOBS)  # a fresh task may join a suspect
    assert [t.frames[0] for t in only(sup.pump(), b"w2", p.Tasks).tasks] == [b"call-4"]
    sup.results(b"w3", ok(second.task_id))
    (third,) = only(sup.pump(), b"w3", p.Tasks).tasks
    assert third.frames[0] not in (first.frames[0], second.frames[0])


def test_a_suspect_waits_for_isolation_at_most_isolate_for(sup):
    lose_with(sup, b"w1", 11, [1, 2])
    sup.credit(b"w2", 5)
    assert len(only(sup.pump(), b"w2", p.Tasks).tasks) == 1
    assert sup.state.next_check() == pytest.approx(ISOLATE_FOR)
    sup.tick(ISOLATE_FOR / 2)
    assert sup.pump() == [] and sup.state.next_check() == pytest.approx(ISOLATE_FOR / 2)
    sup.tick(ISOLATE_FOR / 2)
    assert len(only(sup.pump(), b"w2", p.Tasks).tasks) == 1  # no other worker came: it goes anyway
    assert sup.state.next_check() is None


def test_the_tasks_that_shared_a_poisoned_worker_survive_it():
    """max_retries=1: a task that kills every worker it runs on fails after
    two deaths; the two that shared its first worker were charged that
    death, but run apart from it afterwards and complete."""
    broker = Broker(heartbeat=BEAT, max_retries=1)
    broker.connect(b"o", "origin")
    broker.connect(b"s", "supervisor", host="h")
    for ident, pid in ((b"w1", 11), (b"w2", 22)):
        broker.connect(ident, "worker", host="h", pid=pid)
    lose_with(broker, b"w1", 11, [1, 2, 3])  # 1 kills it
    broker.credit(b"w2", 3)
    (poison,) = only(broker.pump(), b"w2", p.Tasks).tasks  # one suspect only: say it kills w2
    broker.send(b"s", exited("w2", 22))
    out = broker.pump()
    (record,) = only(out, b"o", p.Results).results
    assert record.status is p.Status.LOST and b"call-%d" % record.task_id == poison.frames[0]
    for ident, pid in ((b"w3", 33), (b"w4", 44)):  # the replacements
        broker.connect(ident, "worker", host="h", pid=pid)
    broker.credit(b"w3", 3)
    broker.credit(b"w4", 3)
    out = broker.pump()
    survivors = [only(out, ident, p.Tasks).tasks for ident in (b"w3", b"w4")]
    others = {b"call-1", b"call-2", b"call-3"} - {poison.frames[0]}
    assert sorted(t.frames[0] for (t,) in survivors) == sorted(others)


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
