"""Who may talk to a federation (docs/security.md): key files, CurveZMQ on
real brokers and workers, the authenticator, the refusal to bind beyond
loopback without a key, and the embedded federation's private sockets."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys

import pytest
import zmq

from fedprocs import GUARD, Federation, command
from futurefed import FederatedExecutor
from futurefed import protocol as p
from futurefed._versions import local_versions
from futurefed.errors import ConfigError, FederationLost
from futurefed.security import (
    KEY_FILE_VARIABLE, FederationKey, HandshakeWatch, KeyFile, is_loopback, make_client,
)


def square(x):
    return x * x


@pytest.fixture
def key_file(tmp_path):
    path = str(tmp_path / "federation.key")
    FederationKey.generate().save(path)
    return path


@pytest.fixture
def keyed(key_file):
    """A broker and a worker that hold the federation key."""
    fed = Federation(env={KEY_FILE_VARIABLE: key_file})
    try:
        broker = fed.broker("A")
        fed.worker("A.w0", broker)
        yield fed, broker, key_file
    finally:
        fed.close()


# -- key files ---------------------------------------------------------------------------


def test_a_key_file_is_private_and_reads_back(tmp_path):
    key = FederationKey.generate()
    path = str(tmp_path / "k")
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert FederationKey.load(path) == key
    assert key.secret.decode() not in repr(key)
    assert FederationKey.from_text(key.text()) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_file_others_can_read_is_refused(tmp_path, mode):
    path = str(tmp_path / "k")
    FederationKey.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=r"readable by other users .*chmod 600"):
        FederationKey.load(path)


@pytest.mark.parametrize("text", [
    "",
    "not a certificate at all\n",
    'curve\n    public-key = "short"\n',
    # a public key only: no secret to connect with
    'curve\n    public-key = "{public}"\n',
    # a secret key with somebody else's public key
    'curve\n    public-key = "{other}"\n    secret-key = "{secret}"\n',
])
def test_a_malformed_key_file_is_refused(tmp_path, text):
    key, other = FederationKey.generate(), FederationKey.generate()
    path = tmp_path / "k"
    path.write_text(text.format(public=key.public.decode(), secret=key.secret.decode(),
                                other=other.public.decode()))
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=KEY_FILE_VARIABLE):
        FederationKey.load(str(path))


def test_a_missing_key_file_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=rf"{KEY_FILE_VARIABLE}=.*nowhere"):
        FederatedExecutor(address="tcp://127.0.0.1:1")


def test_fedkeys_makes_checks_and_will_not_overwrite(tmp_path):
    path = str(tmp_path / "k")
    made = subprocess.run(command("fedkeys") + [path], capture_output=True, text=True, timeout=GUARD)
    assert made.returncode == 0, made.stderr
    public = FederationKey.load(path).public.decode()
    assert made.stdout.strip() == f"public key {public}"
    again = subprocess.run(command("fedkeys") + [path], capture_output=True, text=True, timeout=GUARD)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert FederationKey.load(path).public.decode() == public
    checked = subprocess.run(command("fedkeys") + ["--check", path], capture_output=True, text=True,
                             timeout=GUARD)
    assert checked.stdout.strip() == f"public key {public}"
    forced = subprocess.run(command("fedkeys") + ["--force", path], capture_output=True, text=True,
                            timeout=GUARD)
    assert forced.returncode == 0 and FederationKey.load(path).public.decode() != public


def test_a_key_file_directory_goes_away():
    with KeyFile(FederationKey.generate()) as key_file:
        directory = os.path.dirname(key_file.path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(key_file.path).st_mode) == 0o600
    assert not os.path.exists(directory)


@pytest.mark.parametrize(("address", "loopback"), [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.10:0", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:0", False), ("tcp://10.0.0.5:5555", False),
    ("tcp://node1:5555", False), ("tcp://[::]:0", False),
])
def test_what_counts_as_loopback(address, loopback):
    assert is_loopback(address) is loopback


# -- binding beyond loopback ------------------------------------------------------------


def test_a_broker_will_not_bind_beyond_loopback_without_a_key(monkeypatch):
    monkeypatch.delenv(KEY_FILE_VARIABLE, raising=False)
    result = subprocess.run(command("fedbroker") + ["--address", "tcp://*:0"],
                            capture_output=True, text=True, timeout=GUARD)
    assert result.returncode == 2
    assert "refusing to bind tcp://*:0 without a key" in result.stderr
    assert "fedkeys" in result.stderr and "--insecure" in result.stderr


def test_insecure_lets_it_bind_with_a_warning(monkeypatch):
    monkeypatch.delenv(KEY_FILE_VARIABLE, raising=False)
    fed = Federation()
    try:
        broker = fed._start("open", command("fedbroker") + ["-v", "--insecure"], {
            "BROKER_ADDRESS": "tcp://*:0", "BROKER_NAME": "open",
        })
        broker.wait_for(r"WARNING .*--insecure: tcp://\*:0 accepts anyone")
        broker.wait_for(r"bound tcp://")
    finally:
        fed.close()


def test_a_key_lets_it_bind_beyond_loopback(key_file, monkeypatch):
    monkeypatch.delenv(KEY_FILE_VARIABLE, raising=False)
    fed = Federation()
    try:
        broker = fed._start("keyed", command("fedbroker") + ["-v", "--key-file", key_file], {
            "BROKER_ADDRESS": "tcp://*:0", "BROKER_NAME": "keyed",
        })
        broker.wait_for(r"bound tcp://")
        assert not any("WARNING" in line for line in broker.lines), broker.lines
    finally:
        fed.close()


# -- who gets in -------------------------------------------------------------------------


def test_holders_of_the_key_work_together(keyed, monkeypatch):
    fed, broker, key_file = keyed
    monkeypatch.setenv(KEY_FILE_VARIABLE, key_file)
    with FederatedExecutor(address=broker.task) as executor:
        assert list(executor.map(square, range(50))) == [i * i for i in range(50)]
    status = subprocess.run(command("fedstatus") + [broker.meta, "--timeout", "5"],
                            capture_output=True, text=True, timeout=GUARD,
                            env={**os.environ, KEY_FILE_VARIABLE: key_file})
    assert status.returncode == 0, status.stderr
    assert "A.w0" in status.stdout or " 1 " in status.stdout


def test_fedbroker_status_passes_its_key_file_timeout_and_json_on(keyed):
    fed, broker, key_file = keyed
    env = {k: v for k, v in os.environ.items() if k != KEY_FILE_VARIABLE}
    status = subprocess.run(
        command("fedbroker") + ["--status", broker.meta, "--key-file", key_file,
                                "--timeout", "5", "--json"],
        capture_output=True, text=True, timeout=GUARD, env=env,
    )
    assert status.returncode == 0, status.stderr
    (load,) = json.loads(status.stdout)["brokers"]
    assert load["task"] == broker.task and load["workers"] == 1


def _still_serves(broker, key_file, monkeypatch):
    monkeypatch.setenv(KEY_FILE_VARIABLE, key_file)
    with FederatedExecutor(address=broker.task) as executor:
        assert executor.submit(square, 7).result(GUARD) == 49


def test_a_worker_without_the_key_is_refused_and_says_why(keyed, monkeypatch):
    fed, broker, key_file = keyed
    env = {k: v for k, v in os.environ.items() if k != KEY_FILE_VARIABLE}
    result = subprocess.run(
        command("fedworker") + ["--address", broker.task, "--name", "intruder",
                                "--connect-timeout", "2"],
        capture_output=True, text=True, timeout=GUARD, env=env,
    )
    assert result.returncode == 1
    assert "spoke a different security mechanism" in result.stderr, result.stderr
    assert f"set {KEY_FILE_VARIABLE}" in result.stderr
    broker.process.wait_for(r"a client failed the handshake")
    assert not any("intruder" in line for line in broker.process.lines)
    _still_serves(broker, key_file, monkeypatch)


def test_an_origin_with_another_key_is_refused_and_told(keyed, tmp_path, monkeypatch):
    fed, broker, key_file = keyed
    other = str(tmp_path / "other.key")
    FederationKey.generate().save(other)
    monkeypatch.setenv(KEY_FILE_VARIABLE, other)
    with pytest.raises(FederationLost, match=r"failed the security handshake .*key file"):
        FederatedExecutor(address=broker.task)
    broker.process.wait_for(r"a client failed the handshake .*cryptographic")
    _still_serves(broker, key_file, monkeypatch)


class _Explodes:
    """A payload that would leave a file behind if anyone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_client_that_knows_the_public_key_only_is_refused_unread(keyed, tmp_path, monkeypatch):
    """The federation's public key is no secret: a client presenting it as
    the server key, with a key pair of its own, passes the CurveZMQ
    handshake's first step; the authenticator must refuse it, and nothing
    it sends may reach the broker's decoder, let alone be unpickled."""
    fed, broker, key_file = keyed
    federation = FederationKey.load(key_file)
    own = FederationKey.generate()
    witness = tmp_path / "unpickled"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.curve_serverkey = federation.public
        sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
        watch = HandshakeWatch(sock, own)
        sock.connect(broker.task)
        hello = p.encode(p.Hello({"role": "worker", "name": "evil", "host": "x", "pid": 1,
                                  "versions": local_versions()}))
        sock.send_multipart(hello, zmq.NOBLOCK)
        sock.send_multipart([b"\x00" * 4, pickle.dumps(_Explodes(str(witness)))], zmq.NOBLOCK)
        assert watch.monitor.poll(GUARD * 1000)
        assert "refused our key" in (watch.check() or "")
        watch.close()
    finally:
        sock.close(linger=0)
        ctx.term()
    broker.process.wait_for(r"refused a connection from 127\.0\.0\.1: its key is not the federation's")
    _still_serves(broker, key_file, monkeypatch)  # the broker got past anything it was sent
    assert not witness.exists()
    assert not any("evil" in line for line in broker.process.lines)


def test_garbage_on_the_task_port_is_dropped(keyed, monkeypatch):
    fed, broker, key_file = keyed
    host, port = broker.task[len("tcp://"):].rsplit(":", 1)
    for payload in (b"GET / HTTP/1.0\r\n\r\n" * 50, b"\xff" + b"\x00" * 8 + b"\x7f" + os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=GUARD) as raw:
            try:
                raw.sendall(payload)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):  # until the broker drops us
                    pass
            except OSError:
                pass  # dropped: reset, or gone before we finished
    _still_serves(broker, key_file, monkeypatch)
    assert broker.process.popen.poll() is None


def test_a_keyed_broker_is_silent_to_a_status_query_without_the_key(keyed):
    fed, broker, key_file = keyed
    env = {k: v for k, v in os.environ.items() if k != KEY_FILE_VARIABLE}
    status = subprocess.run(command("fedstatus") + [broker.meta, "--timeout", "2"],
                            capture_output=True, text=True, timeout=GUARD, env=env)
    assert status.returncode == 1
    assert "security mechanism" in status.stderr, status.stderr


# -- the embedded federation ------------------------------------------------------------


_CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_the_embedded_federation_admits_no_other_user():
    with FederatedExecutor(2) as executor:
        federation = executor._transport.federation
        address = federation.address
        assert address.startswith("ipc://"), address
        path = address[len("ipc://"):]
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        other = subprocess.run([sys.executable, "-c", _CONNECT_AS_NOBODY, path],
                               capture_output=True, text=True, timeout=GUARD)
        assert other.stdout.strip() == "refused", other.stderr
        assert executor.submit(square, 3).result(GUARD) == 9
    assert not os.path.exists(os.path.dirname(path))


def test_the_embedded_federation_has_no_tcp_port():
    with FederatedExecutor(1) as executor:
        assert executor.submit(square, 4).result(GUARD) == 16
        broker_pid = executor._transport.federation.pids[0]
        listening = _tcp_listeners_of(broker_pid)
    assert listening == set()


def _tcp_listeners_of(pid):
    """Inodes of listening TCP sockets the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    listening.add(fields[9])
    return listening


def test_make_client_without_a_key_changes_nothing():
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        make_client(sock, None)
        assert sock.mechanism == zmq.NULL
        make_client(sock, FederationKey.generate())
        assert sock.mechanism == zmq.CURVE
        sock.close(0)
    finally:
        ctx.term()
