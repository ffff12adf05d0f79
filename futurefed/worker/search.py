"""Which broker a worker tries to join next, and when it gives up (sans I/O).

A worker looks for a broker when it starts, and again when its broker is
lost (docs/federation.md, "A broker lost"). It tries the candidates one at a
time, on a clock passed in by the caller:

* an attempt ends when the broker answers WELCOME (found), answers REFUSE
  (that broker is not tried again), when the connection is refused or
  closed, or after ``attempt`` seconds without an answer;
* a round tries every candidate left once, in order; the next round starts
  no sooner than ``attempt`` seconds after the previous one began, so that
  brokers which all refuse at once are not hammered;
* the search fails when ``timeout`` seconds have passed since it began, or
  when every candidate has refused.

With one candidate only (a worker that knows no other broker), the single
attempt lasts the whole timeout and a refused connection does not end it:
ZeroMQ keeps connecting, as a worker started before its broker expects.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Sequence

__all__ = ["BrokerSearch", "candidates"]


def candidates(
    lost: Sequence[str], peers: Sequence[str], fallbacks: Sequence[str], start: int
) -> List[str]:
    """The brokers to try after losing the one known as ``lost`` (each
    address it went by): the ``peers`` it named, rotated by ``start`` so that
    the workers of a lost broker spread over the others, then the
    ``fallbacks`` from the environment; without duplicates."""
    order = list(peers)
    if order:
        start %= len(order)
        order = order[start:] + order[:start]
    excluded = set(lost)
    return [a for a in dict.fromkeys(order + list(fallbacks)) if a not in excluded]


class BrokerSearch:
    """One search for a broker: the attempt in progress and the ones left."""

    def __init__(
        self, addresses: Sequence[str], now: float, timeout: Optional[float], attempt: float
    ) -> None:
        self.addresses = list(dict.fromkeys(addresses))
        self.deadline = None if timeout is None else now + timeout
        # one candidate: wait for it as long as the search lasts
        self.attempt = attempt if len(self.addresses) > 1 else None
        self.current: Optional[str] = None  # the address being tried
        self.tried: List[str] = []  # in the order tried, each once
        self._left: Deque[str] = deque()  # not yet tried in this round
        self._attempt_ends: Optional[float] = None
        self._round_starts = now

    @property
    def single(self) -> bool:
        """True when there is no alternative to the one candidate."""
        return len(self.addresses) <= 1

    def start(self, now: float) -> Optional[str]:
        """The address to try now, if an attempt is due (none in progress,
        and the pause between rounds over); else None."""
        if self.current is not None or self.failed(now) or now < self._round_starts:
            return None
        if not self._left:
            self._left.extend(self.addresses)
            self._round_starts = now
        self.current = self._left.popleft()
        if self.current not in self.tried:
            self.tried.append(self.current)
        self._attempt_ends = None if self.attempt is None else now + self.attempt
        return self.current

    def attempt_over(self, now: float) -> bool:
        """True when the attempt in progress has had no answer in time."""
        return self._attempt_ends is not None and now >= self._attempt_ends

    def give_up_current(self, now: float, *, refused: bool = False) -> None:
        """End the attempt in progress without success; a broker that
        ``refused`` us (REFUSE) is not tried again."""
        if self.current is None:
            return
        if refused:
            self.addresses.remove(self.current)
            self._left = deque(a for a in self._left if a != self.current)
        self.current = None
        self._attempt_ends = None
        if not self._left and self.attempt is not None:
            # next round: no sooner than one attempt after this one began
            self._round_starts = max(now, self._round_starts + self.attempt)

    def connection_failed(self, now: float) -> bool:
        """The connection of the attempt in progress was refused or closed:
        end the attempt (True), unless there is no alternative to wait on."""
        if self.current is None or self.single:
            return False
        self.give_up_current(now)
        return True

    def failed(self, now: float) -> bool:
        """True when the search is over without a broker."""
        return not self.addresses or (self.deadline is not None and now >= self.deadline)

    def timeout(self, now: float) -> Optional[float]:
        """Seconds until the search has something to do (None: nothing)."""
        times = [t for t in (self.deadline, self._attempt_ends) if t is not None]
        if self.current is None:
            times.append(self._round_starts)
        return max(0.0, min(times) - now) if times else None
