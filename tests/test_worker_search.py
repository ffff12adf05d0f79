"""How a worker chooses the broker to try next (futurefed/worker/search.py),
on a clock that moves only when told."""

from __future__ import annotations

import pytest

from futurefed.worker.search import BrokerSearch, candidates

A, B, C, D = "tcp://a:1", "tcp://b:1", "tcp://c:1", "tcp://d:1"
ATTEMPT = 0.6


def test_candidates_leave_out_the_lost_broker_by_every_name():
    assert candidates([B, "tcp://127.0.0.1:9"], [A, B, C], ["tcp://127.0.0.1:9"], 0) == [A, C]


@pytest.mark.parametrize(
    "start, order", [(0, [A, C, D]), (1, [C, D, A]), (2, [D, A, C]), (5, [D, A, C])]
)
def test_candidates_rotate_the_peers_then_add_the_fallbacks(start, order):
    assert candidates([B], [A, C, D], [D, "tcp://e:1"], start) == order + ["tcp://e:1"]


def test_candidates_may_be_none():
    assert candidates([A], [], [], 7) == []
    assert candidates([A], [A], [A], 7) == []


def test_a_search_tries_each_in_turn_each_for_one_attempt():
    search = BrokerSearch([A, B, C], 0.0, timeout=10.0, attempt=ATTEMPT)
    assert search.start(0.0) == A
    assert search.start(0.1) is None  # one attempt at a time
    assert search.timeout(0.1) == pytest.approx(0.5)
    assert not search.attempt_over(0.5)
    assert search.attempt_over(0.6)
    search.give_up_current(0.6)
    assert search.start(0.6) == B
    assert search.connection_failed(0.61)  # refused: on to the next at once
    assert search.start(0.61) == C
    assert search.tried == [A, B, C]


def test_a_new_round_waits_until_one_attempt_after_the_last_began():
    search = BrokerSearch([A, B], 0.0, timeout=10.0, attempt=ATTEMPT)
    assert search.start(0.0) == A
    assert search.connection_failed(0.01)
    assert search.start(0.01) == B
    assert search.connection_failed(0.02)
    assert search.start(0.02) is None  # both refused at once: not again so soon
    assert search.timeout(0.02) == pytest.approx(0.58)
    assert search.start(0.6) == A
    assert search.tried == [A, B]


def test_a_round_of_silent_brokers_is_followed_by_the_next_at_once():
    search = BrokerSearch([A, B], 0.0, timeout=10.0, attempt=ATTEMPT)
    search.start(0.0)
    search.give_up_current(0.6)
    search.start(0.6)
    search.give_up_current(1.2)
    assert search.start(1.2) == A


def test_a_broker_that_refuses_us_is_not_tried_again():
    search = BrokerSearch([A, B], 0.0, timeout=10.0, attempt=ATTEMPT)
    assert search.start(0.0) == A
    search.give_up_current(0.01, refused=True)
    assert search.start(0.01) == B
    search.give_up_current(0.61)
    assert search.start(0.61) == B
    search.give_up_current(0.7, refused=True)
    assert search.failed(0.7)  # every one refused: over before the timeout
    assert search.start(0.7) is None


def test_a_search_ends_at_its_timeout():
    search = BrokerSearch([A, B], 0.0, timeout=1.0, attempt=ATTEMPT)
    search.start(0.0)
    search.give_up_current(0.6)
    assert search.start(0.6) == B
    assert not search.failed(0.99)
    assert search.timeout(0.9) == pytest.approx(0.1)  # the deadline before the attempt's end
    assert search.failed(1.0)


def test_one_candidate_is_waited_for_the_whole_timeout():
    """A worker that knows no other broker waits for its own, as one started
    before its broker does; a refused connection does not end the attempt."""
    search = BrokerSearch([A, A], 0.0, timeout=10.0, attempt=ATTEMPT)
    assert search.single
    assert search.start(0.0) == A
    assert not search.connection_failed(0.1)
    assert not search.attempt_over(9.9)
    assert search.timeout(1.0) == pytest.approx(9.0)
    assert search.failed(10.0)


def test_without_a_timeout_one_candidate_is_waited_for_ever():
    search = BrokerSearch([A], 0.0, timeout=None, attempt=ATTEMPT)
    assert search.start(0.0) == A
    assert search.timeout(1e6) is None
    assert not search.failed(1e9)
