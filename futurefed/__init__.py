"""futurefed: run ``concurrent.futures`` code on a federation of brokers.

General layout: ``executor`` holds the public :class:`FederatedExecutor`;
``_agent`` is its socket-owning thread; ``broker/`` and ``worker/`` are the
two kinds of server process; ``protocol`` is the wire contract; ``serialize``
the pickling; ``errors`` every exception. Importing this package is cheap and
side-effect free: the executor and its dependencies load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BrokenFederation,
    FederationLost,
    FutureFedError,
    InitializerFailed,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerLost,
)

if TYPE_CHECKING:
    from .executor import ExecutorView, FederatedExecutor

__all__ = [
    "BrokenFederation",
    "ExecutorView",
    "FederatedExecutor",
    "FederationLost",
    "FutureFedError",
    "InitializerFailed",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "WorkerLost",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("FederatedExecutor", "ExecutorView"):
        from . import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
