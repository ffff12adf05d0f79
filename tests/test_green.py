"""The worker's greenlet hub on its own: tasks, parking, the greenlet pool."""

from __future__ import annotations

import greenlet
import pytest

from futurefed.worker import green
from futurefed.worker.green import Hub, Waiter


@pytest.fixture
def hub():
    return Hub()


def test_a_greenlet_whose_task_ended_runs_the_next_task(hub):
    ran = []
    first = hub.spawn(lambda: ran.append(greenlet.getcurrent()), "first")
    hub.run_ready()
    second = hub.spawn(lambda: ran.append(greenlet.getcurrent()), "second")
    assert second is first  # from the pool, not a new greenlet
    assert second.context == "second"
    hub.run_ready()
    assert ran == [first, first] and first.context is None and not first.dead


def test_tasks_parked_at_once_get_greenlets_of_their_own(hub):
    waiters = []

    def parks():
        waiter = Waiter(hub)
        waiters.append(waiter)
        waiter.wait(None)

    glets = [hub.spawn(parks, i) for i in range(3)]
    hub.run_ready()
    assert len(set(glets)) == 3 and hub.parked == 3
    for waiter in waiters:
        waiter.wake()
    hub.run_ready()
    assert hub.parked == 0 and all(glet.context is None for glet in glets)


def test_a_stopped_task_ends_its_greenlet_and_a_late_wake_is_ignored(hub):
    waiter = Waiter(hub)
    stopped = hub.spawn(lambda: waiter.wait(None), "stopped")
    hub.run_ready()
    hub.throw(stopped, greenlet.GreenletExit())
    assert stopped.dead
    other_waiter = Waiter(hub)
    woken = []
    other = hub.spawn(lambda: woken.append(other_waiter.wait(None)), "other")
    assert other is not stopped  # a dead greenlet never returns to the pool
    hub.run_ready()
    waiter.wake()  # the stopped task's wait: it must not resume anything
    assert not hub.ready
    other_waiter.wake(False)
    hub.run_ready()
    assert woken == [False]


def test_a_wait_ended_by_an_exception_cannot_resume_the_greenlets_next_task(hub):
    class Stop(Exception):
        pass

    waiter = Waiter(hub)
    caught = []

    def waits_and_survives():
        try:
            waiter.wait(None)
        except Stop:
            caught.append(True)

    glet = hub.spawn(waits_and_survives, "first")
    hub.run_ready()
    hub.throw(glet, Stop())  # like a time limit: the task handles it and ends
    assert caught == [True] and glet.context is None and not glet.dead
    second_waiter = Waiter(hub)
    results = []
    assert hub.spawn(lambda: results.append(second_waiter.wait(None)), "second") is glet
    hub.run_ready()
    waiter.wake()  # stale: the first task's wait is over
    assert not hub.ready
    second_waiter.wake()
    hub.run_ready()
    assert results == [True]


def test_an_unspawned_task_never_runs_and_its_greenlet_is_reused(hub):
    hub.run_ready()
    pooled = hub.spawn(lambda: None, "warm")
    hub.run_ready()
    ran = []
    glet = hub.spawn(lambda: ran.append("dropped"), "dropped")
    assert glet is pooled
    hub.unspawn(glet)
    hub.run_ready()
    assert ran == [] and glet.context is None
    assert hub.spawn(lambda: ran.append("next"), "next") is glet
    hub.run_ready()
    assert ran == ["next"]


def test_a_fresh_greenlet_unspawned_is_simply_dropped(hub):
    ran = []
    glet = hub.spawn(lambda: ran.append(1), "never")
    hub.unspawn(glet)
    hub.run_ready()
    assert ran == [] and not glet  # never started
    assert hub.spawn(lambda: None, "next") is not glet


def test_the_pool_keeps_at_most_max_idle_greenlets(hub):
    waiters = [Waiter(hub) for _ in range(green.MAX_IDLE + 5)]
    glets = [hub.spawn(waiter.wait, i, None) for i, waiter in enumerate(waiters)]
    hub.run_ready()
    for waiter in waiters:
        waiter.wake()
    hub.run_ready()
    assert sum(1 for glet in glets if glet.dead) == 5
    assert len({hub.spawn(lambda: None, i) for i in range(green.MAX_IDLE)} & set(glets)) \
        == green.MAX_IDLE
