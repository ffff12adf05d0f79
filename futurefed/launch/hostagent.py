"""The host agent: what ``fedrun`` starts on every host, locally, over ssh or
through ``srun``, as ``python -m futurefed.launch.hostagent``.

It starts that host's broker and workers, relays their output, and ends them
all when fedrun says so, when its stdin closes (the ssh connection dropped)
or when fedrun falls silent for :data:`SILENCE_TIMEOUT`. The children hold
the read end of a lifeline pipe whose write end only the agent has, so they
also end if the agent is killed outright.

It is the workers' supervisor: when one ends, it tells the broker at once
(WORKER_EXIT, ``futurefed.supervisor``) how it ended and what it last wrote
on stderr, then starts another in its place.

Nothing it does waits on fedrun: the start runs in a thread of its own (a
broker that hangs before binding is ended, and ``@stop``, the end of input
and the silence rule are heard meanwhile), and its lines go out through a
writer thread (:class:`_Out`), so that a host whose ssh channel no longer
drains still ends its processes when fedrun falls silent.

It speaks a line protocol on stdin and stdout (docs/fedrun.md)::

    agent -> fedrun   @ready {"host", "cores", "python", "version", "pid"}
                      @broker {"task", "meta"}     the broker's advertised addresses
                      @spawn NAME PID              a broker or worker process started
                      @joined {"workers"}          how many workers joined the broker
                      @o NAME TEXT / @e NAME TEXT  a line of a child's stdout / stderr
                      @exit NAME STATUS            a child ended (negative: by that signal)
                      @error MESSAGE               could not start; the agent exits 1
                      @beat                        every HEARTBEAT seconds
    fedrun -> agent   @start {...}                 what to start (see :meth:`HostAgent.start`)
                      @beat                        every HEARTBEAT seconds
                      @stop                        end everything and exit
"""

from __future__ import annotations

import functools
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Any, Callable, Deque, Dict, List, Optional, Tuple

from ..supervisor import STDERR_TAIL, report_exit

HEARTBEAT = 1.0
#: With no line from fedrun for this long, the agent ends everything.
SILENCE_TIMEOUT = 6.0
#: How long the children may take to exit once their lifeline closed.
STOP_TIMEOUT = 5.0
#: How long the broker may take to bind.
BROKER_TIMEOUT = 30.0
#: How long the workers may take to join the broker.
JOIN_TIMEOUT = 60.0
#: Dead workers replaced in the life of one agent, at most.
MAX_REPLACEMENTS = 1000
#: How long a child may take to exit after SIGTERM before SIGKILL.
TERM_GRACE = 2.0
#: How long the agent tries to write its last lines before it exits.
FLUSH_TIMEOUT = 2.0


class _Out:
    """Whole lines to fedrun, from any thread, without ever blocking on fedrun.

    One writer thread owns the agent's stdout and writes what the others
    queue. When fedrun stops reading (a host cut off the network without a
    reset: the ssh channel stops draining), that thread blocks in
    ``write()`` holding no lock, and nothing else waits on it:

    - the agent's own lines (``@spawn``, ``@exit``, ``@error``, ...) are
      queued at once, whatever the queue holds (there are few, and small);
    - ``@beat`` is dropped while the queue is full: fedrun is not reading;
    - the children's lines (``@o``, ``@e``) wait for room, so that a chatty
      child is slowed down rather than losing lines, until :meth:`close`.

    So the silence rule can always end the host's processes, and the agent
    exits even if its last lines cannot be written.
    """

    #: Bytes queued before the children's lines wait for room.
    LIMIT = 1 << 20

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.changed = threading.Condition()
        self.pending: Deque[bytes] = deque()
        self.queued = 0  # bytes queued or being written
        self.closed = False  # no more lines are taken
        self.broken = False  # fedrun is gone: nothing more can be written
        threading.Thread(target=self._write, name="agent-stdout", daemon=True).start()

    def send(self, tag: str, payload: str = "") -> None:
        """One of the agent's own lines: queued at once."""
        self._put(_line(tag, payload), wait=False)

    def json(self, tag: str, value: Dict[str, Any]) -> None:
        self.send(tag, json.dumps(value, separators=(",", ":")))

    def relay(self, tag: str, payload: str) -> None:
        """A child's line: waits while the queue is full (and open)."""
        self._put(_line(tag, payload), wait=True)

    def beat(self) -> None:
        """``@beat``, unless fedrun is not reading what we sent already."""
        self._put(b"@beat\n", wait=False, droppable=True)

    def _put(self, data: bytes, wait: bool, droppable: bool = False) -> None:
        with self.changed:
            if wait:
                self.changed.wait_for(
                    lambda: self.queued < self.LIMIT or self.closed or self.broken
                )
            if self.closed or self.broken or (droppable and self.queued >= self.LIMIT):
                return
            self.pending.append(data)
            self.queued += len(data)
            self.changed.notify_all()

    def _write(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: bool(self.pending))
                data = b"".join(self.pending)
                self.pending.clear()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError:  # fedrun is gone (EPIPE): the silence rule ends us
                with self.changed:
                    self.broken = True
                    self.pending.clear()
                    self.changed.notify_all()
                return
            with self.changed:
                self.queued -= len(data)
                self.changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is written (False: not within ``timeout``)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.queued == 0 or self.broken, timeout)

    def close(self) -> None:
        """Take no more lines; children's lines waiting for room are dropped."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def _line(tag: str, payload: str) -> bytes:
    return (f"@{tag} {payload}\n" if payload else f"@{tag}\n").encode("utf-8", "replace")


class HostAgent:
    """Starts and watches one host's broker and workers."""

    def __init__(self, out: _Out) -> None:
        self.out = out
        self.children: List[subprocess.Popen] = []  # type: ignore[type-arg]
        self.readers: List[threading.Thread] = []
        self.last_error: Dict[str, str] = {}  # each child's last stderr line
        self.broker_address: Optional[str] = None  # where to report workers' ends
        self.restarts: Dict[str, Callable[[], Any]] = {}  # how to replace each worker
        self.replacing = threading.Lock()  # held to start a child, and to begin stopping
        self.replaced = 0
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.stopping = threading.Event()
        self.starter: Optional[threading.Thread] = None  # runs :meth:`start`
        self.key: Any = None  # the federation key fedrun sent, if any
        self.key_file: Any = None  # it, for the children (security.KeyFile)

    # -- children ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: List[str], env: Dict[str, str], nice: int = 0,
               pass_fds: tuple = ()) -> "subprocess.Popen[bytes]":
        """Start a child (call with :attr:`replacing` held): none once the
        agent is stopping, so that :meth:`stop` sees every child."""
        if self.stopping.is_set():
            raise _Stopped()

        def lower_priority() -> None:
            if nice:
                os.nice(nice)

        try:
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(self.lifeline_r, *pass_fds),
                preexec_fn=lower_priority if nice else None,
            )
        except subprocess.SubprocessError as exc:  # os.nice failed in the child
            raise _StartError(f"cannot start {name}: {exc}") from None
        self.children.append(process)
        self.out.send("spawn", f"{name} {process.pid}")
        tail: Deque[str] = deque(maxlen=STDERR_TAIL)  # this process's, not its name's
        readers = []
        for tag, stream in (("o", process.stdout), ("e", process.stderr)):
            reader = threading.Thread(
                target=self._relay, args=(name, tag, stream, tail), daemon=True
            )
            reader.start()
            readers.append(reader)
        self.readers += readers
        threading.Thread(
            target=self._watch, args=(name, process, readers, tail), daemon=True
        ).start()
        return process

    def _relay(self, name: str, tag: str, stream: IO[bytes], tail: Deque[str]) -> None:
        for raw in stream:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if tag == "e":
                tail.append(text)
                if text:
                    self.last_error[name] = text
            self.out.relay(tag, f"{name} {text}")

    def _watch(self, name: str, process: "subprocess.Popen[bytes]", readers: List[threading.Thread],
               tail: Deque[str]) -> None:
        """Report a child's end; replace a worker that died. A worker whose
        broker died does not end: it joins another host's broker (the peers
        its broker named, or the ``peers`` fedrun gave us), so the broker's
        death alone replaces nothing here; a worker that dies after that is
        replaced by one that finds a broker the same way."""
        status = process.wait()
        for reader in readers:  # its last lines go first
            reader.join(STOP_TIMEOUT)
        self.out.send("exit", f"{name} {status}")
        restart = self.restarts.get(name)
        if restart is None or self.stopping.is_set():
            return
        if self.broker_address is not None:  # the broker loses it now, not 3 heartbeats later
            report_exit(self.broker_address, name, process.pid, status, list(tail), key=self.key)
        with self.replacing:
            if self.stopping.is_set() or self.replaced >= MAX_REPLACEMENTS:
                return
            self.replaced += 1
            restart()  # a worker died: the pool keeps its size

    # -- starting --------------------------------------------------------------------------

    def begin(self, text: str, failed: Callable[[str], None]) -> None:
        """Start what the ``@start`` line's ``text`` asks (:meth:`start`) in
        a thread of its own, so that the agent goes on hearing fedrun
        meanwhile: ``@stop``, the end of its input and the silence rule stop
        a start that hangs. ``failed(reason)`` if the start fails."""

        def run() -> None:
            try:
                self.start(json.loads(text))
            except _Stopped:
                pass  # stop() came first: it ends what was started
            except (_StartError, OSError, ValueError, KeyError, TypeError,
                    subprocess.SubprocessError) as exc:
                if not self.stopping.is_set():
                    failed(str(exc) or type(exc).__name__)
            except Exception as exc:  # a bug: the agent ends, the traceback on its stderr
                failed(f"{type(exc).__name__}: {exc}")
                raise

        self.starter = threading.Thread(target=run, name="agent-start", daemon=True)
        self.starter.start()

    def start(self, spec: Dict[str, Any]) -> None:
        """Start the broker, then the workers, as ``spec`` says::

            {"name": "node1", "bind": "tcp://*:0", "advertise": "10.0.0.1" | null,
             "peers": [[task, meta], ...], "workers": 4, "env": {...}, "nice": 0,
             "key": "PUBLIC SECRET" | null}

        The key reaches the broker and workers in a file only this user can
        read, named by FUTUREFED_KEY_FILE, removed when the agent stops.
        Raises :class:`_Stopped` if :meth:`stop` is called meanwhile.
        """
        from ..security import KEY_FILE_VARIABLE, FederationKey, KeyFile

        python = sys.executable
        name = str(spec["name"])
        nice = int(spec.get("nice", 0))
        if nice < 0:
            _check_nice(nice)  # before anything starts
        base_env = {**os.environ, **{str(k): str(v) for k, v in spec.get("env", {}).items()}}
        base_env["PYTHONUNBUFFERED"] = "1"
        if spec.get("key"):
            self.key = FederationKey.from_text(str(spec["key"]))
            with self.replacing:  # stop() removes it: not made after stop() began
                if self.stopping.is_set():
                    raise _Stopped()
                self.key_file = KeyFile(self.key)
            base_env[KEY_FILE_VARIABLE] = self.key_file.path
        peers = spec.get("peers") or []
        broker_env = {
            **base_env,
            "BROKER_NAME": name,
            "BROKER_ADDRESS": spec["bind"],
            "META_ADDRESS": _meta_bind(spec["bind"]),
            "BROKER_ADDRESSES": " ".join(task for task, _ in peers),
            "META_ADDRESSES": " ".join(meta for _, meta in peers),
        }
        ready = self._start_broker(f"{name}.broker", python, spec, broker_env)
        self.out.json("broker", {"task": ready["advertised"], "meta": ready["advertised_meta"]})
        port = ready["task"].rsplit(":", 1)[1]
        self.broker_address = f"tcp://127.0.0.1:{port}"
        count = int(spec.get("workers", 0))
        for index in range(count):
            worker_name = f"{name}.w{index}"
            start = functools.partial(
                self._spawn, worker_name,
                [python, "-m", "futurefed.worker", "--lifeline", str(self.lifeline_r)],
                {
                    **base_env,
                    "IS_ORIGIN": "0",
                    "WORKER_NAME": worker_name,
                    "BROKER_NAME": name,
                    "BROKER_ADDRESS": f"tcp://127.0.0.1:{port}",
                    # where a worker goes if this host's broker is gone (the
                    # broker's WELCOME names the others once it has one)
                    "BROKER_ADDRESSES": broker_env["BROKER_ADDRESSES"],
                },
                nice=nice,
            )
            self.restarts[worker_name] = start
            with self.replacing:
                start()
        joined = _await_workers(ready["meta"], count, self.children, self.key, self.lifeline_r)
        if self.stopping.is_set():
            raise _Stopped()
        self.out.json("joined", {"workers": joined})

    def _start_broker(self, name: str, python: str, spec: Dict[str, Any],
                      env: Dict[str, str]) -> Dict[str, Any]:
        """Start the broker and read its ready line. A broker that does not
        write it within :data:`BROKER_TIMEOUT` (it hangs before binding, and
        so before it watches its lifeline) is ended here: SIGTERM, then
        SIGKILL; so is one that is still starting when the agent stops."""
        ready_r, ready_w = os.pipe()
        try:
            argv = [python, "-m", "futurefed.broker", "--lifeline", str(self.lifeline_r),
                    "--ready-fd", str(ready_w)]
            if spec.get("advertise"):
                argv += ["--advertise", str(spec["advertise"])]
            with self.replacing:
                broker = self._spawn(name, argv, env, pass_fds=(ready_w,))
            os.close(ready_w)
            ready_w = -1
            ready, outcome = _read_ready(ready_r, self.lifeline_r)
        finally:
            os.close(ready_r)
            if ready_w != -1:
                os.close(ready_w)
        if ready is not None:
            return ready
        if outcome == "closed":  # it is exiting, most likely: its status says how
            try:
                broker.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if broker.poll() is None:
            _end(broker)
        if self.stopping.is_set():
            raise _Stopped()
        status = broker.wait()
        for reader in self.readers:
            reader.join(STOP_TIMEOUT)
        last = self.last_error.get(name)
        if outcome == "timeout":
            detail = f" (its last line: {last})" if last else ""
            raise _StartError(
                f"the broker did not start within {BROKER_TIMEOUT:g} s,"
                f" so the agent ended it{detail}"
            )
        raise _StartError(f"the broker did not start: {last or f'exit status {status}'}")

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Close the lifeline, give the children time to go, kill the rest."""
        with self.replacing:
            if self.stopping.is_set():
                return
            self.stopping.set()
            os.close(self.lifeline_w)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in list(self.children):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in [self.starter, *self.readers]:  # all end once the children have
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if self.key_file is not None:
            self.key_file.close()


class _StartError(Exception):
    pass


class _Stopped(Exception):
    """The agent began to stop while it was starting things."""


def _end(process: "subprocess.Popen[bytes]") -> None:
    """SIGTERM, then SIGKILL if it has not exited within :data:`TERM_GRACE`."""
    process.terminate()
    try:
        process.wait(TERM_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _check_nice(nice: int) -> None:
    """Raise :class:`_StartError` unless the workers may have their niceness
    changed by ``nice`` on this host (a negative one needs privileges): tried
    in a throwaway process, before anything is started."""
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         "import os, sys\ntry:\n    os.nice(int(sys.argv[1]))\n"
         "except OSError as exc:\n    sys.exit(exc.strerror)", str(nice)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=BROKER_TIMEOUT,
    )
    if probe.returncode != 0:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {probe.returncode}"
        raise _StartError(f"cannot give the workers niceness {nice} (--nice {nice}): {reason}")


def _await_workers(
    meta_endpoint: str, count: int, children: List["subprocess.Popen[bytes]"], key: Any,
    stop_fd: int,
) -> int:
    """Watch the broker's LOAD until ``count`` workers have joined it (or a
    child died, or :data:`JOIN_TIMEOUT` passed, or ``stop_fd`` became
    readable: the agent is stopping); how many joined."""
    import zmq

    from .. import protocol as p
    from ..security import make_client

    port = meta_endpoint.rsplit(":", 1)[1]
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    make_client(sub, key)
    sub.connect(f"tcp://127.0.0.1:{port}")
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(stop_fd, zmq.POLLIN)
    joined = 0
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while joined < count and time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                break
            events = dict(poller.poll(500))
            if stop_fd in events:
                break
            if sub not in events:
                continue
            message = p.decode(sub.recv_multipart())
            workers = message.meta.get("workers") if isinstance(message, p.Load) else None
            if isinstance(workers, int):
                joined = workers
    finally:
        sub.close()
    return joined


def _meta_bind(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    return f"{host}:0" if port in ("0", "*") else f"{host}:{int(port) + 1}"


def _read_ready(fd: int, stop_fd: int) -> "Tuple[Optional[Dict[str, Any]], str]":
    """The broker's ready line and ``"ready"``; else None and why:
    ``"closed"`` (its end closed first: it exited), ``"timeout"`` (nothing
    within :data:`BROKER_TIMEOUT`) or ``"stopping"`` (``stop_fd``, the
    lifeline's read end, became readable first: the agent is stopping)."""
    data = b""
    deadline = time.monotonic() + BROKER_TIMEOUT
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, "timeout"
        readable, _, _ = select.select([fd, stop_fd], [], [], remaining)
        if stop_fd in readable:
            return None, "stopping"
        if fd not in readable:
            return None, "timeout"
        chunk = os.read(fd, 4096)
        if not chunk:
            return None, "closed"
        data += chunk
    return dict(json.loads(data)), "ready"


def _stdin_lines(lines: "queue.Queue[object]") -> None:
    for line in sys.stdin:
        lines.put(line.rstrip("\n"))
    lines.put(None)


#: Put on the queue of fedrun's lines when the start failed.
_START_FAILED = object()


def main() -> int:
    out = _Out()
    out.json("ready", {
        "host": socket.gethostname(),
        "cores": os.cpu_count() or 1,
        "python": sys.executable,
        "version": _version(),
        "pid": os.getpid(),
    })
    agent = HostAgent(out)
    lines: "queue.Queue[object]" = queue.Queue()
    threading.Thread(target=_stdin_lines, args=(lines,), daemon=True).start()
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(HEARTBEAT):
            out.beat()

    threading.Thread(target=beat, daemon=True).start()
    status = 1
    try:
        status = _serve(agent, out, lines)
    except KeyboardInterrupt:
        status = 1
    finally:
        beating.set()
        agent.stop()
        out.flush(FLUSH_TIMEOUT)  # the last lines, if fedrun still reads them
        out.close()
    return status


def _serve(agent: HostAgent, out: _Out, lines: "queue.Queue[object]") -> int:
    """Follow fedrun's lines until ``@stop`` or the end of input (0), a
    failed start, or :data:`SILENCE_TIMEOUT` without a line (1)."""

    def failed(reason: str) -> None:
        out.send("error", reason)
        lines.put(_START_FAILED)

    while True:
        try:
            line = lines.get(timeout=SILENCE_TIMEOUT)
        except queue.Empty:
            # fedrun may not read our lines either (a host cut off without a
            # reset): say why if it can still be said, but take no more
            # lines, so that ending the processes waits on no output
            out.send("error", f"no word from fedrun for {SILENCE_TIMEOUT:g} s: stopping")
            out.close()
            return 1
        if line is None or line == "@stop":
            return 0
        if line is _START_FAILED:
            return 1
        if isinstance(line, str) and line.startswith("@start ") and agent.starter is None:
            agent.begin(line[len("@start "):], failed)


def _version() -> str:
    from futurefed import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
