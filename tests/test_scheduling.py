"""Where tasks go: a task queued behind a long-running one is taken back and
run by an idle worker (broker state with a fake clock, then end to end)."""

from __future__ import annotations

import threading
import time


from futurefed import FederatedExecutor
from futurefed import protocol as p
from futurefed.broker.state import REVOKE_AFTER, BrokerState

FN = bytes(range(16))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def send(state, ident, message):
    state.receive(ident, p.encode(message))


def messages_to(out, ident):
    """What ``out`` sends to ``ident``, WELCOMEs left out."""
    decoded = [p.decode(frames) for who, frames in out if who == ident]
    return [message for message in decoded if not isinstance(message, p.Welcome)]


def test_stranded_task_is_revoked_and_runs_on_the_idle_worker():
    clock = FakeClock()
    state = BrokerState(clock=clock, heartbeat=1e9)
    for ident, role in ((b"O", "origin"), (b"A", "worker"), (b"B", "worker")):
        send(state, ident, p.Hello({"role": role, "name": ident.decode()}))
    send(state, b"A", p.Credit(2))
    tasks = [p.TaskRecord(i, FN, p.NO_INIT, [b"call"]) for i in (1, 2)]
    send(state, b"O", p.Submit(tasks, {FN: b"blob"}))
    (batch,) = messages_to(state.pump(), b"A")
    first, second = (record.task_id for record in batch.tasks)
    send(state, b"A", p.Started([first]))  # A runs the first: it will run long
    send(state, b"B", p.Credit(2))  # B joins, idle
    assert messages_to(state.pump(), b"A") == []  # too early to take anything back
    assert state.next_check() == REVOKE_AFTER

    clock.now += REVOKE_AFTER
    out = state.pump()
    (cancel,) = messages_to(out, b"A")
    assert cancel == p.Cancel([second])  # only the task that has not started
    (moved,) = messages_to(out, b"B")  # moved at once: A may be stuck in its task
    send(state, b"A", p.Results([p.ResultRecord(second, p.Status.CANCELLED, [])]))
    assert messages_to(state.pump(), b"O") == []  # the origin never hears of the move
    assert [record.frames for record in moved.tasks] == [[b"call"]]
    send(state, b"B", p.Results([p.ResultRecord(moved.tasks[0].task_id, p.Status.OK, [b"r"])]))
    (results,) = messages_to(state.pump(), b"O")
    assert [(r.task_id, r.status) for r in results.results] == [(2, p.Status.OK)]


def test_task_that_ran_on_both_workers_is_delivered_once():
    clock = FakeClock()
    state = BrokerState(clock=clock, heartbeat=1e9)
    for ident, role in ((b"O", "origin"), (b"A", "worker"), (b"B", "worker")):
        send(state, ident, p.Hello({"role": role}))
    send(state, b"A", p.Credit(2))
    send(state, b"O", p.Submit([p.TaskRecord(i, FN, p.NO_INIT, [b"c"]) for i in (1, 2)], {FN: b"b"}))
    (batch,) = messages_to(state.pump(), b"A")
    first, second = (record.task_id for record in batch.tasks)
    send(state, b"B", p.Credit(1))
    clock.now += REVOKE_AFTER
    out = state.pump()
    (cancel,) = messages_to(out, b"A")
    assert cancel == p.Cancel([first])  # one task moves: B has room for one
    (moved,) = messages_to(out, b"B")
    # A had started it before the CANCEL came: both copies run and answer.
    send(state, b"A", p.Results([p.ResultRecord(first, p.Status.OK, [b"from A"]),
                                  p.ResultRecord(second, p.Status.OK, [b"2"])]))
    (results,) = messages_to(state.pump(), b"O")
    assert sorted((r.task_id, bytes(r.frames[0])) for r in results.results) == [
        (1, b"from A"), (2, b"2")]
    send(state, b"B", p.Results([p.ResultRecord(moved.tasks[0].task_id, p.Status.OK, [b"from B"])]))
    assert messages_to(state.pump(), b"O") == []  # the second answer is dropped
    assert state.load()["queued"] == 0 and state.tasks == {}


def short(_):
    time.sleep(0.002)  # long enough that workers keep one task queued behind
    return "short"


def wait_for(gate_path):
    import os
    import select

    fd = os.open(gate_path, os.O_RDONLY)  # a FIFO: blocks until the test opens it
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)
    return "released"


def test_quick_tasks_do_not_wait_behind_a_blocked_one(tmp_path):
    import os

    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    with FederatedExecutor(max_workers=2) as executor:
        assert list(executor.map(short, range(40))) == ["short"] * 40  # both workers hold two
        blocked = executor.submit(wait_for, gate)
        quick = [executor.submit(short, i) for i in range(20)]
        # Whatever sits behind the blocked task must be handed to the other
        # worker; without that this times out (the guard, not a sleep).
        assert [f.result(timeout=30) for f in quick] == ["short"] * 20
        assert not blocked.done()
        releaser = threading.Thread(target=lambda: open(gate, "w").close())
        releaser.start()
        assert blocked.result(timeout=30) == "released"
        releaser.join()
