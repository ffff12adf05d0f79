"""FederatedExecutor: ``concurrent.futures`` on a federation of brokers.

Data flow (origin side; see docs/architecture.md for the whole picture)::

    submit()/map()            agent thread                 broker              worker
    +-----------+  deque +   +--------------+  DEALER    +-----------+ ROUTER +----------------+
    | pickle    | -------->  | SUBMIT batch | ---------> | queue,    | -----> | hub greenlet:  |
    | args, fn  |  inproc    | match RESULTS| <--------- | credits,  | <----- | one greenlet   |
    | -> Future |  wake-up   | -> futures   |  RESULTS   | routing   | RESULTS| per task       |
    +-----------+            +--------------+  STARTED   +-----------+        +----------------+

What happens when ``submit(fn, *args)`` is called:

1. The arguments are pickled at once (cloudpickle, protocol 5), so an
   unpicklable argument raises here, in the caller. Large buffers stay
   out-of-band: they are sent from where they lie, without a copy, so the
   caller must leave them unchanged until the future is done.
   ``fn`` is pickled once per executor and named by a digest afterwards.
2. A plain ``concurrent.futures.Future`` is created and the task is handed to
   the agent thread, which alone owns the socket; it sends every task queued
   since it last woke in one SUBMIT message.
3. The broker queues the task and hands it to a worker that has credit. The
   worker announces a task (a start notice, which the broker forwards)
   before it runs it. Only tasks of
   functions that recently finished in under 0.2 ms on that worker go
   unannounced: their result arrives about as soon as the notice would.
   ``cancel()`` asks the broker, which cancels the task if it is still
   queued and otherwise answers that it is running (``_future.py``).
4. The result comes back in a RESULTS batch; the agent settles the future.

Inside a worker, ``FederatedExecutor()`` talks through the worker's own
connection instead and hands out GreenFutures: a task waiting on them parks
and the worker runs other tasks meanwhile.

Time limits: ``task_timeout=`` (every task of the executor) or
``executor.options(timeout=...)`` (a view whose tasks have that limit) travel
with each task; the worker stops a task that runs past its limit, and
``future.cancel(force=True)`` stops one at once (docs/architecture.md §4.5).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import os
import threading
import time
import types
import weakref
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from . import config, protocol, serialize
from ._agent import Agent, BrokenState, watch_executor
from ._future import cancel_all
from .errors import FederationLost
from .outcome import chunk_results
from .security import key_from_environ

__all__ = ["ExecutorView", "FederatedExecutor"]

#: Seconds a FederatedExecutor joining a broker waits for its answer.
CONNECT_TIMEOUT = 10.0

class _Unset:
    """The default of ``options(timeout=...)``: keep the limit as it is."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

_live_agents: "weakref.WeakSet[Agent]" = weakref.WeakSet()
_exiting = False


def _python_exit() -> None:
    """At interpreter exit: let every agent finish its work and close."""
    global _exiting
    _exiting = True
    agents = list(_live_agents)
    for agent in agents:
        agent.stop()
    for agent in agents:
        agent.join()


# A forked child has copies of the agents, not their threads nor sockets:
# its exit must not touch them.
os.register_at_fork(after_in_child=_live_agents.clear)

if hasattr(threading, "_register_atexit"):
    # Runs before non-daemon threads are joined, as for the stdlib executors.
    threading._register_atexit(_python_exit)
else:  # pragma: no cover
    import atexit

    atexit.register(_python_exit)


class _WorkerTransport:
    """Submission through the connection of the worker we run in."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def submit(self, fn: Tuple[bytes, bytes], init: Any, frames: List[Any]) -> futures.Future:  # type: ignore[type-arg]
        return self.worker.submit(fn, init, frames)  # type: ignore[no-any-return]

    def stop(self) -> None:
        pass  # the worker's connection outlives the executor

    def options(self) -> Dict[str, Any]:
        return self.worker.nested_options()  # type: ignore[no-any-return]


def check_timeout(value: Any, name: str = "timeout") -> Optional[float]:
    """``value`` as a time limit in seconds: a positive finite number, or
    None for no limit; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive finite number of seconds or None, not {value!r}")
    return seconds


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[List[Any]]:
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


class FederatedExecutor(futures.Executor):
    """An Executor whose tasks run on the workers of a broker federation.

    Where it runs, in this order: ``address`` given → join that broker; inside
    a futurefed worker → submit through that worker; the environment names a
    broker (``BROKER_ADDRESS``, as set by ``fedrun``) → join it; otherwise start
    an embedded local federation of one broker and ``max_workers`` workers
    that lives and dies with this executor.

    Args:
        max_workers: workers of the embedded federation (default
            ``os.cpu_count()``); must be positive.
        initializer: called as ``initializer(*initargs)`` in each worker
            before the first of this executor's tasks runs there. If it raises,
            the executor is broken: pending and later work fail with
            :class:`~futurefed.errors.InitializerFailed`.
        initargs: arguments of ``initializer``.
        address: a broker's task socket to join instead. When joining, the
            key file named by ``FUTUREFED_KEY_FILE`` (if any) is the
            federation's key (docs/security.md).
        task_timeout: a time limit, in seconds, for each task of this
            executor, counted from when a worker starts it (not while it
            waits in a queue). A task still running then is stopped (its
            worker replaces itself if need be; docs/architecture.md §4.5)
            and its future fails with :class:`~futurefed.errors.TaskTimeout`;
            it is not run again. ``None``: no limit. :meth:`options` makes
            views with other limits.

    Raises:
        ValueError: ``max_workers`` is not positive, or ``task_timeout`` is
            not a positive finite number or None.
        ConfigError: ``address`` or the environment's ``BROKER_ADDRESS`` is
            malformed, or ``FUTUREFED_KEY_FILE`` names a missing, unreadable,
            malformed or group/world-readable file.
        FederationLost: joining, no broker answered within 10 s, or the
            broker refused us.

    Functions are pickled once per executor (cloudpickle, so lambdas,
    closures and ``__main__`` functions work); globals they capture by value
    are those of the first submission.
    """

    def __init__(
        self,
        max_workers: Optional[int] = None,
        *,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        address: Optional[str] = None,
        task_timeout: Optional[float] = None,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._timeout = check_timeout(task_timeout, "task_timeout")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._shared = BrokenState()
        self._shutdown = False
        self._pending: "set[futures.Future[Any]]" = set()
        self._functions: "weakref.WeakKeyDictionary[Any, Tuple[bytes, bytes]]" = (
            weakref.WeakKeyDictionary()
        )
        self._init: Tuple[bytes, Optional[bytes]] = (protocol.NO_INIT, None)
        if initializer is not None:
            self._init = serialize.dump_function((initializer, tuple(initargs)))
        self._transport: Any = self._connect(max_workers, address)

    def _connect(self, max_workers: Optional[int], address: Optional[str]) -> Any:
        from .worker.green import current_hub

        hub = current_hub()
        if address is None and hub is not None:
            worker = hub.owner
            if self._init[1] is None:
                self._init = worker.current_init()
            return _WorkerTransport(worker)
        federation = None
        source = "address"
        key = None
        if address is not None:
            address = config.check_connect_address(address, "address")
            key = key_from_environ()
        else:
            env = config.from_environ()
            if env.configured and env.is_origin:
                address, source = env.broker_address, "BROKER_ADDRESS"
                config.check_connect_address(address, source)
                key = key_from_environ()
            else:
                from .local import LocalFederation

                federation = LocalFederation(max_workers or os.cpu_count() or 1)
                address = federation.address
        agent = Agent(address, self._shared, federation=federation,
                      heartbeat=config.heartbeat_from_environ(), key=key)
        agent.start()
        _live_agents.add(agent)
        watch_executor(self, agent)
        if federation is None:  # joining: fail here, not in every result()
            if not agent.answered.wait(CONNECT_TIMEOUT):
                agent.stop()
                problem = agent.handshake_problem
                raise FederationLost(
                    f"no broker answered at {source}={address} within {CONNECT_TIMEOUT:g} s"
                    + (f": {problem}" if problem else "")
                )
            broken = self._shared.broken
            if broken is not None:
                agent.stop()
                raise broken
        return agent

    # -- the Executor API ----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:  # type: ignore[type-arg]
        """Schedule ``fn(*args, **kwargs)``; returns a Future. Every keyword
        goes to ``fn`` (a time limit is set with ``task_timeout=`` or
        :meth:`options`, never here).

        Raises:
            RuntimeError: after ``shutdown()``.
            BrokenFederation: the executor is broken.
            SerializationError: ``fn`` or an argument cannot be pickled.
        """
        self._check_open()
        return self._submit(fn, self._payload(args, kwargs, self._timeout))

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``map(fn, *iterables)``, run concurrently.

        Results come in input order; a task's error is raised when the
        iterator reaches its position. ``timeout`` counts from this call
        (as in the stdlib; the time limit of each task is ``task_timeout``
        or :meth:`options`). With ``chunksize > 1``, items travel and run in
        chunks of that size, each chunk one message and one task; a time
        limit then applies to each item.
        """
        return self._map(fn, iterables, timeout, chunksize, self._timeout, None)

    def options(self, *, timeout: Union[Optional[float], _Unset] = UNSET) -> "ExecutorView":
        """A view of this executor whose ``submit`` and ``map`` give each task
        the time limit ``timeout`` (seconds from when a worker starts it;
        ``None``: no limit; left out: this executor's ``task_timeout``).

        The view shares this executor's connection and workers; it is cheap
        to make, one per call site if need be::

            limited = executor.options(timeout=30)
            future = limited.submit(fn, x, timeout=5)   # fn gets timeout=5

        Raises:
            ValueError: ``timeout`` is not a positive finite number or None.
        """
        limit = self._timeout if isinstance(timeout, _Unset) else check_timeout(timeout)
        return ExecutorView(self, limit)

    @property
    def task_timeout(self) -> Optional[float]:
        """This executor's time limit per task, in seconds (None: none)."""
        return self._timeout

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: Tuple[Iterable[Any], ...],
        timeout: Optional[float],
        chunksize: int,
        task_timeout: Optional[float],
        view: Optional["ExecutorView"],
    ) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        self._check_open()
        if chunksize == 1:
            calls: Iterable[Tuple[Any, Any]] = ((args, {}) for args in zip(*iterables))
        else:
            calls = ((chunk, None) for chunk in _chunks(zip(*iterables), chunksize))
        fs = [
            self._submit(fn, self._payload(args, kwargs, task_timeout), view)
            for args, kwargs in calls
        ]
        return self._results(fs, end_time, chunked=chunksize > 1)

    @staticmethod
    def _results(
        fs: "List[futures.Future[Any]]", end_time: Optional[float], chunked: bool
    ) -> Iterator[Any]:
        # As the stdlib's: pop each future once consumed and name neither it
        # nor its result while suspended, so that nothing keeps a result the
        # caller has dropped alive; cancel the rest on early exit.
        try:
            fs.reverse()
            while fs:
                if chunked:
                    yield from chunk_results(_next_result(fs, end_time))
                else:
                    yield _next_result(fs, end_time)
        finally:
            cancel_all(fs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``cancel_futures`` cancel what has not
        started; with ``wait`` block until running work is done and every
        process of an embedded federation has exited."""
        with self._shared.lock:
            already = self._shutdown
            self._shutdown = True
        if cancel_futures:
            cancel_all(list(self._pending))
        if already and not wait:
            return
        transport = self._transport
        if transport is None:
            return
        transport.stop()
        if wait:
            if isinstance(transport, Agent):
                transport.join()
            else:
                futures.wait(list(self._pending))

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        broken = self._shared.broken
        if broken is not None:
            raise type(broken)(*broken.args) from broken.__cause__
        if self._shutdown or _exiting:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _payload(self, args: Any, kwargs: Any, timeout: Optional[float]) -> List[Any]:
        """The frames of one call: ``(args, kwargs)``, plus a dict of options
        when there are any (docs/protocol.md §9)."""
        options = self._transport.options() if isinstance(self._transport, _WorkerTransport) else {}
        if timeout is not None:
            options["timeout"] = timeout
        return serialize.dumps((args, kwargs, options) if options else (args, kwargs))

    def _submit(
        self, fn: Callable[..., Any], frames: List[Any], view: Optional["ExecutorView"] = None
    ) -> futures.Future:  # type: ignore[type-arg]
        if not callable(fn):
            raise TypeError(f"{type(fn).__name__!r} object is not callable")
        function = self._function(fn)
        with self._shared.lock:
            # checked again under the lock that shutdown() and a break take
            self._check_open()
            if view is not None and view._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown of this view")
            future = self._transport.submit(function, self._init, frames)
            self._pending.add(future)
            if view is not None:
                view._pending.add(future)
        # The set's method, not the executor's: a future, even a finished
        # one (the stdlib never drops its callbacks), keeps no executor
        # alive, and a collected executor stops its agent (watch_executor).
        future.add_done_callback(self._pending.discard)
        if view is not None:
            future.add_done_callback(view._pending.discard)
        return future

    def _function(self, fn: Callable[..., Any]) -> Tuple[bytes, bytes]:
        # Plain functions and partials are named by identity, so they are
        # pickled once; anything else (bound methods, callable objects) may
        # compare equal to another and is pickled at each call.
        if type(fn) in (types.FunctionType, functools.partial):
            cached = self._functions.get(fn)
            if cached is None:
                cached = self._functions[fn] = serialize.dump_function(fn)
            return cached
        return serialize.dump_function(fn)



def _next_result(fs: "List[futures.Future[Any]]", end_time: Optional[float]) -> Any:
    """The result of the last future of ``fs``, which is popped; one that
    raises (or times out) goes back, to be cancelled with the rest."""
    future = fs.pop()
    try:
        return future.result(None if end_time is None else end_time - time.monotonic())
    except BaseException:
        fs.append(future)
        raise
    finally:
        del future  # the traceback of an error must not keep it alive


class ExecutorView(futures.Executor):
    """``FederatedExecutor.options(...)``: an executor-like view whose tasks
    have their own options (a time limit), submitted through the executor
    it came from (same connection, workers, functions and initializer).

    ``shutdown()`` of a view concerns only the view: no more submissions
    through it; ``wait`` waits for the work submitted through it, and
    ``cancel_futures`` cancels what of it has not started. The executor goes
    on. A ``with`` block over a view therefore waits for that work.
    """

    def __init__(self, executor: FederatedExecutor, timeout: Optional[float]) -> None:
        self._executor = executor
        self._timeout = timeout
        self._shutdown = False
        self._pending: "Set[futures.Future[Any]]" = set()

    @property
    def timeout(self) -> Optional[float]:
        """The time limit of this view's tasks, in seconds (None: none)."""
        return self._timeout

    @property
    def executor(self) -> FederatedExecutor:
        """The executor this view submits through."""
        return self._executor

    def __repr__(self) -> str:
        return f"<ExecutorView of {self._executor!r}: timeout={self._timeout!r}>"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:  # type: ignore[type-arg]
        """As :meth:`FederatedExecutor.submit`, with this view's options.

        Raises:
            RuntimeError: after ``shutdown()`` of this view or of its executor.
        """
        executor = self._executor
        executor._check_open()
        return executor._submit(fn, executor._payload(args, kwargs, self._timeout), self)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """As :meth:`FederatedExecutor.map` (``timeout`` counts from this
        call), with this view's time limit for each task."""
        return self._executor._map(fn, iterables, timeout, chunksize, self._timeout, self)

    def options(self, *, timeout: Union[Optional[float], _Unset] = UNSET) -> "ExecutorView":
        """Another view of the same executor (left out: this view's limit)."""
        limit = self._timeout if isinstance(timeout, _Unset) else check_timeout(timeout)
        return ExecutorView(self._executor, limit)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work through this view; see the class docstring."""
        self._shutdown = True
        if cancel_futures:
            cancel_all(list(self._pending))
        if wait:
            futures.wait(list(self._pending))
