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
    WorkerLost,
)

if TYPE_CHECKING:
    from .executor import FederatedExecutor

__all__ = [
    "BrokenFederation",
    "FederatedExecutor",
    "FederationLost",
    "FutureFedError",
    "InitializerFailed",
    "RemoteTraceback",
    "SerializationError",
    "WorkerLost",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "FederatedExecutor":
        from .executor import FederatedExecutor

        return FederatedExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
