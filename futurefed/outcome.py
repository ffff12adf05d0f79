"""Both ends of a task's outcome: running a call or a map chunk on a worker,
and settling a future from the result record that comes back."""

from __future__ import annotations

import json
import logging
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import protocol as p
from . import serialize
from ._future import TaskFuture
from .errors import (
    InitializerFailed,
    RemoteProtocolError,
    RemoteTraceback,
    SerializationError,
    WorkerLost,
)

__all__ = ["ChunkResult", "resolve_future", "run_call", "run_chunk", "chunk_results"]

logger = logging.getLogger(__name__)

#: What a map chunk returns: the results of the items that ran, then, if an
#: item raised, that exception and its labelled traceback text.
ChunkResult = Tuple[List[Any], Optional[BaseException], str]


def run_call(fn: Callable[..., Any], args: Any, kwargs: Optional[Dict[str, Any]]) -> Any:
    """Run one task; ``kwargs is None`` marks a map chunk, whose ``args`` is a
    list of argument tuples."""
    if kwargs is None:
        return run_chunk(fn, args)
    return fn(*args, **kwargs)


def run_chunk(
    fn: Callable[..., Any],
    chunk: Iterable[Sequence[Any]],
    results: Optional[List[Any]] = None,
    before_each: Optional[Callable[[], None]] = None,
) -> ChunkResult:
    """Run ``fn`` over a chunk, stopping at the first item that raises so that
    the origin can raise that error at that item's position. Results go to
    ``results`` as they come (the worker reads them if it stops the chunk);
    ``before_each`` is called before each item (it restarts a time limit)."""
    if results is None:
        results = []
    for args in chunk:
        if before_each is not None:
            before_each()
        try:
            results.append(fn(*args))
        except Exception as exc:
            return results, exc, serialize.remote_traceback_text(exc)
    return results, None, ""


def chunk_results(outcome: ChunkResult) -> Iterable[Any]:
    """Yield a chunk's results, then raise the error that cut it short.
    Each result is let go once yielded, as the stdlib's ``map`` does."""
    results, exc, text = outcome
    del outcome
    results = list(results)
    results.reverse()
    while results:
        yield results.pop()
    if exc is not None:
        exc.__cause__ = RemoteTraceback(text)
        raise exc


def initializer_failure(frames: Sequence[Any]) -> InitializerFailed:
    """The error that breaks an executor whose initializer raised in a worker."""
    cause = serialize.load_exception(frames)
    logger.critical(
        "the executor's initializer failed in a worker; the executor is broken:%s",
        cause.__cause__,
    )
    broken = InitializerFailed("a worker's initializer raised; the executor is now unusable")
    broken.__cause__ = cause
    return broken


ExitInfo = Callable[[int], Optional[Tuple[Optional[int], List[str]]]]


#: At most this many stderr lines of a LOST record are kept.
MAX_TAIL = 100


def _ended(info: Dict[str, Any]) -> Optional[Tuple[int, List[str]]]:
    """How the worker of a LOST record ended, as its supervisor told the
    broker (WORKER_EXIT): (exit status, negative for a signal; its last
    stderr lines), or None if the record does not say."""
    status, signum, lines = info.get("status"), info.get("signal"), info.get("stderr")
    if isinstance(signum, int) and not isinstance(signum, bool) and signum > 0:
        code = -signum
    elif isinstance(status, int) and not isinstance(status, bool) and status >= 0:
        code = status
    else:
        return None
    if not isinstance(lines, list):
        lines = []
    tail = [line for line in lines[-MAX_TAIL:] if isinstance(line, str)]
    return code, tail


def worker_lost(frames: Sequence[Any], exit_info: Optional[ExitInfo] = None) -> WorkerLost:
    """The WorkerLost of a LOST record (a JSON frame from the broker). The
    process's exit status and last stderr lines come from the record where
    its supervisor reported them (fedrun's host agent, the embedded
    federation), else from ``exit_info`` (the embedded federation, which
    started it) where that knows them."""
    try:
        info = json.loads(bytes(frames[0]))
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (IndexError, ValueError, TypeError):
        info = {}
    host, worker = str(info.get("host", "?")), str(info.get("worker", "?"))
    pid = info.get("pid") if isinstance(info.get("pid"), int) else None
    reason = str(info.get("reason", ""))
    attempts = info.get("attempts", "?")
    message = (
        f"the task's worker was lost each of the {attempts} times it ran; the last was"
        f" {worker} on {host} (pid {pid}): {reason}"
    )
    status: Optional[int] = None
    tail: List[str] = []
    ended = _ended(info)
    known = exit_info(pid) if ended is None and exit_info is not None and pid is not None else None
    if ended is not None:
        status, tail = ended  # the reason says how it ended
    elif known is not None:
        status, tail = known
        if status is None:
            message += "; the process is still running (hung?)"
        elif status < 0:
            message += f"; it was killed by {_signal_name(-status)}"
        else:
            message += f"; it exited with status {status}"
    if tail:
        message += "; its last lines on stderr:\n" + "\n".join(f"  {line}" for line in tail)
    return WorkerLost(message, host=host, worker=worker, pid=pid, reason=reason,
                      exit_status=status, stderr_tail=tail)


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def resolve_future(
    future: TaskFuture, record: p.ResultRecord, exit_info: Optional[ExitInfo] = None
) -> None:
    """Settle ``future`` from a result record (INIT_FAILED is the caller's
    business: it breaks the whole executor)."""
    if future.done():
        return  # only a broken executor settles futures otherwise
    status = record.status
    try:
        if status is p.Status.OK:
            future.set_result(serialize.loads(record.frames))
        elif status is p.Status.ERROR:
            future.set_exception(serialize.load_exception(record.frames))
        elif status is p.Status.CANCELLED:
            future.confirm_cancel()
        elif status is p.Status.INIT_FAILED:
            future.set_exception(initializer_failure(record.frames))
        elif status is p.Status.LOST:
            future.set_exception(worker_lost(record.frames, exit_info))
        else:
            reason = bytes(record.frames[0]).decode(errors="replace") if record.frames else ""
            future.set_exception(RemoteProtocolError(f"the broker rejected the task: {reason}"))
    except SerializationError as exc:
        future.set_exception(exc)
    except futures.InvalidStateError:
        pass  # settled meanwhile by a broken executor
