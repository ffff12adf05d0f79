"""``fedworker``: start one worker, configured by the environment (DESIGN.md
§1.3) or by flags that override it."""

from __future__ import annotations

import sys
from typing import List, Optional

from .._cli import configure, parser


def main(argv: Optional[List[str]] = None) -> int:
    cli = parser(
        "fedworker",
        "Run one futurefed worker: it connects to a broker and runs its tasks.",
        "WORKER_NAME",
        "the broker's task socket to connect to",
    )
    args, env, address = configure(cli, argv)
    from .loop import Worker

    return Worker(address, args.name or env.worker_name, lifeline=args.lifeline).run()


if __name__ == "__main__":
    sys.exit(main())
