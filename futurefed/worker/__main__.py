"""``fedworker``: start one worker, configured by the environment (DESIGN.md
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
        prog="fedworker",
        description="Run one futurefed worker. Flags override the environment "
        "variables WORKER_NAME and BROKER_ADDRESS.",
    )
    parser.add_argument("--address", help="the broker's task socket (BROKER_ADDRESS)")
    parser.add_argument("--name", help="worker name (WORKER_NAME)")
    parser.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s fedworker %(levelname)s %(message)s",
    )
    try:
        env = config.from_environ()
        address = config.check_address(args.address, "--address") if args.address else env.broker_address
    except ConfigError as exc:
        print(f"fedworker: {exc}", file=sys.stderr)
        return 2
    from .loop import Worker

    return Worker(address, args.name or env.worker_name, lifeline=args.lifeline).run()


if __name__ == "__main__":
    sys.exit(main())
