"""One fedrun session: start a host agent per host, a broker and workers on
each, run the program as the origin, and tear it all down.

The steps, each bounded in time:

1. open every channel in parallel; each agent answers ``@ready`` with its
   host's core count;
2. spread the workers over the hosts (``hosts.distribute``);
3. start the first host's broker, then the others peering with it (they
   learn of each other from its LOAD messages);
4. run the program with ``IS_ORIGIN=1`` and ``BROKER_ADDRESS`` set to the
   first broker, its stdin, stdout and stderr fedrun's own;
5. stop: ``@stop`` to every agent, wait for them, close the channels.

Meanwhile a thread per channel relays the agents' output, prefixed with host
and process, and a heartbeat thread beats every agent from the moment its
channel opens and notices a host that falls silent; either ends the session
early with a one-line reason.

Once the session ends (or a first SIGINT or SIGTERM ends it), later signals
cannot interrupt the teardown: they make it kill the program at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, TextIO

from ..security import KEY_FILE_VARIABLE, FederationKey, KeyFile
from .channels import AgentCommand, Channel, LaunchError

#: How long an agent may take to start and say ``@ready``.
READY_TIMEOUT = 60.0
HEARTBEAT = 1.0
#: A host silent for this long is lost.
LOST_AFTER = 5.0
#: How long agents may take to end their processes at the end.
STOP_TIMEOUT = 15.0
#: How long the origin may take to exit after SIGINT/SIGTERM before SIGKILL.
ORIGIN_GRACE = 5.0


class SessionError(Exception):
    """The session cannot go on; a one-line reason naming the host."""


@dataclass
class Plan:
    """What to run and how (from the command line)."""

    program: Sequence[str]
    workers: Optional[int] = None
    bind_host: str = "*"
    broker_port: int = 0
    env: Dict[str, str] = field(default_factory=dict)
    nice: int = 0
    log_dir: Optional[str] = None
    verbose: bool = False
    prefix_output: bool = True
    tunnel: bool = False
    #: The federation key; None: a new one for this run (docs/security.md).
    key: Optional[FederationKey] = None


class _Agent:
    """fedrun's view of one host agent."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.ready: Optional[Dict[str, Any]] = None
        self.broker: Optional[Dict[str, Any]] = None
        self.joined: Optional[int] = None  # workers that joined the broker
        self.error: Optional[str] = None
        self.changed = threading.Condition()
        self.last_heard = time.monotonic()
        self.ended = False
        self.lost = False  # silent too long: not waited for at the end
        self.opened = False  # its agent was started
        self.workers = 0


class Session:
    """Run ``plan`` on ``channels`` (the first hosts the origin's broker)."""

    def __init__(
        self,
        plan: Plan,
        channels: Sequence[Channel],
        command: Callable[[Channel], AgentCommand],
        distribute: Callable[[int, Dict[str, int]], List[int]],
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ) -> None:
        self.plan = plan
        self.agents = [_Agent(channel) for channel in channels]
        self.command = command
        self.distribute = distribute
        self.out, self.err = out, err
        self.print_lock = threading.Lock()
        self.logs: Dict[str, Optional[IO[str]]] = {}  # None: it could not be opened
        self.failure: Optional[str] = None
        self.failed = threading.Event()
        self.stopping = False
        self._ending = threading.Event()  # the heartbeats stop
        self.origin: Optional["subprocess.Popen[bytes]"] = None
        self._wake = threading.Event()  # the program ended, or the session failed
        self.key = plan.key or FederationKey.generate()

    # -- output --------------------------------------------------------------------------

    def say(self, message: str) -> None:
        with self.print_lock:
            print(f"fedrun: {message}", file=self.err, flush=True)

    def _relay(self, agent: _Agent, stream: str, name: str, text: str) -> None:
        with self.print_lock:
            target = self.out if stream == "o" else self.err
            if self.plan.prefix_output:
                print(f"[{agent.channel.label} {name}] {text}", file=target, flush=True)
            else:
                print(text, file=target, flush=True)
            log = self._log(name)
            if log is not None:
                try:
                    log.write(text + "\n")
                    log.flush()
                except OSError as exc:
                    self._log_failed(name, log.name, exc)

    # -- the agents' output --------------------------------------------------------------

    def _read(self, agent: _Agent) -> None:
        label = agent.channel.label
        try:
            for raw in agent.channel.stdout():
                line = raw.rstrip("\n")
                agent.last_heard = time.monotonic()
                tag, _, rest = line.partition(" ")
                if tag in ("@o", "@e"):
                    name, _, text = rest.partition(" ")
                    self._relay(agent, tag[1], name, text)
                elif tag == "@beat":
                    pass
                elif tag == "@spawn":
                    self._spawned(agent, rest)
                elif tag == "@exit":
                    self._child_exited(agent, rest)
                elif tag in ("@ready", "@broker", "@joined", "@error"):
                    with agent.changed:
                        if tag == "@ready":
                            agent.ready = _json(rest)
                            if self.plan.verbose:
                                pid = agent.ready.get("pid")
                                self.say(f"{label}: started {label}.agent (pid {pid})")
                        elif tag == "@broker":
                            agent.broker = _json(rest)
                        elif tag == "@joined":
                            agent.joined = int(_json(rest).get("workers", 0))
                        else:
                            agent.error = rest
                        agent.changed.notify_all()
                    if tag == "@error" and not self.stopping:
                        self._fail(f"{label}: {rest}")
                else:  # not the agent speaking: a prolog, a login banner
                    self._relay(agent, "o", "shell", line)
        except (OSError, ValueError, EOFError):
            pass  # the connection broke: same as end of output
        with agent.changed:
            agent.ended = True
            agent.changed.notify_all()
        if not self.stopping:
            self._host_failed(agent, self._ended_reason(agent))

    def _ended_reason(self, agent: _Agent) -> str:
        status = agent.channel.wait(2.0)
        tail = agent.channel.last_words(2.0)
        last = tail[-1] if tail else ""
        if agent.ready is None:
            if status == 127:
                return f"cannot run the host's Python ({last or 'exit status 127'})"
            if "No module named" in last and "futurefed" in last:
                return f"futurefed is not installed for the host's Python ({last})"
            detail = f": {last}" if last else ""
            return f"the host agent exited before it was ready (status {status}){detail}"
        return f"the connection to the host was lost{f' ({last})' if last else ''}"

    def _spawned(self, agent: _Agent, rest: str) -> None:
        name, _, pid = rest.partition(" ")
        with self.print_lock:
            self._log(name)  # created even if the process prints nothing
        if self.plan.verbose:
            self.say(f"{agent.channel.label}: started {name} (pid {pid})")

    def _log(self, name: str) -> Optional[IO[str]]:
        """The session log of process ``name``, opened to append on first
        use; None without --log-dir or if it cannot be written (said once;
        the session goes on). Call with print_lock held."""
        if self.plan.log_dir is None:
            return None
        if name not in self.logs:
            path = os.path.join(self.plan.log_dir, f"{_safe(name)}.log")
            try:
                self.logs[name] = open(path, "a", encoding="utf-8")
            except OSError as exc:
                self._log_failed(name, path, exc)
        return self.logs[name]

    def _log_failed(self, name: str, path: str, exc: OSError) -> None:
        """Say once that ``name``'s log cannot be written (print_lock held)."""
        log = self.logs.get(name)
        self.logs[name] = None
        if log is not None:
            try:
                log.close()
            except OSError:
                pass  # what it still held is lost with it
        print(f"fedrun: cannot write {path}: {exc.strerror or exc}; {name}'s lines are not logged",
              file=self.err, flush=True)

    def _child_exited(self, agent: _Agent, rest: str) -> None:
        name, _, status = rest.partition(" ")
        if self.stopping:
            return
        if name.endswith(".broker"):
            if agent.broker is not None:  # else the agent's @error says why
                self._broker_exited(agent, status)
        else:
            self.say(f"{agent.channel.label}: worker {name} {_how_it_ended(status)}; replacing it")

    def _fail(self, reason: str) -> bool:
        """End the session for ``reason``; False if another reason came
        first (that one is the session's; say this one yourself)."""
        first = self.failure is None
        if first:
            self.failure = reason
        self.failed.set()
        self._wake.set()
        for agent in self.agents:  # whoever waits for any of them stops waiting
            with agent.changed:
                agent.changed.notify_all()
        return first

    # -- heartbeats ------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Beat every agent from the moment its channel is open, whether or
        not the others are (an agent that hears nothing for 6 s stops), until
        the teardown; a ready agent silent for LOST_AFTER is lost. An agent
        not ready yet is not: READY_TIMEOUT and its reader speak for it."""
        while not self._ending.wait(HEARTBEAT):
            now = time.monotonic()
            for agent in self.agents:
                if not agent.opened or agent.ended:
                    continue
                sent = agent.channel.send("@beat")
                silent = now - agent.last_heard
                if agent.ready is None or self.failed.is_set() or self.stopping:
                    continue
                if not sent or silent > LOST_AFTER:
                    agent.lost = True
                    self._host_failed(agent, f"host lost (nothing heard for {silent:.0f} s)")

    def _broker_exited(self, agent: _Agent, status: str) -> None:
        """A host's broker died while the program runs. The first host's
        ends the session, as losing that host does. Another's tasks run
        again on the other hosts, and its workers join the other brokers
        (docs/federation.md): its agent goes on running them, so it is still
        heartbeaten and stopped at the end like any other."""
        label = agent.channel.label
        reason = f"the broker exited with status {status}"
        if agent is self.agents[0] or self.origin is None:
            self._fail(f"{label}: {reason}")
            return
        self.say(f"{label}: {reason}; its tasks run again on the other hosts"
                 " and its workers join their brokers")

    def _host_failed(self, agent: _Agent, reason: str) -> None:
        """A host was lost while the program runs. Losing the first ends the
        session: the program's broker is there. Another's work runs again on
        the other hosts (docs/federation.md), so the session goes on."""
        label = agent.channel.label
        if agent is self.agents[0] or self.origin is None:
            self._fail(f"{label}: {reason}")
            return
        with agent.changed:
            if agent.ended and agent.lost:
                return  # said already
            agent.ended = agent.lost = True
            agent.changed.notify_all()
        self.say(f"{label}: {reason}; its tasks run again on the other hosts")

    # -- the steps -------------------------------------------------------------------------

    def _open(self, agent: _Agent) -> None:
        agent.channel.open(self.command(agent.channel))
        agent.last_heard = time.monotonic()
        agent.opened = True  # the heartbeat thread beats it from now on
        threading.Thread(target=self._read, args=(agent,), daemon=True).start()
        with agent.changed:
            agent.changed.wait_for(
                lambda: agent.ready is not None or agent.ended or self.failed.is_set(), READY_TIMEOUT
            )
        if agent.ready is None and not agent.ended and not self.failed.is_set():
            raise LaunchError(f"{agent.channel.label}: the host agent was not ready within {READY_TIMEOUT:g} s")

    def _open_all(self) -> None:
        """Open every channel at once (32 at a time); every host that fails
        is named on a line of its own, the session's reason last."""
        threading.Thread(target=self._heartbeat, daemon=True).start()
        errors = []
        with futures.ThreadPoolExecutor(max_workers=min(32, len(self.agents))) as pool:
            done = [pool.submit(self._open, agent) for agent in self.agents]
            try:
                for future in done:
                    try:
                        future.result()
                    except LaunchError as exc:
                        errors.append(str(exc))
            except (KeyboardInterrupt, _Terminated):
                self._fail("interrupted")  # the opens still waiting for @ready stop waiting
                raise
        for error in errors[:-1]:
            self.say(error)
        if errors and not self._fail(errors[-1]):
            self.say(errors[-1])
        self._check()

    def _check(self) -> None:
        if self.failed.is_set():
            raise SessionError(self.failure or "stopped")

    def _start_brokers(self) -> str:
        cores = {a.channel.label: int((a.ready or {}).get("cores", 1)) for a in self.agents}
        total = self.plan.workers
        counts = self.distribute(total if total is not None else -1, cores)
        first, *others = self.agents
        address = self._start_one(first, counts[0], peers=[])
        peers = [[address, (first.broker or {}).get("meta")]]
        for agent, count in zip(others, counts[1:]):
            self._send_start(agent, count, peers)
        for agent in others:
            self._await_broker(agent)
        self._await_workers()
        if self.plan.verbose:
            spread = ", ".join(f"{a.channel.label}: {a.workers}" for a in self.agents)
            self.say(f"{sum(counts)} workers ({spread}); origin joins {address}")
        return address

    def _start_one(self, agent: _Agent, count: int, peers: List[List[Any]]) -> str:
        self._send_start(agent, count, peers)
        return self._await_broker(agent)

    def _send_start(self, agent: _Agent, count: int, peers: List[List[Any]]) -> None:
        agent.workers = count
        spec = {
            "name": agent.channel.label,
            "bind": f"tcp://{self.plan.bind_host}:{self.plan.broker_port}",
            "advertise": agent.channel.advertise,
            "peers": peers,
            "workers": count,
            "env": self.plan.env,
            "nice": self.plan.nice,
            "key": self.key.text(),  # over the channel's stdin: never on a command line
        }
        if not agent.channel.send("@start " + json.dumps(spec)):
            self._fail(f"{agent.channel.label}: the host agent stopped listening")
            self._check()

    def _await_broker(self, agent: _Agent) -> str:
        with agent.changed:
            agent.changed.wait_for(
                lambda: agent.broker is not None or agent.ended or self.failed.is_set(), READY_TIMEOUT
            )
        self._check()
        if agent.broker is None:
            raise SessionError(f"{agent.channel.label}: the broker did not start within {READY_TIMEOUT:g} s")
        return str(agent.broker["task"])

    def _await_workers(self) -> None:
        """Start the program only once every worker has joined its broker,
        so that its first tasks already spread over all of them."""
        for agent in self.agents:
            with agent.changed:
                agent.changed.wait_for(
                    lambda: agent.joined is not None or agent.ended or self.failed.is_set(),
                    READY_TIMEOUT,
                )
            self._check()
            if agent.joined is not None and agent.joined < agent.workers:
                self.say(f"{agent.channel.label}: only {agent.joined} of {agent.workers} workers joined")

    def _run_origin(self, address: str) -> int:
        with KeyFile(self.key) as key_file:
            env = {
                **os.environ, **self.plan.env,
                "IS_ORIGIN": "1", "BROKER_ADDRESS": address,
                "BROKER_NAME": self.agents[0].channel.label, "WORKER_NAME": "origin",
                KEY_FILE_VARIABLE: key_file.path,
            }
            try:
                self.origin = subprocess.Popen(
                    list(self.plan.program), env=env, preexec_fn=_die_with_parent
                )
            except OSError as exc:
                raise SessionError(f"cannot run {self.plan.program[0]}: {exc.strerror}") from None
            return self._await_origin(self.origin)

    def _await_origin(self, origin: "subprocess.Popen[bytes]") -> int:
        threading.Thread(target=lambda: (origin.wait(), self._wake.set()), daemon=True).start()
        try:
            while not self._wake.wait(3600):
                pass
        except KeyboardInterrupt:
            # A Ctrl-C at the terminal reached the program too: give it time
            # to end on its own before asking again (another Ctrl-C meanwhile
            # kills it: see _hurry).
            try:
                origin.wait(ORIGIN_GRACE / 5)
            except subprocess.TimeoutExpired:
                self._interrupt_origin(signal.SIGINT)
            raise
        if origin.poll() is None:  # woken by a failure: stop the program
            self._interrupt_origin(signal.SIGTERM)
        status = origin.returncode
        return 128 - status if status < 0 else status

    def _interrupt_origin(self, sig: int) -> None:
        origin = self.origin
        if origin is None or origin.poll() is not None:
            return
        origin.send_signal(sig)
        try:
            origin.wait(ORIGIN_GRACE)
        except subprocess.TimeoutExpired:
            origin.kill()
            origin.wait()

    # -- the whole -----------------------------------------------------------------------

    def run(self) -> int:
        """The session's exit status: the origin's, or 1 when fedrun itself
        failed (the reason printed on one line), 130/143 on SIGINT/SIGTERM."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._first_signal)
        status = 1
        try:
            status = self._run()
        except KeyboardInterrupt:
            self.say("interrupted")
            status = 130
        except _Terminated:
            self.say("terminated")
            status = 143
        finally:
            self._teardown_signals()  # first: nothing may interrupt the teardown
            try:
                self._stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return status

    def _run(self) -> int:
        try:
            self._open_all()
            address = self._start_brokers()
            if self.plan.tunnel:
                address = self.agents[0].channel.tunnel(address)
                if self.plan.verbose:
                    label = self.agents[0].channel.label
                    self.say(f"the program reaches {label}'s broker through ssh at {address}")
            status = self._run_origin(address)
            if self.failed.is_set():  # the program was stopped for it
                self.say(self.failure or "failed")
                status = 1
        except (SessionError, LaunchError) as exc:
            self.say(str(exc))
            status = 1
        return status

    # -- signals ---------------------------------------------------------------------------

    def _first_signal(self, signum: int, frame: Any) -> None:
        """The first SIGINT or SIGTERM ends the session: later ones must not
        interrupt its teardown, so the handlers change before it raises."""
        self._teardown_signals()
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated

    def _teardown_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._hurry)

    def _hurry(self, signum: int, frame: Any) -> None:
        """A SIGINT or SIGTERM during the teardown: the program is killed
        now rather than after its grace; the teardown goes on, bounded as
        ever. (Nothing here may wait for a lock the interrupted code could
        hold: Popen.kill only tries its own, without waiting.)"""
        origin = self.origin
        if origin is not None:
            origin.kill()  # nothing if it has been reaped already

    def _await_agent(self, agent: _Agent, deadline: float, began: float) -> str:
        """Wait for ``agent`` to exit: "exited", or "silent" if it falls
        silent first (its host cut off), or "late" at the deadline. An agent
        not ready yet has said nothing since it opened: its silence counts
        from ``began``, the teardown's start, as a closed connection would
        not end what its shell still runs (a login script, a failing start)."""
        while time.monotonic() < deadline:
            if agent.channel.wait(min(HEARTBEAT / 2, deadline - time.monotonic())) is not None:
                return "exited"
            heard = agent.last_heard if agent.ready is not None else max(agent.last_heard, began)
            if time.monotonic() - heard > LOST_AFTER / 2:
                return "silent"
        return "late"

    def _stop(self) -> None:
        """Stop the program (SIGTERM, then SIGKILL), tell every agent to stop
        and wait for them (bounded); close."""
        self.stopping = True
        self._ending.set()
        self._interrupt_origin(signal.SIGTERM)
        for agent in self.agents:
            agent.channel.send("@stop")
            agent.channel.close_input()
        began = time.monotonic()
        deadline = began + STOP_TIMEOUT
        for agent in self.agents:
            if not agent.opened:
                continue
            outcome = "silent" if agent.lost else self._await_agent(agent, deadline, began)
            if outcome == "silent":
                # unreachable: its agent ends everything once it hears nothing
                agent.channel.kill()
            elif outcome == "late":
                self.say(f"{agent.channel.label}: the host agent did not stop; closing its connection")
                agent.channel.kill()
            agent.channel.close()
        for log in self.logs.values():
            if log is not None:
                try:
                    log.close()
                except OSError:
                    pass  # said when it failed, or lost with the disk


def _die_with_parent() -> None:
    """In the program's process: get SIGTERM if fedrun dies, even by SIGKILL
    (Linux; elsewhere the heartbeats end it: its broker falls silent)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux


class _Terminated(BaseException):
    """SIGTERM reached fedrun."""


def _how_it_ended(status: str) -> str:
    """``exited with status N`` or ``was killed by SIGNAME``, from an
    ``@exit`` line's status (negative: the signal, as subprocess says)."""
    try:
        code = int(status)
    except ValueError:
        return f"exited with status {status}"
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _json(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:200] or "process"
