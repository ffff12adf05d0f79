"""Configuration from the environment (the manual-launch contract of
DESIGN.md §1.3), validated in one place.

Every invalid value raises :class:`ConfigError` with a one-line message that
names the variable, so command-line entry points can print it and exit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from .errors import ConfigError

__all__ = [
    "Environment", "check_address", "check_connect_address", "from_environ",
    "heartbeat_from_environ", "meta_address_for",
]

DEFAULT_BROKER_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_META_ADDRESS = "tcp://127.0.0.1:5556"
#: FUTUREFED_HEARTBEAT's bounds, in seconds. Beyond the upper one, timeouts
#: derived from it overflow (inf and 1e300 crashed workers).
HEARTBEAT_RANGE = (0.01, 3600.0)

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-*]+):(?P<port>[0-9]+|\*)$")


def check_address(value: str, name: str = "address") -> str:
    """``value`` if it is a ZeroMQ endpoint we can use, else ConfigError."""
    value = value.strip()
    match = _TCP.match(value)
    if match:
        port = match.group("port")
        if port != "*" and not 0 <= int(port) <= 65535:
            raise ConfigError(f"{name}={value!r}: port {port} is out of range")
        return value
    if value.startswith(("ipc://", "inproc://")) and len(value) > len("ipc://"):
        return value
    raise ConfigError(f"{name}={value!r} is not an address like tcp://HOST:PORT")


def check_connect_address(value: str, name: str = "address") -> str:
    """``value`` if another process can connect to it: an address
    :func:`check_address` accepts that names a host and a port (``*`` or
    port 0 only bind) and is not ``inproc://`` (within one process only)."""
    value = check_address(value, name)
    if value.startswith("inproc://"):
        raise ConfigError(f"{name}={value!r}: inproc:// cannot be reached from another process")
    match = _TCP.match(value)
    if match and (match.group("host") == "*" or match.group("port") in ("*", "0")):
        raise ConfigError(
            f"{name}={value!r} is an address to bind, not to connect to: name the host and port"
        )
    return value


def meta_address_for(task_address: str) -> str:
    """The default meta address: the task address with its port plus one (a
    free port if the task port is 0 or ``*``, to be picked at bind time;
    for ``ipc://PATH``, ``ipc://PATH.meta``)."""
    if task_address.startswith("ipc://"):
        return task_address + ".meta"
    match = _TCP.match(task_address)
    if not match:
        raise ConfigError(f"cannot derive a meta address from {task_address!r}")
    port = match.group("port")
    if port in ("0", "*"):
        return f"tcp://{match.group('host')}:0"
    return f"tcp://{match.group('host')}:{int(port) + 1}"


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be 1 or 0")


def _addresses(environ: Mapping[str, str], name: str) -> Tuple[str, ...]:
    raw = environ.get(name, "")
    return tuple(check_address(item, name) for item in re.split(r"[\s,]+", raw) if item)


@dataclass(frozen=True)
class Environment:
    """What the manual-launch variables say (defaults as in DESIGN.md §1.3)."""

    is_origin: bool = True
    worker_name: str = "origin"
    broker_name: str = "broker"
    broker_address: str = DEFAULT_BROKER_ADDRESS
    meta_address: str = DEFAULT_META_ADDRESS
    broker_addresses: Tuple[str, ...] = ()
    meta_addresses: Tuple[str, ...] = ()
    #: True when BROKER_ADDRESS was set, i.e. a federation is configured.
    configured: bool = False
    #: FUTUREFED_HEARTBEAT: seconds between heartbeats; a peer silent for
    #: three of them is lost.
    heartbeat: float = 1.0
    #: FUTUREFED_MAX_RETRIES: runs of a task whose worker was lost, beyond the first.
    max_retries: int = 3


def from_environ(environ: Optional[Mapping[str, str]] = None) -> Environment:
    """Read and validate the manual-launch variables."""
    env = os.environ if environ is None else environ
    broker_address = check_address(
        env.get("BROKER_ADDRESS") or DEFAULT_BROKER_ADDRESS, "BROKER_ADDRESS"
    )
    meta = env.get("META_ADDRESS")
    if meta:
        meta_address = check_address(meta, "META_ADDRESS")
    elif env.get("BROKER_ADDRESS"):
        try:
            meta_address = meta_address_for(broker_address)
        except ConfigError:
            raise ConfigError(
                f"BROKER_ADDRESS={broker_address!r} names no port from which to derive"
                " META_ADDRESS (the task port plus one): set META_ADDRESS"
            ) from None
    else:
        meta_address = DEFAULT_META_ADDRESS
    broker_addresses = tuple(
        check_connect_address(address, "BROKER_ADDRESSES")
        for address in _addresses(env, "BROKER_ADDRESSES")
    )
    meta_addresses = _addresses(env, "META_ADDRESSES") or tuple(
        meta_address_for(address) for address in broker_addresses
    )
    if len(meta_addresses) != len(broker_addresses):
        raise ConfigError(
            f"META_ADDRESSES has {len(meta_addresses)} entries, "
            f"BROKER_ADDRESSES has {len(broker_addresses)}"
        )
    return Environment(
        is_origin=_flag(env, "IS_ORIGIN", True),
        worker_name=env.get("WORKER_NAME") or "origin",
        broker_name=env.get("BROKER_NAME") or "broker",
        broker_address=broker_address,
        meta_address=meta_address,
        broker_addresses=broker_addresses,
        meta_addresses=meta_addresses,
        configured=bool(env.get("BROKER_ADDRESS")),
        heartbeat=heartbeat_from_environ(env),
        max_retries=_number(env, "FUTUREFED_MAX_RETRIES", 3, int, low=0),
    )


def heartbeat_from_environ(environ: Optional[Mapping[str, str]] = None) -> float:
    """FUTUREFED_HEARTBEAT alone (for an origin that joins by address)."""
    low, high = HEARTBEAT_RANGE
    environ = os.environ if environ is None else environ
    return float(_number(environ, "FUTUREFED_HEARTBEAT", 1.0, float, low=low, high=high))


def _number(environ: Mapping[str, str], name: str, default: Any, kind: Any, low: float,
            high: Optional[float] = None) -> Any:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if high is not None and not low <= value <= high:  # also rejects nan and inf
        raise ConfigError(f"{name}={raw!r} must be a number from {low:g} to {high:g}")
    if not value >= low:  # also rejects nan
        raise ConfigError(f"{name}={raw!r} must be at least {low}")
    return value
