"""BrokerState (futurefed/broker/state.py), driven sans I/O: frames made by
protocol.encode go in through ``receive``, and what ``pump`` returns is
decoded and checked."""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter

import pytest
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from futurefed import protocol as p
from futurefed.broker import state as state_module
from futurefed.broker.state import ISOLATE_FOR, BrokerState

FN = b"F" * p.DIGEST_SIZE
FN2 = b"G" * p.DIGEST_SIZE
INIT = b"I" * p.DIGEST_SIZE
UNKNOWN = b"?" * p.DIGEST_SIZE
BLOBS = {FN: b"fn-blob", FN2: b"fn2-blob", INIT: b"init-blob"}
NO_HEARTBEAT = 1e9  # seconds: no peer is ever heartbeaten nor lost

pytestmark = pytest.mark.timeout(120)


# -- harness ---------------------------------------------------------------------------


class Broker:
    """A BrokerState plus helpers that speak in messages, not frames."""

    def __init__(self, name="test-broker", heartbeat=NO_HEARTBEAT, max_retries=3):
        # A clock that moves only when told: revocation of stranded tasks
        # (REVOKE_AFTER) must not depend on how fast the test runs. Heartbeats
        # are off unless a test is about them.
        self.now = 1000.0
        self.state = BrokerState(
            name, clock=lambda: self.now, heartbeat=heartbeat, max_retries=max_retries
        )

    def tick(self, seconds):
        self.now += seconds

    def send(self, ident, message):
        self.state.receive(ident, p.encode(message))

    def pump(self):
        return [(ident, p.decode(frames)) for ident, frames in self.state.pump()]

    def connect(self, ident, role, **meta):
        self.send(ident, p.Hello({"role": role, "name": ident.decode(), **meta}))
        out = self.pump()
        assert out == [(ident, self.welcome())]

    def welcome(self):
        """The WELCOME this broker answers a HELLO with now."""
        meta = {"broker": self.state.name, "task": self.state.address, "meta": self.state.meta_address}
        if self.state.peer_addresses():
            meta["peers"] = self.state.peer_addresses()
        return p.Welcome(meta)

    def submit(self, ident, tasks, blobs=None):
        self.send(ident, p.Submit(tasks, dict(blobs or {})))

    def credit(self, ident, count):
        self.send(ident, p.Credit(count))

    def results(self, ident, *records):
        self.send(ident, p.Results(list(records)))

    def load(self):
        return self.state.load()


def task(task_id, fn=FN, init=p.NO_INIT, frames=None):
    return p.TaskRecord(task_id, fn, init, frames if frames is not None else [b"call-%d" % task_id])


def only(out, ident=None, cls=None):
    """The single message in ``out`` (for ``ident``, of type ``cls``)."""
    found = [
        m for i, m in out if (ident is None or i == ident) and (cls is None or isinstance(m, cls))
    ]
    assert len(found) == 1, out
    return found[0]


def to(out, ident):
    return [m for i, m in out if i == ident]


def ok(task_id, *frames):
    return p.ResultRecord(task_id, p.Status.OK, list(frames) or [b"value"])


@pytest.fixture
def broker():
    return Broker()


@pytest.fixture
def fed(broker):
    """A broker with origin ``o`` and worker ``w`` connected."""
    broker.connect(b"o", "origin")
    broker.connect(b"w", "worker", host="h1")
    return broker


# -- HELLO -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["origin", "worker"])
def test_hello_is_welcomed(broker, role):
    broker.send(b"peer", p.Hello({"role": role, "name": "n", "host": "h", "pid": 7}))
    assert broker.pump() == [(b"peer", p.Welcome({"broker": "test-broker", "task": "", "meta": ""}))]
    assert broker.pump() == []


@pytest.mark.parametrize(
    "meta", [{}, {"role": "emperor"}, {"role": "link"}, {"role": None}, {"role": ["worker"]}, {"role": 1}]
)
def test_unknown_role_is_refused(broker, meta):
    broker.send(b"peer", p.Hello(meta))
    out = broker.pump()
    refuse = only(out, b"peer")
    assert isinstance(refuse, p.Refuse)
    assert "role" in refuse.reason
    # not registered: what it sends next is dropped
    broker.submit(b"peer", [task(1)], BLOBS)
    assert broker.pump() == []
    assert broker.load()["queued"] == 0


def test_hello_with_odd_metadata_is_welcomed(broker):
    broker.send(b"w", p.Hello({"role": "worker", "name": ["x"] * 500, "host": {"a": 1}, "pid": "no"}))
    assert isinstance(only(broker.pump(), b"w"), p.Welcome)
    assert broker.load()["workers"] == 1


@pytest.mark.parametrize(
    "message",
    [
        p.Submit([task(1)], BLOBS),
        p.Credit(5),
        p.Results([ok(1)]),
        p.Started([1]),
        p.Cancel([1]),
        p.Heartbeat(),
        p.Bye(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_before_hello_are_dropped(broker, message):
    broker.connect(b"w", "worker")
    broker.credit(b"w", 10)
    broker.send(b"stranger", message)
    assert broker.pump() == []
    assert broker.load() == {"queued": 0, "running": 0, "lent": 0, "done": 0, "credit": 10, "workers": 1, "hosts": 1}
    # a later HELLO starts from scratch: the early SUBMIT was not kept
    broker.connect(b"stranger", "origin")
    assert broker.pump() == []


@pytest.mark.parametrize(
    "message",
    [p.Welcome(), p.Refuse("x"), p.Tasks([task(1)], BLOBS), p.Shutdown()],
    ids=lambda m: type(m).__name__,
)
def test_commands_not_for_a_broker_are_dropped(fed, message):
    fed.send(b"o", message)
    fed.send(b"w", message)
    assert fed.pump() == []
    assert fed.load()["queued"] == 0


def test_garbage_is_dropped(fed):
    for frames in ([], [b""], [b"FF\x01"], [b"GG\x01\x04", b""], [b"FF\x01\x04", b"\x00"], [b"\xff" * 100]):
        fed.state.receive(b"o", frames)
        fed.state.receive(b"w", frames)
        fed.state.receive(b"nobody", frames)
    assert fed.pump() == []


def test_credit_from_an_origin_is_ignored(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    fed.credit(b"o", 5)
    assert fed.pump() == []
    assert fed.load()["credit"] == 0


def test_rehello_forgets_the_old_session(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    assert fed.load()["queued"] == 1
    fed.connect(b"o", "origin")
    assert fed.load()["queued"] == 0
    fed.credit(b"w", 5)
    assert fed.pump() == []


# -- SUBMIT and CREDIT -----------------------------------------------------------------


def test_submit_waits_for_credit(fed):
    payload = [[b"call-%d" % i, zmq.Frame(b"oob-%d" % i)] for i in range(3)]
    fed.submit(b"o", [task(100 + i, frames=payload[i]) for i in range(3)], {FN: BLOBS[FN]})
    assert fed.pump() == []
    assert fed.load()["queued"] == 3
    fed.connect(b"w2", "worker")  # a worker without credit gets nothing
    assert fed.pump() == []

    fed.credit(b"w", 2)
    out = fed.pump()
    tasks = only(out, b"w", p.Tasks)
    assert len(out) == 1
    assert len(tasks.tasks) == 2
    assert tasks.blobs == {FN: BLOBS[FN]}
    bids = [t.task_id for t in tasks.tasks]
    assert len(set(bids)) == 2 and not set(bids) & {100, 101, 102}  # the broker's own ids
    # payload frames are forwarded as the very objects submitted
    assert tasks.tasks[0].frames[0] is payload[0][0] and tasks.tasks[0].frames[1] is payload[0][1]
    assert tasks.tasks[1].frames[1] is payload[1][1]
    assert fed.load()["queued"] == 1
    assert fed.load()["running"] == 2
    assert fed.load()["credit"] == 0

    fed.credit(b"w", 5)
    tasks = only(fed.pump(), b"w", p.Tasks)
    assert len(tasks.tasks) == 1
    assert tasks.tasks[0].frames == payload[2]
    assert tasks.blobs == {}  # the worker has the function already
    assert tasks.tasks[0].task_id not in bids
    assert fed.load()["credit"] == 4


@pytest.mark.parametrize("credit", [1, 2, 3, 7])
def test_credit_bounds_the_batch(fed, credit):
    fed.submit(b"o", [task(i) for i in range(10)], BLOBS)
    fed.credit(b"w", credit)
    tasks = only(fed.pump(), b"w", p.Tasks)
    assert len(tasks.tasks) == credit
    assert fed.pump() == []


def test_credit_zero_sends_nothing(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    fed.credit(b"w", 0)
    assert fed.pump() == []
    assert fed.load()["queued"] == 1


def test_credit_accumulates(fed):
    fed.credit(b"w", 2)
    fed.credit(b"w", 3)
    assert fed.pump() == []
    assert fed.load()["credit"] == 5
    fed.submit(b"o", [task(i) for i in range(7)], BLOBS)
    assert len(only(fed.pump(), b"w", p.Tasks).tasks) == 5


def test_function_blobs_sent_once_per_worker(fed):
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(i, FN, INIT) for i in range(4)] + [task(9, FN2)], BLOBS)
    fed.credit(b"w", 1)
    first = only(fed.pump(), b"w", p.Tasks)
    assert first.blobs == {FN: BLOBS[FN], INIT: BLOBS[INIT]}
    fed.credit(b"w", 1)
    assert only(fed.pump(), b"w", p.Tasks).blobs == {}
    fed.credit(b"w2", 1)
    assert only(fed.pump(), b"w2", p.Tasks).blobs == {FN: BLOBS[FN], INIT: BLOBS[INIT]}
    fed.credit(b"w", 2)
    last = only(fed.pump(), b"w", p.Tasks)
    assert [t.task_id for t in last.tasks] and {t.fn for t in last.tasks} == {FN, FN2}
    assert last.blobs == {FN2: BLOBS[FN2]}  # only the new one


def test_blob_sent_in_an_earlier_submit_is_remembered(fed):
    fed.submit(b"o", [], {FN: BLOBS[FN]})
    fed.submit(b"o", [task(1)])
    fed.credit(b"w", 1)
    assert only(fed.pump(), b"w", p.Tasks).blobs == {FN: BLOBS[FN]}


def test_no_init_is_not_a_blob(fed):
    fed.submit(b"o", [task(1, FN, p.NO_INIT)], {FN: BLOBS[FN]})
    fed.credit(b"w", 1)
    tasks = only(fed.pump(), b"w", p.Tasks)
    assert p.NO_INIT not in tasks.blobs
    assert tasks.tasks[0].init == p.NO_INIT


def dispatched(out):
    """How many tasks each worker got in ``out``."""
    sizes = Counter()
    for ident, message in out:
        if isinstance(message, p.Tasks):
            sizes[ident] += len(message.tasks)
    return sizes


def test_load_is_spread_over_workers_with_credit(fed):
    fed.connect(b"w2", "worker", host="h2")
    fed.credit(b"w", 10)
    fed.credit(b"w2", 10)
    fed.submit(b"o", [task(i) for i in range(4)], BLOBS)
    sizes = dispatched(fed.pump())
    assert sum(sizes.values()) == 4
    assert sizes[b"w"] >= 1 and sizes[b"w2"] >= 1  # both get work
    assert fed.load()["credit"] == 16 and fed.load()["running"] == 4


def test_load_spread_one_task_each(fed):
    fed.connect(b"w2", "worker")
    fed.credit(b"w", 10)
    fed.credit(b"w2", 10)
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    assert dispatched(fed.pump()) == {b"w": 1, b"w2": 1}


def test_load_spread_follows_credit_when_work_exceeds_it(fed):
    fed.connect(b"w2", "worker")
    fed.credit(b"w", 2)
    fed.credit(b"w2", 3)
    fed.submit(b"o", [task(i) for i in range(10)], BLOBS)
    assert dispatched(fed.pump()) == {b"w": 2, b"w2": 3}
    assert fed.load()["queued"] == 5


# Regression: an earlier _dispatch put a served worker back into ``ready``
# before computing the next one's share, so 4 tasks over 2 workers went 3/1
# and one worker got two TASKS in one pump.
@pytest.mark.parametrize("n_workers, n_tasks", [(2, 4), (3, 6), (2, 6), (4, 8)])
def test_load_spread_is_even_with_one_batch_per_worker(broker, n_workers, n_tasks):
    broker.connect(b"o", "origin")
    workers = [b"w%d" % i for i in range(n_workers)]
    for w in workers:
        broker.connect(w, "worker")
        broker.credit(w, 100)
    broker.submit(b"o", [task(i) for i in range(n_tasks)], BLOBS)
    out = broker.pump()
    assert dispatched(out) == {w: n_tasks // n_workers for w in workers}
    assert len(out) == n_workers


def test_load_spread_respects_each_workers_credit(fed):
    fed.connect(b"w2", "worker")
    fed.connect(b"w3", "worker")
    fed.credit(b"w", 1)
    fed.credit(b"w2", 10)
    fed.credit(b"w3", 3)
    fed.submit(b"o", [task(i) for i in range(9)], BLOBS)
    out = fed.pump()
    sizes = dispatched(out)
    assert sum(sizes.values()) == 9
    assert sizes[b"w"] == 1 and sizes[b"w3"] == 3 and sizes[b"w2"] == 5
    all_bids = [t.task_id for _, m in out for t in m.tasks]
    assert len(set(all_bids)) == 9


def test_more_credit_than_work(fed):
    fed.connect(b"w2", "worker")
    fed.credit(b"w", 100)
    fed.credit(b"w2", 100)
    fed.submit(b"o", [task(1)], BLOBS)
    out = fed.pump()
    assert len(out) == 1 and len(out[0][1].tasks) == 1
    assert fed.load()["credit"] == 199


# -- RESULTS and STARTED ---------------------------------------------------------------


def dispatch(broker, worker, count):
    broker.credit(worker, count)
    tasks = only(broker.pump(), worker, p.Tasks)
    assert len(tasks.tasks) == count
    return tasks.tasks


def test_results_are_mapped_back_and_coalesced(fed):
    fed.connect(b"o2", "origin")
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(10), task(11)], BLOBS)
    fed.submit(b"o2", [task(10, frames=[b"o2-call"])])
    t1 = dispatch(fed, b"w", 2)
    t2 = dispatch(fed, b"w2", 1)
    origin_of = {t.task_id: ("o2" if t.frames == [b"o2-call"] else "o") for t in t1 + t2}
    value = zmq.Frame(b"v")
    for worker, tasks in ((b"w", t1), (b"w2", t2)):
        for t in tasks:
            fed.results(worker, p.ResultRecord(t.task_id, p.Status.OK, [value, b"buf-" + t.frames[0]]))
    out = fed.pump()
    assert len(out) == 2  # one RESULTS per origin
    r1 = only(out, b"o", p.Results)
    r2 = only(out, b"o2", p.Results)
    assert sorted(r.task_id for r in r1.results) == [10, 11]
    assert [r.task_id for r in r2.results] == [10]
    assert all(r.status is p.Status.OK and r.frames[0] is value for r in r1.results + r2.results)
    assert {bytes(r.frames[1]) for r in r1.results} == {b"buf-call-10", b"buf-call-11"}
    assert r2.results[0].frames[1] == b"buf-o2-call"
    assert sorted(origin_of.values()) == ["o", "o", "o2"]
    assert fed.load()["done"] == 3 and fed.load()["running"] == 0
    assert fed.pump() == []


@pytest.mark.parametrize("status", [p.Status.OK, p.Status.ERROR, p.Status.INIT_FAILED])
def test_result_status_and_frames_pass_through(fed, status):
    fed.submit(b"o", [task(5)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    frames = [b"a", memoryview(b"b"), b""]
    fed.results(b"w", p.ResultRecord(t.task_id, status, frames))
    record = only(fed.pump(), b"o", p.Results).results[0]
    assert (record.task_id, record.status) == (5, status)
    assert all(a is b for a, b in zip(record.frames, frames)) and len(record.frames) == 3


def test_results_over_several_messages_are_coalesced(fed):
    fed.submit(b"o", [task(i) for i in range(3)], BLOBS)
    tasks = dispatch(fed, b"w", 3)
    for t in tasks:
        fed.results(b"w", ok(t.task_id))
    results = only(fed.pump(), b"o", p.Results)
    assert sorted(r.task_id for r in results.results) == [0, 1, 2]


def test_started_is_mapped_back(fed):
    fed.submit(b"o", [task(40), task(41)], BLOBS)
    tasks = dispatch(fed, b"w", 2)
    fed.send(b"w", p.Started([t.task_id for t in tasks]))
    started = only(fed.pump(), b"o", p.Started)
    assert sorted(started.ids) == [40, 41]
    assert fed.pump() == []


def test_started_rides_with_results_in_one_pump(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    first, second = dispatch(fed, b"w", 2)
    fed.send(b"w", p.Started([first.task_id]))
    fed.results(b"w", ok(first.task_id))
    fed.send(b"w", p.Started([second.task_id]))
    out = fed.pump()
    assert out == [(b"o", p.Results([ok(1)], [1, 2]))]


def test_one_worker_report_carries_results_start_notices_and_credit(fed):
    """What a worker sends when a task ends and the next starts: one RESULTS."""
    fed.submit(b"o", [task(1), task(2), task(3)], BLOBS)
    first, second = dispatch(fed, b"w", 2)
    fed.send(b"w", p.Results([ok(first.task_id)], [second.task_id], 1))
    out = fed.pump()
    assert [ident for ident, _ in out] == [b"w", b"o"]
    (third,) = out[0][1].tasks  # the credit brought the next task
    assert third.frames == task(3).frames
    assert out[1][1] == p.Results([ok(1)], [2])
    assert fed.load()["running"] == 2 and fed.load()["done"] == 1


def test_worker_reporting_unknown_task_ids_is_ignored(fed):
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(101), task(102)], BLOBS)
    (mine,) = dispatch(fed, b"w", 1)
    (theirs,) = dispatch(fed, b"w2", 1)
    bogus = max(mine.task_id, theirs.task_id) + 1000
    assert not {mine.task_id, theirs.task_id} & {101, 102}
    # another worker's id, the origin's ids, an id never given out
    fed.results(b"w", ok(bogus), ok(theirs.task_id), ok(101), ok(102))
    fed.send(b"w", p.Started([bogus, theirs.task_id, 101, 102]))
    fed.results(b"o", ok(mine.task_id))  # an origin is no worker
    fed.send(b"o", p.Started([mine.task_id]))
    assert fed.pump() == []
    assert fed.load()["done"] == 0 and fed.load()["running"] == 2
    # the real answers still get through
    fed.results(b"w2", ok(theirs.task_id))
    assert [r.task_id for r in only(fed.pump(), b"o", p.Results).results] == [102]


def test_duplicate_result_is_reported_once(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.results(b"w", ok(t.task_id), ok(t.task_id))
    fed.results(b"w", ok(t.task_id))
    assert len(only(fed.pump(), b"o", p.Results).results) == 1
    fed.results(b"w", ok(t.task_id))
    assert fed.pump() == []
    assert fed.load()["done"] == 1


# -- CANCEL ----------------------------------------------------------------------------


def test_cancel_of_a_queued_task(fed):
    fed.submit(b"o", [task(1), task(2), task(3)], BLOBS)
    fed.send(b"o", p.Cancel([2]))
    assert fed.load()["queued"] == 2
    assert fed.pump() == [(b"o", p.Results([p.ResultRecord(2, p.Status.CANCELLED, [])]))]
    fed.credit(b"w", 10)
    tasks = only(fed.pump(), b"w", p.Tasks)
    assert sorted(t.frames[0] for t in tasks.tasks) == [b"call-1", b"call-3"]
    assert fed.load()["queued"] == 0 and fed.load()["credit"] == 8


def test_cancel_of_every_queued_task(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    fed.send(b"o", p.Cancel([1, 2, 99]))
    assert fed.load()["queued"] == 0
    fed.credit(b"w", 10)
    out = fed.pump()
    assert [(r.task_id, r.status) for r in only(out, b"o", p.Results).results] == [
        (1, p.Status.CANCELLED), (2, p.Status.CANCELLED)]  # nothing for the unknown 99
    assert to(out, b"w") == []
    assert fed.load()["credit"] == 10


def test_cancel_of_a_dispatched_task_is_refused(fed):
    # A worker has it: the answer is STARTED (it runs), and the worker keeps it.
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    tasks = dispatch(fed, b"w", 2)
    bid = {t.frames[0]: t.task_id for t in tasks}[b"call-2"]
    fed.send(b"o", p.Cancel([2]))
    assert fed.pump() == [(b"o", p.Started([2]))]
    fed.results(b"w", ok(bid))
    assert [r.task_id for r in only(fed.pump(), b"o", p.Results).results] == [2]


def test_cancel_answers_each_task_in_one_pump(fed):
    fed.submit(b"o", [task(1), task(2), task(3)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.results(b"w", ok(t.task_id))  # call-1 answered, not yet sent
    fed.send(b"o", p.Cancel([1, 2, 3]))
    out = fed.pump()
    results = only(out, b"o", p.Results)
    assert len(out) == 1
    assert [(r.task_id, r.status) for r in results.results] == [
        (1, p.Status.OK), (2, p.Status.CANCELLED), (3, p.Status.CANCELLED)]


def test_cancel_of_another_origins_task_is_ignored(fed):
    fed.connect(b"o2", "origin")
    fed.submit(b"o", [task(1)], BLOBS)
    fed.send(b"o2", p.Cancel([1]))
    assert fed.load()["queued"] == 1
    fed.credit(b"w", 1)
    assert len(only(fed.pump(), b"w", p.Tasks).tasks) == 1


def test_cancel_after_the_result_is_harmless(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.results(b"w", ok(t.task_id))
    assert len(only(fed.pump(), b"o", p.Results).results) == 1
    fed.send(b"o", p.Cancel([1]))
    assert fed.pump() == []


# -- KILL (a forced cancel) -------------------------------------------------------------


def cancelled(task_id):
    return p.ResultRecord(task_id, p.Status.CANCELLED, [])


def test_kill_of_a_queued_task_answers_at_once(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    fed.send(b"o", p.Kill([2, 99]))  # 99: unknown, ignored
    assert fed.pump() == [(b"o", p.Results([cancelled(2)]))]
    fed.credit(b"w", 10)
    assert [t.frames[0] for t in only(fed.pump(), b"w", p.Tasks).tasks] == [b"call-1"]


def test_kill_of_a_dispatched_task_goes_to_its_worker(fed):
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    bids = {t.frames[0]: t.task_id for t in dispatch(fed, b"w", 2)}
    fed.send(b"w", p.Started([bids[b"call-2"]]))
    fed.send(b"o", p.Kill([2]))
    out = fed.pump()
    assert only(out, b"w", p.Kill).ids == [bids[b"call-2"]]
    assert only(out, b"o", p.Started).ids == [2]  # the STARTED that came first
    fed.send(b"o", p.Kill([2]))  # asked again: nothing new
    assert fed.pump() == []
    fed.results(b"w", cancelled(bids[b"call-2"]))  # the worker stopped it
    assert fed.pump() == [(b"o", p.Results([cancelled(2)]))]
    assert fed.load()["running"] == 1 and fed.load()["done"] == 1


def test_kill_crossed_by_the_result_delivers_the_result(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.send(b"o", p.Kill([1]))
    fed.results(b"w", ok(t.task_id))  # sent before the KILL arrived
    out = fed.pump()
    assert only(out, b"o", p.Results).results[0].status is p.Status.OK
    fed.results(b"w", cancelled(t.task_id))  # the worker's answer to the KILL
    assert fed.pump() == []


def test_kill_after_the_result_is_harmless(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.results(b"w", ok(t.task_id))
    fed.pump()
    fed.send(b"o", p.Kill([1]))
    assert fed.pump() == []


def test_kill_of_another_origins_task_is_ignored(fed):
    fed.connect(b"o2", "origin")
    fed.submit(b"o", [task(1)], BLOBS)
    dispatch(fed, b"w", 1)
    fed.send(b"o2", p.Kill([1]))
    fed.send(b"w", p.Kill([1]))
    assert fed.pump() == []


@pytest.mark.parametrize("how", ["bye", "rehello"])
def test_a_killed_task_whose_worker_leaves_is_answered_not_requeued(fed, how):
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(1), task(2)], BLOBS)
    bids = {t.frames[0]: t.task_id for t in dispatch(fed, b"w", 2)}
    fed.send(b"o", p.Kill([1]))
    fed.pump()
    if how == "bye":
        fed.send(b"w", p.Bye())
    else:
        fed.send(b"w", p.Hello({"role": "worker"}))
    fed.credit(b"w2", 5)
    out = fed.pump()
    assert only(out, b"o", p.Results).results == [cancelled(1)]
    assert [t.frames[0] for t in only(out, b"w2", p.Tasks).tasks] == [b"call-2"]  # innocent
    assert all(t.attempts == 0 for t in fed.state.tasks.values())
    assert bids


def test_kill_of_a_revoked_task_stops_its_stale_copy_too(fed):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (moved,) = only(fed.pump(), b"w2", p.Tasks).tasks  # call-1 moved to w2
    fed.send(b"o", p.Kill([1]))
    out = fed.pump()
    assert only(out, b"w2", p.Kill).ids == [moved.task_id]
    assert only(out, b"w", p.Kill).ids == [bids[b"call-1"]]  # in case it started there
    fed.results(b"w", cancelled(bids[b"call-1"]))  # the stale copy: absorbed
    assert fed.pump() == []
    fed.results(b"w2", cancelled(moved.task_id))
    assert fed.pump() == [(b"o", p.Results([cancelled(1)]))]


def test_kill_of_a_revoked_and_requeued_task_answers_at_once(fed):
    bids, _ = stranded(fed, started=1)
    fed.send(b"w2", p.Credit(0))
    fed.state.ready.clear()  # w2 takes nothing: call-1 waits in the queue after revocation
    fed.tick(REVOKE_AFTER * 2)
    fed.connect(b"w3", "worker")
    fed.credit(b"w3", 1)
    out = fed.pump()
    (moved,) = only(out, b"w3", p.Tasks).tasks
    fed.send(b"w3", p.Bye())  # call-1 is queued again, its stale copy still at w
    fed.send(b"o", p.Kill([1]))
    out = fed.pump()
    assert only(out, b"o", p.Results).results == [cancelled(1)]
    assert only(out, b"w", p.Kill).ids == [bids[b"call-1"]]
    assert fed.load()["queued"] == 0


def test_no_kill_for_a_task_whose_revoked_copy_answered_in_the_same_turn(fed):
    """The KILL and the revoked copy's result cross: the result goes to the
    origin, and the live copy is only cancelled (if it has not started),
    never killed: killing it would replace its worker for nothing."""
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (moved,) = only(fed.pump(), b"w2", p.Tasks).tasks  # call-1 moved to w2
    fed.send(b"o", p.Kill([1]))
    fed.results(b"w", ok(bids[b"call-1"]))  # its revoked copy ran after all
    out = fed.pump()
    assert only(out, b"o", p.Results).results == [ok(1)]
    assert not [m for _, m in out if isinstance(m, p.Kill)], out
    assert only(out, b"w2", p.Cancel).ids == [moved.task_id]


def test_stranded_killed_task_is_not_revoked(fed):
    bids, _ = stranded(fed, started=1)
    fed.send(b"o", p.Kill([1, 2]))  # both wait behind call-0
    out = fed.pump()
    assert sorted(only(out, b"w", p.Kill).ids) == sorted([bids[b"call-1"], bids[b"call-2"]])
    fed.tick(REVOKE_AFTER * 2)
    assert to(fed.pump(), b"w2") == []


def test_a_worker_kills_the_tasks_it_submitted(fed):
    fed.connect(b"w2", "worker")
    fed.submit(b"w", [task(5)], BLOBS)  # a nested task, w as its origin
    (t,) = dispatch(fed, b"w2", 1)
    fed.send(b"w", p.Kill([5]))
    assert only(fed.pump(), b"w2", p.Kill).ids == [t.task_id]
    fed.results(b"w2", cancelled(t.task_id))
    assert fed.pump() == [(b"w", p.Results([cancelled(5)]))]


def test_a_replaced_worker_answers_what_it_stopped_and_its_other_tasks_run_again(fed):
    """A worker that stopped a task by replacing itself sends that task's
    outcome, then BYE: its other tasks are requeued without an attempt."""
    fed.submit(b"o", [task(1), task(2), task(3)], BLOBS)
    bids = {t.frames[0]: t.task_id for t in dispatch(fed, b"w", 3)}
    timeout = p.ResultRecord(bids[b"call-1"], p.Status.ERROR, [b"tb", b"TaskTimeout"])
    fed.results(b"w", timeout, ok(bids[b"call-3"]))
    fed.send(b"w", p.Bye())
    fed.send(b"w-again", p.Hello({"role": "worker"}))  # its replacement, on a new connection
    fed.credit(b"w-again", 5)
    out = fed.pump()
    assert [(r.task_id, r.status) for r in only(out, b"o", p.Results).results] == [
        (1, p.Status.ERROR), (3, p.Status.OK)]
    (again,) = only(out, b"w-again", p.Tasks).tasks
    assert again.frames[0] == b"call-2"
    assert fed.state.tasks[(b"o", 2)].attempts == 0


# -- BYE -------------------------------------------------------------------------------


def test_worker_bye_requeues_its_tasks_to_another_worker(fed):
    fed.submit(b"o", [task(1, FN, INIT), task(2, FN, INIT), task(3, FN, INIT)], BLOBS)
    tasks = dispatch(fed, b"w", 2)
    fed.send(b"w", p.Bye())
    assert fed.pump() == []
    assert fed.load()["queued"] == 3 and fed.load()["running"] == 0 and fed.load()["workers"] == 0
    fed.connect(b"w2", "worker")
    again = dispatch(fed, b"w2", 3)
    assert sorted(t.frames[0] for t in again) == [b"call-1", b"call-2", b"call-3"]
    # the payload objects survive the requeue
    assert {id(t.frames[0]) for t in tasks} <= {id(t.frames[0]) for t in again}
    # a late answer from the departed worker is dropped
    fed.results(b"w", *(ok(t.task_id) for t in tasks))
    assert fed.pump() == []
    fed.results(b"w2", *(ok(t.task_id) for t in again))
    assert sorted(r.task_id for r in only(fed.pump(), b"o", p.Results).results) == [1, 2, 3]


def test_requeued_tasks_go_first(fed):
    fed.submit(b"o", [task(i) for i in range(4)], BLOBS)
    first = dispatch(fed, b"w", 2)
    fed.send(b"w", p.Bye())
    fed.connect(b"w2", "worker")
    again = dispatch(fed, b"w2", 2)
    assert {t.frames[0] for t in again} == {t.frames[0] for t in first}


def test_requeued_task_gets_its_blob_at_the_new_worker(fed):
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(1, FN2)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.send(b"w", p.Bye())
    fed.credit(b"w2", 1)
    tasks = only(fed.pump(), b"w2", p.Tasks)
    assert tasks.blobs == {FN2: BLOBS[FN2]}


def test_worker_rehello_requeues_its_tasks(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    dispatch(fed, b"w", 1)
    fed.connect(b"w", "worker")
    assert fed.load() == {"queued": 1, "running": 0, "lent": 0, "done": 0, "credit": 0, "workers": 1, "hosts": 1}
    fed.credit(b"w", 1)
    again = only(fed.pump(), b"w", p.Tasks)
    assert again.blobs == {FN: BLOBS[FN]}  # a new session knows no blobs


def test_origin_bye_drops_queued_and_cancels_dispatched(fed):
    fed.connect(b"o2", "origin")
    fed.submit(b"o", [task(i) for i in range(5)], BLOBS)
    fed.submit(b"o2", [task(1, frames=[b"o2"])])
    tasks = dispatch(fed, b"w", 2)
    assert fed.load()["queued"] == 4
    fed.send(b"o", p.Bye())
    assert [t.frames[0] for t in tasks] == [b"call-0", b"call-1"]  # queue order
    assert fed.load()["queued"] == 1  # o2's task
    out = fed.pump()
    assert len(out) == 1
    assert sorted(only(out, b"w", p.Cancel).ids) == sorted(t.task_id for t in tasks)
    # answers for the departed origin go nowhere
    fed.results(b"w", *(ok(t.task_id) for t in tasks))
    out = fed.pump()
    assert to(out, b"o") == []
    # o2's task still runs
    fed.credit(b"w", 10)
    remaining = only(fed.pump(), b"w", p.Tasks).tasks
    assert [t.frames for t in remaining] == [[b"o2"]]
    assert fed.load()["queued"] == 0


def test_origin_bye_with_only_queued_tasks(fed):
    fed.submit(b"o", [task(i) for i in range(5)], BLOBS)
    fed.send(b"o", p.Bye())
    assert fed.pump() == []
    assert fed.load()["queued"] == 0
    fed.credit(b"w", 10)
    assert fed.pump() == []


def test_origin_bye_drops_pending_results(fed):
    fed.submit(b"o", [task(1)], BLOBS)
    (t,) = dispatch(fed, b"w", 1)
    fed.send(b"w", p.Started([t.task_id]))
    fed.results(b"w", ok(t.task_id))
    fed.send(b"o", p.Bye())
    assert fed.pump() == []


# -- rejection and duplicates ----------------------------------------------------------


@pytest.mark.parametrize("fn, init", [(UNKNOWN, p.NO_INIT), (FN, UNKNOWN), (UNKNOWN, UNKNOWN)])
def test_submit_with_unknown_function_is_rejected(fed, fn, init):
    fed.submit(b"o", [task(1), task(2, fn, init), task(3)], BLOBS)
    out = fed.pump()
    results = only(out, b"o", p.Results).results
    assert len(out) == 1 and len(results) == 1
    (record,) = results
    assert record.task_id == 2 and record.status is p.Status.REJECTED
    assert len(record.frames) == 1
    assert UNKNOWN.hex() in bytes(record.frames[0]).decode("utf-8")
    assert fed.load()["queued"] == 2
    fed.credit(b"w", 10)
    assert len(only(fed.pump(), b"w", p.Tasks).tasks) == 2


def test_submit_without_any_blob_is_rejected(fed):
    fed.submit(b"o", [task(1)])
    (record,) = only(fed.pump(), b"o", p.Results).results
    assert record.status is p.Status.REJECTED


def test_blob_from_another_origin_counts(fed):
    fed.connect(b"o2", "origin")
    fed.submit(b"o2", [], {FN: BLOBS[FN]})
    fed.submit(b"o", [task(1)])
    assert fed.pump() == []
    assert fed.load()["queued"] == 1


def test_duplicate_task_id_from_same_origin_is_ignored(fed):
    fed.connect(b"o2", "origin")
    fed.submit(b"o", [task(7, frames=[b"first"])], BLOBS)
    fed.submit(b"o", [task(7, frames=[b"second"])], BLOBS)
    fed.submit(b"o", [task(8), task(8, frames=[b"dup-in-batch"])], BLOBS)
    fed.submit(b"o2", [task(7, frames=[b"other origin"])], BLOBS)  # another origin: fine
    assert fed.load()["queued"] == 3
    fed.credit(b"w", 10)
    tasks = only(fed.pump(), b"w", p.Tasks).tasks
    assert sorted(t.frames[0] for t in tasks) == [b"call-8", b"first", b"other origin"]
    # ...also while the first one runs
    fed.submit(b"o", [task(7, frames=[b"third"])], BLOBS)
    assert fed.load()["queued"] == 0
    fed.results(b"w", *(ok(t.task_id) for t in tasks))
    out = fed.pump()
    assert sorted(r.task_id for r in only(out, b"o", p.Results).results) == [7, 8]
    assert [r.task_id for r in only(out, b"o2", p.Results).results] == [7]


# -- shutdown and load -----------------------------------------------------------------


def test_drop_all_sends_shutdown_to_workers_only(fed):
    fed.connect(b"w2", "worker")
    fed.connect(b"o2", "origin")
    out = [(i, p.decode(f)) for i, f in fed.state.drop_all()]
    assert sorted(out, key=lambda x: x[0]) == [(b"w", p.Shutdown()), (b"w2", p.Shutdown())]


def test_drop_all_without_workers(broker):
    broker.connect(b"o", "origin")
    assert broker.state.drop_all() == []


def test_load_numbers(broker):
    assert broker.load() == {"queued": 0, "running": 0, "lent": 0, "done": 0, "credit": 0, "workers": 0, "hosts": 0}
    broker.connect(b"o", "origin", host="h0")
    broker.connect(b"w1", "worker", host="h1")
    broker.connect(b"w2", "worker", host="h1")
    broker.connect(b"w3", "worker", host="h2")
    assert broker.load() == {"queued": 0, "running": 0, "lent": 0, "done": 0, "credit": 0, "workers": 3, "hosts": 2}
    broker.submit(b"o", [task(i) for i in range(10)], BLOBS)
    broker.credit(b"w1", 3)
    broker.credit(b"w2", 1)
    assert broker.load()["queued"] == 10 and broker.load()["credit"] == 4
    tasks = {i: m.tasks for i, m in broker.pump()}
    assert broker.load() == {"queued": 6, "running": 4, "lent": 0, "done": 0, "credit": 0, "workers": 3, "hosts": 2}
    broker.results(b"w1", *(ok(t.task_id) for t in tasks[b"w1"]))
    broker.pump()
    assert broker.load() == {"queued": 6, "running": 1, "lent": 0, "done": 3, "credit": 0, "workers": 3, "hosts": 2}
    broker.credit(b"w3", 10)
    assert broker.load()["credit"] == 10
    broker.pump()
    assert broker.load() == {"queued": 0, "running": 7, "lent": 0, "done": 3, "credit": 4, "workers": 3, "hosts": 2}
    broker.send(b"w3", p.Bye())
    assert broker.load() == {"queued": 6, "running": 1, "lent": 0, "done": 3, "credit": 0, "workers": 2, "hosts": 1}


# -- hostile HELLOs (regressions) -------------------------------------------------------


def test_deeply_nested_hello_does_not_escape_receive(broker):
    """json.loads raises RecursionError on deep nesting; it once escaped
    receive() and took the broker's serve loop down."""
    for raw in (b"[" * 5000, b'{"role":' * 5000):
        broker.state.receive(b"evil", [p.encode(p.Hello())[0], raw])
    assert broker.pump() == []
    assert broker.load()["workers"] == 0


@pytest.mark.parametrize("char", ["x", "\x85", "\u2028", "\U0001f600"])
def test_refuse_for_a_long_role_is_decodable(broker, char):
    """The REFUSE echoes the role; for a long one (whose repr() may be longer
    than its UTF-8) it once exceeded what the peer's decoder accepts."""
    raw = json.dumps({"role": char * (p.MAX_JSON_BYTES // 5)}, ensure_ascii=False).encode()
    assert len(raw) <= p.MAX_JSON_BYTES
    broker.state.receive(b"peer", [p.encode(p.Hello())[0], raw])
    ((ident, frames),) = broker.state.pump()
    assert ident == b"peer"
    refuse = p.decode(frames)
    assert isinstance(refuse, p.Refuse) and "role" in refuse.reason


# -- stranded tasks: revocation ----------------------------------------------------------

REVOKE_AFTER = getattr(state_module, "REVOKE_AFTER", 0.05)


def stranded(fed, n=3, started=0):
    """``w`` holds ``n`` tasks (ids 0..n-1), has started the first
    ``started``; ``w2`` joins with one credit and nothing to do."""
    fed.submit(b"o", [task(i) for i in range(n)], BLOBS)
    tasks = dispatch(fed, b"w", n)
    bids = {t.frames[0]: t.task_id for t in tasks}
    payload = {t.frames[0]: t.frames for t in tasks}
    if started:
        fed.send(b"w", p.Started([bids[b"call-%d" % i] for i in range(started)]))
        assert sorted(only(fed.pump(), b"o", p.Started).ids) == list(range(started))
    fed.connect(b"w2", "worker")
    fed.credit(b"w2", 1)
    return bids, payload


def test_young_tasks_are_not_revoked(fed):
    stranded(fed, started=0)
    assert fed.pump() == []
    assert fed.state.next_check() == REVOKE_AFTER
    fed.tick(REVOKE_AFTER / 2)
    assert fed.pump() == []


def test_old_waiting_task_is_revoked(fed):
    bids, _ = stranded(fed, started=0)
    fed.tick(REVOKE_AFTER * 2)
    out = fed.pump()
    (moved,) = only(out, b"w2", p.Tasks).tasks
    assert only(out, b"w", p.Cancel).ids == [bids[moved.frames[0]]]


def test_a_started_task_is_never_revoked(fed):
    bids, _ = stranded(fed, n=2, started=1)
    fed.tick(REVOKE_AFTER * 2)
    out = fed.pump()
    (moved,) = only(out, b"w2", p.Tasks).tasks
    assert moved.frames[0] == b"call-1"  # the waiting one, not the running call-0
    assert only(out, b"w", p.Cancel).ids == [bids[b"call-1"]]
    fed.connect(b"w3", "worker")
    fed.credit(b"w3", 1)
    fed.tick(REVOKE_AFTER * 2)
    assert fed.pump() == []  # w only holds its running task (and a stale copy)


def test_stranded_task_moves_to_an_idle_worker(fed):
    bids, payload = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    out = fed.pump()
    cancel = only(out, b"w", p.Cancel)
    moved = only(out, b"w2", p.Tasks)
    assert cancel.ids == [bids[b"call-1"]]  # the first task not started
    (t,) = moved.tasks
    assert t.frames[0] == b"call-1" and t.frames[0] is payload[b"call-1"][0]
    assert t.task_id not in bids.values()
    assert moved.blobs == {FN: BLOBS[FN]}
    assert len(out) == 2
    # the old worker drops it as asked; the new one runs it: one answer
    fed.results(b"w", p.ResultRecord(bids[b"call-1"], p.Status.CANCELLED, []))
    assert fed.pump() == []
    fed.results(b"w2", ok(t.task_id))
    fed.results(b"w", ok(bids[b"call-0"]), ok(bids[b"call-2"]))
    assert sorted(r.task_id for r in only(fed.pump(), b"o", p.Results).results) == [0, 1, 2]
    fed.results(b"w", ok(bids[b"call-1"]))  # too late, and answered already
    assert fed.pump() == []
    assert fed.load()["running"] == 0 and fed.load()["queued"] == 0


def test_revoked_copy_that_ran_anyway_wins(fed):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (t,) = only(fed.pump(), b"w2", p.Tasks).tasks
    fed.send(b"w", p.Started([bids[b"call-1"]]))  # crossed the CANCEL
    fed.results(b"w", ok(bids[b"call-1"], b"old"))
    out = fed.pump()
    assert only(out, b"o", p.Results).results[0].task_id == 1
    assert only(out, b"w2", p.Cancel).ids == [t.task_id]  # the live copy is dropped
    assert to(out, b"o") and not any(isinstance(m, p.Started) for m in to(out, b"o"))
    fed.results(b"w2", ok(t.task_id))
    assert fed.pump() == []


def test_live_copy_answers_first_and_stale_copy_is_dropped(fed):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (t,) = only(fed.pump(), b"w2", p.Tasks).tasks
    fed.results(b"w2", ok(t.task_id))
    assert [r.task_id for r in only(fed.pump(), b"o", p.Results).results] == [1]
    fed.results(b"w", ok(bids[b"call-1"]))
    assert fed.pump() == []


def test_stale_copy_is_not_requeued_when_its_worker_leaves(fed):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (t,) = only(fed.pump(), b"w2", p.Tasks).tasks
    fed.send(b"w", p.Bye())
    assert fed.load()["queued"] == 2  # call-0 and call-2, not call-1
    fed.results(b"w2", ok(t.task_id))
    assert [r.task_id for r in only(fed.pump(), b"o", p.Results).results] == [1]


def test_stale_copy_result_after_the_live_worker_left(fed):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    only(fed.pump(), b"w2", p.Tasks)
    fed.send(b"w2", p.Bye())
    assert fed.load()["queued"] == 1  # call-1, requeued
    fed.results(b"w", ok(bids[b"call-1"]))
    assert [r.task_id for r in only(fed.pump(), b"o", p.Results).results] == [1]
    assert fed.load()["queued"] == 0
    fed.connect(b"w3", "worker")
    fed.credit(b"w3", 5)
    # w3 may take over call-2 (waiting behind call-0) but never the answered call-1
    out = fed.pump()
    assert all(t.frames[0] != b"call-1" for m in to(out, b"w3") for t in m.tasks)


def test_cancel_of_a_revoked_task_is_refused(fed):
    # Requeued after revocation, it may still run at its first worker, which
    # has not answered the CANCEL yet: too late to cancel.
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (t,) = only(fed.pump(), b"w2", p.Tasks).tasks
    fed.send(b"o", p.Cancel([1]))
    assert fed.pump() == [(b"o", p.Started([1]))]
    fed.results(b"w", ok(bids[b"call-1"]))
    out = fed.pump()
    assert [r.task_id for r in only(out, b"o", p.Results).results] == [1]
    assert only(out, b"w2", p.Cancel).ids == [t.task_id]
    fed.results(b"w2", ok(t.task_id))
    assert fed.pump() == []


# Regression: _on_started once skipped cancelled tasks but not done ones, so
# once a revoked copy's result had won, the live copy's STARTED still went to
# the origin: after the RESULTS, and even after the origin's BYE (a done task
# is no longer in ``tasks``, so _drop_peer does not cancel it).
@pytest.mark.parametrize("origin", ["stays", "leaves-after-result", "leaves-before-result"])
def test_started_of_a_finished_task_is_not_forwarded(fed, origin):
    bids, _ = stranded(fed, started=1)
    fed.tick(REVOKE_AFTER * 2)
    (t,) = only(fed.pump(), b"w2", p.Tasks).tasks
    fed.results(b"w", ok(bids[b"call-1"]))  # the revoked copy ran after all: it wins
    if origin == "leaves-before-result":
        fed.send(b"o", p.Bye())
    out = fed.pump()
    assert only(out, b"w2", p.Cancel).ids == [t.task_id]
    if origin == "leaves-after-result":
        assert [r.task_id for r in only(out, b"o", p.Results).results] == [1]
        fed.send(b"o", p.Bye())
    fed.send(b"w2", p.Started([t.task_id]))  # it had started before the CANCEL came
    out = fed.pump()
    assert to(out, b"o") == []
    assert not any(isinstance(m, p.Started) for _, m in out)


def test_revocation_is_bounded_by_idle_credit(fed):
    fed.submit(b"o", [task(i) for i in range(6)], BLOBS)
    dispatch(fed, b"w", 6)
    fed.connect(b"w2", "worker")
    fed.credit(b"w2", 2)
    fed.tick(REVOKE_AFTER * 2)
    out = fed.pump()
    assert len(only(out, b"w", p.Cancel).ids) == 2
    assert len(only(out, b"w2", p.Tasks).tasks) == 2
    assert fed.load()["running"] == 8  # 6 at w (2 of them stale), 2 at w2


@pytest.mark.parametrize(
    "case", ["all started", "one task each", "no idle worker", "work queued", "idle without credit"]
)
def test_no_revocation(fed, case):
    fed.connect(b"w2", "worker")
    fed.submit(b"o", [task(i) for i in range(3)], BLOBS)
    tasks = dispatch(fed, b"w", 1 if case == "one task each" else 3)
    if case == "all started":
        fed.send(b"w", p.Started([t.task_id for t in tasks]))
    if case == "work queued":
        fed.submit(b"o", [task(10)], BLOBS)
    if case == "no idle worker":
        fed.submit(b"o", [task(10), task(11)], BLOBS)
        dispatch(fed, b"w2", 2 if case != "one task each" else 1)
    if case != "idle without credit":
        fed.credit(b"w2", 1)
    out = fed.pump()
    fed.tick(REVOKE_AFTER * 10)
    out += fed.pump()
    assert not any(isinstance(m, p.Cancel) for _, m in out), out


def test_next_check(fed):
    assert fed.state.next_check() is None
    stranded(fed)
    assert fed.state.next_check() == REVOKE_AFTER
    fed.tick(REVOKE_AFTER * 2)
    fed.pump()
    assert fed.state.next_check() is None  # w2 is busy now


# -- random interleavings ----------------------------------------------------------------

ORIGINS = [b"o0", b"o1", b"o2"]
WORKERS = [b"w0", b"w1", b"w2"]
STRANGERS = [b"x0"]
ALL = ORIGINS + WORKERS + STRANGERS
SUPERVISOR = b"s0"  # the workers' parent: says when one has ended (WORKER_EXIT)
HANDLED = {
    p.Command.HELLO,
    p.Command.SUBMIT,
    p.Command.CREDIT,
    p.Command.RESULTS,
    p.Command.STARTED,
    p.Command.CANCEL,
    p.Command.KILL,
    p.Command.BYE,
}


class OriginSim:
    """What an origin incarnation expects."""

    def __init__(self, alive=False):
        self.alive = alive
        self.outstanding = {}  # id -> Sub: submitted, no RESULTS yet
        self.submitted = set()


class Sub:
    """One submitted task, as its origin knows it."""

    def __init__(self, origin, sim, task_id, fn, init, frames, rejected):
        self.origin, self.sim, self.task_id = origin, sim, task_id
        self.fn, self.init, self.frames, self.rejected = fn, init, frames, rejected
        self.answered = False  # its origin got its result
        self.handed_out = False  # a worker has had it: no longer cancellable
        self.cancel_asked = False  # its origin sent CANCEL and awaits the answer
        self.losses = 0  # times a worker died holding its live copy (at most: see worker_dies)
        self.last_exit = None  # (name, pid, status, signal) of the last such worker
        self.kill_asked = False  # its origin sent KILL: it must end CANCELLED or crossed


class WorkerSim:
    def __init__(self, alive=False):
        self.alive = alive
        self.credit = 0  # granted and not yet used
        self.held = {}  # broker id -> Sub
        self.given = set()  # every broker id this incarnation was given
        self.known = set()  # blobs received
        self.to_cancel = set()
        self.to_kill = set()
        self.zombie = {}  # held at a previous incarnation's BYE / re-HELLO
        self.pid = None  # this incarnation's, as its HELLO gave it


def _wrap(frames, n, kind):
    if kind == "bytes":
        return frames
    conv = zmq.Frame if kind == "zmq" else memoryview
    return [conv(bytes(f)) if i < n else f for i, f in enumerate(frames)]


class BrokerMachine(RuleBasedStateMachine):
    """Peers talking to one BrokerState in random order, with a model of what
    each origin must get back."""

    def __init__(self):
        super().__init__()
        self.deaths = 0  # workers lost through a supervisor's notice
        self.now = 0.0
        self.state = BrokerState("fuzz", clock=lambda: self.now, heartbeat=NO_HEARTBEAT)
        self.next_pid = 100
        self.origins = {i: OriginSim() for i in ORIGINS}
        self.workers = {i: WorkerSim() for i in WORKERS}
        self.known_blobs = set()  # digests the broker has been given
        self.by_key = {}  # payload key -> Sub
        self.location = {}  # payload key -> (worker, bid) of the live copy at a worker
        self.revoked = []  # (worker, bid) cancelled by the pump being checked
        self.bids = set()
        self.next_id = 1
        self.expect = Counter()  # (ident, Welcome/Refuse) -> how many still due
        self.subs = {}  # (origin, task id) -> Sub, over all sessions (ids are unique)

    # -- plumbing ----------------------------------------------------------------------

    def send(self, ident, message, kind="bytes"):
        frames = p.encode(message)
        n = 2 if isinstance(message, (p._TaskBatch, p.Results)) else len(frames)
        self.state.receive(ident, _wrap(frames, n, kind))

    def snapshot(self):
        s = self.state
        return (
            s.queued,
            [id(t) for t in s.queue],
            sorted(s.tasks),
            {i: (q.role, q.credit, sorted(q.inflight), list(q.cancels)) for i, q in s.peers.items()},
            list(s.ready),
            s.done,
            {o: len(r) for o, r in s._results.items()},
            {o: len(r) for o, r in s._started.items()},
            s.load(),
        )

    def live_origin(self, ident):
        sim = self.origins.get(ident)
        return sim if sim is not None and sim.alive else None

    def forget_copy(self, ident, bid, sub):
        key = bytes(sub.frames[0])
        if self.location.get(key) == (ident, bid):
            del self.location[key]

    def worker_gone(self, ident):
        """Forget what a worker incarnation held: the broker requeues it."""
        w = self.workers[ident]
        new = WorkerSim()
        new.zombie = {**w.zombie, **w.held}
        for bid, sub in w.held.items():
            self.forget_copy(ident, bid, sub)
        self.workers[ident] = new
        return new

    # -- pumping and checking outputs --------------------------------------------------

    def do_pump(self):
        out = [(ident, p.decode(frames)) for ident, frames in self.state.pump()]
        # CANCELs first: a task revoked from one worker is sent to another
        # in the same pump (TASKS precede CANCELs in the output)
        self.revoked = []
        for ident, message in sorted(out, key=lambda x: not isinstance(x[1], p.Cancel)):
            getattr(self, "got_" + type(message).__name__)(ident, message)
        for ident, bid in self.revoked:
            sub = self.workers[ident].held.get(bid)
            if sub is not None and sub.sim.alive and sub.sim.outstanding.get(sub.task_id) is sub:
                # CANCEL of a task nobody cancelled: a revocation, so the task
                # must have moved (or the old copy is not the live one)
                assert self.location.get(bytes(sub.frames[0])) != (ident, bid), "revoked, not moved"
        self.check_after_pump()

    def got_Welcome(self, ident, message):
        assert self.expect[(ident, "welcome")] > 0, ident
        self.expect[(ident, "welcome")] -= 1

    def got_Refuse(self, ident, message):
        assert self.expect[(ident, "refuse")] > 0, ident
        self.expect[(ident, "refuse")] -= 1

    def got_Tasks(self, ident, message):
        w = self.workers[ident]
        assert w.alive, f"TASKS to departed worker {ident}"
        assert 0 < len(message.tasks) <= w.credit, (len(message.tasks), w.credit)
        w.credit -= len(message.tasks)
        needed = {d for t in message.tasks for d in (t.fn, t.init) if d != p.NO_INIT}
        for digest, blob in message.blobs.items():
            assert digest not in w.known, "blob sent twice to one worker"
            assert bytes(blob) == BLOBS[digest]
            assert digest in needed
            w.known.add(digest)
        for t in message.tasks:
            assert t.task_id not in self.bids, "broker id reused"
            self.bids.add(t.task_id)
            key = bytes(t.frames[0])
            sub = self.by_key[key]
            assert not sub.kill_asked, "dispatched a killed task"
            assert sub.sim is self.origins[sub.origin] and sub.sim.alive, "task of a departed origin"
            assert sub.sim.outstanding.get(sub.task_id) is sub, "dispatched a cancelled/answered task"
            assert not sub.rejected
            assert (t.fn, t.init) == (sub.fn, sub.init)
            assert len(t.frames) == len(sub.frames)
            assert all(a is b for a, b in zip(t.frames, sub.frames)), "payload copied"
            assert {t.fn, t.init} - {p.NO_INIT} <= w.known, "worker lacks a blob"
            old = self.location.get(key)
            if old is not None:  # moved: the old copy must have been revoked
                assert old[1] in self.workers[old[0]].to_cancel, f"{key!r} live at two workers"
            self.location[key] = (ident, t.task_id)
            sub.handed_out = True
            w.held[t.task_id] = sub
            w.given.add(t.task_id)

    def got_Cancel(self, ident, message):
        w = self.workers[ident]
        assert w.alive
        assert set(message.ids) <= w.given, "CANCEL of a task this worker never had"
        for bid in message.ids:
            w.to_cancel.add(bid)
            self.revoked.append((ident, bid))

    def got_Kill(self, ident, message):
        w = self.workers[ident]
        assert w.alive
        assert set(message.ids) <= w.given, "KILL of a task this worker never had"
        for bid in message.ids:
            sub = w.held.get(bid)
            assert sub is not None and sub.kill_asked, f"KILL of {bid}, which nobody killed"
            w.to_kill.add(bid)

    def got_Started(self, ident, message):
        self.saw_started(ident, message.ids)

    def saw_started(self, ident, ids):
        sim = self.live_origin(ident)
        assert sim is not None, f"STARTED to departed origin {ident}"
        assert set(ids) <= sim.submitted
        for tid in ids:  # never after the task's RESULTS
            sub = self.subs[(ident, tid)]
            assert not sub.answered, f"STARTED after RESULTS for {tid}"
            assert sub.handed_out, f"STARTED for {tid}, which no worker has had"
            sub.cancel_asked = False  # refused, or answered by a worker's notice

    def got_Results(self, ident, message):
        assert message.credit == 0, "credit sent to an origin"
        if message.started:  # they come first, as a STARTED before it would
            self.saw_started(ident, message.started)
        sim = self.live_origin(ident)
        assert sim is not None, f"RESULTS to departed origin {ident}"
        for record in message.results:
            sub = sim.outstanding.pop(record.task_id, None)
            assert sub is not None, f"unexpected or duplicate result for {record.task_id}"
            sub.answered = True
            if record.status is p.Status.CANCELLED:
                if not sub.kill_asked:  # a plain CANCEL succeeds only while queued
                    assert sub.cancel_asked, f"{record.task_id} cancelled unasked"
                    assert not sub.handed_out, f"{record.task_id} cancelled after a worker had it"
            elif sub.rejected:
                assert record.status is p.Status.REJECTED
                assert len(record.frames) == 1
                bytes(record.frames[0]).decode("utf-8")
            elif record.status is p.Status.LOST:
                assert sub.losses > self.state.max_retries, (record.task_id, sub.losses)
                info = json.loads(bytes(record.frames[0]))
                ended = (info["worker"], info["pid"], info["status"], info["signal"])
                assert ended == sub.last_exit
                assert info["stderr"] == [f"last words of {info['pid']}"]
            elif record.status is p.Status.OK:
                assert len(record.frames) == len(sub.frames)
                assert all(a is b for a, b in zip(record.frames, sub.frames)), "wrong result"
            else:
                assert record.status is p.Status.ERROR, record.status
                assert [bytes(f) for f in record.frames] == [b"error:" + bytes(sub.frames[0])]

    def got_Shutdown(self, ident, message):
        raise AssertionError("pump never sends SHUTDOWN")

    def got_Heartbeat(self, ident, message):
        raise AssertionError("pump never sends HEARTBEAT")

    def check_after_pump(self):
        s = self.state
        load = s.load()
        # work-conserving: nothing waits while a worker has credit, except a
        # suspect (a task that lost its worker) waiting for a worker that
        # holds no other, for ISOLATE_FOR at most
        now = s.clock()

        def isolated(t):
            return t.attempts and now - t.lost_at < ISOLATE_FOR

        waiting = [t for t in s.queue if not (t.cancelled or t.done)]
        if load["credit"]:
            assert all(isolated(t) for t in waiting), load
            for ident, peer in s.peers.items():
                if waiting and peer.role == "worker" and peer.credit:
                    assert BrokerState._holds_suspect(ident, peer, now), ident  # could take one
        for ident, peer in s.peers.items():  # suspects run apart
            live = [t for bid, t in peer.inflight.items() if t.worker == ident and t.bid == bid]
            assert sum(1 for t in live if isolated(t) and not (t.cancelled or t.done)) <= 1, ident
        # every live task is in exactly one place
        queued = [t for t in s.queue if not (t.cancelled or t.done)]
        assert len(queued) == s.queued == load["queued"]
        assert len({id(t) for t in queued}) == len(queued)
        for ident, w in self.workers.items():
            if w.alive:
                peer = s.peers[ident]
                assert set(peer.inflight) == set(w.held)
                assert peer.credit == w.credit
                assert not peer.cancels
            else:
                assert ident not in s.peers or s.peers[ident].role != "worker"
        for ident, sim in self.origins.items():
            keys = {tid for (o, tid) in s.tasks if o == ident}
            if not sim.alive:
                assert not keys
                continue
            # after a pump, every unanswered task is still held, and every
            # CANCEL has been answered
            assert keys == set(sim.outstanding), (keys, set(sim.outstanding))
            for tid, sub in sim.outstanding.items():
                assert not sub.cancel_asked, f"CANCEL of {tid} not answered"
                task = s.tasks[(ident, tid)]
                assert not (task.cancelled or task.done)
                where = self.location.get(bytes(sub.frames[0]))
                if sub.kill_asked:  # unanswered: its worker has been told to stop it
                    assert task.killed and where is not None, f"KILL of {tid} not answered"
                    assert where[1] in self.workers[where[0]].to_kill, f"KILL of {tid} not passed on"
                if task.worker is None:
                    assert sum(t is task for t in queued) == 1
                    assert where is None
                else:
                    assert not any(t is task for t in queued)
                    assert where == (task.worker, task.bid), (where, task.worker, task.bid)
                    assert s.peers[task.worker].inflight.get(task.bid) is task
        # a worker holding a task nobody waits for any more was told to drop it
        for key, (ident, bid) in self.location.items():
            sub = self.by_key[key]
            if not (sub.sim.alive and sub.sim.outstanding.get(sub.task_id) is sub):
                assert bid in self.workers[ident].to_cancel, f"{ident} not told to drop {key!r}"
        assert not any(o not in self.origins for (o, _) in s.tasks)
        assert not s._results and not s._started

    @invariant()
    def counters_consistent(self):
        s = self.state
        assert s.queued == sum(1 for t in s.queue if not (t.cancelled or t.done))
        # no peer is lost by silence here (no heartbeats), only by a
        # supervisor's notice: until one comes, every requeue was of an
        # innocent task (a BYE, a replaced worker), which costs no retry
        if not self.deaths:
            assert all(t.attempts == 0 for t in s.tasks.values())
        assert not any(t.killed for t in s.queue if not (t.cancelled or t.done))
        load = s.load()
        assert load["workers"] == sum(w.alive for w in self.workers.values())
        assert load["running"] == sum(len(w.held) for w in self.workers.values() if w.alive)

    # -- rules ---------------------------------------------------------------------------

    def busy_origins(self):
        return sorted(i for i, o in self.origins.items() if o.alive and o.outstanding)

    def busy_workers(self):
        return sorted(i for i, w in self.workers.items() if w.alive and w.held)

    @initialize(
        n_workers=st.integers(1, len(WORKERS)), credit=st.integers(0, 6), preload=st.booleans(),
        retries=st.integers(0, 2),
    )
    def everyone_says_hello(self, n_workers, credit, preload, retries):
        self.state.max_retries = retries  # a task lost retries + 1 times fails with LOST
        for ident in ORIGINS + WORKERS[:n_workers]:
            self.hello(ident)
        self.send(SUPERVISOR, p.Hello({"role": "supervisor", "name": "s0", "host": "h"}))
        self.expect[(SUPERVISOR, "welcome")] += 1
        for ident in WORKERS[:n_workers]:
            self.credit(ident, credit)
        if preload:  # the function blobs, without tasks
            self.send(ORIGINS[0], p.Submit([], dict(BLOBS)))
            self.known_blobs |= set(BLOBS)
        self.do_pump()

    @rule()
    def pump(self):
        self.do_pump()

    @rule(ident=st.sampled_from(ORIGINS + WORKERS), leave=st.booleans())
    def churn(self, ident, leave):
        """A peer leaves (BYE) or (re)joins (HELLO)."""
        if leave:
            self.bye(ident)
        else:
            self.hello(ident)

    def hello(self, ident):
        if ident in self.origins:
            self.send(ident, p.Hello({"role": "origin", "name": ident.decode(), "host": "h"}))
            self.origins[ident].alive = False  # a re-HELLO ends the old session...
            self.origins[ident] = OriginSim(alive=True)  # ...and starts a new one
        else:
            pid, self.next_pid = self.next_pid, self.next_pid + 1
            name = ident.decode()
            self.send(ident, p.Hello({"role": "worker", "name": name, "host": "h", "pid": pid}))
            new = self.worker_gone(ident)
            new.alive, new.pid = True, pid
        self.expect[(ident, "welcome")] += 1

    @rule(
        ident=st.sampled_from(ORIGINS + ORIGINS + STRANGERS),
        fns=st.lists(st.sampled_from([FN] * 4 + [FN2] * 3 + [UNKNOWN]), min_size=1, max_size=4),
        inits=st.lists(st.sampled_from([p.NO_INIT] * 6 + [INIT] * 3 + [UNKNOWN]), min_size=4, max_size=4),
        send_blobs=st.sets(st.sampled_from([FN, FN2, INIT])),
        multi=st.booleans(),
        kind=st.sampled_from(["bytes", "zmq", "memoryview"]),
        then_pump=st.booleans(),
    )
    def submit(self, ident, fns, inits, send_blobs, multi, kind, then_pump=False):
        sim = self.live_origin(ident)
        blobs = {d: BLOBS[d] for d in sorted(send_blobs)}
        have = self.known_blobs | set(blobs)
        records = []
        for fn, init in zip(fns, inits):
            tid = self.next_id
            self.next_id += 1
            first = zmq.Frame(b"T%d" % tid) if kind == "zmq" else b"T%d" % tid
            frames = [first, b"buf%d" % tid] if multi else [first]
            records.append(p.TaskRecord(tid, fn, init, frames))
            if sim is not None:
                rejected = bool({fn, init} - {p.NO_INIT} - have)
                sub = Sub(ident, sim, tid, fn, init, frames, rejected)
                sim.outstanding[tid] = sub
                sim.submitted.add(tid)
                self.subs[(ident, tid)] = sub
                self.by_key[bytes(first)] = sub
        before = self.snapshot()
        self.send(ident, p.Submit(records, blobs), kind)
        if sim is None:
            assert self.snapshot() == before, "SUBMIT before HELLO was not dropped"
        else:
            self.known_blobs |= set(blobs)
        if then_pump:
            self.do_pump()

    @precondition(lambda self: self.busy_origins())
    @rule(data=st.data())
    def submit_duplicate(self, data):
        self.do_pump()  # so that no answer is waiting inside the broker
        if not self.busy_origins():
            return
        ident = data.draw(st.sampled_from(self.busy_origins()))
        sim = self.origins[ident]
        tid = data.draw(st.sampled_from(sorted(sim.outstanding)))
        before = self.snapshot()
        self.send(ident, p.Submit([p.TaskRecord(tid, FN, p.NO_INIT, [b"dup"])], {FN: BLOBS[FN]}))
        self.known_blobs.add(FN)
        assert self.snapshot()[:4] == before[:4], "duplicate id was not ignored"

    @precondition(lambda self: self.busy_origins())
    @rule(data=st.data(), bogus=st.booleans(), then_pump=st.booleans())
    def cancel(self, data, bogus, then_pump):
        self._ask_to_stop(data, bogus, then_pump, p.Cancel, "cancel_asked")

    @precondition(lambda self: self.busy_origins())
    @rule(data=st.data(), bogus=st.booleans(), then_pump=st.booleans())
    def kill(self, data, bogus, then_pump):
        """A forced cancel: the task ends CANCELLED wherever it is, unless its
        result crossed the KILL."""
        self._ask_to_stop(data, bogus, then_pump, p.Kill, "kill_asked")

    def _ask_to_stop(self, data, bogus, then_pump, message, asked):
        """An origin sends ``message`` (CANCEL or KILL) for some of its
        outstanding tasks (and, with ``bogus``, an id it never used)."""
        ident = data.draw(st.sampled_from(self.busy_origins()))
        sim = self.origins[ident]
        ids = data.draw(st.lists(st.sampled_from(sorted(sim.outstanding)), min_size=1, unique=True))
        if bogus:
            ids.append(self.next_id + 10**6)
        for tid in ids:
            if tid in sim.outstanding:
                setattr(sim.outstanding[tid], asked, True)
        self.send(ident, message(ids))
        if then_pump:
            self.do_pump()

    @precondition(lambda self: self.busy_workers())
    @rule(data=st.data(), rejoin=st.booleans())
    def worker_replaced(self, data, rejoin):
        """A worker stops tasks by replacing itself (a time limit, or KILLs
        it was sent): it answers them (ERROR for a timeout, CANCELLED for a
        kill), maybe some finished ones, then says BYE; its replacement
        joins on a new connection. The rest must run again, at no retry's
        cost, and everything be answered exactly once."""
        ident = data.draw(st.sampled_from(self.busy_workers()))
        w = self.workers[ident]
        held = sorted(w.held)
        stopped = data.draw(st.lists(st.sampled_from(held), min_size=1, unique=True))
        stopped += sorted(set(held) & w.to_kill - set(stopped))
        rest = sorted(set(held) - set(stopped))
        finished = data.draw(st.lists(st.sampled_from(rest), unique=True)) if rest else []
        records = self.answers(ident, stopped, error=True) + self.answers(ident, finished)
        self.send(ident, p.Results(records))
        self.bye(ident)
        if rejoin:
            self.hello(ident)
            self.credit(ident, data.draw(st.integers(1, 4)))
        self.do_pump()

    def bye(self, ident):
        self.send(ident, p.Bye())
        if ident in self.origins:
            self.origins[ident].alive = False
            self.origins[ident] = OriginSim(alive=False)
        else:
            self.worker_gone(ident)

    @rule(
        ident=st.sampled_from(WORKERS + WORKERS + ORIGINS + STRANGERS),
        count=st.integers(0, 6),
        then_pump=st.booleans(),
    )
    def credit(self, ident, count, then_pump=False):
        w = self.workers.get(ident)
        before = self.snapshot()
        self.send(ident, p.Credit(count))
        if w is not None and w.alive:
            w.credit += count
        else:
            assert self.snapshot() == before
        if then_pump:
            self.do_pump()

    @precondition(lambda self: self.busy_workers())
    @rule(data=st.data(), bogus=st.booleans())
    def worker_started(self, data, bogus):
        ident = data.draw(st.sampled_from(self.busy_workers()))
        w = self.workers[ident]
        ids = data.draw(st.lists(st.sampled_from(sorted(w.held)), unique=True))
        if bogus:
            ids.append(max(self.bids, default=0) + 1000)
        self.send(ident, p.Started(ids))

    @precondition(lambda self: self.busy_workers())
    @rule(
        data=st.data(),
        error=st.booleans(),
        bogus=st.booleans(),
        raced=st.booleans(),
        kind=st.sampled_from(["bytes", "zmq"]),
        then=st.sampled_from(["nothing", "pump", "origin leaves"]),
        credit=st.integers(0, 3),
    )
    def worker_results(self, data, error, bogus, raced, kind, then, credit):
        """A worker answers some tasks it holds. One it was told to CANCEL it
        answers CANCELLED, unless ``raced``: it had started it already. Its
        RESULTS may also say that others started, and ask for more."""
        ident = data.draw(st.sampled_from(self.busy_workers()))
        w = self.workers[ident]
        bids = data.draw(st.lists(st.sampled_from(sorted(w.held)), min_size=1, unique=True))
        self.held_origin = w.held[bids[0]].origin
        records = self.answers(ident, bids, error, raced)
        if bogus:
            records.append(p.ResultRecord(max(self.bids, default=0) + 1000, p.Status.OK, [b"bogus"]))
            records.append(p.ResultRecord(records[0].task_id, p.Status.OK, [b"repeat"]))
        held = sorted(w.held)
        started = data.draw(st.lists(st.sampled_from(held), unique=True)) if held else []
        w.credit += credit
        self.send(ident, p.Results(records, started, credit), kind)
        if then == "origin leaves":  # before its answer went out
            self.bye(self.held_origin)
        if then != "nothing":
            self.do_pump()

    def answers(self, ident, bids, error=False, raced=False):
        """Result records for tasks ``ident`` holds, which it forgets."""
        w = self.workers[ident]
        records = []
        for bid in bids:
            sub = w.held.pop(bid)
            self.forget_copy(ident, bid, sub)
            if (bid in w.to_cancel or bid in w.to_kill) and not raced:
                records.append(p.ResultRecord(bid, p.Status.CANCELLED, []))
                continue
            if error:
                records.append(p.ResultRecord(bid, p.Status.ERROR, [b"error:" + bytes(sub.frames[0])]))
            else:
                records.append(p.ResultRecord(bid, p.Status.OK, list(sub.frames)))
        return records

    @rule(dt=st.sampled_from([REVOKE_AFTER / 10, REVOKE_AFTER * 2, 10.0]), then_pump=st.booleans())
    def time_passes(self, dt, then_pump):
        """Tasks that wait too long at a worker may be moved (revoked)."""
        self.now += dt
        if then_pump:
            self.do_pump()

    @precondition(
        lambda self: any(o.alive for o in self.origins.values())
        and sum(w.alive for w in self.workers.values()) >= 2
    )
    @rule(
        data=st.data(),
        n=st.integers(2, 4),
        wait=st.booleans(),
        start=st.booleans(),
        leave=st.sampled_from([None, "loaded", "idle"]),
    )
    def strand(self, data, n, wait, start, leave):
        """Set up a stranding: one worker takes a batch, another finishes all
        it holds and asks for work; the batch's waiting tasks may then move."""
        origin = data.draw(st.sampled_from([i for i, o in self.origins.items() if o.alive]))
        alive = [i for i, w in self.workers.items() if w.alive]
        loaded = data.draw(st.sampled_from(alive))
        idle = data.draw(st.sampled_from([i for i in alive if i != loaded]))
        if self.workers[idle].held:
            self.send(idle, p.Results(self.answers(idle, sorted(self.workers[idle].held))))
        self.credit(loaded, n)
        self.submit(origin, [FN] * n, [p.NO_INIT] * 4, {FN}, False, "bytes", then_pump=True)
        if start and self.workers[loaded].held:
            self.send(loaded, p.Started(sorted(self.workers[loaded].held)[-1:]))
        if wait:
            self.now += REVOKE_AFTER * 2
        self.credit(idle, data.draw(st.integers(1, 3)))
        self.do_pump()
        if leave is not None:  # the worker with the stale copies, or the one with the live ones
            self.bye(loaded if leave == "loaded" else idle)
            self.do_pump()

    def loaded_workers(self):
        alive = [i for i, w in self.workers.items() if w.alive]
        return [i for i in alive if len(self.workers[i].held) >= 2] if len(alive) > 1 else []

    @precondition(lambda self: self.loaded_workers())
    @rule(data=st.data(), count=st.integers(1, 3), wait=st.booleans(), start=st.booleans())
    def idle_worker_asks_for_work(self, data, count, wait, start):
        """One worker finishes all it holds and asks for more while another
        holds tasks it has not got to: those may move to the idle one, after
        REVOKE_AFTER or at once if they wait behind a STARTED task."""
        loaded = data.draw(st.sampled_from(self.loaded_workers()))
        idle = data.draw(st.sampled_from([i for i, w in self.workers.items() if w.alive and i != loaded]))
        if self.workers[idle].held:
            self.send(idle, p.Results(self.answers(idle, sorted(self.workers[idle].held))))
        if start:
            self.send(loaded, p.Started(sorted(self.workers[loaded].held)[:1]))
        if wait:
            self.now += REVOKE_AFTER * 2
        self.credit(idle, count)
        self.do_pump()

    @precondition(lambda self: self.busy_workers())
    @rule(data=st.data(), rejoin=st.booleans())
    def busy_worker_leaves(self, data, rejoin):
        """A worker leaves (or restarts: HELLO again) while holding tasks: the
        broker must hand them to another worker."""
        ident = data.draw(st.sampled_from(self.busy_workers()))
        if rejoin:
            self.hello(ident)
        else:
            self.bye(ident)

    @precondition(lambda self: any(w.alive for w in self.workers.values()))
    @rule(data=st.data(), load=st.booleans(), deaths=st.integers(1, 3))
    def workers_die(self, data, load, deaths):
        """A worker process ends and its supervisor says so; with ``load`` it
        was given tasks first. Then, up to ``deaths`` times in all, a worker
        that got one of the tasks it held dies as well."""
        busy = self.busy_workers()
        alive = [i for i, w in self.workers.items() if w.alive]
        if busy and data.draw(st.integers(0, 3)):
            alive = busy
        ident = data.draw(st.sampled_from(sorted(alive)))
        origins = [i for i, o in self.origins.items() if o.alive]
        if load and origins:
            self.credit(ident, 2)
            origin = data.draw(st.sampled_from(origins))
            self.submit(origin, [FN, FN], [p.NO_INIT] * 4, {FN}, False, "bytes", then_pump=True)
        for _ in range(deaths):
            returncode = data.draw(st.sampled_from([0, 3, -9, -11]))
            lost = self.worker_dies(ident, data.draw(st.booleans()), returncode)
            now_at = [self.location.get(bytes(sub.frames[0])) for sub in lost]
            holders = sorted({where[0] for where in now_at if where})
            if not holders:
                break
            ident = data.draw(st.sampled_from(holders))

    def worker_dies(self, ident, last_words, returncode):
        """Worker ``ident`` ends and its supervisor says so: the broker loses
        it in the next pump, without waiting for heartbeats. With
        ``last_words``, RESULTS it sent before dying arrive in the same turn,
        before that pump, and settle their tasks. Returns the tasks whose
        live copy it held."""
        w = self.workers[ident]
        self.deaths += 1
        if last_words and w.held:
            self.send(ident, p.Results(self.answers(ident, sorted(w.held)[:1])))
        notice = p.WorkerExit.of(ident.decode(), w.pid, returncode, [f"last words of {w.pid}"])
        lost = []
        for bid, sub in w.held.items():
            # an upper bound: a copy answered elsewhere in this turn is not counted by the broker
            if self.location.get(bytes(sub.frames[0])) == (ident, bid):
                sub.losses += 1
                sub.last_exit = (notice.worker, notice.pid, notice.status, notice.signal)
                lost.append(sub)
        self.send(SUPERVISOR, notice)
        self.worker_gone(ident)  # dead, not to come back under this pid
        self.do_pump()
        return lost

    @rule(
        sender=st.sampled_from(ALL + [SUPERVISOR]),
        name=st.sampled_from([w.decode() for w in WORKERS] + ["s0", "o0", "nobody"]),
        pid_offset=st.sampled_from([0, 1, 1000]),
    )
    def notice_for_no_worker(self, sender, name, pid_offset):
        """A WORKER_EXIT that must change nothing: from a peer that is not a
        supervisor, or naming no connected worker (a wrong pid: a stale
        notice, or the replacement of a worker that had the name)."""
        w = self.workers.get(name.encode())
        pid = (w.pid or 1) + pid_offset if w is not None else 7
        if sender == SUPERVISOR and w is not None and w.alive and pid == w.pid:
            pid += 1  # that one would be a real notice
        before = self.snapshot()
        self.send(sender, p.WorkerExit(name, pid, 1, None, []))
        assert self.snapshot() == before and not self.state._exits, "a notice for no worker acted"

    @rule(ident=st.sampled_from(ALL), frames=st.lists(st.binary(max_size=48), max_size=5))
    def garbage(self, ident, frames):
        try:
            message = p.decode(frames)
        except Exception:
            pass
        else:
            if message.command in HANDLED:
                return  # random bytes that happen to be a meaningful message
        before = self.snapshot()
        self.state.receive(ident, frames)
        assert self.snapshot() == before

    @rule(
        ident=st.sampled_from(ALL),
        variant=st.sampled_from(
            ["hello", "welcome", "refuse", "tasks", "shutdown", "heartbeat", "started", "results",
             "credit", "cancel", "kill"]
        ),
        data=st.data(),
    )
    def misdirected(self, ident, variant, data):
        """Messages that must change nothing: a HELLO with a bad role, commands
        a broker does not take, and answers or credit from peers that have no
        business sending them (another worker's tasks, a departed incarnation's,
        an origin's)."""
        w = self.workers.get(ident)
        mine = set(w.held) if w is not None and w.alive else set()
        foreign = sorted(self.bids - mine)
        ids = data.draw(st.lists(st.sampled_from(foreign), max_size=4)) if foreign else []
        ids.append(max(self.bids, default=0) + 1000)
        if variant == "hello":
            role = data.draw(st.sampled_from([None, "broker", "link", "", "Worker", 7, ["origin"]]))
            message = p.Hello({} if role is None else {"role": role})
            self.expect[(ident, "refuse")] += 1
        elif variant == "welcome":
            message = p.Welcome({"broker": "x"})
        elif variant == "refuse":
            message = p.Refuse("no")
        elif variant == "tasks":
            message = p.Tasks([p.TaskRecord(ids[0], FN, p.NO_INIT, [b"t"])], {FN: b"x"})
        elif variant == "shutdown":
            message = p.Shutdown()
        elif variant == "heartbeat":
            message = p.Heartbeat()
        elif variant == "started":
            message = p.Started(ids)
        elif variant == "results":
            message = p.Results([p.ResultRecord(i, p.Status.OK, [b"not yours"]) for i in ids])
        elif variant == "credit":
            if w is not None and w.alive:
                return  # that one is real credit
            message = p.Credit(3)
        else:
            if ident in self.origins and self.origins[ident].alive:
                return  # that one is a real cancel
            message = p.Cancel(ids) if variant == "cancel" else p.Kill(ids)
        before = self.snapshot()
        self.send(ident, message)
        assert self.snapshot() == before

    # -- the end: workers answer everything ----------------------------------------------

    def teardown(self):
        if sys.exc_info()[0] is not None:
            return  # a step failed: do not bury its error under the drain's
        for _ in range(100):
            self.do_pump()
            if not self.state.queued and not any(w.held for w in self.workers.values() if w.alive):
                break
            if not any(w.alive for w in self.workers.values()):
                self.hello(WORKERS[0])
            for ident, w in self.workers.items():
                if w.alive:
                    self.credit(ident, 5)
                    self.do_pump()
                    w = self.workers[ident]
                    self.state.receive(ident, p.encode(p.Started(sorted(w.held))))
                    bids = sorted(w.held)
                    # answer CANCELs as asked, except every third: it had started
                    records = self.answers(ident, [b for b in bids if b % 3])
                    records += self.answers(ident, [b for b in bids if not b % 3], raced=True)
                    self.send(ident, p.Results(records))
        else:
            raise AssertionError("the federation did not drain")
        self.do_pump()
        s = self.state
        assert s.queued == 0 and s.load()["running"] == 0 and not s.tasks
        for ident, sim in self.origins.items():
            if sim.alive:
                assert not sim.outstanding, f"{ident}: lost {sorted(sim.outstanding)}"
        assert not any(self.expect.values()), self.expect
        shutdowns = [(i, p.decode(f)) for i, f in s.drop_all()]
        assert sorted(i for i, _ in shutdowns) == sorted(i for i, w in self.workers.items() if w.alive)
        assert all(isinstance(m, p.Shutdown) for _, m in shutdowns)


BrokerMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_broker_state_machine = BrokerMachine.TestCase


# -- versions -------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("python", "2.7"), ("futurefed", "0.0.1"), ("cloudpickle", "1.0.0"), ("protocol", "9"),
])
def test_a_peer_with_other_versions_is_refused_naming_both(broker, key, value):
    from futurefed._versions import local_versions

    theirs = {**local_versions(), key: value}
    broker.send(b"peer", p.Hello({"role": "worker", "versions": theirs}))
    refuse = only(broker.pump(), b"peer", p.Refuse)
    assert refuse.reason == (
        f"version mismatch: the peer has {key} {value}; this broker has {key} {local_versions()[key]}"
    )
    assert b"peer" not in broker.state.peers


@pytest.mark.parametrize("versions", ["3.11", ["x"], 7])
def test_versions_that_are_not_an_object_are_refused(broker, versions):
    broker.send(b"peer", p.Hello({"role": "origin", "versions": versions}))
    assert "not a JSON object" in only(broker.pump(), b"peer", p.Refuse).reason


def test_a_peer_with_our_versions_is_welcomed(broker):
    from futurefed._versions import local_versions

    broker.send(b"peer", p.Hello({"role": "worker", "versions": local_versions()}))
    assert isinstance(only(broker.pump(), b"peer"), p.Welcome)


def test_a_refusal_quoting_a_peers_unencodable_text_is_still_sent(broker):
    broker.send(b"peer", p.Hello({"role": "origin", "versions": {"protocol": "\ud800"}}))
    refuse = only(broker.pump(), b"peer", p.Refuse)
    assert "the peer has protocol ?" in refuse.reason
    assert b"peer" not in broker.state.peers


@pytest.mark.parametrize("version", [1, p.VERSION + 1, 255])
def test_a_peer_of_another_protocol_version_is_refused_in_its_own(broker, version):
    """Its HELLO is read whatever the version; the REFUSE is written in the
    peer's version, the only one it can read."""
    broker.send(b"old", p.Hello({"role": "worker", "name": "w"}, version))
    broker.send(b"older", p.Hello({"role": "worker", "versions": {"protocol": str(version)}},
                                  version))
    out = broker.state.pump()
    assert [ident for ident, _ in out] == [b"old", b"older"]
    for ident, frames in out:
        assert bytes(frames[0]) == struct.pack("!2sBB", p.MAGIC, version, p.Command.REFUSE)
        refuse = p.decode(frames)
        assert refuse.version == version
        assert f"the peer has protocol {version}" in refuse.reason
        assert f"this broker has protocol {p.VERSION}" in refuse.reason
        assert ident not in broker.state.peers
