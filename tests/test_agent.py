"""The origin's agent thread against a test that plays the broker
(``fakebroker.FakeBroker``): what it does with what the broker says, and
that no future it handed out is left unsettled when it ends."""

from __future__ import annotations

import operator

import pytest

from fedprocs import GUARD
from futurefed import protocol as p
from futurefed import serialize
from futurefed._agent import Agent, BrokenState
from futurefed.errors import FederationLost, InitializerFailed

FN = serialize.dump_function(operator.pow)
INIT = serialize.dump_function((print, ()))


def call(*args):
    return serialize.dumps((args, {}))


@pytest.fixture
def start_agent(fake_broker):
    """``start_agent(cls=Agent)``: an agent of class ``cls`` joined to the
    fake broker, welcomed; stopped and joined at teardown."""
    agents = []

    def start(cls=Agent):
        agent = cls(fake_broker.address, BrokenState(), heartbeat=GUARD)
        agent.start()
        agents.append(agent)
        ident, hello = fake_broker.receive_a(p.Hello)
        assert hello.meta["role"] == "origin"
        fake_broker.send(ident, p.Welcome({"broker": "fake"}))
        return agent, ident

    yield start
    for agent in agents:
        agent.stop()
        agent.join(GUARD)
        assert not agent.is_alive(), "the agent thread did not end"


def submitted_ids(fake_broker, count):
    """The task ids of the next ``count`` tasks the agent submits."""
    ids = []
    while len(ids) < count:
        _, submit = fake_broker.receive_a(p.Submit)
        ids += [task.task_id for task in submit.tasks]
    return ids


def test_a_failed_initializer_breaks_but_the_results_beside_it_stand(fake_broker, start_agent):
    agent, ident = start_agent()
    failed, fine = agent.submit(FN, INIT, call(2, 3)), agent.submit(FN, INIT, call(2, 4))
    first, second = submitted_ids(fake_broker, 2)
    error = serialize.dump_exception(ValueError("no such file"))
    fake_broker.send(ident, p.Results([
        p.ResultRecord(first, p.Status.INIT_FAILED, error),
        p.ResultRecord(second, p.Status.OK, serialize.dumps(16)),
    ]))
    assert fine.result(GUARD) == 16
    with pytest.raises(InitializerFailed):
        failed.result(GUARD)
    later = agent.submit(FN, INIT, call(2, 5))  # broken: failed, never sent
    with pytest.raises(InitializerFailed):
        later.result(GUARD)


class LateSubmission(Agent):
    """An agent to which a task comes after its last turn took the queued
    commands, as the thread is on its way out (a race a thread submitting
    during shutdown or a broken connection can hit)."""

    late = None

    def _serve(self, wake_rx):
        super()._serve(wake_rx)
        self.late = self.submit(FN, INIT, call(2, 6))


def test_a_task_submitted_as_the_agent_ends_fails_instead_of_hanging(start_agent):
    agent, _ = start_agent(LateSubmission)
    agent.stop()
    agent.join(GUARD)
    assert agent.late is not None
    with pytest.raises(RuntimeError, match="after shutdown"):
        agent.late.result(GUARD)
    with pytest.raises(RuntimeError, match="after shutdown"):
        agent.submit(FN, INIT, call(2, 7))


def test_after_a_refusal_an_ended_agent_raises_why(fake_broker):
    agent = Agent(fake_broker.address, BrokenState(), heartbeat=GUARD)
    agent.start()
    try:
        ident, _ = fake_broker.receive_a(p.Hello)
        fake_broker.send(ident, p.Refuse("version mismatch: the peer has protocol 1"))
        assert agent.answered.wait(GUARD)
    finally:
        agent.stop()
        agent.join(GUARD)
    with pytest.raises(FederationLost, match="refused us: version mismatch"):
        agent.submit(FN, INIT, call(2, 8))


def test_start_notices_in_results_mark_futures_running(fake_broker, start_agent):
    agent, ident = start_agent()
    running, done = agent.submit(FN, INIT, call(2, 2)), agent.submit(FN, INIT, call(2, 3))
    first, second = submitted_ids(fake_broker, 2)
    fake_broker.send(ident, p.Results([p.ResultRecord(second, p.Status.OK, serialize.dumps(8))],
                                      [first, second]))
    assert done.result(GUARD) == 8
    assert running.running()
    fake_broker.send(ident, p.Results([p.ResultRecord(first, p.Status.OK, serialize.dumps(4))]))
    assert running.result(GUARD) == 4
