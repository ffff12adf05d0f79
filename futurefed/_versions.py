"""The versions peers must share, and the check a broker makes on HELLO.

A pickle made by one cloudpickle (or Python) may not load in another, and
peers of different futurefed releases may not speak the same protocol, so
every origin and worker names its versions in HELLO and the broker refuses
a peer whose versions differ from its own, naming both sides.
"""

from __future__ import annotations

import functools
import sys
from importlib import metadata
from typing import Any, Dict, Optional

from ._version import __version__
from .protocol import VERSION

__all__ = ["local_versions", "mismatch"]


@functools.lru_cache(maxsize=None)
def local_versions() -> Dict[str, str]:
    """This process's protocol, Python (major.minor), futurefed and
    cloudpickle versions."""
    try:
        cloudpickle = metadata.version("cloudpickle")
    except metadata.PackageNotFoundError:
        cloudpickle = "none"
    return {
        "protocol": str(VERSION),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "futurefed": __version__,
        "cloudpickle": cloudpickle,
    }


def mismatch(theirs: Any) -> Optional[str]:
    """Why a peer with versions ``theirs`` (from its HELLO) cannot join, or
    None. A peer that names no versions is let in (tests, old tools)."""
    if theirs is None:
        return None
    if not isinstance(theirs, dict):
        return "its versions are not a JSON object"
    ours = local_versions()
    differ = [key for key in ours if str(theirs.get(key, "?"))[:40] != ours[key]]
    if not differ:
        return None
    them = ", ".join(f"{key} {str(theirs.get(key, '?'))[:40]}" for key in differ)
    us = ", ".join(f"{key} {ours[key]}" for key in differ)
    return f"version mismatch: the peer has {them}; this broker has {us}"
