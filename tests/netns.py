"""Real hosts for multi-host tests: network namespaces running OpenSSH servers.

``SshCluster`` builds, on this machine, a small private network that exists
only inside network namespaces it creates::

    ffc<pid>-br   a bridge ``br0`` (no address); every other namespace has a
                  veth pair whose far end is a port of that bridge
    ffc<pid>-h1   "node1", 10.231.0.11, a real /usr/sbin/sshd on port 22
    ffc<pid>-h2   "node2", 10.231.0.12, ditto
    ffc<pid>-h3   "node3", 10.231.0.13, ditto
    ffc<pid>-cl   the client, 10.231.0.10: run the launcher under test here

(A second cluster in the same process is named ``ffc<pid>_<n>-...``.) Every
namespace has ``lo`` up, so 127.0.0.1 works inside each one, and no default
route, so nothing sent inside can leave for anywhere else. The /24 is the
first of ``SUBNETS`` that no route or address of the root namespace overlaps
(checked at setup); the bridge lives in its own namespace, so the range is
never seen by the root namespace. Veth devices are created directly inside
the namespaces (``eth0`` in a host or the client, ``v<name>`` on the bridge),
so nothing is added to the root namespace and parallel runs cannot clash.

Per host, ``/etc/netns/<ns>/hosts`` maps node1..nodeN and ``client`` to their
addresses and ``/etc/netns/<ns>/resolv.conf`` is empty (``ip netns exec``
bind-mounts those over /etc inside the namespace: names resolve without DNS,
and no DNS query leaves). Each sshd runs in its own UTS namespace whose
hostname is the alias, so ``hostname`` in an ssh session prints ``node2``.

Everything else is shared with the test process: the filesystem, users, the
Python interpreter and the futurefed checkout. Running Python on a "host":
sshd gives a session a fresh environment (root's login shell, PATH from
sshd, whatever ~/.bashrc does), so use the absolute interpreter of the test
process, ``cluster.python`` (``sys.executable``), and either ``cd`` to the
checkout first (``python -c`` and ``-m`` put the cwd first on sys.path) or
pass ``PYTHONPATH`` with the exec request (sshd is configured ``AcceptEnv
*``; paramiko: ``exec_command(cmd, environment={...})``). ``remote_python()``
builds such a command line.

Use::

    with SshCluster() as cluster:            # skips the test if impossible
        cluster.run_in_client([sys.executable, "-m", "futurefed.launch", ...,
                               "--ssh-config", cluster.ssh_config])
        assert cluster.pids_in("node1") == []   # nothing left behind

or as a fixture: ``ssh_cluster = ssh_cluster_fixture(scope="module")`` in a
test module. Teardown kills (by pid) every process in each namespace it
created, deletes the namespaces (and with them the veths and the bridge),
and removes its files; it runs on any error and is idempotent.

Requirements (else ``pytest.skip`` with the reason): root, a working ``ip
netns``, /usr/sbin/sshd, and a free subnet. ``.ci/run`` installs
openssh-server and iproute2 when they are missing.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from collections.abc import Iterator, Mapping, Sequence
from typing import Callable, Union

import pytest

SSHD = "/usr/sbin/sshd"
IP = shutil.which("ip") or "/usr/sbin/ip"
#: Candidate subnets, tried in order; the first not routed in the root ns wins.
SUBNETS = ("10.231.0.0/24", "10.231.77.0/24", "10.199.231.0/24", "172.31.231.0/24")
#: The checkout this file belongs to (the futurefed source tree).
REPO = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"^ffc(\d+)(?:_\d+)?-(?:br|cl|h\d+)$")

_counter = itertools.count()
_live: list[SshCluster] = []
_live_lock = threading.Lock()

Argv = Sequence[Union[str, os.PathLike]]


# --------------------------------------------------------------------------
# small helpers


def _run(argv: Argv, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a setup command; on failure raise with its stderr."""
    p = subprocess.run(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} -> {p.returncode}: {p.stderr.strip()}")
    return p


def _ns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _proc_stat(pid: int):
    """(comm, ppid) of a pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    lpar, rpar = data.index("("), data.rindex(")")
    fields = data[rpar + 2 :].split()
    return data[lpar + 1 : rpar], int(fields[1])


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _pids_in_netns(name: str) -> list[int]:
    """Every live process whose network namespace is /run/netns/<name>."""
    ino = _ns_inode(name)
    if ino is None:
        return []
    me = os.getpid()
    out = []
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ino:
                out.append(pid)
        except OSError:  # gone, or a zombie
            continue
    return sorted(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(name: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process in netns <name> (by pid) until none."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        pids = _pids_in_netns(name)
        if not pids:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _reap_children()
        time.sleep(0.02)
        if time.monotonic() > deadline + 5:
            raise RuntimeError(f"processes in netns {name} survive SIGKILL: {pids}")


def _reap_children() -> None:
    """Reap zombies among our own children (e.g. exec_in() Popens nobody waited for)."""
    for c in list(_popens):
        if c.poll() is not None:
            _popens.discard(c)


_popens: set[subprocess.Popen] = set()


def preflight() -> str | None:
    """Why an SshCluster cannot be built here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (not running as root)"
    if not os.path.exists(SSHD):
        return f"{SSHD} missing (install openssh-server; .ci/run does)"
    if not os.path.exists(IP):
        return "`ip` missing (install iproute2; .ci/run does)"
    try:
        p = _run([IP, "netns", "list"], check=False, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns list` failed: {e}"
    if p.returncode != 0:
        return f"`ip netns list` failed: {p.stderr.strip()}"
    return None


def _root_ns_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 prefix the root namespace routes or has addresses in (no default)."""
    nets = []
    p = _run([IP, "-j", "-4", "route", "show", "table", "all"], check=False)
    try:
        routes = json.loads(p.stdout or "[]")
    except ValueError:
        routes = []
    for r in routes:
        dst = r.get("dst", "")
        if dst in ("", "default", "0.0.0.0/0"):
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(dst, strict=False))
    p = _run([IP, "-j", "-4", "addr", "show"], check=False)
    try:
        links = json.loads(p.stdout or "[]")
    except ValueError:
        links = []
    for link in links:
        for a in link.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def pick_subnet(candidates: Sequence[str] = SUBNETS) -> ipaddress.IPv4Network | None:
    """The first candidate /24 that nothing in the root namespace overlaps."""
    used = _root_ns_networks()
    for c in candidates:
        net = ipaddress.ip_network(c)
        if not any(net.overlaps(u) for u in used):
            return net
    return None


def reap_stale() -> list[str]:
    """Delete SshCluster namespaces left by test processes that no longer exist.

    Only names of this module's pattern (``ffc<pid>...``) whose <pid> is dead
    are touched. Returns the names removed.
    """
    p = _run([IP, "netns", "list"], check=False)
    removed = []
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NAME_RE.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(Exception):
            _kill_netns_processes(name)
        _run([IP, "netns", "delete", name], check=False)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        removed.append(name)
    return removed


def _keygen(path: Path, comment: str) -> str:
    """Write an unencrypted private key at `path` (+ .pub); return the public line."""
    keygen = shutil.which("ssh-keygen")
    if keygen:
        _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    else:  # paramiko can generate RSA (not ed25519)
        import paramiko

        key = paramiko.RSAKey.generate(2048)
        key.write_private_key_file(str(path))
        path.with_name(path.name + ".pub").write_text(
            f"{key.get_name()} {key.get_base64()} {comment}\n"
        )
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


# --------------------------------------------------------------------------


class SshCluster:
    """N hosts with real sshd plus a client namespace, on a private bridge.

    Attributes (valid after ``start()`` / ``__enter__``):

    ``aliases``      ["node1", "node2", "node3"]
    ``hosts``        ["10.231.0.11", "10.231.0.12", "10.231.0.13"]
    ``host_ns``      the hosts' namespace names, same order
    ``client_ns``    the client's namespace; ``client_ip`` its address
    ``bridge_ns``    the bridge's namespace; ``namespaces`` all of them
    ``ssh_config``   OpenSSH-style config: Host nodeK -> HostName, User root,
                     IdentityFile, UserKnownHostsFile (paramiko.SSHConfig reads it)
    ``known_hosts``  the hosts' keys, by alias and by IP
    ``identity``     the client's private key (``identity + ".pub"`` its public key)
    ``tmp``          the cluster's directory; ``sshd_log(host)`` each sshd's stderr
    ``python``       the interpreter to run on hosts (``sys.executable``)
    ``repo``         the futurefed checkout (same path on every host)
    ``sshd_pids``    {alias: pid of that host's listening sshd}
    """

    def __init__(
        self,
        n_hosts: int = 3,
        subnets: Sequence[str] = SUBNETS,
        sshd_options: Sequence[str] = (),
        start_timeout: float = 15.0,
    ) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be in 1..200")
        self.n_hosts = n_hosts
        self._subnets = tuple(subnets)
        self._sshd_options = list(sshd_options)
        self._start_timeout = start_timeout
        n = next(_counter)
        self.prefix = f"ffc{os.getpid()}" + (f"_{n}" if n else "")
        self.bridge_ns = f"{self.prefix}-br"
        self.client_ns = f"{self.prefix}-cl"
        self.host_ns = [f"{self.prefix}-h{i + 1}" for i in range(n_hosts)]
        self.aliases = [f"node{i + 1}" for i in range(n_hosts)]
        self.namespaces = [self.bridge_ns, *self.host_ns, self.client_ns]
        self.python = sys.executable
        self.repo = str(REPO)
        self.hosts: list[str] = []
        self.client_ip = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.tmp = ""
        self.ssh_config = self.known_hosts = self.identity = ""
        self.sshd_pids: dict[str, int] = {}
        self._sshd: dict[str, subprocess.Popen] = {}
        self._created: list[str] = []
        self._etc_dirs: list[str] = []
        self._closed = False
        self._started = False
        self.setup_seconds = 0.0

    # ---------------------------------------------------------------- names

    def ns(self, name: str) -> str:
        """Full namespace name for "node2" / "h2" / 2-style host refs, "client"/"cl",
        "bridge"/"br", a host IP, or an already full name."""
        if name in self.namespaces:
            return name
        if name in ("client", "cl", self.client_ip):
            return self.client_ns
        if name in ("bridge", "br"):
            return self.bridge_ns
        return self.host_ns[self._host_index(name)]

    def _host_index(self, host: str | int) -> int:
        if isinstance(host, int):
            return host - 1
        if host in self.aliases:
            return self.aliases.index(host)
        if host in self.hosts:
            return self.hosts.index(host)
        if host in self.host_ns:
            return self.host_ns.index(host)
        m = re.fullmatch(r"h(\d+)", host)
        if m and 1 <= int(m.group(1)) <= self.n_hosts:
            return int(m.group(1)) - 1
        raise KeyError(f"no host {host!r} in this cluster")

    def sshd_log(self, host: str | int) -> str:
        """Path of that host's sshd stderr (LogLevel VERBOSE)."""
        return os.path.join(self.tmp, f"sshd-{self.aliases[self._host_index(host)]}.log")

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> SshCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> SshCluster:
        """Build everything; pytest.skip() if this machine can't. Cleans up on error."""
        if self._started:
            return self
        self._started = True
        reason = preflight()
        if reason:
            pytest.skip(f"SshCluster: {reason}")
        self.subnet = pick_subnet(self._subnets)
        if self.subnet is None:
            pytest.skip(f"SshCluster: every candidate subnet {self._subnets} is routed here")
        with _live_lock:
            _live.append(self)
        t0 = time.monotonic()
        try:
            reap_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def _build(self) -> None:
        base = self.subnet.network_address
        self.client_ip = str(base + 10)
        self.hosts = [str(base + 11 + i) for i in range(self.n_hosts)]
        plen = self.subnet.prefixlen
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        tmp = Path(self.tmp)

        # namespaces, lo, the bridge, one veth pair per namespace
        for name in self.namespaces:
            if _ns_inode(name) is not None:
                raise RuntimeError(f"netns {name} already exists")
            _run([IP, "netns", "add", name])
            self._created.append(name)
            _run([IP, "-n", name, "link", "set", "lo", "up"])
        br = self.bridge_ns
        _run([IP, "-n", br, "link", "add", "br0", "type", "bridge"])
        _run([IP, "-n", br, "link", "set", "br0", "up"])
        for name, ip in [*zip(self.host_ns, self.hosts), (self.client_ns, self.client_ip)]:
            port = self._bridge_port(name)
            _run(
                [
                    IP,
                    "-n",
                    name,
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    br,
                ]
            )
            _run([IP, "-n", br, "link", "set", port, "master", "br0", "up"])
            _run([IP, "-n", name, "addr", "add", f"{ip}/{plen}", "dev", "eth0"])
            _run([IP, "-n", name, "link", "set", "eth0", "up"])

        # name resolution inside the namespaces: /etc/netns/<ns>/{hosts,resolv.conf}
        hosts_lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        hosts_lines += [f"{ip}\t{alias}" for ip, alias in zip(self.hosts, self.aliases)]
        hosts_lines.append(f"{self.client_ip}\tclient")
        for name in [*self.host_ns, self.client_ns]:
            d = f"/etc/netns/{name}"
            os.makedirs(d, exist_ok=True)
            self._etc_dirs.append(d)
            Path(d, "hosts").write_text("\n".join(hosts_lines) + "\n")
            Path(d, "resolv.conf").write_text("# SshCluster: no DNS inside the namespaces\n")

        # keys: one client key pair, one host key per host
        self.identity = str(tmp / "id_client")
        client_pub = _keygen(tmp / "id_client", f"client@{self.prefix}")
        auth = tmp / "authorized_keys"
        auth.write_text(client_pub + "\n")
        os.chmod(auth, 0o600)
        known = []
        for alias, ip in zip(self.aliases, self.hosts):
            pub = _keygen(tmp / f"hostkey-{alias}", f"root@{alias}")
            ktype, kb64 = pub.split()[:2]
            known.append(f"{alias},{ip} {ktype} {kb64}")
        self.known_hosts = str(tmp / "known_hosts")
        Path(self.known_hosts).write_text("\n".join(known) + "\n")

        cfg = []
        for alias, ip in zip(self.aliases, self.hosts):
            cfg += [f"Host {alias}", f"    HostName {ip}", ""]
        cfg += [
            "Host *",
            "    User root",
            "    Port 22",
            f"    IdentityFile {self.identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {self.known_hosts}",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            "    ConnectTimeout 5",
            "",
        ]
        self.ssh_config = str(tmp / "ssh_config")
        Path(self.ssh_config).write_text("\n".join(cfg))

        # sshd per host
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        unshare = shutil.which("unshare")
        for alias, ip, name in zip(self.aliases, self.hosts, self.host_ns):
            conf = tmp / f"sshd_config-{alias}"
            conf.write_text(self._sshd_config(alias, ip, str(auth)))
            _run([SSHD, "-t", "-f", conf])  # config test: fail loudly, early
            if unshare:  # own UTS namespace so `hostname` says the alias
                q = shlex.quote
                inner = f"hostname {q(alias)} && exec {SSHD} -D -e -f {q(str(conf))}"
                cmd = [IP, "netns", "exec", name, unshare, "--uts", "/bin/sh", "-c", inner]
            else:
                cmd = [IP, "netns", "exec", name, SSHD, "-D", "-e", "-f", str(conf)]
            with open(self.sshd_log(alias), "wb") as log:
                p = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                )
            self._sshd[alias] = p
            self.sshd_pids[alias] = p.pid  # ip netns exec / unshare / sh all exec
        self._wait_listening()

    def _bridge_port(self, name: str) -> str:
        return "v" + name.rsplit("-", 1)[1]  # vh1, vh2, ..., vcl (<= 15 chars)

    def _sshd_config(self, alias: str, ip: str, authorized_keys: str) -> str:
        lines = [
            f"# SshCluster {self.prefix} {alias}",
            f"ListenAddress {ip}",
            "Port 22",
            "AddressFamily inet",
            f"HostKey {self.tmp}/hostkey-{alias}",
            f"PidFile {self.tmp}/sshd-{alias}.pid",
            f"AuthorizedKeysFile {authorized_keys}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "ClientAliveInterval 2",
            "ClientAliveCountMax 2",
            "LogLevel VERBOSE",
            "AcceptEnv *",
            "PermitUserEnvironment no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "MaxStartups 200",
            "MaxSessions 200",
            "Subsystem sftp internal-sftp",
            *self._sshd_options,
        ]
        return "\n".join(lines) + "\n"

    def _wait_listening(self) -> None:
        """Bounded connect retry, from inside the client namespace, to every sshd."""
        script = textwrap.dedent(
            """
            import socket, sys, time
            deadline = time.monotonic() + float(sys.argv[1])
            for ip in sys.argv[2:]:
                while True:
                    try:
                        socket.create_connection((ip, 22), timeout=1).close()
                        break
                    except OSError as e:
                        if time.monotonic() > deadline:
                            sys.exit(f"sshd on {ip}:22 not accepting: {e}")
                        time.sleep(0.02)
            """
        )
        budget = self._start_timeout
        p = self.run_in_client(
            [sys.executable, "-c", script, str(budget), *self.hosts], timeout=budget + 10
        )
        if p.returncode != 0:
            logs = {}
            for alias in self.aliases:
                with contextlib.suppress(OSError):
                    logs[alias] = Path(self.sshd_log(alias)).read_text()[-2000:]
            dead = {a: pr.poll() for a, pr in self._sshd.items() if pr.poll() is not None}
            raise RuntimeError(
                f"sshd not reachable: {p.stderr.strip()}; exited: {dead}; logs: {logs}"
            )

    def close(self) -> None:
        """Tear everything down (kill by pid, delete namespaces, remove files). Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for name in self._created:
            try:
                _kill_netns_processes(name)
            except Exception as e:  # keep going: delete what we can
                errors.append(str(e))
        for p in self._sshd.values():
            with contextlib.suppress(Exception):
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=5)
        for p in list(_popens):
            if getattr(p, "_ffc_cluster", None) is self:
                with contextlib.suppress(Exception):
                    if p.poll() is None:
                        p.kill()
                    p.wait(timeout=5)
                _popens.discard(p)
        for name in reversed(self._created):
            r = _run([IP, "netns", "delete", name], check=False)
            if r.returncode != 0 and _ns_inode(name) is not None:
                errors.append(f"ip netns delete {name}: {r.stderr.strip()}")
        for d in self._etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        with _live_lock:
            if self in _live:
                _live.remove(self)
        if errors:
            raise RuntimeError("SshCluster cleanup: " + "; ".join(errors))

    # --------------------------------------------------------------- running

    def exec_in(self, ns: str, argv: Argv, **popen_kwargs) -> subprocess.Popen:
        """Popen ``ip netns exec <ns> argv...``; ``ns`` as accepted by ``ns()``.

        The Popen's pid is the command's own (ip netns exec execs). The cluster
        kills it at close() if it is still running. Default stdin: /dev/null.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen([IP, "netns", "exec", self.ns(ns), *map(str, argv)], **popen_kwargs)
        p._ffc_cluster = self  # type: ignore[attr-defined]
        _popens.add(p)
        return p

    def run_in(
        self,
        ns: str,
        argv: Argv,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        input: str | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run argv in a namespace to completion; text stdout/stderr captured.

        ``env`` is added to (overrides) this process's environment. On timeout
        the process is killed and ``subprocess.TimeoutExpired`` raised.
        """
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        p = self.exec_in(
            ns,
            argv,
            env=full_env,
            cwd=cwd,
            text=True,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        finally:
            _popens.discard(p)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def run_in_client(
        self,
        argv: Argv,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        input: str | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess:
        """``run_in(client_ns, ...)``: where the launcher under test runs."""
        return self.run_in(self.client_ns, argv, env=env, timeout=timeout, input=input, cwd=cwd)

    def remote_python(self, code: str = "", args: Sequence[str] = (), module: str = "") -> str:
        """A shell command line that runs this interpreter, with the checkout
        importable, on a host: ``cd <repo> && PYTHONPATH=<repo> <python> -c code``."""
        r = shlex.quote(self.repo)
        what = ["-m", module] if module else ["-c", code]
        return f"cd {r} && PYTHONPATH={r} exec {shlex.quote(self.python)} " + " ".join(
            shlex.quote(a) for a in [*what, *args]
        )

    # ------------------------------------------------------------- inspection

    def pids_in(self, ns: str, include_sshd: bool = False) -> list[int]:
        """Pids of live processes in that namespace (``ns()`` names it).

        Leaves out the host's listening sshd and every ``sshd`` process that
        descends from it (per-connection sshd), unless include_sshd.
        """
        pids = _pids_in_netns(self.ns(ns))
        if include_sshd:
            return pids
        daemons = set(self.sshd_pids.values())
        out = []
        for pid in pids:
            if pid in daemons:
                continue
            st = _proc_stat(pid)
            if st is None:
                continue
            if st[0] == "sshd" and self._descends_from(pid, daemons):
                continue
            out.append(pid)
        return out

    @staticmethod
    def _descends_from(pid: int, ancestors: set) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            st = _proc_stat(pid)
            if st is None:
                return False
            pid = st[1]
            if pid in ancestors:
                return True
            seen += 1
        return False

    def describe(self, pids: Sequence[int]) -> list[str]:
        """'pid cmdline' strings, for assertion messages."""
        out = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = "<gone>"
            out.append(f"{pid} {cmd.strip()}")
        return out

    # ------------------------------------------------------------------ faults

    def cut(self, host: str | int) -> None:
        """Unplug a host: its bridge-side veth goes down (packets to it vanish)."""
        self._set_link(host, "down")

    def uncut(self, host: str | int) -> None:
        """Plug it back in."""
        self._set_link(host, "up")

    def _set_link(self, host: str | int, state: str) -> None:
        port = self._bridge_port(self.host_ns[self._host_index(host)])
        _run([IP, "-n", self.bridge_ns, "link", "set", port, state])

    def __repr__(self) -> str:
        return f"SshCluster({self.prefix}, hosts={dict(zip(self.aliases, self.hosts))})"


@contextlib.contextmanager
def ssh_cluster(**kwargs) -> Iterator[SshCluster]:
    """``with ssh_cluster(n_hosts=3) as c:`` — same as ``with SshCluster(...)``."""
    with SshCluster(**kwargs) as c:
        yield c


def ssh_cluster_fixture(scope: str = "module", **kwargs) -> Callable:
    """A pytest fixture yielding a started SshCluster(**kwargs).

    In a test module: ``ssh_cluster = ssh_cluster_fixture(scope="module")``;
    the fixture's name is the variable's.
    """

    @pytest.fixture(scope=scope)
    def _fixture():
        with SshCluster(**kwargs) as c:
            yield c

    return _fixture


@atexit.register
def _close_all() -> None:  # a run stopped without teardown (e.g. ^C) still cleans up
    with _live_lock:
        live = list(_live)
    for c in live:
        with contextlib.suppress(Exception):
            c.close()
