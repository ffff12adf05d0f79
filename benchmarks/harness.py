"""What ``bench.py`` and ``bench_federation.py`` share: samples, metrics and
scenarios, their medians and ratios, a deadline for calls that may hang, the
timed map and latency samples, the summary table and the JSON output.

Both scripts run with this directory on ``sys.path`` and import it as
``harness``. Nothing here is shipped to workers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

WATCHDOG_GRACE_S = 10.0  # on top of --timeout, so the executors' own timeouts fire first
MEDIANS_NOTE = "Medians of the repetitions. ↑ higher is better, ↓ lower is better."

T = TypeVar("T")
ContextT = TypeVar("ContextT")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_futurefed() -> Any:
    """Import futurefed lazily, falling back to the checkout this file lives in."""
    try:
        import futurefed
    except ImportError:
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        import futurefed
    return futurefed


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


# --------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------


class Hung(RuntimeError):
    """A call did not return within its deadline; its thread was abandoned."""

    def __init__(self, message: str, stack: str) -> None:
        super().__init__(message)
        self.stack = stack


def call_with_deadline(fn: Callable[[], T], deadline_s: float, what: str) -> T:
    """Run ``fn`` in a helper thread and give up on it after ``deadline_s``.

    Executors are only supposed to block for as long as the timeouts they are
    given, but a broken one can block anywhere (in submit(), in shutdown()...).
    Running each sample in a throwaway daemon thread keeps such a hang from
    stopping the whole benchmark; the stuck thread's stack is kept for the report.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed over to the calling thread
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name=f"bench: {what}", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if not outcome:
        frame = sys._current_frames().get(thread.ident or -1)
        frames = traceback.extract_stack(frame) if frame else traceback.StackSummary()
        where = next(
            (
                f" in {Path(f.filename).name}:{f.lineno} {f.name}()"
                for f in reversed(frames)
                if Path(f.filename).name != "threading.py"
            ),
            "",
        )
        stack = "".join(frames.format()) or "(stack unavailable)\n"
        raise Hung(f"Hung: still blocked after {deadline_s:g}s{where}; abandoned", stack)
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def call_with_watchdog(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``call_with_deadline`` for work bounded by ``timeout``, with WATCHDOG_GRACE_S to spare."""
    return call_with_deadline(fn, timeout + WATCHDOG_GRACE_S, what)


def describe_failure(exc: BaseException, timeout: float) -> str:
    """``Type: message``; a message-less futures timeout names the --timeout that ran out."""
    detail = str(exc)
    if not detail and isinstance(exc, FuturesTimeout):
        detail = f"no result within --timeout {timeout:g}s"
    return f"{type(exc).__name__}: {detail}"


# --------------------------------------------------------------------------
# Scenarios and their results
# --------------------------------------------------------------------------


@dataclass
class Sample:
    values: dict[str, float]
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str
    is_latency: bool = False

    @property
    def unit_cell(self) -> str:
        """The unit, with ↑ if higher is better or ↓ if lower is."""
        return f"{self.unit} {'↑' if self.higher_is_better else '↓'}"


@dataclass(frozen=True)
class Scenario(Generic[ContextT]):
    """A timed workload; each script brings its own ``Sizes`` and ``Context``."""

    name: str
    summary: str
    size: Callable[[Any], str]  # describes the work done per sample, given the Sizes
    metrics: tuple[Metric, ...]
    run: Callable[[Executor, ContextT], Sample]
    warmup: Callable[[Executor, ContextT], None] | None = None
    needs_payload: bool = False

    def headline(self, sizes: Any) -> str:
        return f"[{self.name}] {self.summary}: {self.size(sizes)}"

    def format_values(self, sample: Sample) -> str:
        return ", ".join(
            f"{m.key}={format(sample.values[m.key], m.fmt)} {m.unit}" for m in self.metrics
        )


def timed_sample(scenario: Scenario[ContextT], executor: Executor, ctx: ContextT) -> Sample:
    """The scenario's own (untimed) warm-up if it has one, ``gc.collect()``, one timed run."""
    if scenario.warmup is not None:
        scenario.warmup(executor, ctx)
    gc.collect()
    return scenario.run(executor, ctx)


def alternating(keys: Sequence[T], repeat: int) -> Iterator[tuple[int, Sequence[T]]]:
    """``(rep, order)`` per repetition; the order reverses every time, so drifts hit all alike."""
    for rep in range(repeat):
        yield rep, keys if rep % 2 == 0 else keys[::-1]


@dataclass
class ScenarioResult:
    scenario: Scenario[Any]
    samples: dict[str, list[Sample]]
    errors: dict[str, str] = field(default_factory=dict)
    stacks: dict[str, str] = field(default_factory=dict)  # where hung executors were blocked

    def add(self, key: str, rep: int, sample: Sample) -> None:
        sample.raw["rep"] = rep
        self.samples[key].append(sample)

    def values(self, metric: Metric, key: str) -> list[float]:
        return [sample.values[metric.key] for sample in self.samples.get(key, [])]

    def median(self, metric: Metric, key: str) -> float | None:
        values = self.values(metric, key)
        return statistics.median(values) if values else None

    def ratio(self, metric: Metric, key: str, base: str) -> float | None:
        """``key`` vs ``base``, oriented so that > 1.0 means ``key`` is better."""
        a, b = self.median(metric, key), self.median(metric, base)
        if not a or not b:
            return None
        return a / b if metric.higher_is_better else b / a

    def paired_ratio(self, metric: Metric, key: str, base: str) -> float | None:
        """Median over repetitions of the per-repetition ratio (same orientation as ratio()).

        The samples of one repetition run close together, so when the whole
        machine drifts between repetitions this cancels more of it.
        """
        by_rep = {
            k: {s.raw["rep"]: s.values[metric.key] for s in self.samples.get(k, [])}
            for k in (key, base)
        }
        ratios = [
            a / b if metric.higher_is_better else b / a
            for rep, a in by_rep[key].items()
            if (b := by_rep[base].get(rep)) and a
        ]
        return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------
# Inside a sample
# --------------------------------------------------------------------------


class WrongResult(AssertionError):
    """An executor returned something other than what the task computes."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise WrongResult(message)


def wait_all(futures: Sequence[Future[Any]], timeout: float) -> None:
    _, not_done = wait(futures, timeout=timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(futures)} futures not done after {timeout}s")


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (same as numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def map_sample(
    executor: Executor, noop: Callable[..., Any], items: int, chunksize: int, timeout: float
) -> Sample:
    """Time ``list(executor.map(noop, range(items)))``: throughput in tasks/s.

    ``noop`` is the calling script's own, so it travels to workers as before.
    """
    started = time.perf_counter()
    results = list(executor.map(noop, range(items), timeout=timeout, chunksize=chunksize))
    elapsed = time.perf_counter() - started
    check(results == list(range(items)), "map() returned wrong results")
    return Sample({"throughput": items / elapsed}, {"elapsed_s": elapsed})


def latency_sample(
    executor: Executor, noop: Callable[..., Any], calls: int, timeout: float
) -> Sample:
    """Time ``calls`` sequential ``submit(noop).result()`` round trips: p50 and p99 in µs."""
    clock = time.perf_counter_ns
    latencies_ns: list[int] = []
    for _ in range(calls):
        started = clock()
        result = executor.submit(noop).result(timeout=timeout)
        latencies_ns.append(clock() - started)
        check(result is None, f"noop() returned {result!r}")
    latencies_us = [ns / 1000 for ns in latencies_ns]
    return Sample(
        {"p50": percentile(latencies_us, 50), "p99": percentile(latencies_us, 99)},
        {
            "mean_us": statistics.fmean(latencies_us),
            "max_us": max(latencies_us),
            "latencies_us": [round(us, 1) for us in latencies_us],
        },
    )


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def format_table(rows: list[list[str]], right_align_from: int = 2) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if i >= right_align_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([fmt(rows[0]), rule, *(fmt(row) for row in rows[1:])])


def run_summary(meta: dict[str, Any]) -> str:
    """The line above the table: workers, repeat, sizes, Python, CPUs and the load average."""
    load = ""
    if meta["loadavg_start"] and meta["loadavg_end"]:
        load = f"  load1={meta['loadavg_start'][0]:.2f}->{meta['loadavg_end'][0]:.2f}"
    sizes = "quick (1/10)" if meta["quick"] else "full"
    return (
        f"\nworkers={meta['workers']}  repeat={meta['repeat']}  sizes={sizes}"
        f"  python={platform.python_version()}  cpus={meta['cpu_count']}{load}"
    )


def run_meta() -> dict[str, Any]:
    """When, how and where this run started: the first entries of the JSON ``meta``."""
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": sys.version,
        "platform": platform.platform(),
    }


def scenario_json(
    result: ScenarioResult,
    keys: Sequence[str],
    metric_extras: Callable[[ScenarioResult, Metric], dict[str, Any]],
) -> dict[str, Any]:
    """One scenario in the JSON: per metric its samples and medians, then ``metric_extras``."""
    return {
        "summary": result.scenario.summary,
        "metrics": {
            metric.key: {
                "label": metric.label,
                "unit": metric.unit,
                "higher_is_better": metric.higher_is_better,
                "samples": {k: result.values(metric, k) for k in keys},
                "median": {k: result.median(metric, k) for k in keys},
                **metric_extras(result, metric),
            }
            for metric in result.scenario.metrics
        },
        "raw": {k: [asdict(s) for s in result.samples[k]] for k in keys},
        "errors": result.errors,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"Raw samples written to {path}")
