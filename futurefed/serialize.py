"""Pickling for the wire: cloudpickle, protocol 5, out-of-band buffers.

A pickled object travels as a list of frames: the pickle stream first, then
its out-of-band buffers, each of which becomes its own zero-copy ZeroMQ frame.
Large ``bytes`` objects go out-of-band too (the stdlib pickles them in-band),
so a 64 MiB argument is never copied into the pickle stream.

This is the only module that imports cloudpickle; the broker never imports it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import sys
import traceback
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cloudpickle

from .errors import RemoteTraceback, SerializationError

__all__ = [
    "digest",
    "dump_exception",
    "dump_function",
    "dumps",
    "load_exception",
    "loads",
    "remote_traceback_text",
    "set_process_label",
    "share_main_globals",
]

PROTOCOL = 5
#: Buffers (and ``bytes``) at least this large travel as separate frames.
OOB_THRESHOLD = 64 * 1024

_process_label = f"origin on {socket.gethostname()} (pid {os.getpid()})"


def set_process_label(worker_name: str) -> None:
    """Name this process in the remote tracebacks it produces."""
    global _process_label
    _process_label = f"worker {worker_name} on {socket.gethostname()} (pid {os.getpid()})"


def _rebuild_bytes(buffer: Any) -> bytes:
    return bytes(buffer)


def _rebuild_bytearray(buffer: Any) -> bytearray:
    return bytearray(buffer)


class _LargeBytes:
    """Stands in for a large ``bytes`` or ``bytearray`` so that it pickles
    out-of-band.

    Picklers never call ``reducer_override`` for exact ``bytes`` and pickle
    ``bytearray`` in-band themselves, so the
    wrapping happens before pickling, near the top of the object: the value
    itself and the items of small tuples, lists and dicts two levels down
    (which covers ``(args, kwargs)`` and a returned value).
    """

    __slots__ = ("data",)

    def __init__(self, data: Union[bytes, bytearray]) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        rebuild = _rebuild_bytes if type(self.data) is bytes else _rebuild_bytearray
        return rebuild, (pickle.PickleBuffer(self.data),)


_SHALLOW_LIMIT = 64  # containers longer than this are not scanned
_LIFTABLE = frozenset({bytes, bytearray, tuple, list, dict})


def _lift_large_bytes(obj: Any, depth: int = 2, memo: Optional[Dict[int, Any]] = None) -> Any:
    """``obj`` with its large bytes wrapped (see _LargeBytes): the object
    itself when none is found; else copies of the containers on the way to
    them, one per original (``memo``), so that what was shared, or refers
    to itself, stays so, and a buffer met twice is sent once."""
    kind = type(obj)
    if kind not in _LIFTABLE:
        return obj
    if memo is None:
        memo = {}
    else:
        done = memo.get(id(obj))
        if done is not None:  # met before, at whatever depth
            return done[1]
    if kind is bytes or kind is bytearray:
        if len(obj) < OOB_THRESHOLD:
            return obj
    elif depth == 0 or len(obj) > _SHALLOW_LIMIT:
        return obj
    if kind is bytes or kind is bytearray:
        lifted: Any = _LargeBytes(obj)
    elif kind is tuple:
        items = [_lift_large_bytes(item, depth - 1, memo) for item in obj]
        lifted = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    else:
        lifted = kind()  # known before its items, should one of them be itself
        memo[id(obj)] = (obj, lifted)
        if kind is dict:
            lifted.update((key, _lift_large_bytes(value, depth - 1, memo))
                          for key, value in obj.items())
            changed = any(lifted[key] is not value for key, value in obj.items())
        else:
            lifted.extend(_lift_large_bytes(item, depth - 1, memo) for item in obj)
            changed = any(a is not b for a, b in zip(lifted, obj))
        if not changed:
            lifted = obj
    memo[id(obj)] = (obj, lifted)  # the original too: its id must not be reused meanwhile
    return lifted


#: Types whose values plain pickle writes exactly as cloudpickle would.
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str})
_PLAIN_CONTAINERS = frozenset({tuple, list, dict})


def _is_plain(obj: Any, depth: int = 2) -> bool:
    """Whether ``obj`` is a scalar, small bytes, or a small tuple, list or
    dict of them (two levels deep): data with no code, classes or large
    buffers in it, which the C pickler alone handles (``((), {})``, the
    arguments of a call with none, takes a sixth of cloudpickle's time)."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is bytes:
        return len(obj) < OOB_THRESHOLD
    if depth == 0 or kind not in _PLAIN_CONTAINERS or len(obj) > _SHALLOW_LIMIT:
        return False
    if kind is dict:
        return all(type(key) in _PLAIN_SCALARS and _is_plain(value, depth - 1)
                   for key, value in obj.items())
    return all(_is_plain(item, depth - 1) for item in obj)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler; one class so that later tweaks have a home."""


def dumps(obj: Any) -> List[Any]:
    """Pickle ``obj`` into ``[stream, *out_of_band_buffers]``.

    Raises SerializationError (a ``pickle.PicklingError``) naming the object's
    type when it cannot be pickled.
    """
    if _is_plain(obj):
        return [pickle.dumps(obj, protocol=PROTOCOL)]
    buffers: List[Any] = []

    def keep_large(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OOB_THRESHOLD:
            return True
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    try:
        _Pickler(stream, protocol=PROTOCOL, buffer_callback=keep_large).dump(_lift_large_bytes(obj))
    except Exception as exc:  # pickling runs arbitrary __reduce__ code
        raise SerializationError(
            f"cannot pickle {type(obj).__name__} object: {type(exc).__name__}: {exc}"
        ) from exc
    return [stream.getbuffer(), *buffers]


def loads(frames: Sequence[Any]) -> Any:
    """Unpickle frames made by :func:`dumps` (zmq Frames, bytes or buffers)."""
    if not frames:
        raise SerializationError("no frames to unpickle")
    try:
        return pickle.loads(frames[0], buffers=frames[1:])
    except Exception as exc:  # unpickling runs arbitrary code too
        raise SerializationError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc


def share_main_globals(fn: Any, namespace: Dict[str, Any], _seen: Optional[Dict[int, Any]] = None) -> Any:
    """Rebase a ``__main__`` function pickled by value onto ``namespace``.

    cloudpickle gives each unpickled function its own copy of the globals it
    uses, so an initializer that sets a global of the user's script would set
    it where no task looks. A worker keeps one namespace for the origin's
    ``__main__`` and rebuilds such functions (and the ``__main__`` functions
    their globals name) on it, as the script's own module would be shared.
    Values already in the namespace win: they are the worker's live state.
    """
    seen = {} if _seen is None else _seen
    if not isinstance(fn, types.FunctionType) or fn.__globals__.get("__name__") != "__main__":
        return fn
    if fn.__globals__ is namespace or sys.modules.get("__main__") is not None and (
        fn.__globals__ is vars(sys.modules["__main__"])
    ):
        return fn
    if id(fn) in seen:
        return seen[id(fn)]
    rebased = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    seen[id(fn)] = rebased
    rebased.__kwdefaults__ = fn.__kwdefaults__
    rebased.__qualname__ = fn.__qualname__
    rebased.__doc__ = fn.__doc__
    rebased.__dict__.update(fn.__dict__)
    rebased.__module__ = fn.__module__
    for name, value in fn.__globals__.items():
        if name not in namespace:
            namespace[name] = share_main_globals(value, namespace, seen)
    return rebased


def digest(blob: Any) -> bytes:
    """The 16-byte name of a function blob."""
    return hashlib.blake2b(blob, digest_size=16).digest()


def dump_function(fn: Any) -> Tuple[bytes, bytes]:
    """``(digest, blob)`` of a callable pickled by value where needed."""
    try:
        blob = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot pickle function {fn!r}: {exc}") from exc
    return digest(blob), blob


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def remote_traceback_text(
    exc: BaseException, stack: Optional[List[traceback.FrameSummary]] = None
) -> str:
    """The traceback of ``exc`` framed and labelled with where it was raised;
    futurefed's own frames above the task's first frame are left out.
    ``stack``, if given, stands for the traceback: where a task was when it
    was stopped, for an error raised on its behalf (TaskTimeout)."""
    if stack is not None:
        while stack and stack[0].filename.startswith(_PACKAGE_DIR):
            stack = stack[1:]
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(stack),
                 *traceback.format_exception_only(type(exc), exc)]
    else:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            tb = tb.tb_next
        lines = traceback.format_exception(type(exc), exc, tb or exc.__traceback__)
    return f'\n"""\nRaised in {_process_label}:\n{"".join(lines)}"""'


def dump_exception(exc: BaseException, text: Optional[str] = None) -> List[Any]:
    """Frames of a task's exception: the labelled traceback text (``text``,
    else that of ``exc``), then the pickled exception (or a
    SerializationError standing in for it)."""
    label = (remote_traceback_text(exc) if text is None else text).encode("utf-8", errors="replace")
    try:
        return [label, *dumps(exc)]
    except SerializationError as err:
        stand_in = SerializationError(
            f"the task raised {type(exc).__qualname__}({_safe_str(exc)}), which cannot be"
            f" pickled: {_safe_str(err)}"
        )
        return [label, *dumps(stand_in)]


def _safe_str(value: object) -> str:
    """``str(value)``, or a placeholder if its ``__str__`` raises (the
    task's own code, which must not take its worker down)."""
    try:
        return str(value)
    except Exception:  # anything user code may raise
        return f"<{type(value).__qualname__}: str() failed>"


def load_exception(frames: Sequence[Any]) -> BaseException:
    """Rebuild an exception from :func:`dump_exception` frames, with the
    remote traceback as its ``__cause__``."""
    text = bytes(frames[0]).decode("utf-8", errors="replace") if frames else ""
    exc: Optional[BaseException]
    try:
        exc = loads(frames[1:])
    except SerializationError as err:
        exc = err
    if not isinstance(exc, BaseException):
        exc = SerializationError(f"expected an exception, got {type(exc).__name__}")
    exc.__cause__ = RemoteTraceback(text)
    return exc
