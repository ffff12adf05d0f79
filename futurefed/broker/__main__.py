"""``fedbroker``: start one broker, configured by the environment (DESIGN.md
§1.3) or by flags that override it."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import zmq

from .._cli import configure, parser


def main(argv: Optional[List[str]] = None) -> int:
    cli = parser(
        "fedbroker",
        "Run one futurefed broker: workers and origins connect to its task socket.",
        "BROKER_NAME",
        "the task socket to bind; port 0 picks a free one",
    )
    cli.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args, env, address = configure(cli, argv)
    from .core import Broker

    broker = Broker(address, args.name or env.broker_name, lifeline=args.lifeline, ready_fd=args.ready_fd)
    try:
        broker.bind()
    except zmq.ZMQError as exc:
        print(f"fedbroker: cannot bind BROKER_ADDRESS={address}: {exc}", file=sys.stderr)
        return 1
    return broker.run()


if __name__ == "__main__":
    sys.exit(main())
