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


def test_a_fresh_greenlet_unspawned_goes_to_the_pool_unused(hub):
    ran = []
    glet = hub.spawn(lambda: ran.append(1), "never")
    hub.unspawn(glet)
    hub.run_ready()
    assert ran == [] and glet.context is None  # its task never ran
    assert hub.spawn(lambda: ran.append(2), "next") is glet
    hub.run_ready()
    assert ran == [2]


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


# -- found by review: stale wake-ups, other threads, the hub waiting, leaks ------------


class _NoCancel:
    def cancel_futures(self, fs, force=False):
        pass


def test_a_wake_queued_before_a_stop_is_dropped_and_the_greenlet_serves_on(hub):
    """The wait's future settles (its wake is queued), then the task is
    stopped in the same turn and catches the GreenletExit: the queued wake
    must not reach the greenlet, back in the pool, as if it were a task."""
    future = green.GreenFuture(1, _NoCancel())
    hub.install()
    try:
        caught = []

        def task():
            try:
                future.result()
            except greenlet.GreenletExit:
                caught.append(True)  # user code that swallows everything

        glet = hub.spawn(task, "task")
        hub.run_ready()
        future.set_result(1)  # wake queued
        hub.throw(glet, greenlet.GreenletExit())
        assert caught == [True] and not hub.ready
        hub.run_ready()
        ran = []
        assert hub.spawn(lambda: ran.append(1), "next") is glet  # pooled, and sound
        hub.run_ready()
        assert ran == [1]
    finally:
        hub.uninstall()


def test_a_stopped_task_that_waits_again_is_not_resumed_by_the_old_wake(hub):
    first, second = green.GreenFuture(1, _NoCancel()), green.GreenFuture(2, _NoCancel())
    hub.install()
    try:
        log = []

        def task():
            try:
                first.result()
            finally:
                log.append(second.result())  # clean-up that waits

        glet = hub.spawn(task, "task")
        hub.run_ready()
        first.set_result(1)
        hub.throw(glet, greenlet.GreenletExit())  # it parks again, on second
        hub.run_ready()
        assert log == [] and hub.parked == 1  # still waiting for second
        second.set_result(2)
        hub.run_ready()
        assert log == [2] and glet.dead
    finally:
        hub.uninstall()


def test_a_wake_from_another_thread_goes_through_the_hub(hub):
    """Another thread (a thread pool settling a future a task waits on)
    does not touch the hub's queue: it hands the wake-up over and wakes the
    hub's poll through the pipe."""
    import select
    import threading

    waiter = Waiter(hub)
    woken = []
    hub.spawn(lambda: woken.append(waiter.wait(None)), "task")
    hub.run_ready()
    thread = threading.Thread(target=waiter.wake)
    thread.start()
    thread.join()
    assert not hub.ready and not woken
    assert select.select([hub.wake_r], [], [], 60)[0] == [hub.wake_r]
    hub.run_calls()
    hub.run_ready()
    assert woken == [True]
    hub.close()


def test_the_hub_itself_cannot_wait_on_a_pending_future(hub):
    from concurrent.futures import TimeoutError as FuturesTimeout

    future = green.GreenFuture(1, _NoCancel())
    hub.install()
    try:
        with pytest.raises(RuntimeError, match="cannot wait on a pending future"):
            future.result()
        with pytest.raises(FuturesTimeout):
            future.result(timeout=0)  # no wait: as the stdlib's
        future.set_result(3)
        assert future.result() == 3
    finally:
        hub.uninstall()


def test_cancelled_timers_let_go_of_what_they_refer_to(hub):
    import gc
    import weakref

    class Payload:
        pass

    keep = hub.call_later(3600, lambda: None)  # a long wait at the heap's top
    refs = []
    for _ in range(2 * green.MIN_PURGE):
        payload = Payload()
        refs.append(weakref.ref(payload))
        hub.call_later(7200, lambda payload=payload: payload).cancel()
    del payload
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(hub._timers) < green.MIN_PURGE  # swept, though behind ``keep``
    assert not keep.cancelled


def test_an_idle_greenlet_keeps_nothing_of_its_last_task(hub):
    import gc
    import weakref

    class Argument:
        pass

    argument = Argument()
    ref = weakref.ref(argument)
    hub.spawn(lambda arg: None, "task", argument)
    hub.run_ready()
    del argument
    gc.collect()
    assert ref() is None and len(hub._idle) == 1


def test_a_task_abandoned_with_its_broker_that_waits_again_is_woken():
    """The broker is lost while a task waits on a nested future; unwinding,
    it waits again (a nested executor's shutdown): failing the lost
    session's futures must wake it, and that wake-up is kept."""
    from futurefed.executor import FederatedExecutor
    from futurefed.worker.loop import Worker

    worker = Worker("tcp://127.0.0.1:1", "w")  # never connected
    worker.hub.install()
    try:
        unwound = []

        def task():
            try:
                with FederatedExecutor() as executor:
                    executor.submit(abs, -1).result()
            except BaseException as exc:
                unwound.append(type(exc).__name__)
                raise

        from futurefed import protocol

        record = type("Record", (), {"task_id": 7, "init": protocol.NO_INIT})()
        glet = worker.hub.spawn(task, record)
        worker._task_glets.add(glet)
        worker.hub.run_ready()
        assert worker.hub.parked == 1
        worker._abandon_session()
        worker.hub.run_ready()
        assert glet.dead and worker.hub.parked == 0
        assert unwound == ["GreenletExit"]
    finally:
        worker.hub.uninstall()
        worker.hub.close()
