"""What ``fedbroker`` and ``fedworker`` share: flags that override the
manual-launch environment, logging, and one-line errors (exit status 2)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Tuple

from . import config
from .errors import ConfigError
from .security import FederationKey, key_from_environ


_EPILOG = """environment (flags win over these):
  BROKER_ADDRESS    the broker's task socket, e.g. tcp://10.0.0.5:5555
                    (default tcp://127.0.0.1:5555)
  META_ADDRESS      the broker's meta socket, where it publishes its load
                    (default: BROKER_ADDRESS's port + 1)
  BROKER_ADDRESSES  peer brokers' task sockets, separated by spaces or commas
                    (a broker connects to them and shares their load; a
                    worker joins one of them if its broker does not answer
                    or is lost)
  META_ADDRESSES    the peers' meta sockets, in the same order
                    (default: each task port + 1)
  BROKER_NAME       the broker's name (default: broker)
  WORKER_NAME       a worker's name (default: origin)
  IS_ORIGIN         1 in the process that runs the user's program (default 1)
  FUTUREFED_HEARTBEAT    seconds between heartbeats, from 0.01 to 3600; a
                         peer silent for 3 of them is lost (default 1)
  FUTUREFED_KEY_FILE     the federation's key file (made by fedkeys): every
                         socket then uses CurveZMQ and only holders of the
                         key may connect
  FUTUREFED_MAX_RETRIES  how many times a task whose worker was lost runs
                         again before it fails with WorkerLost (default 3)
"""


def parser(
    prog: str, description: str, name_variable: str, address_help: str
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", help=f"{address_help} (overrides BROKER_ADDRESS)")
    parser.add_argument("--name", help=f"this process's name (overrides {name_variable})")
    parser.add_argument(
        "--key-file", metavar="FILE",
        help="the federation's key file (overrides FUTUREFED_KEY_FILE; make one with fedkeys)",
    )
    parser.add_argument("--lifeline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    return parser


def configure(
    parser: argparse.ArgumentParser, argv: Optional[List[str]], *, connect: bool = False
) -> Tuple[argparse.Namespace, config.Environment, str, Optional[FederationKey]]:
    """Parse ``argv`` and the environment, and read the key file if one is
    named; exits with status 2 and one line on a bad value. With
    ``connect``, the address is one to connect to (a worker's), not to bind."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format=f"%(asctime)s {parser.prog} %(levelname)s %(message)s",
    )
    try:
        env = config.from_environ()
        address = (
            config.check_address(args.address, "--address") if args.address else env.broker_address
        )
        if connect:
            source = "--address" if args.address else "BROKER_ADDRESS"
            address = config.check_connect_address(address, source)
        key = key_from_environ(override=args.key_file)
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, env, address, key
