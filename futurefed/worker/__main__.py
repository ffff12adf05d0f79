"""``fedworker``: start one worker, configured by the environment (DESIGN.md
§1.3) or by flags that override it."""

from __future__ import annotations

import sys
from typing import List, Optional

from .._cli import configure, parser

#: Seconds a worker waits for its broker's WELCOME before it gives up.
CONNECT_TIMEOUT = 10.0


def main(argv: Optional[List[str]] = None) -> int:
    cli = parser(
        "fedworker",
        "Run one futurefed worker: it connects to a broker and runs its tasks.",
        "WORKER_NAME",
        "the broker's task socket to connect to",
    )
    cli.add_argument(
        "--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
        help=f"give up if no broker answers within this long, at start and after losing"
        f" the broker (default {CONNECT_TIMEOUT:g})",
    )
    args, env, address, key = configure(cli, argv, connect=True)
    from .loop import Worker

    worker = Worker(
        address, args.name or env.worker_name, fallbacks=env.broker_addresses,
        heartbeat=env.heartbeat, lifeline=args.lifeline, connect_timeout=args.connect_timeout,
        key=key,
    )
    status = worker.run()
    if worker.gave_up:
        source = "--address" if args.address else "BROKER_ADDRESS"
        others = ""
        if env.broker_addresses:
            others = f" or BROKER_ADDRESSES={' '.join(env.broker_addresses)}"
        print(
            f"fedworker: no broker answered at {source}={address}{others}"
            f" within {args.connect_timeout:g} s"
            + (f": {worker.handshake_problem}" if worker.handshake_problem else ""),
            file=sys.stderr,
        )
    elif worker.broker_lost:
        print(f"fedworker: {worker.failure}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
