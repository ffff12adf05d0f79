"""Estimate pi by Monte Carlo on futurefed's embedded local federation.

    python docs/examples/pi.py [--tasks 64] [--samples 1000000]

Each task throws darts at the unit square with its own seed; the fraction
that lands inside the quarter circle is pi/4. The executor below is a drop-in
replacement for concurrent.futures.ProcessPoolExecutor.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

from futurefed import FederatedExecutor


def darts(seed: int, samples: int) -> int:
    """How many of ``samples`` random points fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1_000_000, help="per task")
    args = parser.parse_args()

    started = time.perf_counter()
    with FederatedExecutor() as executor:
        hits = sum(executor.map(darts, range(args.tasks), [args.samples] * args.tasks))
    elapsed = time.perf_counter() - started

    total = args.tasks * args.samples
    estimate = 4 * hits / total
    print(f"pi ~ {estimate:.6f} (error {abs(estimate - math.pi):.2e}) from {total:,} samples")
    where = os.environ.get("BROKER_ADDRESS") if os.environ.get("IS_ORIGIN", "1") == "1" else None
    federation = f"the federation at {where}" if where else "the embedded federation"
    print(f"{args.tasks} tasks in {elapsed:.2f} s on {federation}")


if __name__ == "__main__":
    main()
