"""Every error futurefed raises, in one place.

Our exception hierarchy::

    FutureFedError
    ├── ConfigError (ValueError)          bad option or environment variable
    ├── ProtocolError                     a frame that breaks docs/protocol.md
    │   ├── LocalProtocolError            we were about to send one (a bug)
    │   └── RemoteProtocolError           a peer sent one (dropped and logged)
    ├── SerializationError (pickle.PicklingError)
    │                                     an argument, result or exception that
    │                                     cannot cross the wire
    ├── WorkerLost                        a task's worker was lost each time it ran
    ├── TaskTimeout (TimeoutError)        a task ran past its time limit and was stopped
    └── BrokenFederation (concurrent.futures.BrokenExecutor)
        ├── InitializerFailed             the executor's initializer raised in a worker
        └── FederationLost                the origin's broker went away

    RemoteTraceback                       attached as ``__cause__`` of a task's
                                          exception; never raised on its own

The stdlib bases let ``except concurrent.futures.BrokenExecutor``,
``except TimeoutError`` and ``except pickle.PicklingError`` catch ours. This module imports nothing from
futurefed so that every other module may import it.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import Optional, Sequence

__all__ = [
    "BrokenFederation",
    "ConfigError",
    "FederationLost",
    "FutureFedError",
    "InitializerFailed",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "WorkerLost",
]


class FutureFedError(Exception):
    """Base class of every error futurefed raises itself."""


class ConfigError(FutureFedError, ValueError):
    """An option or environment variable has an invalid value."""


class ProtocolError(FutureFedError):
    """A message does not follow the wire protocol (docs/protocol.md)."""


class LocalProtocolError(ProtocolError):
    """We were about to send a message that breaks the protocol."""


class RemoteProtocolError(ProtocolError):
    """A peer sent a message that breaks the protocol."""


class SerializationError(FutureFedError, pickle.PicklingError):
    """An object could not be pickled or unpickled on its way across the wire."""


class BrokenFederation(FutureFedError, concurrent.futures.BrokenExecutor):
    """The executor can no longer run work; pending futures fail with this."""


class InitializerFailed(BrokenFederation):
    """The executor's ``initializer`` raised in a worker.

    Like ``ProcessPoolExecutor``, the executor is then broken: pending and
    later work fail with this error. The worker's traceback is its
    ``__cause__`` and is logged at CRITICAL in the submitting process.
    """


class FederationLost(BrokenFederation):
    """The origin lost its broker, so nothing it submitted can complete."""


class WorkerLost(FutureFedError):
    """A task's worker was lost (it died, hung, or its host dropped off)
    each time the task ran, ``max_retries + 1`` times in all; the attributes
    describe the last one."""

    def __init__(self, message: str, host: str = "?", worker: str = "?", pid: Optional[int] = None,
                 reason: str = "", exit_status: Optional[int] = None,
                 stderr_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.host, self.worker, self.pid, self.reason = host, worker, pid, reason
        #: how the process ended (negative: the signal), where its supervisor
        #: (fedrun's host agent, the embedded federation) saw it end; None
        #: if unknown: a worker started by hand, or one lost by silence
        self.exit_status = exit_status
        #: its last lines on stderr, where its supervisor kept them
        self.stderr_tail = list(stderr_tail)

    @property
    def signal(self) -> Optional[int]:
        """The signal that killed the process, if one did (and it is known)."""
        status = self.exit_status
        return -status if status is not None and status < 0 else None


# concurrent.futures.TimeoutError is the builtin TimeoutError from Python 3.11
# on; before, it is a class of its own, and ``except`` of either should work.
_TIMEOUT_BASES = tuple(dict.fromkeys((TimeoutError, concurrent.futures.TimeoutError)))


class TaskTimeout(FutureFedError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """A task ran longer than its time limit (``task_timeout``, or
    ``options(timeout=...)``) and was stopped; it is not run again.

    The attributes say which task and where: ``function`` (its qualified
    name), ``timeout`` (the limit, in seconds), ``host``, ``worker`` and
    ``pid``. The remote traceback (``__cause__``) shows where the task was
    when it was stopped.
    """

    def __init__(self, message: str, *, function: str = "?", timeout: Optional[float] = None,
                 host: str = "?", worker: str = "?", pid: Optional[int] = None) -> None:
        super().__init__(message)
        self.function, self.timeout = function, timeout
        self.host, self.worker, self.pid = host, worker, pid


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised on a worker.

    Set as ``__cause__`` of the re-raised exception so that the usual
    traceback printout shows where, on which host and worker, it happened.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
