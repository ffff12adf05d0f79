"""Host agents over ssh (paramiko): the only module that imports paramiko.

A host is resolved as OpenSSH would: ``~/.ssh/config`` (or ``--ssh-config``)
gives HostName, User, Port and IdentityFile for aliases and patterns; a
user or port written in ``--hosts`` wins. Host keys are checked against the
user's known_hosts file and the system's, as OpenSSH checks them (the
user's first); an unknown key is refused unless ``accept_unknown`` is set.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, List, Optional

import paramiko

from ..errors import ConfigError
from ..hosts import Host, name_problem
from .channels import AgentCommand, Channel, LaunchError

__all__ = ["SshChannel", "SshOptions"]

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"

# paramiko logs failed handshakes with whole tracebacks; fedrun says it in one line.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)


class _AcceptUnknown(paramiko.MissingHostKeyPolicy):
    """--accept-unknown-hosts: use an unknown key, and say so."""

    def __init__(self, label: str) -> None:
        self.label = label

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        print(
            f"fedrun: {self.label}: accepting the unknown {key.get_name()} host key of {hostname}"
            f" (fingerprint {key.fingerprint})", file=sys.stderr, flush=True,
        )


@dataclass
class SshOptions:
    config_file: Optional[str] = None  # default ~/.ssh/config, if it exists
    known_hosts: Optional[str] = None  # default ~/.ssh/known_hosts
    identity: Optional[str] = None  # overrides IdentityFile
    accept_unknown: bool = False
    timeout: float = 10.0


class SshChannel(Channel):
    """The agent on one host, as the command of an ssh session."""

    def __init__(self, host: Host, options: SshOptions) -> None:
        super().__init__(host.name)
        self.host = host
        self.options = options
        self.client: Optional[paramiko.SSHClient] = None
        self.session: Optional[paramiko.Channel] = None
        self._stdout: Optional[IO[str]] = None
        self.known_hosts: Optional[str] = None
        self._listeners: List[socket.socket] = []
        self.hostname, self.user, self.port, self.key_files = self._resolve()
        self.advertise = self.hostname

    def _resolve(self) -> "tuple[str, Optional[str], int, List[str]]":
        """HostName, User, Port and IdentityFile as OpenSSH would resolve
        them (UserKnownHostsFile too); what --hosts says wins. A config that
        cannot be read (``--ssh-config`` must exist; ``~/.ssh/config`` may
        not) or holds a value that cannot be used is a ConfigError: a bad
        argument, found before anything starts."""
        config = paramiko.SSHConfig()
        path = self.options.config_file or os.path.expanduser("~/.ssh/config")
        if self.options.config_file or os.path.exists(path):
            try:
                config = paramiko.SSHConfig.from_path(path)
            except (OSError, paramiko.ssh_exception.ConfigParseError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigError(f"cannot read ssh config {path}: {reason}") from None
        found = config.lookup(self.host.name)
        hostname = str(found.get("hostname", self.host.name)).strip("[]")
        problem = name_problem(hostname) if "hostname" in found and ":" not in hostname else None
        if problem:
            raise ConfigError(f"{self.label}: ssh config {path}: HostName {hostname!r} {problem}")
        user = self.host.user or found.get("user")
        port = self.host.port
        if port is None:
            text = str(found.get("port", "22"))
            if not (text.isdigit() and 1 <= int(text) <= 65535):
                raise ConfigError(
                    f"{self.label}: ssh config {path}: Port {text!r} is not a port (1-65535)"
                )
            port = int(text)
        keys = [self.options.identity] if self.options.identity else list(found.get("identityfile", []))
        known = found.get("userknownhostsfile")
        if known and not self.options.known_hosts:
            self.known_hosts = os.path.expanduser(str(known).split()[0])
        return hostname, user, port, [os.path.expanduser(k) for k in keys if k]

    def known_hosts_files(self) -> List[str]:
        """The files host keys are checked against, in order: the user's
        (--known-hosts, else UserKnownHostsFile, else ~/.ssh/known_hosts),
        then the system's, as OpenSSH reads both."""
        user = (
            self.options.known_hosts or self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        )
        files = [user]
        if os.path.realpath(SYSTEM_KNOWN_HOSTS) != os.path.realpath(user):
            files.append(SYSTEM_KNOWN_HOSTS)
        return files

    def open(self, command: AgentCommand) -> None:
        client = paramiko.SSHClient()
        # All in one table, the user's file first: paramiko checks a host
        # against the first key of the server's type it finds there. (Its
        # "system" table would be searched alone whenever it names the host,
        # so a stale system entry would hide the user's.)
        keys = client.get_host_keys()
        files = self.known_hosts_files()
        for path in files:
            if os.path.exists(path):
                try:
                    keys.load(path)
                except (OSError, paramiko.SSHException) as exc:
                    raise LaunchError(f"{self.label}: cannot read known hosts {path}: {exc}") from None
        known = " or ".join(files)
        client.set_missing_host_key_policy(
            _AcceptUnknown(self.label) if self.options.accept_unknown else paramiko.RejectPolicy()
        )
        where = f"{self.user + '@' if self.user else ''}{self.hostname}:{self.port}"
        try:
            client.connect(
                self.hostname, port=self.port, username=self.user,
                key_filename=self.key_files or None, timeout=self.options.timeout,
                banner_timeout=self.options.timeout, auth_timeout=self.options.timeout,
                allow_agent=True, look_for_keys=not self.key_files,
            )
        except socket.gaierror as exc:
            raise LaunchError(f"{self.label}: unknown host {self.hostname} ({exc.strerror})") from None
        except UnicodeError as exc:  # a name the resolver cannot even encode (IDNA)
            raise LaunchError(f"{self.label}: unknown host {self.hostname} ({exc})") from None
        except paramiko.AuthenticationException as exc:
            raise LaunchError(f"{self.label}: authentication failed for {where}: {exc}") from None
        except paramiko.BadHostKeyException:
            raise LaunchError(
                f"{self.label}: the host key of {where} does not match known_hosts"
                " (it changed, or this is not the host you think)"
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise LaunchError(
                    f"{self.label}: the host key of {where} is not in {known}"
                    " (check it, or pass --accept-unknown-hosts)"
                ) from None
            raise LaunchError(f"{self.label}: ssh to {where} failed: {exc}") from None
        except socket.timeout:
            raise LaunchError(f"{self.label}: no answer from {where} within {self.options.timeout:g} s") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LaunchError(f"{self.label}: cannot connect to {where}: {reason}") from None
        self.client = client
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(1)
        try:
            session = client.get_transport().open_session(timeout=self.options.timeout)  # type: ignore[union-attr]
            session.exec_command(command.shell())
        except (paramiko.SSHException, OSError) as exc:
            raise LaunchError(f"{self.label}: cannot run a command on {where}: {exc}") from None
        self.session = session
        self._stdin = session.makefile_stdin("w")  # type: ignore[assignment]
        # paramiko's files yield each line as soon as it is complete (an
        # io.TextIOWrapper would wait for a whole buffer)
        self._stdout = session.makefile("r")  # type: ignore[assignment]
        stderr = session.makefile_stderr("r")
        self._read_stderr(stderr)

    def stdout(self) -> IO[str]:
        if self._stdout is None:
            raise LaunchError(f"{self.label}: not connected")
        return self._stdout

    def close_input(self) -> None:
        super().close_input()
        if self.session is not None:
            try:
                self.session.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the connection is gone: the agent's stdin is closed anyway

    def wait(self, timeout: float) -> Optional[int]:
        session = self.session
        if session is None:
            return None
        if session.status_event.wait(timeout):
            return session.recv_exit_status()
        if session.closed:
            return -1
        return None

    def kill(self) -> None:
        self.close()

    def tunnel(self, address: str) -> str:
        """Forward a local port to ``address``'s port on this host, through
        the ssh connection; the local address to use instead."""
        transport = self.client.get_transport() if self.client is not None else None
        if transport is None:
            raise LaunchError(f"{self.label}: no ssh connection to tunnel through")
        port = int(address.rsplit(":", 1)[1])
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self._listeners.append(listener)
        threading.Thread(target=self._accept, args=(listener, transport, port), daemon=True).start()
        return f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    def _accept(self, listener: socket.socket, transport: paramiko.Transport, port: int) -> None:
        while True:
            try:
                local, peer = listener.accept()
            except OSError:
                return  # closed: the session is over
            try:
                remote = transport.open_channel("direct-tcpip", ("127.0.0.1", port), peer)
            except (paramiko.SSHException, OSError, EOFError):
                local.close()
                continue
            for source, sink in ((local, remote), (remote, local)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self.client is not None:
            self.client.close()
            self.client = None


def _pump(source: Any, sink: Any) -> None:
    """Copy bytes one way until either side closes."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass  # one side went away: close both below
    for end in (source, sink):
        try:
            end.close()
        except (OSError, EOFError):
            pass
