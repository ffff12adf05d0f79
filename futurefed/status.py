"""``fedstatus`` (also ``fedbroker --status``): print the federation as the
brokers' meta sockets describe it.

It subscribes to one broker's meta socket, reads its LOAD messages
(docs/federation.md), follows every peer they list to that peer's meta
socket, and so on through the whole federation. It keeps the latest LOAD of
each broker (by task address) and stops once every broker it knows of has
been heard from and no new one has turned up for one publish interval, or at
``--timeout``. :class:`Collector` is that logic without sockets; :func:`main`
drives it with a ZeroMQ SUB socket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Set

import zmq

from . import config
from . import protocol as p
from .broker.core import META_INTERVAL
from .errors import ConfigError, RemoteProtocolError
from .security import FederationKey, HandshakeWatch, key_from_environ, make_client

__all__ = ["Collector", "main", "render"]

DEFAULT_TIMEOUT = 3.0
#: Follow at most this many brokers (a bound on what peers can make us do).
MAX_BROKERS = 1024
#: Larger messages are dropped by ZeroMQ before we read them.
MAX_MESSAGE_BYTES = 2 * p.MAX_JSON_BYTES
#: At most this many messages are read between two looks at the clock.
MAX_DRAIN = 512
#: How long a name, host or address may be when printed.
MAX_TEXT = 200
#: The numbers of a LOAD, in the order of the table's columns.
COUNTS = ("workers", "queued", "running", "lent", "done", "idle")

_EPILOG = """environment (used when META_ADDRESS is not given as an argument):
  META_ADDRESS      a broker's meta socket, e.g. tcp://10.0.0.5:5556
  BROKER_ADDRESS    a broker's task socket; its port + 1 is then the meta
                    socket (default tcp://127.0.0.1:5555, so tcp://127.0.0.1:5556)
  FUTUREFED_KEY_FILE  the federation's key file, if its brokers use one

output: one row per broker (name, task socket, workers, queued, running, lent,
done, idle), the workers of each broker per host, then totals. A task a peer
borrowed counts as done on both brokers. Brokers that peers list but that
published nothing before the timeout are listed as silent.

exit status: 0 the federation was printed, 1 no broker published on
META_ADDRESS before the timeout, 2 bad arguments or environment."""


def _address(value: Any) -> Optional[str]:
    """A broker address from a LOAD, if it looks like one."""
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT and "://" in value:
        return value
    return None


def _count(value: Any) -> Optional[int]:
    """A non-negative count from a LOAD, or None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _text(value: Any) -> str:
    """``value`` made safe to print: bounded, no control characters."""
    text = value if isinstance(value, str) else "?"
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:MAX_TEXT])
    return text or "?"


def connectable(address: str) -> Optional[str]:
    """``address`` if a SUB socket can connect to it, else None."""
    try:
        address = config.check_address(address)
    except ConfigError:
        return None
    if address.startswith("inproc://"):
        return None
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        if host == "*" or port in ("*", "0"):
            return None
    return address


class Collector:
    """What the LOAD messages heard so far say about the federation.

    Feed it with :meth:`take`; :meth:`to_connect` names the meta sockets to
    subscribe to next; :meth:`complete` says when to stop.
    """

    def __init__(self, start: str, interval: float = META_INTERVAL) -> None:
        self.start = start
        self.interval = interval
        self.latest: Dict[str, Dict[str, Any]] = {}  # task address -> latest LOAD
        self.known: Dict[str, Optional[str]] = {}  # task address -> meta address
        self.listed_by: Dict[str, str] = {}  # task address -> name of a broker listing it
        self.malformed = 0
        self.handshake_problem: Optional[str] = None  # set by collect()
        self.changed_at: Optional[float] = None  # when a broker was last learned of
        self._subscribed: Set[str] = {start}
        self._to_connect: List[str] = []

    def take(self, frames: Sequence[Any], now: float) -> None:
        """One message from a meta socket; a malformed one is counted and dropped."""
        try:
            message = p.decode(frames)
        except RemoteProtocolError:
            self.malformed += 1
            return
        if not isinstance(message, p.Load) or _address(message.meta.get("task")) is None:
            self.malformed += 1
            return
        load = message.meta
        task = load["task"]
        if task not in self.known and len(self.known) >= MAX_BROKERS:
            return
        previous = self.latest.get(task)
        seq, old_seq = load.get("seq"), None if previous is None else previous.get("seq")
        if isinstance(seq, int) and isinstance(old_seq, int) and seq < old_seq:
            return  # an older LOAD, heard through a second subscription
        self.latest[task] = load
        meta = _address(load.get("meta"))
        if meta is not None:
            self._subscribed.add(meta)  # we hear it already: no second subscription
        self._learn(task, meta, None, now)
        peers = load.get("peers")
        if isinstance(peers, list):
            for entry in peers[:MAX_BROKERS]:
                if isinstance(entry, dict) and _address(entry.get("task")) is not None:
                    self._learn(entry["task"], _address(entry.get("meta")), task, now)

    def _learn(self, task: str, meta: Optional[str], listed_by: Optional[str], now: float) -> None:
        if task not in self.known:
            if len(self.known) >= MAX_BROKERS:
                return
            self.known[task] = None
            self.changed_at = now
        if listed_by is not None and task not in self.listed_by:
            self.listed_by[task] = _text(self.latest[listed_by].get("name"))
        if self.known[task] is None and meta is None and task not in self.latest:
            try:
                meta = config.meta_address_for(task)
            except ConfigError:
                meta = None
        if meta is not None and self.known[task] is None:
            self.known[task] = meta
        if meta is not None and task not in self.latest and meta not in self._subscribed:
            self._subscribed.add(meta)
            address = connectable(meta)
            if address is not None:
                self._to_connect.append(address)

    def to_connect(self) -> List[str]:
        """Meta sockets learned of since the last call, to subscribe to."""
        found, self._to_connect = self._to_connect, []
        return found

    def silent(self) -> List[str]:
        """Task addresses of brokers listed as peers but not heard from."""
        return sorted(task for task in self.known if task not in self.latest)

    def complete(self, now: float) -> bool:
        """Every known broker heard from, and none new for one interval."""
        return (
            self.changed_at is not None
            and not self.silent()
            and now - self.changed_at >= self.interval
        )

    def wait(self, now: float) -> Optional[float]:
        """Seconds until :meth:`complete` may turn true without a message, if
        only time is missing; else None."""
        if self.changed_at is None or self.silent():
            return None
        return max(0.0, self.changed_at + self.interval - now)

    def brokers(self) -> List[Dict[str, Any]]:
        """The latest LOAD of every broker heard from, by name then address."""
        return sorted(
            self.latest.values(), key=lambda load: (_text(load.get("name")), load["task"])
        )

    def report(self) -> Dict[str, Any]:
        """Everything collected, as the ``--json`` document."""
        return {
            "address": self.start,
            "brokers": self.brokers(),
            "silent": [
                {"task": task, "meta": self.known[task], "listed_by": self.listed_by.get(task)}
                for task in self.silent()
            ],
            "malformed": self.malformed,
        }


def _cell(value: Any) -> str:
    count = _count(value)
    return "?" if count is None else str(count)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def render(collector: Collector) -> str:
    """The human-readable table of the federation."""
    brokers = collector.brokers()
    rows = [["BROKER", "TASK ADDRESS", *(column.upper() for column in COUNTS)]]
    for load in brokers:
        rows.append([_text(load.get("name")), _text(load.get("task")),
                     *(_cell(load.get(column)) for column in COUNTS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    lines.append("")
    lines.append("workers per host:")
    name_width = widths[0]
    per_host: Dict[str, int] = {}
    for load in brokers:
        hosts = load.get("hosts")
        entries = [
            (_text(host), _count(n) or 0)
            for host, n in (hosts.items() if isinstance(hosts, dict) else [])
        ]
        entries = [(host, n) for host, n in entries if n > 0]
        name = _text(load.get("name")).ljust(name_width)
        if not entries:
            lines.append(f"  {name}  (no workers)")
        for host, n in entries:
            per_host[host] = per_host.get(host, 0) + n
            lines.append(f"  {name}  {host}: {_plural(n, 'worker')}")
    totals = {column: sum(_count(load.get(column)) or 0 for load in brokers) for column in COUNTS}
    lines.append("")
    lines.append(
        f"total: {_plural(len(brokers), 'broker')}, {_plural(totals['workers'], 'worker')}"
        f" on {_plural(len(per_host), 'host')}; {totals['queued']} queued,"
        f" {totals['running']} running, {totals['lent']} lent, {totals['done']} done,"
        f" {totals['idle']} idle"
    )
    for task in collector.silent():
        listed = collector.listed_by.get(task)
        lines.append(
            f"silent: {_text(task)} (listed by {listed}) published nothing before the timeout"
            if listed else f"silent: {_text(task)} published nothing before the timeout"
        )
    if collector.malformed:
        lines.append(f"ignored {_plural(collector.malformed, 'malformed meta message')}")
    return "\n".join(lines)


def collect(
    address: str, timeout: float, context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
    key: Optional[FederationKey] = None,
) -> Collector:
    """Subscribe to ``address`` and the meta sockets of every broker it
    leads to; return what was heard within ``timeout`` seconds. A failed
    security handshake is noted in ``collector.handshake_problem``."""
    collector = Collector(address)
    ctx = context or zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    make_client(sub, key)
    watch = HandshakeWatch(sub, key)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(address)
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if collector.complete(now) or now >= deadline:
                return collector
            wait = collector.wait(now)
            wait = deadline - now if wait is None else min(wait, deadline - now)
            if sub.poll(max(1, int(wait * 1000) + 1)):
                for _ in range(MAX_DRAIN):
                    if not sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
                    collector.take(sub.recv_multipart(zmq.NOBLOCK), time.monotonic())
            for meta in collector.to_connect():
                try:
                    sub.connect(meta)
                except zmq.ZMQError:
                    pass  # an address we cannot use: that broker stays silent
    finally:
        watch.check()
        collector.handshake_problem = watch.problem
        sub.close(linger=0)
        watch.close()


def await_load(
    meta_address: str, condition: Callable[[Dict[str, Any]], bool], timeout: float,
    context: Optional[zmq.Context] = None,  # type: ignore[type-arg]
    key: Optional[FederationKey] = None,
) -> Optional[Dict[str, Any]]:
    """The first LOAD published on ``meta_address`` that meets ``condition``
    (malformed meta messages are skipped), or None if none does within
    ``timeout`` seconds: to wait for a federation to reach a state, such as a
    number of workers, without polling it."""
    sub = (context or zmq.Context.instance()).socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        make_client(sub, key)
        sub.connect(meta_address)
        deadline = time.monotonic() + timeout
        while sub.poll(max(0.0, deadline - time.monotonic()) * 1000):
            try:
                message = p.decode(sub.recv_multipart())
            except RemoteProtocolError:
                continue
            if isinstance(message, p.Load) and condition(message.meta):
                return dict(message.meta)
    finally:
        sub.close()
    return None


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str) -> NoReturn:
    print(f"fedstatus: {message}", file=sys.stderr)
    raise SystemExit(2)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 and at most 3600 seconds")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedstatus",
        description="Print a futurefed federation as its brokers' meta sockets describe it:\n"
        "every broker reachable from META_ADDRESS through the peers each one lists,\n"
        "their workers per host, and their queued, running and done tasks.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "address", nargs="?", metavar="META_ADDRESS",
        help="a broker's meta socket (default: META_ADDRESS, else BROKER_ADDRESS's port + 1)",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="stop listening after this long even if some brokers are silent"
        f" (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--key-file", metavar="FILE",
        help="the federation's key file (overrides FUTUREFED_KEY_FILE)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON document instead: {address, brokers: [LOAD...], silent, malformed}",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``fedstatus``; the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.address:
            address = config.check_address(args.address, "META_ADDRESS")
        else:
            address = config.from_environ().meta_address
        key = key_from_environ(override=args.key_file)
    except ConfigError as exc:
        _fail(str(exc))
    if connectable(address) is None:
        _fail(f"cannot connect to {address}: name the host and port a broker publishes on")
    context = zmq.Context()
    try:
        collector = collect(address, args.timeout, context, key)
    except zmq.ZMQError as exc:
        _fail(f"cannot connect to {address}: {exc}")
    finally:
        context.destroy(linger=0)
    if not collector.latest:
        why = collector.handshake_problem or "is a broker running there?"
        print(f"fedstatus: no broker published on {address} ({why})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(collector.report(), indent=2, sort_keys=True))
    else:
        print(render(collector))
    return 0


if __name__ == "__main__":
    sys.exit(main())
