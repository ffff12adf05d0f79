#!/usr/bin/env python3
"""Federation benchmark: ProcessPoolExecutor vs futurefed on 1 broker vs 3 brokers.

All three executors have the same total number of workers W, run in this one
process tree during one run, and take turns sample by sample (the order
reverses on every repetition); each table cell is the MEDIAN of the
repetitions, because the machines this runs on are shared and noisy.

The futurefed brokers and workers are separate processes started the way a
user starts them by hand, configured only by the environment of DESIGN.md
§1.3::

    BROKER_NAME=A BROKER_ADDRESS=tcp://127.0.0.1:0 python -m futurefed.broker -v
    BROKER_NAME=B BROKER_ADDRESS=tcp://127.0.0.1:0 BROKER_ADDRESSES="<A>" \\
        META_ADDRESSES="<A meta>" python -m futurefed.broker -v
    BROKER_NAME=C ... BROKER_ADDRESSES="<A> <B>" META_ADDRESSES="<A meta> <B meta>" ...
    IS_ORIGIN=0 WORKER_NAME=f3-A-w1 BROKER_ADDRESS=<A> PYTHONPATH=benchmarks:<repo> \\
        python -m futurefed.worker

and this process (the origin) joins broker A with
``FederatedExecutor(address=<A>)``.

Run ``python benchmarks/bench_federation.py --help``; see the "Federation
scenario" section of ``benchmarks/README.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # when imported rather than run as a script
    sys.path.insert(0, str(HERE))

import fedbench_tasks as tasks  # noqa: E402
from harness import Hung, call_with_deadline, call_with_watchdog, describe_failure  # noqa: E402
from harness import Metric, Sample, Scenario, ScenarioResult, alternating  # noqa: E402
from harness import check, latency_sample, map_sample, timed_sample, wait_all  # noqa: E402
from harness import MEDIANS_NOTE, format_table, run_summary, scenario_json  # noqa: E402
from harness import import_futurefed, log, positive_int, run_meta, write_json  # noqa: E402

BOUND = re.compile(r"bound (tcp://\S+) \(meta (tcp://\S+)\)")
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
TARGET_TASK_S = 0.020  # one cpu task, alone on one core


class BenchError(RuntimeError):
    """A failure that ends the run (or one executor's part in it), with a clear message."""


# --------------------------------------------------------------------------
# CPU calibration
# --------------------------------------------------------------------------


@dataclass
class Calibration:
    iterations: int
    task_s: float  # median time of one burn(iterations) here, alone
    checksum: int
    samples_s: list[float]


def time_burn(iterations: int, runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        tasks.burn(iterations)
        timings.append(time.perf_counter() - started)
    return timings


def calibrate(target_s: float = TARGET_TASK_S) -> Calibration:
    """Pick the loop count for which one task takes ``target_s`` on one core, alone.

    Done once, in this process, before any executor or broker exists: a short
    warm-up (so the CPU clock has ramped up), a coarse estimate, one refinement
    from 9 runs, then the task time is the FASTEST of 9 more runs: on a shared
    machine, noise only ever adds time, and a task time overstated by noise
    would overstate every efficiency (above 100% even).
    """
    time_burn(10_000, 1)
    warm_until = time.perf_counter() + 0.3
    while time.perf_counter() < warm_until:
        tasks.burn(10_000)
    iterations = 10_000
    while True:  # grow until one measurement is long enough to trust
        elapsed = min(time_burn(iterations, 3))
        if elapsed >= 0.05 or iterations >= 1 << 30:
            break
        iterations *= 4
    iterations = max(1, round(iterations * target_s / elapsed))
    iterations = max(1, round(iterations * target_s / min(time_burn(iterations, 9))))
    timings = time_burn(iterations, 9)
    return Calibration(iterations, min(timings), tasks.burn(iterations), timings)


# --------------------------------------------------------------------------
# Processes started by hand (brokers and workers)
# --------------------------------------------------------------------------


class Proc:
    """One child process; a thread keeps reading its stderr so the pipe never fills."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.eof = False
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, name=f"stderr of {name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.eof = True
            self._changed.notify_all()

    def wait_for(
        self, pattern: re.Pattern[str], timeout: float, about: Proc | None = None
    ) -> re.Match[str]:
        """The first stderr line matching ``pattern``, waiting up to ``timeout``.

        Gives up early if this process closes its stderr or ``about`` (the
        process the line is expected to be about) exits.
        """

        def found() -> re.Match[str] | None:
            return next((m for line in self.lines if (m := pattern.search(line))), None)

        deadline = time.monotonic() + timeout
        gone: Proc | None = None
        with self._changed:
            while (match := found()) is None:
                left = deadline - time.monotonic()
                if self.eof:
                    gone = self
                elif about is not None and about.popen.poll() is not None:
                    gone = about
                if gone is not None or left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
        if match is not None:
            return match
        if gone is not None:
            try:
                status = gone.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                status = None
            why = f"{gone.name} (pid {gone.pid}) exited with status {status}"
        else:
            why = f"not within {timeout:g}s"
        tails = self.tail() + (f"\n{about.tail()}" if about is not None else "")
        raise BenchError(
            f"{self.name} (pid {self.pid}) never logged {pattern.pattern!r}: {why}.\n{tails}"
        )

    def tail(self, lines: int = 15) -> str:
        with self._changed:
            last = self.lines[-lines:]
        body = "\n".join(f"    {line}" for line in last) or "    (nothing)"
        return f"  last stderr lines of {self.name}:\n{body}"

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; always reaps. Returns the exit status."""
        if self.popen.poll() is None:
            try:
                self.popen.terminate()
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log(f"  warning: {self.name} (pid {self.pid}) ignored SIGTERM; killing it")
                self.popen.kill()
                self.popen.wait()
        self._reader.join(STOP_GRACE_S)
        return self.popen.returncode


def child_env(overrides: dict[str, str], futurefed_dir: Path) -> dict[str, str]:
    """This process's environment without the federation variables, plus ``overrides``.

    PYTHONPATH gets the benchmarks directory (the task module) and the directory
    holding the futurefed we imported, so every process runs the same futurefed.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in (
            "BROKER_NAME",
            "BROKER_ADDRESS",
            "META_ADDRESS",
            "BROKER_ADDRESSES",
            "META_ADDRESSES",
            "WORKER_NAME",
            "IS_ORIGIN",
        )
    }
    paths = [str(HERE), str(futurefed_dir), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.update(overrides)
    return env


@dataclass
class BrokerInfo:
    name: str
    task: str
    meta: str
    proc: Proc


# --------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------


class Contender:
    """One executor under test; start() (untimed), executor, check(), close()."""

    key = ""
    label = ""
    executor: Executor | None = None

    def start(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise BenchError if something it depends on has died."""

    def expected_workers(self) -> list[str]:
        return []

    def tails(self) -> str:
        """The last stderr lines of its processes, for error messages ('' if none)."""
        return ""

    def close(self) -> None:
        raise NotImplementedError


class PPE(Contender):
    key = "ppe"
    label = "ProcessPoolExecutor"

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def start(self) -> None:
        self.executor = ProcessPoolExecutor(self.workers)

    def close(self) -> None:
        """shutdown(); if that blocks (a broken pool), SIGTERM its processes by pid."""
        executor, self.executor = self.executor, None
        if executor is None:
            return
        # CPython's {pid: Process}; read before shutdown() clears it
        processes = list((getattr(executor, "_processes", None) or {}).values())
        try:
            call_with_deadline(
                lambda: executor.shutdown(wait=True, cancel_futures=True),
                STOP_GRACE_S * 2,
                "shutting down ppe",
            )
        finally:
            for process in processes:
                if process.is_alive():
                    log(f"  warning: terminating ProcessPoolExecutor worker pid {process.pid}")
                    process.terminate()
                    process.join(STOP_GRACE_S)
                    if process.is_alive():
                        log(f"  warning: pid {process.pid} ignored SIGTERM; killing it")
                        process.kill()
                        process.join(STOP_GRACE_S)


class Federation(Contender):
    """Brokers and workers as separate processes, plus a FederatedExecutor on broker[0]."""

    def __init__(
        self, key: str, label: str, split: Sequence[int], timeout: float, futurefed_dir: Path
    ) -> None:
        self.key, self.label = key, label
        self.split = list(split)
        self.timeout = timeout
        self.futurefed_dir = futurefed_dir
        self.brokers: list[BrokerInfo] = []
        self.workers: list[Proc] = []
        self.procs: list[Proc] = []  # everything started, in start order

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, child_env(env, self.futurefed_dir))
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        for index in range(len(self.split)):
            name = f"{self.key}-{chr(ord('A') + index)}"
            peers = self.brokers[:]  # B peers with A, C with A and B
            proc = self._spawn(
                f"broker {name}",
                [sys.executable, "-m", "futurefed.broker", "-v"],
                {
                    "BROKER_NAME": name,
                    "BROKER_ADDRESS": "tcp://127.0.0.1:0",
                    "BROKER_ADDRESSES": " ".join(p.task for p in peers),
                    "META_ADDRESSES": " ".join(p.meta for p in peers),
                },
            )
            match = proc.wait_for(BOUND, self.timeout)
            self.brokers.append(BrokerInfo(name, match.group(1), match.group(2), proc))
        pending = []
        for broker, count in zip(self.brokers, self.split):
            for number in range(1, count + 1):
                name = (
                    f"{broker.name}-w{number}" if len(self.split) > 1 else f"{self.key}-w{number}"
                )
                proc = self._spawn(
                    f"worker {name}",
                    [sys.executable, "-m", "futurefed.worker"],
                    {"IS_ORIGIN": "0", "WORKER_NAME": name, "BROKER_ADDRESS": broker.task},
                )
                self.workers.append(proc)
                pending.append((broker, name, proc))
        for broker, name, proc in pending:  # started together, awaited one by one
            joined = re.compile(rf"<worker {re.escape(name)} on \S+ pid {proc.pid}> joined")
            broker.proc.wait_for(joined, self.timeout, about=proc)
        cls = import_futurefed().FederatedExecutor
        address = self.brokers[0].task
        self.executor = call_with_deadline(
            lambda: cls(address=address), self.timeout, f"FederatedExecutor(address={address!r})"
        )

    def expected_workers(self) -> list[str]:
        return [p.name.removeprefix("worker ") for p in self.workers]

    def tails(self) -> str:
        return "".join(f"\n{p.tail(5)}" for p in self.procs)

    def check(self) -> None:
        dead = [p for p in self.procs if p.popen.poll() is not None]
        if dead:
            raise BenchError(
                "; ".join(
                    f"{p.name} (pid {p.pid}) exited with status {p.popen.returncode}" for p in dead
                )
                + "\n"
                + "\n".join(p.tail() for p in dead)
            )

    def describe(self) -> str:
        parts = []
        for broker, count in zip(self.brokers, self.split):
            parts.append(f"{broker.name} {broker.task} ({count} worker{'s' * (count != 1)})")
        return ", ".join(parts)

    def close(self) -> None:
        """Shut the executor down, then SIGTERM workers, then brokers (each reaped)."""
        try:
            if self.executor is not None:
                executor, self.executor = self.executor, None
                call_with_deadline(
                    lambda: executor.shutdown(wait=True, cancel_futures=True),
                    STOP_GRACE_S * 2,
                    f"shutting down {self.key}",
                )
        finally:
            for proc in self.workers + [b.proc for b in self.brokers]:
                proc.stop()
            for proc in self.procs:  # anything not reached above (e.g. a broker that never bound)
                proc.stop()


def split_workers(workers: int, brokers: int) -> list[int]:
    """Workers per broker: the first gets the remainder, so every broker has one if possible."""
    rest = workers // brokers
    return [workers - rest * (brokers - 1)] + [rest] * (brokers - 1)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    cpu_tasks: int = 400
    map_items: int = 2_000
    latency_calls: int = 500

    def scaled_down(self, divisor: int) -> Sizes:
        return replace(
            self,
            cpu_tasks=self.cpu_tasks // divisor,
            map_items=self.map_items // divisor,
            latency_calls=self.latency_calls // divisor,
        )


@dataclass
class Context:
    sizes: Sizes
    workers: int
    timeout: float
    calibration: Calibration


def worker_label(name: str | None, pid: int) -> str:
    return name if name else f"pid {pid}"


def run_cpu(executor: Executor, ctx: Context) -> Sample:
    n, cal = ctx.sizes.cpu_tasks, ctx.calibration
    started = time.perf_counter()
    futures = [executor.submit(tasks.cpu_task, cal.iterations) for _ in range(n)]
    wait_all(futures, ctx.timeout)
    wall = time.perf_counter() - started
    results = [f.result() for f in futures]
    check(
        all(checksum == cal.checksum for _, _, checksum in results),
        "cpu_task() returned a wrong checksum",
    )
    per_worker = Counter(worker_label(name, pid) for name, pid, _ in results)
    cores = min(ctx.workers, os.cpu_count() or 1)
    return Sample(
        {"wall": wall, "efficiency": n * cal.task_s / (cores * wall)},
        {"elapsed_s": wall, "tasks_per_worker": dict(sorted(per_worker.items()))},
    )


def run_map(executor: Executor, ctx: Context) -> Sample:
    return map_sample(executor, tasks.noop, ctx.sizes.map_items, 1, ctx.timeout)


def run_latency(executor: Executor, ctx: Context) -> Sample:
    return latency_sample(executor, tasks.noop, ctx.sizes.latency_calls, ctx.timeout)


SCENARIOS: dict[str, Scenario[Context]] = {
    s.name: s
    for s in (
        Scenario(
            "cpu",
            "fixed-work CPU tasks (calibrated loop), submit all then wait",
            lambda s: f"{s.cpu_tasks} tasks",
            (
                Metric("wall", "cpu tasks wall time", "s", False, ",.3f"),
                Metric("efficiency", "cpu parallel efficiency", "of ideal", True, ".1%"),
            ),
            run_cpu,
        ),
        Scenario(
            "map_c1",
            "list(ex.map(noop, range(N))), chunksize=1",
            lambda s: f"{s.map_items:,} items",
            (Metric("throughput", "map noop chunksize=1", "tasks/s", True, ",.0f"),),
            run_map,
        ),
        Scenario(
            "latency",
            "sequential submit(noop).result() round trips",
            lambda s: f"{s.latency_calls:,} round trips",
            (
                Metric("p50", "round trip latency p50", "µs", False, ",.1f"),
                Metric("p99", "round trip latency p99", "µs", False, ",.1f"),
            ),
            run_latency,
        ),
    )
}


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def warm_up(contender: Contender, workers: int, timeout: float) -> Executor:
    """An untimed no-op map of ``2 * workers`` items; returns the executor."""
    executor = contender.executor
    if executor is None:
        raise BenchError(f"{contender.label} is not running")
    list(executor.map(tasks.noop, range(2 * workers), timeout=timeout))
    return executor


def describe(exc: BaseException, timeout: float) -> str:
    """A one-line description of a failure."""
    if isinstance(exc, BenchError):
        return str(exc)
    return describe_failure(exc, timeout)


def take_sample(
    scenario: Scenario[Context], contender: Contender, ctx: Context
) -> Sample:
    """Check the processes, warm up (untimed), then run one timed sample."""
    contender.check()
    executor = warm_up(contender, ctx.workers, ctx.timeout)
    sample = timed_sample(scenario, executor, ctx)
    contender.check()
    return sample


class Runner:
    def __init__(self, contenders: Sequence[Contender], ctx: Context, repeat: int) -> None:
        self.contenders = list(contenders)
        self.ctx = ctx
        self.repeat = repeat
        self.failed: dict[str, str] = {}  # key -> first error; skipped afterwards
        self.abandoned = False  # a sample thread was left blocked

    def run(self, scenario: Scenario[Context]) -> ScenarioResult:
        ctx = self.ctx
        result = ScenarioResult(scenario, {c.key: [] for c in self.contenders})
        log(scenario.headline(ctx.sizes))
        for rep, order in alternating(self.contenders, self.repeat):
            for contender in order:
                key = contender.key
                if key in self.failed:
                    result.errors.setdefault(key, f"skipped: failed earlier ({self.failed[key]})")
                    continue
                label = f"rep {rep + 1}/{self.repeat} {key:>4}"
                try:
                    sample = call_with_watchdog(
                        partial(take_sample, scenario, contender, ctx),
                        ctx.timeout,
                        f"{scenario.name}/{key}",
                    )
                except Exception as exc:
                    if isinstance(exc, Hung):
                        self.abandoned = True
                        message = f"{exc}\n  stack of the blocked thread:\n{exc.stack}"
                    else:
                        message = describe(exc, ctx.timeout)
                    if not isinstance(exc, BenchError):
                        message += contender.tails()
                    first_line = message.splitlines()[0]
                    result.errors[key] = message
                    self.failed[key] = f"{scenario.name}: {first_line}"
                    log(f"  {label}: FAILED {message}")
                    continue
                result.add(key, rep, sample)
                log(f"  {label}: {scenario.format_values(sample)}")
        return result


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

COMPARISONS = (("fed1", "ppe", "1b/ppe"), ("fed3", "ppe", "3b/ppe"), ("fed3", "fed1", "3b/1b"))


def render_table(results: Sequence[ScenarioResult], contenders: Sequence[Contender]) -> str:
    keys = [c.key for c in contenders]
    comparisons = [c for c in COMPARISONS if c[0] in keys and c[1] in keys]
    rows = [["scenario", "unit", *(c.label for c in contenders), *(c[2] for c in comparisons)]]
    for result in results:
        for metric in result.scenario.metrics:
            row = [metric.label, metric.unit_cell]
            for key in keys:
                median = result.median(metric, key)
                if median is None:
                    row.append("ERROR" if key in result.errors else "-")
                else:
                    row.append(format(median, metric.fmt))
            for key, base, _ in comparisons:
                ratio = result.ratio(metric, key, base)
                row.append("-" if ratio is None else f"{ratio:.2f}")
            rows.append(row)
    return format_table(rows)


def render_distribution(result: ScenarioResult, contenders: Sequence[Contender]) -> list[str]:
    """Which workers ran how many cpu tasks, summed over the samples; flags idle workers."""
    lines = ["cpu tasks per worker (summed over samples; per sample in brackets):"]
    warnings = []
    for contender in contenders:
        samples = result.samples.get(contender.key, [])
        if not samples:
            continue
        per_sample = [s.raw["tasks_per_worker"] for s in samples]
        names = list(dict.fromkeys(contender.expected_workers()))
        for counts in per_sample:
            names += [n for n in counts if n not in names]
        parts = []
        for name in names:
            counts = [c.get(name, 0) for c in per_sample]
            parts.append(f"{name} {sum(counts)} [{' '.join(map(str, counts))}]")
            if min(counts) == 0:
                idle = sum(1 for c in counts if c == 0)
                warnings.append(
                    f"  WARNING {contender.label}: worker {name} ran no cpu task "
                    f"in {idle} of {len(counts)} sample(s)"
                )
        lines.append(f"  {contender.label:<19} {', '.join(parts)}")
    return lines + warnings


def build_json(
    results: Sequence[ScenarioResult],
    contenders: Sequence[Contender],
    meta: dict[str, Any],
) -> dict[str, Any]:
    keys = [c.key for c in contenders]

    def ratios(result: ScenarioResult, metric: Metric) -> dict[str, Any]:
        return {
            "ratios": {
                name: {
                    "of_medians": result.ratio(metric, key, base),
                    "paired_median": result.paired_ratio(metric, key, base),
                }
                for key, base, name in COMPARISONS
                if key in keys and base in keys
            }
        }

    scenarios = {r.scenario.name: scenario_json(r, keys, ratios) for r in results}
    return {"meta": meta, "scenarios": scenarios}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare ProcessPoolExecutor with futurefed on 1 broker and on 3 "
        "federated brokers, all with the same total number of workers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios (always all, in this order):\n"
        + "\n".join(f"  {s.name:<8} {s.summary}" for s in SCENARIOS.values()),
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=3,
        help="total workers of every executor (default: %(default)s, one per broker)",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=None,
        help="samples per scenario and executor; the median is reported "
        "(default: 5, or 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: repeat=1, 1/10 sizes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw samples and medians")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time budget of each sample and of each process start-up (default: %(default)s)",
    )
    return parser.parse_args(argv)


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind so that every started process is ended."""


def on_signal(signum: int, _frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> tuple[int, bool]:
    """Returns (exit status, whether a blocked thread was abandoned)."""
    args = parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    sizes = Sizes().scaled_down(10) if args.quick else Sizes()
    workers = args.workers
    cpus = os.cpu_count() or 1

    try:
        futurefed = import_futurefed()
        futurefed.FederatedExecutor  # noqa: B018
    except (ImportError, AttributeError) as exc:
        log(f"error: cannot use futurefed.FederatedExecutor: {exc}")
        return 1, False
    futurefed_dir = Path(futurefed.__file__).resolve().parent.parent

    run_started = time.perf_counter()
    meta: dict[str, Any] = {
        **run_meta(),
        "cpu_count": cpus,
        "loadavg_start": os.getloadavg(),
        "workers": workers,
        "repeat": repeat,
        "quick": args.quick,
        "timeout_s": args.timeout,
        "sizes": asdict(sizes),
        "futurefed_version": getattr(futurefed, "__version__", None),
        "futurefed_file": futurefed.__file__,
    }
    log(
        f"federation benchmark: workers={workers} repeat={repeat}"
        f"{' (quick)' if args.quick else ''}; calibrating the cpu task..."
    )
    cal = calibrate()
    log(
        f"  {cal.iterations:,} loop iterations take {cal.task_s * 1000:.2f} ms here "
        f"(fastest of {len(cal.samples_s)}; "
        f"median {statistics.median(cal.samples_s) * 1000:.2f} ms)"
    )
    meta["calibration"] = asdict(cal)
    split3 = split_workers(workers, 3)
    if min(split3) == 0:
        log(
            f"  warning: --workers {workers} < 3 leaves a broker of the 3-broker federation "
            f"without workers (split {split3})"
        )
    contenders: list[Contender] = [
        PPE(workers),  # first: it forks before this process starts more threads
        Federation("fed1", "1 broker", [workers], args.timeout, futurefed_dir),
        Federation("fed3", "3 brokers", split3, args.timeout, futurefed_dir),
    ]
    ctx = Context(sizes, workers, args.timeout, cal)
    runner = Runner(contenders, ctx, repeat)
    results: list[ScenarioResult] = []
    status = 0
    close_failed = False
    started: list[Contender] = []
    try:
        for contender in contenders:
            t0 = time.perf_counter()
            started.append(contender)
            try:
                contender.start()  # every wait in here has its own timeout
                call_with_watchdog(
                    partial(warm_up, contender, workers, args.timeout),
                    args.timeout,
                    f"warming up {contender.key}",
                )
            except (BenchError, Hung):
                raise
            except Exception as exc:
                raise BenchError(
                    f"{contender.label} did not start: {describe(exc, args.timeout)}"
                    + contender.tails()
                ) from exc
            took = time.perf_counter() - t0
            meta.setdefault("startup_s", {})[contender.key] = took
            where = f": {contender.describe()}" if isinstance(contender, Federation) else ""
            log(f"  {contender.label} ready in {took:.2f}s (not timed){where}")
        for contender in contenders:
            if isinstance(contender, Federation):
                meta.setdefault("federations", {})[contender.key] = {
                    "brokers": [
                        {
                            "name": b.name,
                            "task": b.task,
                            "meta": b.meta,
                            "pid": b.proc.pid,
                            "workers": n,
                        }
                        for b, n in zip(contender.brokers, contender.split)
                    ],
                    "workers": {p.name.removeprefix("worker "): p.pid for p in contender.workers},
                }
        for scenario in SCENARIOS.values():
            results.append(runner.run(scenario))
    except (BenchError, Hung) as exc:
        log(f"error: {exc}")
        if isinstance(exc, Hung):
            log(f"  stack of the blocked thread:\n{exc.stack}")
            runner.abandoned = True
        status = 1
    except (KeyboardInterrupt, Terminated) as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); stopping every started process")
        status = 130
    finally:
        for contender in reversed(started):
            try:
                contender.close()
            except Hung as exc:
                log(f"error: closing {contender.label}: {exc}")
                runner.abandoned = True
                close_failed = True
            except Exception as exc:  # the processes are ended regardless
                log(f"error: closing {contender.label}: {type(exc).__name__}: {exc}")
                close_failed = True
    if status:
        return status, runner.abandoned

    meta["elapsed_s"] = time.perf_counter() - run_started
    meta["loadavg_end"] = os.getloadavg()
    end_timings = time_burn(cal.iterations, 9)
    meta["calibration_end_s"] = end_timings
    print(run_summary(meta))
    print(
        f"brokers: 1 broker = [{workers}] workers; 3 brokers = A{split3[0]} B{split3[1]} "
        f"C{split3[2]} (B peers with A, C with A and B; the origin is on A)"
    )
    print(render_table(results, contenders))
    print()
    print(MEDIANS_NOTE)
    print("Ratios > 1.00 mean the first-named is better (throughput x/y; latency and wall y/x).")
    print(
        f"cpu task: {cal.iterations:,} loop iterations = {cal.task_s * 1000:.2f} ms alone "
        f"(fastest of 9 at start; {min(end_timings) * 1000:.2f} ms re-timed at end); "
        f"efficiency = {sizes.cpu_tasks} x {cal.task_s * 1000:.2f} ms / "
        f"(min(workers, cpus) = {min(workers, cpus)} x wall)."
    )
    cpu_result = next((r for r in results if r.scenario.name == "cpu"), None)
    if cpu_result is not None:
        print("\n".join(render_distribution(cpu_result, contenders)))
    errors = [
        f"  {r.scenario.name}/{key}: {message}"
        for r in results
        for key, message in r.errors.items()
    ]
    if errors:
        print("\nErrors:")
        print("\n".join(errors))
    print(f"Total run time: {meta['elapsed_s']:.1f}s")
    if args.json:
        write_json(args.json, build_json(results, contenders, meta))
    if close_failed:
        print("\nError: an executor did not shut down cleanly (see stderr).")
    return (1 if errors or close_failed else 0), runner.abandoned


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    code, abandoned = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if abandoned:
        # A thread is still blocked inside an executor; interpreter shutdown would
        # wait for it. Every child process has been ended already.
        log("warning: leaving a blocked thread behind; exiting without joining it")
        os._exit(code)
    sys.exit(code)
