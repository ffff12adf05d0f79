"""Lending and borrowing between brokers (docs/federation.md), sans I/O: two
or more BrokerStates whose outputs the test carries between them."""

from __future__ import annotations

import pytest

from futurefed import protocol as p
from futurefed.broker.state import BORROW_TIMEOUT

from test_broker_state import BLOBS, Broker, ok, only, task, to

A_TASK, A_META = "tcp://a:1", "tcp://a:2"
B_TASK, B_META = "tcp://b:1", "tcp://b:2"
LINK = b"link:" + A_TASK.encode()  # B's link to A
B_AT_A = b"B-at-A"  # B's link as A's ROUTER sees it


def make(name, task, meta):
    broker = Broker(name)
    broker.state.address, broker.state.meta_address = task, meta
    return broker


@pytest.fixture
def pair():
    """Lender A (origin ``o``, no worker) and borrower B (worker ``w``), with
    B's link to A established both ways."""
    a, b = make("A", A_TASK, A_META), make("B", B_TASK, B_META)
    a.connect(b"o", "origin")
    b.connect(b"w", "worker", host="hb")
    b.state.add_link(LINK, A_TASK, A_META)
    carry(b, a, [p.Hello])
    carry(a, b, [p.Welcome])
    return a, b


def carry(src, dst, expect=None):
    """Pump ``src`` and deliver what it sends over the link (B -> A arrives
    from ``B_AT_A``, A -> B through ``LINK``); return the messages carried.
    Anything else ``src`` sends would be lost here, so there must be none."""
    carried = []
    for ident, frames in src.state.pump():
        if src.state.address == B_TASK and ident == LINK:
            dst.state.receive(B_AT_A, frames)
        elif src.state.address == A_TASK and ident == B_AT_A:
            dst.state.receive(LINK, frames)
        else:
            raise AssertionError(f"{src.state.name} also sent {p.decode(frames)} to {ident!r}")
        carried.append(p.decode(frames))
    if expect is not None:
        assert [type(m) for m in carried] == expect, carried
    return carried


def publish(src, dst):
    """``src``'s next LOAD, as ``dst``'s SUB receives it."""
    meta = src.state.meta()
    dst.state.on_load(p.decode(p.encode(p.Load(meta))).meta)
    return meta


def test_link_says_hello_as_a_broker_and_learns_the_peer(pair):
    a, b = pair
    assert a.state.peers[B_AT_A].role == "broker"
    assert a.state.brokers == {B_TASK: B_META}  # A will connect back to B
    assert a.state.take_new_brokers() == [(B_TASK, B_META)]
    assert b.state.peers[LINK].name == "A"


def test_idle_borrower_asks_for_what_its_workers_can_take(pair):
    a, b = pair
    a.submit(b"o", [task(i) for i in range(1, 11)], BLOBS)
    assert a.pump() == []  # no worker at A: all 10 stay queued
    b.credit(b"w", 3)
    assert b.pump() == []  # nothing known about A's load yet
    publish(a, b)
    (request,) = carry(b, a, [p.Credit])
    assert request.count == 3  # min(idle credit, A's queue)
    (tasks,) = carry(a, b, [p.Tasks])
    assert [t.frames[0] for t in tasks.tasks] == [b"call-1", b"call-2", b"call-3"]
    assert a.load()["lent"] == 3 and a.load()["queued"] == 7
    # B queued them as if submitted by the link, and hands them to its worker
    out = b.pump()
    given = only(out, b"w", p.Tasks).tasks
    assert len(given) == 3 and set(given[0].frames[0:1]) == {b"call-1"}
    # results flow back through B to A's origin, under the origin's ids
    b.results(b"w", *[ok(t.task_id, t.frames[0]) for t in given])
    (results,) = carry(b, a, [p.Results])
    assert sorted(bytes(r.frames[0]) for r in results.results) == [b"call-1", b"call-2", b"call-3"]
    out = a.pump()
    assert sorted(r.task_id for r in only(out, b"o", p.Results).results) == [1, 2, 3]
    assert a.load()["lent"] == 0 and a.load()["done"] == 3


def test_a_request_is_answered_once_even_with_nothing(pair):
    a, b = pair
    b.credit(b"w", 2)
    a.submit(b"o", [task(1)], BLOBS)
    publish(a, b)
    a.send(b"o", p.Cancel([1]))  # A's queue empties before B's request lands
    assert only(a.pump(), b"o", p.Results).results[0].status is p.Status.CANCELLED
    carry(b, a, [p.Credit])
    (answer,) = carry(a, b, [p.Tasks])
    assert answer.tasks == []
    assert b.state.peers[LINK].asked == 0
    # the answer was empty: no new request on the same (stale) load
    assert carry(b, a) == []
    # a request lapses with the answer: A keeps no standing credit for B
    a.submit(b"o", [task(2)], BLOBS)
    assert a.pump() == []
    assert a.load()["queued"] == 1
    # fresh load: B asks again and gets it
    publish(a, b)
    carry(b, a, [p.Credit])
    (tasks,) = carry(a, b, [p.Tasks])
    assert [t.frames[0] for t in tasks.tasks] == [b"call-2"]


def test_one_request_at_a_time_and_lapsed_requests(pair):
    a, b = pair
    a.submit(b"o", [task(i) for i in range(1, 6)], BLOBS)
    b.credit(b"w", 2)
    publish(a, b)
    carry(b, a, [p.Credit])
    publish(a, b)
    b.credit(b"w", 1)
    assert b.pump() == []  # still waiting for the answer
    b.tick(BORROW_TIMEOUT * 2)  # the answer never came (A is gone?)
    (request,) = carry(b, a, [p.Credit])
    assert request.count == 3


def test_local_workers_come_before_borrowers(pair):
    a, b = pair
    a.connect(b"wa", "worker")
    a.submit(b"o", [task(i) for i in range(1, 5)], BLOBS)
    a.send(B_AT_A, p.Credit(4))
    a.credit(b"wa", 3)
    out = a.pump()
    assert len(only(out, b"wa", p.Tasks).tasks) == 3
    assert len(only(out, B_AT_A, p.Tasks).tasks) == 1


def test_borrower_leaving_returns_its_tasks(pair):
    a, b = pair
    a.submit(b"o", [task(1), task(2)], BLOBS)
    a.send(B_AT_A, p.Credit(2))
    assert len(only(a.pump(), B_AT_A, p.Tasks).tasks) == 2
    a.send(B_AT_A, p.Bye())
    assert a.load()["queued"] == 2 and a.load()["lent"] == 0


def test_cancel_through_a_link_is_answered_there(pair):
    a, b = pair
    a.submit(b"o", [task(1), task(2)], BLOBS)
    a.send(B_AT_A, p.Credit(2))
    (tasks,) = [m for i, m in a.pump() if i == B_AT_A]
    b.state.receive(LINK, p.encode(tasks))  # B has no worker credit: both wait at B
    a.send(b"o", p.Bye())  # the origin leaves: A cancels what it lent
    carry(a, b, [p.Cancel])
    (answer,) = carry(b, a, [p.Results])
    assert {r.status for r in answer.results} == {p.Status.CANCELLED}
    assert b.load()["queued"] == 0


def test_meta_messages_reveal_new_peers():
    a = make("A", A_TASK, A_META)
    c = make("C", "tcp://c:1", "tcp://c:2")
    c.state.learn(B_TASK, B_META)
    c.state.take_new_brokers()
    meta = c.state.meta()
    assert meta["peers"] == [{"task": B_TASK, "meta": B_META}]
    a.state.on_load(meta)
    assert sorted(a.state.take_new_brokers()) == [(B_TASK, B_META), ("tcp://c:1", "tcp://c:2")]
    a.state.on_load(meta)
    assert a.state.take_new_brokers() == []  # each learned once
    a.state.on_load({**meta, "peers": [{"task": A_TASK, "meta": A_META}]})
    assert a.state.take_new_brokers() == []  # never ourselves


@pytest.mark.parametrize("meta", [
    {"task": 7}, {"task": "x" * 400}, {"peers": "nope"}, {"peers": [1, None, {"task": []}]},
    {"task": B_TASK, "seq": "high", "queued": "lots"},
])
def test_malformed_load_is_harmless(meta):
    a = make("A", A_TASK, A_META)
    a.state.on_load(meta)
    assert all(task.startswith("tcp://") for task, _ in a.state.take_new_brokers())


def test_broker_hello_naming_ourselves_is_refused():
    a = make("A", A_TASK, A_META)
    a.send(b"me", p.Hello({"role": "broker", "name": "A", "task": A_TASK, "meta": A_META}))
    assert isinstance(only(a.pump(), b"me"), p.Refuse)
    assert b"me" not in a.state.peers


def test_a_broker_may_not_submit():
    a = make("A", A_TASK, A_META)
    a.send(b"peer", p.Hello({"role": "broker", "name": "B", "task": B_TASK, "meta": B_META}))
    a.pump()
    a.submit(b"peer", [task(1)], BLOBS)
    assert a.load()["queued"] == 0


def test_tasks_stranded_at_a_busy_worker_are_lent(pair):
    # A's worker took 4 tasks at once (its credit after fast tasks) and runs
    # the first for long: the 3 behind it are stealable after REVOKE_AFTER,
    # and go to the borrower, not back to the worker that still has credit.
    from futurefed.broker.state import REVOKE_AFTER

    a, b = pair
    a.connect(b"wa", "worker")
    a.credit(b"wa", 6)
    a.submit(b"o", [task(i) for i in range(1, 5)], BLOBS)
    given = only(a.pump(), b"wa", p.Tasks).tasks
    assert len(given) == 4
    a.send(b"wa", p.Started([given[0].task_id]))
    assert a.pump() == [(b"o", p.Started([1]))]
    assert a.state.stealable() == 0  # not yet stranded
    a.tick(REVOKE_AFTER * 2)
    assert a.state.stealable() == 3
    b.credit(b"w", 2)
    publish(a, b)
    (request,) = carry(b, a, [p.Credit])
    assert request.count == 2
    out = a.pump()
    lent = only(out, B_AT_A, p.Tasks).tasks
    assert sorted(t.frames[0] for t in lent) == [b"call-2", b"call-3"]
    assert sorted(only(out, b"wa", p.Cancel).ids) == sorted(t.task_id for t in given[1:3])
    assert to(out, b"wa") == [p.Cancel(only(out, b"wa", p.Cancel).ids)]  # nothing sent back
    assert a.state.stealable() == 1


def test_a_lost_record_crosses_brokers_unchanged(pair):
    """A lends a task to B; B's worker dies and its supervisor says how; B
    (no retries) fails the task with LOST, and A hands B's record to the
    origin as it is: the exit information reaches the origin."""
    import json

    a, b = pair
    b.state.max_retries = 0
    b.connect(b"s", "supervisor", host="hb")
    b.connect(b"w2", "worker", host="hb", pid=22)
    a.submit(b"o", [task(1)], BLOBS)
    b.credit(b"w2", 1)
    b.pump()
    publish(a, b)
    carry(b, a, [p.Credit])
    carry(a, b, [p.Tasks])
    assert len(only(b.pump(), b"w2", p.Tasks).tasks) == 1
    b.send(b"s", p.WorkerExit.of("w2", 22, -11, ["Fatal Python error: Segmentation fault"]))
    (results,) = carry(b, a, [p.Results])
    (record,) = only(a.pump(), b"o", p.Results).results
    assert record.task_id == 1 and record.status is p.Status.LOST
    assert record.frames[0] is results.results[0].frames[0]  # forwarded, not rebuilt
    info = json.loads(bytes(record.frames[0]))
    assert (info["worker"], info["host"], info["pid"]) == ("w2", "hb", 22)
    assert (info["status"], info["signal"]) == (None, 11)
    assert info["stderr"] == ["Fatal Python error: Segmentation fault"]


# -- where workers go if their broker is lost ---------------------------------------------


def test_a_workers_welcome_names_the_peers_its_broker_knows(pair):
    a, b = pair
    a.connect(b"wa", "worker")  # A learnt B from the HELLO of B's link
    assert a.welcome().peers == [B_TASK]
    b.connect(b"w2", "worker")  # B knows A: it links to it
    assert b.welcome().peers == [A_TASK]


def test_a_broker_that_knows_no_peer_names_none():
    a = make("A", A_TASK, A_META)
    a.connect(b"wa", "worker")
    assert "peers" not in a.welcome().meta


def test_workers_are_told_of_peers_learnt_later():
    """Each worker gets a fresh WELCOME at the next liveness tick after the
    list changed, and only then; origins and peer brokers get none."""
    b = Broker("B", heartbeat=1.0)
    b.state.address, b.state.meta_address = B_TASK, B_META
    b.connect(b"o", "origin")
    b.connect(b"w1", "worker")
    b.connect(b"w2", "worker")
    b.tick(0.3)
    assert b.pump() == []
    b.state.learn(A_TASK, A_META)
    b.state.on_load({"task": A_TASK, "seq": 1, "peers": [{"task": "tcp://c:1"}, {"task": B_TASK}]})
    assert b.pump() == []  # not before the next liveness tick
    b.tick(0.3)
    out = b.pump()
    assert sorted(ident for ident, _ in out) == [b"w1", b"w2"]
    assert {m.peers == [A_TASK, "tcp://c:1"] for _, m in out} == {True}
    assert all(isinstance(m, p.Welcome) and m.meta["broker"] == "B" for _, m in out)
    b.tick(0.3)
    assert b.pump() == []  # told already
    b.state.learn("tcp://d:1", None)
    assert b.pump() == []  # not before the next tick
    b.tick(0.3)
    welcomes = [(i, m) for i, m in b.pump() if isinstance(m, p.Welcome)]  # (and heartbeats)
    assert sorted(i for i, _ in welcomes) == [b"w1", b"w2"]
    assert [m.peers for _, m in welcomes] == [[A_TASK, "tcp://c:1", "tcp://d:1"]] * 2


def test_peers_in_a_welcome_are_addresses_a_worker_can_use_and_few_enough():
    b = make("B", B_TASK, B_META)
    b.state.learn("inproc://nope", None)
    for i in range(p.MAX_WELCOME_PEERS + 10):
        b.state.learn(f"tcp://h{i}:1", None)
    peers = b.state.peer_addresses()
    assert peers == [f"tcp://h{i}:1" for i in range(p.MAX_WELCOME_PEERS)]
    b.connect(b"w", "worker")
    assert b.welcome().peers == peers


def test_a_kill_of_a_lent_task_reaches_the_borrowers_worker(pair):
    """A forced cancel follows the task: A sends KILL on B's link, B to its
    worker; the worker's CANCELLED goes back the same way."""
    a, b = pair
    a.submit(b"o", [task(1), task(2)], BLOBS)
    b.credit(b"w", 2)
    publish(a, b)
    carry(b, a, [p.Credit])
    carry(a, b, [p.Tasks])
    given = {t.frames[0]: t.task_id for t in only(b.pump(), b"w", p.Tasks).tasks}
    a.send(b"o", p.Kill([2]))
    (kill,) = carry(a, b, [p.Kill])
    assert len(kill.ids) == 1
    assert only(b.pump(), b"w", p.Kill).ids == [given[b"call-2"]]
    b.results(b"w", p.ResultRecord(given[b"call-2"], p.Status.CANCELLED, []))
    carry(b, a, [p.Results])
    assert only(a.pump(), b"o", p.Results).results == [p.ResultRecord(2, p.Status.CANCELLED, [])]


# -- what a peer tells us cannot hurt us -------------------------------------------------


def test_only_addresses_we_can_connect_to_are_learnt():
    b = make("B", B_TASK, B_META)
    b.state.on_load({"task": A_TASK, "meta": A_META, "seq": 1, "peers": [
        {"task": "tcp://\ud800:1"},  # a lone surrogate: not even encodable
        {"task": "bogus://x", "meta": "tcp://c:2"},
        {"task": "tcp://c d:1"},
        {"task": "tcp://ok:1", "meta": "tcp://\ud800:2"},
        {"task": "ipc:///tmp/e"},
    ]})
    assert b.state.take_new_brokers() == [(A_TASK, A_META), ("tcp://ok:1", None),
                                          ("ipc:///tmp/e", None)]


def test_a_welcome_naming_a_bad_meta_address_is_ignored(pair):
    a, b = pair
    b.state.receive(LINK, p.encode(p.Welcome({"broker": "A", "meta": "bogus://x"})))
    assert b.state.take_new_brokers() == []
    assert b.state.peers[LINK].meta_address == A_META


def test_at_most_max_peers_brokers_are_learnt():
    from futurefed.broker.state import MAX_PEERS

    b = make("B", B_TASK, B_META)
    for round_ in range(3):
        b.state.on_load({"task": A_TASK, "seq": round_, "peers": [
            {"task": f"tcp://h{round_}-{i}:1"} for i in range(MAX_PEERS)
        ]})
    assert len(b.state.brokers) == MAX_PEERS
    assert len(b.state.take_new_brokers()) == MAX_PEERS


def test_a_load_fits_its_limit_however_long_the_names_it_lists():
    """A LOAD lists as many peers and hosts as fit in MAX_JSON_BYTES: long
    addresses and long non-ASCII host names (6 bytes each in JSON) too."""
    from futurefed.broker.state import MAX_PEERS

    b = make("B", B_TASK, B_META)
    for i in range(MAX_PEERS):
        b.state.learn(f"tcp://{'h' * 280}{i:03d}:1", f"tcp://{'m' * 280}{i:03d}:2")
    for i in range(MAX_PEERS):
        b.connect(b"w%d" % i, "worker", host="\u00e9" * 190 + f"{i:03d}")
    meta = b.state.meta()
    frames = p.encode(p.Load(meta))
    assert len(bytes(frames[1])) <= p.MAX_JSON_BYTES
    assert 0 < len(meta["peers"]) < MAX_PEERS and 0 < len(meta["hosts"]) < MAX_PEERS
    assert meta["workers"] == MAX_PEERS  # the counts are whole


# -- a lender that stays away --------------------------------------------------------------


def test_a_lost_lender_is_greeted_less_and_less_often_and_its_link_reset():
    """Lost, a lender is sent HELLO again after 3, 6, 12... heartbeats (at
    most LINK_RETRY_MAX s), nothing in between, and each time the link's
    DEALER is to be opened afresh so that nothing piles up for it; a word
    from it makes it an ordinary peer again."""
    from futurefed.broker.state import LINK_RETRY_MAX

    b = Broker("B", heartbeat=1.0)
    b.state.address, b.state.meta_address = B_TASK, B_META
    b.state.add_link(LINK, A_TASK, A_META)
    assert [type(m) for _, m in b.pump()] == [p.Hello]
    hellos = []
    for _ in range(int(400 / 0.25)):  # 400 s of silence, at the liveness tick
        b.tick(0.25)
        out = [m for _, m in b.pump()]
        if not hellos and out == [p.Heartbeat()]:
            continue  # not lost yet
        assert all(isinstance(m, p.Hello) for m in out), out  # no heartbeat once lost
        if out:
            hellos.append(b.state.clock())
            assert b.state.take_link_resets() == [LINK]
        else:
            assert b.state.take_link_resets() == []
    gaps = [round(later - earlier) for earlier, later in zip([1000.0] + hellos, hellos)]
    assert gaps[:6] == [3, 6, 12, 24, 48, LINK_RETRY_MAX]
    assert set(gaps[5:]) == {LINK_RETRY_MAX}
    b.state.receive(LINK, p.encode(p.Welcome({"broker": "A"})))
    b.tick(1.0)
    assert [type(m) for _, m in b.pump()] == [p.Heartbeat]  # an ordinary link again
