"""``fedbroker``: start one broker, configured by the environment (DESIGN.md
§1.3) or by flags that override it; ``fedbroker --status`` prints the
federation instead (see ``futurefed.status``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Tuple

from .. import config
from .._cli import configure, parser
from ..errors import ConfigError
from ..security import KEY_FILE_VARIABLE, is_loopback


def main(argv: Optional[List[str]] = None) -> int:
    cli = parser(
        "fedbroker",
        "Run one futurefed broker: workers and origins connect to its task socket;"
        " peer brokers connect to it and share its load.",
        "BROKER_NAME",
        "the task socket to bind; port 0 picks a free one",
    )
    cli.add_argument(
        "--meta-address",
        help="the meta socket to bind (overrides META_ADDRESS; default: task port + 1)",
    )
    cli.add_argument(
        "--peers", nargs="+", metavar="ADDRESS",
        help="peer brokers' task sockets (overrides BROKER_ADDRESSES)",
    )
    cli.add_argument(
        "--status", nargs="?", const="", metavar="META_ADDRESS",
        help="print the federation seen from this meta socket and exit"
        " (default: META_ADDRESS, else BROKER_ADDRESS's port + 1)",
    )
    cli.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="with --status: stop listening after this long (as fedstatus --timeout)",
    )
    cli.add_argument(
        "--json", action="store_true", help="with --status: print JSON (as fedstatus --json)",
    )
    cli.add_argument(
        "--advertise", metavar="HOST",
        help="the host name or address peers should use to reach this broker"
        " (default: as bound; a wildcard bind such as tcp://*:5555 advertises this host's FQDN)",
    )
    cli.add_argument(
        "--insecure", action="store_true",
        help="allow binding a non-loopback address without a key file: anyone who can"
        " reach it could run code as you (only on a network you trust entirely)",
    )
    cli.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # the embedded federation's private directory of ipc sockets: removed
    # when the broker exits, even if the origin that made it was killed
    cli.add_argument("--runtime-dir", help=argparse.SUPPRESS)
    args, env, address, key = configure(cli, argv)
    if args.status is not None:
        return _status(args)
    if args.timeout is not None or args.json:
        cli.error("--timeout and --json go with --status")
    try:
        meta, peers = _meta_and_peers(args, env, address)
    except ConfigError as exc:
        print(f"fedbroker: {exc}", file=sys.stderr)
        return 2
    exposed = [bound for bound in (address, meta or address) if not is_loopback(bound)]
    if key is None and exposed:
        if not args.insecure:
            print(
                f"fedbroker: refusing to bind {exposed[0]} without a key: anyone who can reach it"
                f" could run code as you. Make a key with `fedkeys FILE` and set"
                f" {KEY_FILE_VARIABLE}=FILE (or --key-file FILE) for every process of the"
                f" federation, or pass --insecure on a network you trust entirely.",
                file=sys.stderr,
            )
            return 2
        logging.getLogger("futurefed.broker").warning(
            "fedbroker: --insecure: %s accepts anyone who can reach it, and anyone can make"
            " its workers run code", exposed[0],
        )
    from .core import BindError, Broker

    broker = Broker(
        address, args.name or env.broker_name, meta_address=meta, peers=peers,
        advertise=args.advertise, lifeline=args.lifeline, ready_fd=args.ready_fd,
        heartbeat=env.heartbeat, max_retries=env.max_retries, key=key,
        runtime_dir=args.runtime_dir,
    )
    try:
        broker.bind()
    except BindError as exc:
        print(f"fedbroker: {exc}", file=sys.stderr)
        return 1
    return broker.run()


def _status(args: argparse.Namespace) -> int:
    """``fedbroker --status``: fedstatus, with the flags that apply to it."""
    from ..status import main as status_main

    argv = [args.status] if args.status else []
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    if args.json:
        argv.append("--json")
    if args.key_file:
        argv += ["--key-file", args.key_file]
    return status_main(argv)


def _meta_and_peers(
    args: argparse.Namespace, env: config.Environment, address: str
) -> Tuple[Optional[str], List[Tuple[str, Optional[str]]]]:
    """The meta address to bind (None: derive it from the task address) and
    the peers, flags first, then the environment."""
    if args.meta_address:
        meta: Optional[str] = config.check_address(args.meta_address, "--meta-address")
    elif os.environ.get("META_ADDRESS"):
        meta = env.meta_address
    elif args.address:
        meta = None
    else:
        meta = env.meta_address
    if args.peers:
        peers: List[Tuple[str, Optional[str]]] = [
            (config.check_address(peer, "--peers"), None) for peer in args.peers
        ]
    else:
        peers = list(zip(env.broker_addresses, env.meta_addresses))
    return meta, peers


if __name__ == "__main__":
    sys.exit(main())
