"""Ways to start a host agent and talk to it: a local subprocess, ``srun``,
or (in ``ssh.py``) an ssh connection. Each is a :class:`Channel`: lines to
the agent's stdin, lines from its stdout, its stderr kept for diagnostics.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Deque, Dict, List, Optional

AGENT_MODULE = "futurefed.launch.hostagent"


class LaunchError(Exception):
    """A host could not be used; the message is one line naming the host."""


@dataclass
class AgentCommand:
    """What runs on a host: ``python -m futurefed.launch.hostagent`` in a
    working directory, with extra environment, after an optional prolog."""

    python: str = sys.executable
    workdir: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    prolog: Optional[str] = None

    def argv(self) -> List[str]:
        return [self.python, "-m", AGENT_MODULE]

    def shell(self) -> str:
        """One POSIX shell command line (for ssh, where the environment of
        the connection cannot be set reliably: sshd drops most of it). Only
        PYTHONPATH goes here; what the user's --env sets travels over the
        agent's stdin, never on a command line."""
        parts = []
        if self.workdir:
            parts.append(f"cd {shlex.quote(self.workdir)}")
        if self.prolog:
            parts.append(f". {shlex.quote(_sourceable(self.prolog))}")
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        argv = self.argv()
        if assignments and "=" in argv[0]:
            # env takes every word with a '=' before the command for one more
            # assignment, even after --: a shell runs the interpreter instead
            argv = ["/bin/sh", "-c", 'exec "$0" "$@"', *argv]
        command = " ".join(shlex.quote(arg) for arg in argv)
        parts.append(f"exec env {assignments} {command}" if assignments else f"exec {command}")
        return " && ".join(parts)


class Channel:
    """One host agent. Subclasses start it and provide the three streams."""

    def __init__(self, label: str) -> None:
        self.label = label  # the host as the user named it
        self.advertise: Optional[str] = None  # the address peers use for its broker
        self.stderr_tail: Deque[str] = deque(maxlen=20)
        self._stderr_ended = threading.Event()
        self._stdin: Optional[IO[str]] = None
        self._send_lock = threading.Lock()

    def open(self, command: AgentCommand) -> None:
        raise NotImplementedError

    def stdout(self) -> IO[str]:
        raise NotImplementedError

    def send(self, line: str) -> bool:
        """Write one line to the agent; False if it cannot be reached."""
        with self._send_lock:
            if self._stdin is None:
                return False
            try:
                self._stdin.write(line + "\n")
                self._stdin.flush()
                return True
            except (OSError, ValueError, EOFError):
                return False

    def close_input(self) -> None:
        """EOF on the agent's stdin: it ends its processes and exits."""
        with self._send_lock:
            if self._stdin is not None:
                try:
                    self._stdin.close()
                except OSError:
                    pass  # already gone
                self._stdin = None

    def wait(self, timeout: float) -> Optional[int]:
        """The agent's exit status, or None if it is still running."""
        raise NotImplementedError

    def kill(self) -> None:
        """Last resort when the agent will not exit."""

    def tunnel(self, address: str) -> str:
        """A local address that reaches ``address`` on this host."""
        raise LaunchError(f"{self.label}: --tunnel needs hosts reached by ssh")

    def close(self) -> None:
        """Release what the channel holds (after :meth:`wait`)."""

    def last_words(self, timeout: float) -> List[str]:
        """The end of the agent's stderr, once it has all arrived (or after
        ``timeout``): its exit status can come before its last lines."""
        self._stderr_ended.wait(timeout)
        return [line for line in self.stderr_tail if line.strip()]

    def _keep_stderr(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self.stderr_tail.append(line.rstrip())
        except (OSError, ValueError, EOFError):
            pass  # the connection broke: the stream has ended
        finally:
            self._stderr_ended.set()

    def _read_stderr(self, stream: IO[str]) -> None:
        threading.Thread(target=self._keep_stderr, args=(stream,), daemon=True).start()


class LocalChannel(Channel):
    """The agent as a child process of fedrun (no hosts, or ``srun``)."""

    def __init__(self, label: str, prefix: Optional[List[str]] = None) -> None:
        super().__init__(label)
        self.prefix = prefix or []  # e.g. srun and its options
        self.process: Optional["subprocess.Popen[str]"] = None

    def open(self, command: AgentCommand) -> None:
        env = {**os.environ, **command.env}
        argv = command.argv()
        if command.prolog:  # sourced where the agent runs (after srun, if any)
            prolog = _sourceable(command.prolog)
            argv = ["/bin/sh", "-c", '. "$0" && exec "$@"', prolog, *argv]
        argv = self.prefix + argv
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", env=env, cwd=command.workdir,
                bufsize=1, start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"{self.label}: cannot start {argv[0]}: {exc.strerror}") from None
        self._stdin = self.process.stdin
        self._read_stderr(self.process.stderr)  # type: ignore[arg-type]

    def stdout(self) -> IO[str]:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout

    def wait(self, timeout: float) -> Optional[int]:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process is not None:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


def _sourceable(path: str) -> str:
    """``path`` as the shell's ``.`` finds it: a bare name would be looked
    up in PATH, so a relative path gets ``./``."""
    return path if "/" in path else f"./{path}"


def srun_channel(host: str, cpus: Optional[int] = None) -> LocalChannel:
    """The agent on ``host`` of the current SLURM allocation, through srun.
    With ``cpus`` (the host's slots) the step asks for that many CPUs: a
    one-task step would otherwise confine every worker to one CPU where
    SLURM binds steps to cores."""
    prefix = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--kill-on-bad-exit=1"]
    if cpus:
        prefix.append(f"--cpus-per-task={cpus}")
    return LocalChannel(host, prefix)
