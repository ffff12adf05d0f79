#!/usr/bin/env python3
"""Benchmark futurefed's FederatedExecutor against concurrent.futures.ProcessPoolExecutor.

Both executors run in this one process tree, with the same number of workers, on
the same scenarios. Samples alternate between executors (the order reverses on
every repetition) and the MEDIAN of the repetitions is reported, because the
machines this runs on are shared and noisy. Executor start-up is never timed:
every executor is warmed up with a map of ``2 * workers`` no-ops before each
timed sample (bandwidth scenarios also push a smaller payload first).

Run ``python benchmarks/bench.py --help``; see ``benchmarks/README.md`` for how
to read the output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # when imported rather than run as a script
    sys.path.insert(0, str(HERE))

from harness import Hung, call_with_deadline, call_with_watchdog, describe_failure  # noqa: E402
from harness import Metric, Sample, Scenario, ScenarioResult, alternating  # noqa: E402
from harness import check, latency_sample, map_sample, timed_sample, wait_all  # noqa: E402
from harness import MEDIANS_NOTE, format_table, run_summary, scenario_json  # noqa: E402
from harness import import_futurefed, log, positive_int, run_meta, write_json  # noqa: E402

MiB = 1024 * 1024
LATENCY_TARGET = 1.5  # "futurefed latency at most 1.5x ProcessPoolExecutor's"


# --------------------------------------------------------------------------
# Task functions. They must stay module-level (ProcessPoolExecutor pickles them
# by reference) and self-contained: when this file runs as a script they live
# in ``__main__``, which cloudpickle ships to futurefed workers by value.
# --------------------------------------------------------------------------


def noop(x: Any = None) -> Any:
    return x


def payload_len(data: bytes) -> int:
    return len(data)


def make_payload(nbytes: int) -> bytes:
    """Return ``nbytes`` of incompressible data: one random 1 MiB block, repeated.

    Used both for the argument (built once, in the parent) and as the task
    result (built by the worker, inside the timed region; the cost of that is
    measured separately and reported as ``payload_build_s``).
    """
    if nbytes <= 0:
        return b""
    block = os.urandom(min(nbytes, 1024 * 1024))
    reps, rest = divmod(nbytes, len(block))
    data = block * reps
    return data + block[:rest] if rest else data


def spin(seconds: float) -> float:
    """Burn CPU (no sleeping) for ``seconds`` of wall time."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return seconds


# --------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------


class ExecutorUnavailable(RuntimeError):
    """An executor selected with --executors cannot be created."""


def federated_executor_class() -> Callable[..., Executor]:
    try:
        futurefed = import_futurefed()
    except ImportError as exc:
        raise ExecutorUnavailable(f"cannot import futurefed: {exc}") from exc
    cls = getattr(futurefed, "FederatedExecutor", None)
    if cls is None:
        raise ExecutorUnavailable(
            "futurefed.FederatedExecutor does not exist (yet); run with --executors ppe"
        )
    return cls  # type: ignore[no-any-return]


def make_federated(workers: int) -> Executor:
    return federated_executor_class()(max_workers=workers)


class KeyedLoopbackExecutor(Executor):
    """futurefed joined over TCP loopback to a broker and workers started as
    ``fedbroker``/``fedworker`` with a federation key: every byte is then
    CurveZMQ-encrypted. Next to "fed" (the embedded federation: ipc sockets
    in a private directory, no encryption) it shows what CurveZMQ costs."""

    READY_TIMEOUT_S = 60.0

    def __init__(self, workers: int) -> None:
        federated_executor_class()  # futurefed importable, or ExecutorUnavailable
        from futurefed.security import KEY_FILE_VARIABLE, FederationKey, KeyFile

        self._key_file = KeyFile(FederationKey.generate())
        env = {
            **os.environ, KEY_FILE_VARIABLE: self._key_file.path,
            "PYTHONPATH": os.pathsep.join(path or os.getcwd() for path in sys.path),
        }
        lifeline_r, self._lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self._processes: list[subprocess.Popen[bytes]] = []
        try:
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", "futurefed.broker", "--address", "tcp://127.0.0.1:0",
                 "--name", "curve", "--lifeline", str(lifeline_r), "--ready-fd", str(ready_w)],
                pass_fds=(lifeline_r, ready_w), env=env,
            ))
            os.close(ready_w)
            with os.fdopen(ready_r, "rb") as ready:
                line = ready.readline()  # the broker writes it once bound, or dies
            if not line:
                raise ExecutorUnavailable("the keyed broker exited before it was ready")
            address = json.loads(line)["task"]
            for index in range(workers):
                self._processes.append(subprocess.Popen(
                    [sys.executable, "-m", "futurefed.worker", "--address", address,
                     "--name", f"curve.w{index}", "--lifeline", str(lifeline_r)],
                    pass_fds=(lifeline_r,), env={**env, "IS_ORIGIN": "0"},
                ))
            os.close(lifeline_r)
            previous = os.environ.get(KEY_FILE_VARIABLE)
            os.environ[KEY_FILE_VARIABLE] = self._key_file.path  # read once, by the constructor
            try:
                self._executor = federated_executor_class()(address=address)
            finally:
                if previous is None:
                    del os.environ[KEY_FILE_VARIABLE]
                else:
                    os.environ[KEY_FILE_VARIABLE] = previous
        except BaseException:
            self._stop()
            raise

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor.submit(fn, *args, **kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Any:
        return self._executor.map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        self._stop()

    def _stop(self) -> None:
        if self._lifeline_w != -1:
            os.close(self._lifeline_w)  # every process reads end-of-file and exits
            self._lifeline_w = -1
        for process in self._processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._key_file.close()


def make_keyed_loopback(workers: int) -> Executor:
    return KeyedLoopbackExecutor(workers)


def make_process_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(max_workers=workers)


def make_thread_pool(workers: int) -> Executor:
    return ThreadPoolExecutor(max_workers=workers)


def make_floor(workers: int) -> Executor:
    from zmq_floor import FloorExecutor  # this directory; needs only pyzmq

    return FloorExecutor(workers)


@dataclass(frozen=True)
class ExecutorKind:
    key: str
    label: str
    factory: Callable[[int], Executor]


EXECUTOR_KINDS: dict[str, ExecutorKind] = {
    kind.key: kind
    for kind in (
        ExecutorKind("fed", "futurefed", make_federated),
        ExecutorKind("ppe", "ProcessPoolExecutor", make_process_pool),
        ExecutorKind("fedcurve", "futurefed+CurveZMQ", make_keyed_loopback),
        ExecutorKind("thread", "ThreadPoolExecutor", make_thread_pool),
        ExecutorKind("floor", "ZeroMQ floor", make_floor),
    )
}
# ProcessPoolExecutor and the floor fork their workers; create and warm them
# before futurefed starts its threads and sockets in this process.
CREATION_ORDER = ("ppe", "thread", "floor", "fed", "fedcurve")
DEFAULT_EXECUTORS = ("fed", "ppe")


def warm_up(executor: Executor, workers: int, timeout: float) -> None:
    list(executor.map(noop, range(2 * workers), timeout=timeout))


class ExecutorPool:
    """Owns the live executors; creates, warms up, replaces and shuts them down."""

    SHUTDOWN_DEADLINE_S = 30.0  # for a clean shutdown(wait=True) at the end
    DISCARD_DEADLINE_S = 5.0  # for shutdown(wait=False) of a broken executor

    def __init__(self, keys: Sequence[str], workers: int, timeout: float) -> None:
        self.keys = tuple(keys)
        self.workers = workers
        self.timeout = timeout
        self.startup_s: dict[str, list[float]] = {key: [] for key in self.keys}
        self.abandoned: set[str] = set()  # executors left blocked in some thread
        self._live: dict[str, Executor] = {}

    def start_all(self) -> None:
        for key in sorted(self.keys, key=CREATION_ORDER.index):
            call_with_deadline(partial(self.get, key), self.timeout, f"starting {key}")

    def get(self, key: str) -> Executor:
        executor = self._live.get(key)
        if executor is None:
            started = time.perf_counter()
            executor = EXECUTOR_KINDS[key].factory(self.workers)
            self._live[key] = executor
            warm_up(executor, self.workers, self.timeout)
            self.startup_s[key].append(time.perf_counter() - started)
        return executor

    def discard(self, key: str, hung: bool = False) -> None:
        """Drop a broken executor without waiting for it; the next get() makes a fresh one."""
        executor = self._live.pop(key, None)
        if hung:
            self.abandoned.add(key)
        if executor is not None:
            self._shutdown(key, executor, wait_for_workers=False)

    def close(self, wait_for_workers: bool = True) -> None:
        for key in list(self._live):
            self._shutdown(key, self._live.pop(key), wait_for_workers)

    def _shutdown(self, key: str, executor: Executor, wait_for_workers: bool) -> None:
        deadline = self.SHUTDOWN_DEADLINE_S if wait_for_workers else self.DISCARD_DEADLINE_S
        try:
            call_with_deadline(
                lambda: executor.shutdown(
                    wait=wait_for_workers, cancel_futures=not wait_for_workers
                ),
                deadline,
                f"shutting down {key}",
            )
        except Hung as exc:
            log(f"  warning: shutting down {key}: {exc}")
            self.abandoned.add(key)
        except Exception as exc:  # best effort
            log(f"  warning: shutting down {key} failed: {exc!r}")


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    map_items: int = 20_000
    map_chunksize: int = 200
    submit_items: int = 10_000
    latency_calls: int = 2_000
    payload_bytes: int = 64 * MiB
    cpu_tasks: int = 200
    cpu_task_s: float = 0.020

    @property
    def warmup_payload_bytes(self) -> int:
        return max(1, self.payload_bytes // 64)

    def scaled_down(self, divisor: int) -> Sizes:
        """Sizes for --quick: counts and payloads shrink, chunksize and task length do not."""
        return replace(
            self,
            map_items=self.map_items // divisor,
            submit_items=self.submit_items // divisor,
            latency_calls=self.latency_calls // divisor,
            payload_bytes=self.payload_bytes // divisor,
            cpu_tasks=self.cpu_tasks // divisor,
        )


@dataclass
class Context:
    sizes: Sizes
    workers: int
    timeout: float
    payload: bytes = b""
    warmup_payload: bytes = b""


def run_map(big_chunks: bool) -> Callable[[Executor, Context], Sample]:
    def run(executor: Executor, ctx: Context) -> Sample:
        chunksize = ctx.sizes.map_chunksize if big_chunks else 1
        return map_sample(executor, noop, ctx.sizes.map_items, chunksize, ctx.timeout)

    return run


def run_submit(executor: Executor, ctx: Context) -> Sample:
    n = ctx.sizes.submit_items
    started = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(n)]
    wait_all(futures, ctx.timeout)
    elapsed = time.perf_counter() - started
    check([f.result() for f in futures] == list(range(n)), "submit() returned wrong results")
    return Sample({"throughput": n / elapsed}, {"elapsed_s": elapsed})


def run_latency(executor: Executor, ctx: Context) -> Sample:
    return latency_sample(executor, noop, ctx.sizes.latency_calls, ctx.timeout)


def warm_payload_arg(executor: Executor, ctx: Context) -> None:
    executor.submit(payload_len, ctx.warmup_payload).result(timeout=ctx.timeout)


def run_payload_arg(executor: Executor, ctx: Context) -> Sample:
    nbytes = len(ctx.payload)
    started = time.perf_counter()
    result = executor.submit(payload_len, ctx.payload).result(timeout=ctx.timeout)
    elapsed = time.perf_counter() - started
    check(result == nbytes, f"payload_len() returned {result!r}, expected {nbytes}")
    return Sample({"bandwidth": nbytes / elapsed / 1e6}, {"elapsed_s": elapsed})


def warm_payload_result(executor: Executor, ctx: Context) -> None:
    nbytes = ctx.sizes.warmup_payload_bytes
    executor.submit(make_payload, nbytes).result(timeout=ctx.timeout)


def run_payload_result(executor: Executor, ctx: Context) -> Sample:
    nbytes = ctx.sizes.payload_bytes
    started = time.perf_counter()
    result = executor.submit(make_payload, nbytes).result(timeout=ctx.timeout)
    elapsed = time.perf_counter() - started
    check(type(result) is bytes and len(result) == nbytes, "make_payload() returned wrong data")
    del result
    return Sample({"bandwidth": nbytes / elapsed / 1e6}, {"elapsed_s": elapsed})


def run_cpu(executor: Executor, ctx: Context) -> Sample:
    n, task_s = ctx.sizes.cpu_tasks, ctx.sizes.cpu_task_s
    started = time.perf_counter()
    futures = [executor.submit(spin, task_s) for _ in range(n)]
    wait_all(futures, ctx.timeout)
    wall = time.perf_counter() - started
    check(all(f.result() == task_s for f in futures), "spin() returned wrong results")
    return Sample({"wall": wall, "efficiency": n * task_s / (ctx.workers * wall)})


SCENARIOS: dict[str, Scenario[Context]] = {
    s.name: s
    for s in (
        Scenario(
            "map_c1",
            "no-op map(), chunksize=1",
            lambda s: f"{s.map_items:,} items",
            (Metric("throughput", "map noop chunksize=1", "tasks/s", True, ",.0f"),),
            run_map(big_chunks=False),
        ),
        Scenario(
            "map_c200",
            "no-op map(), chunksize=200",
            lambda s: f"{s.map_items:,} items",
            (Metric("throughput", "map noop chunksize=200", "tasks/s", True, ",.0f"),),
            run_map(big_chunks=True),
        ),
        Scenario(
            "submit",
            "individual submit()s, then wait for all",
            lambda s: f"{s.submit_items:,} tasks",
            (Metric("throughput", "submit noop + wait all", "tasks/s", True, ",.0f"),),
            run_submit,
        ),
        Scenario(
            "latency",
            "sequential submit(noop).result() round trips",
            lambda s: f"{s.latency_calls:,} round trips",
            (
                Metric("p50", "round trip latency p50", "µs", False, ",.1f", is_latency=True),
                Metric("p99", "round trip latency p99", "µs", False, ",.1f", is_latency=True),
            ),
            run_latency,
        ),
        Scenario(
            "arg_bytes",
            "one task with a large bytes argument (returns its len)",
            lambda s: f"{s.payload_bytes / MiB:g} MiB",
            (Metric("bandwidth", "large bytes argument", "MB/s", True, ",.1f"),),
            run_payload_arg,
            warmup=warm_payload_arg,
            needs_payload=True,
        ),
        Scenario(
            "result_bytes",
            "one task returning a large bytes result",
            lambda s: f"{s.payload_bytes / MiB:g} MiB",
            (Metric("bandwidth", "large bytes result", "MB/s", True, ",.1f"),),
            run_payload_result,
            warmup=warm_payload_result,
        ),
        Scenario(
            "cpu",
            "busy-loop tasks (parallel efficiency)",
            lambda s: f"{s.cpu_tasks} x {s.cpu_task_s * 1000:g} ms",
            (
                Metric("wall", "cpu tasks wall time", "s", False, ",.3f"),
                Metric("efficiency", "cpu tasks parallel efficiency", "of ideal", True, ".1%"),
            ),
            run_cpu,
        ),
    )
}


# --------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------


def take_sample(
    scenario: Scenario[Context], pool: ExecutorPool, key: str, ctx: Context
) -> Sample:
    """Warm up (untimed), then run one timed sample of ``scenario`` on executor ``key``."""
    executor = pool.get(key)
    warm_up(executor, ctx.workers, ctx.timeout)
    return timed_sample(scenario, executor, ctx)


def run_scenario(
    scenario: Scenario[Context], pool: ExecutorPool, ctx: Context, repeat: int
) -> ScenarioResult:
    result = ScenarioResult(scenario, {key: [] for key in pool.keys})
    log(scenario.headline(ctx.sizes))
    for rep, order in alternating(pool.keys, repeat):
        for key in order:
            if key in result.errors:
                continue
            label = f"rep {rep + 1}/{repeat} {key:>6}"
            try:
                sample = call_with_watchdog(
                    partial(take_sample, scenario, pool, key, ctx),
                    ctx.timeout,
                    f"{scenario.name}/{key}",
                )
            except Hung as exc:
                result.errors[key] = str(exc)
                log(f"  {label}: FAILED {exc}. Stack of the blocked thread:\n{exc.stack}")
                result.stacks[key] = exc.stack
                pool.discard(key, hung=True)
                continue
            except Exception as exc:  # report it and carry on
                result.errors[key] = describe_failure(exc, ctx.timeout)
                log(f"  {label}: FAILED {result.errors[key]}")
                pool.discard(key)
                continue
            result.add(key, rep, sample)
            log(f"  {label}: {scenario.format_values(sample)}")
    return result


def fed_over_ppe(result: ScenarioResult, metric: Metric) -> float | None:
    """futurefed's median divided by ProcessPoolExecutor's (not oriented like ratio())."""
    return over_ppe(result, metric, "fed")


def over_ppe(result: ScenarioResult, metric: Metric, key: str) -> float | None:
    """``key``'s median divided by ProcessPoolExecutor's (not oriented like ratio())."""
    value, ppe = result.median(metric, key), result.median(metric, "ppe")
    return value / ppe if value and ppe else None


def render_report(
    results: Iterable[ScenarioResult], keys: Sequence[str], notes: Sequence[str] = ()
) -> str:
    floor = "floor" in keys and "ppe" in keys
    header = ["scenario", "unit", *(EXECUTOR_KINDS[k].label for k in keys), "ratio", "fed/ppe ×"]
    if floor:
        header += ["floor ratio", "floor/ppe ×"]
    rows = [header]
    errors: list[str] = []
    for result in results:
        for metric in result.scenario.metrics:
            row = [metric.label, metric.unit_cell]
            for key in keys:
                median = result.median(metric, key)
                if key in result.errors:
                    row.append("ERROR")
                else:
                    row.append("-" if median is None else format(median, metric.fmt))
            ratio = result.ratio(metric, "fed", "ppe")
            row.append("-" if ratio is None else f"{ratio:.2f}")
            multiple = fed_over_ppe(result, metric) if metric.is_latency else None
            if multiple is None:
                row.append("")
            else:
                verdict = "ok" if multiple <= LATENCY_TARGET else "OVER"
                row.append(f"{multiple:.2f}× {verdict}")
            if floor:
                ratio = result.ratio(metric, "floor", "ppe")
                row.append("-" if ratio is None else f"{ratio:.2f}")
                multiple = over_ppe(result, metric, "floor") if metric.is_latency else None
                row.append("" if multiple is None else f"{multiple:.2f}×")
            rows.append(row)
        errors += [f"  {result.scenario.name}/{key}: {msg}" for key, msg in result.errors.items()]
    lines = [
        format_table(rows),
        "",
        MEDIANS_NOTE,
        "ratio > 1.00 means futurefed is better (throughput: fed/ppe; latency and wall: ppe/fed).",
        f"fed/ppe ×: futurefed latency as a multiple of ProcessPoolExecutor's "
        f"(target ≤ {LATENCY_TARGET}×).",
        *(["floor ratio, floor/ppe ×: the same for the ZeroMQ floor (futurefed's processes, "
           "threads and hops, none of its work)."] if floor else []),
        *notes,
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def ratios_json(result: ScenarioResult, metric: Metric) -> dict[str, Any]:
    return {
        "ratio": result.ratio(metric, "fed", "ppe"),
        "paired_ratio_median": result.paired_ratio(metric, "fed", "ppe"),
        "fed_over_ppe": fed_over_ppe(result, metric),
    }


def build_json(
    results: Sequence[ScenarioResult], meta: dict[str, Any], pool: ExecutorPool
) -> dict[str, Any]:
    scenarios = {
        result.scenario.name: {
            **scenario_json(result, pool.keys, ratios_json),
            "hung_stacks": result.stacks,
        }
        for result in results
    }
    executors = {
        k: {"label": EXECUTOR_KINDS[k].label, "startup_s": pool.startup_s[k]} for k in pool.keys
    }
    return {"meta": meta, "executors": executors, "scenarios": scenarios}


def collect_meta(args: argparse.Namespace, sizes: Sizes, repeat: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        **run_meta(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mp_start_method": multiprocessing.get_start_method(),
        "workers": args.workers,
        "repeat": repeat,
        "quick": args.quick,
        "timeout_s": args.timeout,
        "executors": args.executors,
        "scenarios": args.only,
        "sizes": asdict(sizes),
    }
    if "fed" in args.executors:
        try:
            futurefed = import_futurefed()
            meta["futurefed_version"] = getattr(futurefed, "__version__", None)
            meta["futurefed_file"] = getattr(futurefed, "__file__", None)
        except ImportError:
            pass
    return meta


def time_payload_build(nbytes: int) -> float:
    """How long make_payload() takes here: the floor inside result_bytes' timing."""
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        data = make_payload(nbytes)
        timings.append(time.perf_counter() - started)
        del data
    return statistics.median(timings)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            bad = ", ".join(unknown) or "(none)"
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {bad}; choose from {', '.join(choices)}"
            )
        return list(dict.fromkeys(names))

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark futurefed.FederatedExecutor against ProcessPoolExecutor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n"
        + "\n".join(f"  {s.name:<13} {s.summary}" for s in SCENARIOS.values()),
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="workers per executor (default: os.cpu_count() = %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=None,
        help="repetitions per scenario and executor; the median is reported "
        "(default: 5, or 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: repeat=1 and 1/10 of the sizes",
    )
    parser.add_argument(
        "--only",
        type=comma_list(list(SCENARIOS)),
        default=list(SCENARIOS),
        metavar="NAME[,NAME]",
        help="scenarios to run (default: all)",
    )
    parser.add_argument(
        "--executors",
        type=comma_list(list(EXECUTOR_KINDS)),
        default=list(DEFAULT_EXECUTORS),
        metavar="NAME[,NAME]",
        help="executors to compare: fed, ppe, thread, fedcurve (futurefed joined over TCP with"
        " a key, i.e. CurveZMQ), floor (futurefed's processes, threads and ZeroMQ hops with none"
        " of its work: benchmarks/zmq_floor.py) (default: fed,ppe)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw samples and medians")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up on a sample after this long; the executor is then replaced (default: 120)",
    )
    return parser.parse_args(argv)


def run_all(
    pool: ExecutorPool, scenarios: Sequence[Scenario[Context]], ctx: Context, repeat: int
) -> list[ScenarioResult]:
    """Start every executor (untimed), then run the scenarios; always shuts the pool down."""
    clean_exit = False
    try:
        pool.start_all()
        for key in pool.keys:
            log(f"  {key} ready in {pool.startup_s[key][0]:.2f}s (startup is not timed)")
        results = [run_scenario(scenario, pool, ctx, repeat) for scenario in scenarios]
        clean_exit = True
        return results
    finally:
        pool.close(wait_for_workers=clean_exit)


def print_report(
    results: Sequence[ScenarioResult], keys: Sequence[str], meta: dict[str, Any]
) -> None:
    print(run_summary(meta))
    notes = []
    if "payload_build_s" in meta:
        notes.append(
            f"large bytes result includes building the payload in the worker "
            f"(~{meta['payload_build_s'] * 1000:.0f} ms here)."
        )
    print(render_report(results, keys, notes))
    print(f"Total run time: {meta['elapsed_s']:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    sizes = Sizes().scaled_down(10) if args.quick else Sizes()
    scenarios = [s for s in SCENARIOS.values() if s.name in args.only]  # canonical order
    # futurefed first, then the others in the order given.
    keys = sorted(args.executors, key=lambda k: (k != "fed", args.executors.index(k)))
    if "fed" in keys:
        try:
            federated_executor_class()
        except ExecutorUnavailable as exc:
            log(f"error: {exc}")
            return 2

    meta = collect_meta(args, sizes, repeat)
    run_started = time.perf_counter()
    ctx = Context(sizes=sizes, workers=args.workers, timeout=args.timeout)
    if any(s.needs_payload for s in scenarios):
        ctx.payload = make_payload(sizes.payload_bytes)
        ctx.warmup_payload = make_payload(sizes.warmup_payload_bytes)
    if "result_bytes" in args.only:
        meta["payload_build_s"] = time_payload_build(sizes.payload_bytes)

    log(
        f"futurefed benchmark: workers={args.workers} repeat={repeat} "
        f"executors={','.join(keys)}{' (quick)' if args.quick else ''}"
    )
    pool = ExecutorPool(keys, args.workers, args.timeout)
    try:
        results = run_all(pool, scenarios, ctx, repeat)
    except ExecutorUnavailable as exc:
        log(f"error: {exc}")
        return exit_now(2, pool)
    except Hung as exc:
        log(f"error: {exc}. Stack of the blocked thread:\n{exc.stack}")
        return exit_now(2, pool)
    except KeyboardInterrupt:
        log("interrupted")
        return exit_now(130, pool)
    meta["elapsed_s"] = time.perf_counter() - run_started
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print_report(results, keys, meta)
    if args.json:
        write_json(args.json, build_json(results, meta, pool))
    return exit_now(1 if any(result.errors for result in results) else 0, pool)


_hard_exit_needed = False


def exit_now(code: int, pool: ExecutorPool) -> int:
    """Clean up after executors that were abandoned while blocked, then return ``code``.

    Their worker processes may never exit on their own (orphaned
    ProcessPoolExecutor workers don't), so terminate our multiprocessing
    children; and since the interpreter would likely hang at exit joining their
    threads, ask the ``__main__`` block below to leave with os._exit().
    """
    global _hard_exit_needed
    if pool.abandoned:
        log(
            f"warning: abandoned blocked executor(s) {', '.join(sorted(pool.abandoned))}; "
            "terminating child processes; exiting without waiting for their threads"
        )
        for child in multiprocessing.active_children():
            child.terminate()
        _hard_exit_needed = True
    return code


if __name__ == "__main__":
    exit_code = main()
    if _hard_exit_needed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
