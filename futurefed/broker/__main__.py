"""``fedbroker``: start one broker, configured by the environment (DESIGN.md
§1.3) or by flags that override it."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .. import config
from ..errors import ConfigError


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedbroker",
        description="Run one futurefed broker. Flags override the environment "
        "variables BROKER_NAME and BROKER_ADDRESS.",
    )
    parser.add_argument("--address", help="task socket to bind (BROKER_ADDRESS); port 0 = any")
    parser.add_argument("--name", help="broker name (BROKER_NAME)")
    parser.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s fedbroker %(levelname)s %(message)s",
    )
    try:
        env = config.from_environ()
        address = config.check_address(args.address, "--address") if args.address else env.broker_address
    except ConfigError as exc:
        print(f"fedbroker: {exc}", file=sys.stderr)
        return 2
    from .core import Broker

    broker = Broker(address, args.name or env.broker_name, lifeline=args.lifeline, ready_fd=args.ready_fd)
    import zmq

    try:
        broker.bind()
    except zmq.ZMQError as exc:
        print(f"fedbroker: cannot bind BROKER_ADDRESS={address}: {exc}", file=sys.stderr)
        return 1
    return broker.run()


if __name__ == "__main__":
    sys.exit(main())
