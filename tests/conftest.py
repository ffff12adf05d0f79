"""Shared fixtures for the futurefed test suite.

Executor contract fixtures
--------------------------
``flavour`` is parametrized over the two executors the contract tests run
against: ``"ppe"`` (the stdlib ``concurrent.futures.ProcessPoolExecutor``,
which proves the tests themselves are right) and ``"futurefed"``
(``futurefed.FederatedExecutor``). The futurefed flavour is skipped, with the
reason shown by ``-ra``, only while ``import futurefed`` fails or the package
has no ``FederatedExecutor``. A test can pin one flavour with
``@pytest.mark.parametrize("flavour", ["futurefed"])``.

``make_executor(max_workers=2, **kwargs)`` builds an executor of the flavour
and shuts every one it built down at teardown. ``executor`` is one built with
the defaults (``max_workers=2``).

``rendezvous`` lets tasks in worker processes tell the test that they have
started, and optionally block until the test releases them. It is a TCP
listener on 127.0.0.1; see ``arrive`` and ``arrive_and_wait`` in
``test_executor_contract.py`` for the task side. Teardown always releases it
before the executors are shut down, so a failing test never leaves a worker
blocked.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import queue
import socket
import threading
import time

import pytest

#: Deadlock guard, in seconds, for anything the fixtures wait on.
GUARD = 60

PPE = "ppe"
FUTUREFED = "futurefed"
EXECUTOR_FLAVOURS = (PPE, FUTUREFED)


def futurefed_unavailable_reason():
    """Why ``futurefed.FederatedExecutor`` cannot be tested, or None if it can."""
    try:
        import futurefed
    except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
        return f"import futurefed failed: {exc!r}"
    if not hasattr(futurefed, "FederatedExecutor"):
        return "futurefed has no FederatedExecutor yet"
    return None


def _ppe_factory(max_workers=2, **kwargs):
    # "spawn" starts fresh interpreters, like futurefed's workers: task
    # functions must be importable by module name in the worker, and nothing
    # is inherited from the pytest process except sys.path.
    kwargs.setdefault("mp_context", multiprocessing.get_context("spawn"))
    return concurrent.futures.ProcessPoolExecutor(max_workers, **kwargs)


@pytest.fixture(params=EXECUTOR_FLAVOURS)
def flavour(request):
    """Which executor the test runs against: "ppe" or "futurefed"."""
    return request.param


@pytest.fixture
def executor_factory(flavour):
    """A callable with ProcessPoolExecutor's constructor signature."""
    if flavour == PPE:
        return _ppe_factory
    if flavour == FUTUREFED:
        reason = futurefed_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        import futurefed

        return futurefed.FederatedExecutor
    raise AssertionError(f"unknown executor flavour {flavour!r}")


class Rendezvous:
    """Test-side end of a start signal / gate shared with worker tasks.

    A task connects to ``address`` and sends one line (its tag): that is its
    arrival. ``arrive`` closes the connection at once; ``arrive_and_wait``
    then blocks reading it until the test calls :meth:`release` (which closes
    every held connection and lets later arrivals straight through).
    """

    def __init__(self):
        self._server = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.address = self._server.getsockname()[:2]
        self._arrivals: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self._released = False
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="rendezvous", daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
            conn.settimeout(GUARD)
            try:
                with conn.makefile("rb") as stream:
                    line = stream.readline()
            except OSError:
                conn.close()
                continue
            with self._lock:
                if self._released:
                    conn.close()
                else:
                    self._held.append(conn)
            self._arrivals.put(line.decode("utf-8", "replace").strip())

    def wait(self, count, timeout=GUARD):
        """Block until ``count`` more tasks have arrived; return their tags."""
        deadline = time.monotonic() + timeout
        tags = []
        while len(tags) < count:
            remaining = deadline - time.monotonic()
            try:
                tags.append(self._arrivals.get(timeout=max(remaining, 0)))
            except queue.Empty:
                raise AssertionError(
                    f"only {len(tags)} of {count} tasks arrived within {timeout}s: {tags} "
                    "(if they were submitted together and count <= max_workers, the "
                    "executor did not run them at the same time)"
                ) from None
        return tags

    def release(self):
        """Let every waiting task, and every later one, go on."""
        with self._lock:
            self._released = True
            held, self._held = self._held, []
        for conn in held:
            conn.close()

    def close(self):
        self.release()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:  # wake the accept() so the thread sees _closed
            socket.create_connection(self.address, timeout=GUARD).close()
        except OSError:
            pass
        self._thread.join(GUARD)
        self._server.close()


@pytest.fixture
def rendezvous():
    rv = Rendezvous()
    yield rv
    rv.close()


@pytest.fixture
def make_executor(executor_factory, rendezvous):
    """Build executors of the current flavour; all are shut down at teardown."""
    created = []

    def make(max_workers=2, **kwargs):
        ex = executor_factory(max_workers, **kwargs)
        created.append(ex)
        return ex

    yield make
    rendezvous.release()  # blocked tasks must not hold up the shutdown
    for ex in created:
        ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make_executor):
    """An executor of the current flavour with max_workers=2."""
    return make_executor()


@pytest.fixture
def federation():
    """Brokers and workers as separate processes (``fedprocs.Federation``),
    all ended at teardown."""
    from fedprocs import Federation

    fed = Federation()
    try:
        yield fed
    finally:
        fed.close()


@pytest.fixture
def fake_broker():
    """A test that plays the broker (``fakebroker.FakeBroker``), closed at
    teardown."""
    from fakebroker import FakeBroker

    broker = FakeBroker()
    try:
        yield broker
    finally:
        broker.close()
