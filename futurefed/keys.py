"""``fedkeys FILE``: make a federation key file for brokers, workers and
origins started by hand (``FUTUREFED_KEY_FILE=FILE``; docs/security.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import ConfigError
from .security import KEY_FILE_VARIABLE, FederationKey


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``fedkeys``; the exit status."""
    cli = argparse.ArgumentParser(
        prog="fedkeys",
        description="Make a new federation key (a CurveZMQ key pair) in FILE, readable only"
        f" by you. Give every process of the federation {KEY_FILE_VARIABLE}=FILE (or"
        " --key-file FILE): only holders of the key can connect, and traffic is encrypted.",
    )
    cli.add_argument("file", metavar="FILE")
    cli.add_argument("--force", action="store_true", help="replace FILE if it exists")
    cli.add_argument(
        "--check", action="store_true",
        help="only check that FILE is a usable key file, and print its public key",
    )
    args = cli.parse_args(argv)
    try:
        if args.check:
            key = FederationKey.load(args.file, "FILE")
        elif os.path.lexists(args.file) and not args.force:
            raise ConfigError(f"{args.file} exists; pass --force to replace it")
        else:
            key = FederationKey.generate()
            key.save(args.file)
    except ConfigError as exc:
        print(f"fedkeys: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedkeys: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"public key {key.public.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
