"""Pickling for the wire: out-of-band buffers, exceptions, function blobs."""

from __future__ import annotations

import functools
import gc
import pickle
import threading
import types

import pytest

from futurefed import serialize
from futurefed.errors import RemoteTraceback, SerializationError

LARGE = serialize.OOB_THRESHOLD


@pytest.mark.parametrize(
    "value, frames",
    [
        (b"small", 1),
        (b"x" * LARGE, 2),
        (bytearray(LARGE), 2),
        (((b"a" * LARGE, b"b" * LARGE), {"k": bytearray(LARGE)}), 4),  # an (args, kwargs) pair
        ([b"c" * LARGE] * 65, 1),  # a long list is not scanned: in band
    ],
)
def test_large_bytes_travel_out_of_band(value, frames):
    encoded = serialize.dumps(value)
    assert len(encoded) == frames
    decoded = serialize.loads(encoded)
    assert decoded == value and type(decoded) is type(value)


class _Point:  # pickled by reference: importable as tests.test_serialize._Point
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is _Point and other.x == self.x


@pytest.mark.parametrize(
    "value, plain",
    [
        (((), {}), True),  # the arguments of a call with none
        (None, True),
        ((1, True, 2.5, 1j, "s", b"b"), True),
        ({"k": [1, 2], "j": ("a",)}, True),
        ([[[1]]], False),  # three levels: the scan stops, cloudpickle decides
        ({(1, 2): "tuple key"}, False),
        ((_Point(1),), False),
        ((b"x" * LARGE,), False),  # a large buffer goes out of band
    ],
)
def test_plain_data_skips_cloudpickle_and_round_trips(value, plain):
    assert serialize._is_plain(value) is plain
    assert serialize.loads(serialize.dumps(value)) == value


def test_code_inside_data_still_goes_by_value():
    value = ((lambda: 3,), {})
    assert not serialize._is_plain(value)
    (fn,), kwargs = serialize.loads(serialize.dumps(value))
    assert fn() == 3 and kwargs == {}


def test_pickle_buffers_out_of_band_without_copy():
    numpy = pytest.importorskip("numpy")
    array = numpy.arange(LARGE, dtype=numpy.float64)
    stream, buffer = serialize.dumps(array)
    assert numpy.shares_memory(numpy.frombuffer(buffer, dtype=numpy.float64), array)
    received = bytearray(buffer)  # as a received message buffer
    rebuilt = serialize.loads([stream, received])
    assert numpy.shares_memory(rebuilt, numpy.frombuffer(received, dtype=numpy.float64))
    assert (rebuilt == array).all()


def test_unpicklable_object_raises_serialization_error():
    with pytest.raises(SerializationError, match="cannot pickle") as info:
        serialize.dumps(((threading.Lock(),), {}))
    assert isinstance(info.value, pickle.PicklingError)


def test_garbage_does_not_unpickle():
    with pytest.raises(SerializationError, match="cannot unpickle"):
        serialize.loads([b"not a pickle"])
    with pytest.raises(SerializationError):
        serialize.loads([])


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class BadInit(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from its args
        super().__init__(a)


def raise_and_dump(exc):
    try:
        raise exc
    except BaseException as caught:
        return serialize.dump_exception(caught)


def test_exception_round_trip_keeps_type_and_remote_traceback():
    rebuilt = serialize.load_exception(raise_and_dump(KeyError("k")))
    assert type(rebuilt) is KeyError and rebuilt.args == ("k",)
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert "raise_and_dump" in str(rebuilt.__cause__)
    assert "Raised in" in str(rebuilt.__cause__)


def test_unpicklable_exception_becomes_serialization_error_with_traceback():
    rebuilt = serialize.load_exception(raise_and_dump(Unpicklable()))
    assert isinstance(rebuilt, SerializationError)
    assert "Unpicklable" in str(rebuilt)
    assert "raise_and_dump" in str(rebuilt.__cause__)


def test_exception_that_cannot_be_rebuilt_becomes_serialization_error():
    rebuilt = serialize.load_exception(raise_and_dump(BadInit(1, 2)))
    assert isinstance(rebuilt, SerializationError)
    assert "BadInit" in str(rebuilt.__cause__)


def test_function_digest_is_stable_and_names_the_blob():
    make = lambda k: lambda x: x * k  # noqa: E731
    digest, blob = serialize.dump_function(make(3))
    assert len(digest) == 16 and digest == serialize.digest(blob)
    assert serialize.dump_function(make(3)) == (digest, blob)
    assert serialize.dump_function(make(4))[0] != digest
    assert serialize.loads([blob])(5) == 15


def test_main_functions_share_one_namespace():
    # Two functions "from __main__" pickled apart, as an initializer and a task.
    source = "def init(v):\n    global G\n    G = v\ndef read():\n    return (G, helper())\ndef helper():\n    return G * 2\n"
    module = types.ModuleType("__main__")
    exec(source, module.__dict__)
    namespace: dict = {}
    init = serialize.share_main_globals(_by_value(module.init), namespace)
    read = serialize.share_main_globals(_by_value(module.read), namespace)
    init(21)
    assert read() == (21, 42)


def _by_value(fn):
    """fn pickled and unpickled on its own, as a worker gets it."""
    import cloudpickle

    return pickle.loads(cloudpickle.dumps(fn))


def test_function_cache_is_by_identity_and_weak():
    from futurefed.executor import FederatedExecutor

    executor = FederatedExecutor.__new__(FederatedExecutor)  # only the cache is used
    import weakref

    executor._functions = weakref.WeakKeyDictionary()
    fn = lambda x: x  # noqa: E731
    part = functools.partial(pow, 2)
    first = executor._function(fn)
    assert executor._function(fn) is first
    assert executor._function(part) is executor._function(part)
    assert len(executor._functions) == 2
    del fn, part
    gc.collect()
    assert len(executor._functions) == 0


# -- what is shared stays shared (found by review) --------------------------------------


class Marker:
    """Not plain data: the value goes through cloudpickle and the lifting."""


BIG = b"b" * serialize.OOB_THRESHOLD


def test_shared_containers_stay_shared_as_with_cloudpickle():
    items = [1, 2]
    back = serialize.loads(serialize.dumps((items, items, Marker)))
    assert back[0] is back[1] and back[0] == [1, 2]


def test_a_large_buffer_met_twice_travels_once_and_stays_one_object():
    frames = serialize.dumps((BIG, [BIG], Marker))
    assert len(frames) == 2  # the pickle stream and one out-of-band buffer
    back = serialize.loads(frames)
    assert back[0] is back[1][0] and back[0] == BIG


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_a_container_that_holds_itself_keeps_its_shape(kind):
    if kind == "list":
        loop = [BIG]
        loop.append(loop)
        back = serialize.loads(serialize.dumps((loop, Marker)))[0]
        assert back[1] is back and back[0] == BIG
    else:
        loop = {"data": BIG}
        loop["self"] = loop
        back = serialize.loads(serialize.dumps((loop, Marker)))[0]
        assert back["self"] is back and back["data"] == BIG


def test_nothing_is_copied_when_there_is_nothing_to_lift():
    value = ([1, 2], {"a": (3, Marker)})
    assert serialize._lift_large_bytes(value) is value
