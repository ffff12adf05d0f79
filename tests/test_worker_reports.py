"""What a real worker process says to its broker, read by a test that plays
the broker on a ROUTER socket: when a task ends and the next one starts, the
result, the start notice and the credit travel in one RESULTS (protocol.md
§4.2), so that the broker wakes once per task and not three times."""

from __future__ import annotations

import time

from futurefed import protocol as p
from futurefed import serialize


def sleeping_tasks(ids, seconds):
    digest, blob = serialize.dump_function(time.sleep)
    call = serialize.dumps(((seconds,), {}))
    return p.Tasks([p.TaskRecord(i, digest, p.NO_INIT, list(call)) for i in ids], {digest: blob})


def test_a_task_end_and_the_next_start_travel_in_one_results(federation, fake_broker):
    federation.worker("w", fake_broker.info, wait=False)
    ident, hello = fake_broker.receive()
    assert isinstance(hello, p.Hello) and hello.meta["role"] == "worker"
    fake_broker.send(ident, p.Welcome({"broker": "fake"}))
    # three tasks of 50 ms, all at once: each ends while the next is queued
    fake_broker.send(ident, sleeping_tasks([1, 2, 3], 0.05))
    reports = []
    finished = set()
    while finished != {1, 2, 3}:
        sender, message = fake_broker.receive()
        assert sender == ident
        assert not isinstance(message, p.Started), "a start notice outside a RESULTS"
        if isinstance(message, p.Results):
            reports.append(([r.task_id for r in message.results], message.started))
            for record in message.results:
                assert record.status is p.Status.OK, serialize.loads(record.frames[1:])
                finished.add(record.task_id)
    assert reports == [([], [1]), ([1], [2]), ([2], [3]), ([3], [])], reports


def test_a_result_with_nothing_queued_leaves_before_the_next_task_comes(federation, fake_broker):
    """The latency path: nothing to start after the task, so its result is
    not held back for a start notice."""
    federation.worker("w", fake_broker.info, wait=False)
    ident, _ = fake_broker.receive()
    fake_broker.send(ident, p.Welcome({"broker": "fake"}))
    fake_broker.send(ident, sleeping_tasks([7], 0.0))
    while True:
        _, message = fake_broker.receive()
        if isinstance(message, p.Results) and message.results:
            break
    assert [r.task_id for r in message.results] == [7]
