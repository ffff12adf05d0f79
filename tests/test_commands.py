"""fedbroker and fedworker started by hand, as separate processes configured
by flags and environment variables."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from futurefed import FederatedExecutor

from procs import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = 60


def command(name: str) -> list:
    return [sys.executable, os.path.join(ROOT, "bin", name)]


@pytest.fixture
def broker():
    process = subprocess.Popen(
        command("fedbroker") + ["--address", "tcp://127.0.0.1:0", "--name", "hand", "-v"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()  # the broker says where it bound
        match = re.search(r"bound (tcp://\S+)", line)
        assert match, line
        yield match.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(GUARD) == 0
        process.stderr.close()


def test_workers_started_by_environment_serve_an_origin(broker):
    env = dict(os.environ, BROKER_ADDRESS=broker, IS_ORIGIN="0")
    workers = [
        subprocess.Popen(command("fedworker"), env=dict(env, WORKER_NAME=f"hand{i}"))
        for i in range(2)
    ]
    try:
        with FederatedExecutor(address=broker) as executor:
            assert list(executor.map(abs, range(-50, 0))) == list(range(50, 0, -1))
            names = set(executor.map(lambda _: os.environ["WORKER_NAME"], range(40)))
            assert names <= {"hand0", "hand1"}
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        assert wait_gone([w.pid for w in workers], GUARD) == []
        for worker in workers:
            worker.wait()


def test_origin_joins_the_broker_named_by_the_environment(broker):
    worker = subprocess.Popen(
        command("fedworker"), env=dict(os.environ, BROKER_ADDRESS=broker, IS_ORIGIN="0")
    )
    try:
        origin = subprocess.run(
            [sys.executable, "-c",
             "from futurefed import FederatedExecutor\n"
             "with FederatedExecutor() as e:\n"
             "    assert e._transport.federation is None\n"
             "    print(sum(e.map(abs, range(-10, 0))))"],
            env=dict(os.environ, BROKER_ADDRESS=broker, IS_ORIGIN="1"),
            capture_output=True, text=True, timeout=GUARD,
        )
        assert origin.returncode == 0, origin.stderr
        assert origin.stdout.strip() == "55"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(GUARD)


@pytest.mark.parametrize(
    "name, args, env, message",
    [
        ("fedworker", [], {"BROKER_ADDRESS": "bogus"}, "BROKER_ADDRESS='bogus' is not an address"),
        ("fedbroker", ["--address", "tcp://127.0.0.1:70000"], {}, "port 70000 is out of range"),
        ("fedworker", ["--no-such-flag"], {}, "unrecognized arguments"),
        ("fedbroker", [], {"BROKER_ADDRESSES": "tcp://127.0.0.1:5555 nonsense"},
         "BROKER_ADDRESSES='nonsense' is not an address"),
        ("fedbroker", [], {"BROKER_ADDRESSES": "tcp://127.0.0.1:5555", "META_ADDRESSES": "a b"},
         "META_ADDRESSES='a' is not an address"),
        ("fedbroker", [], {"BROKER_ADDRESSES": "tcp://127.0.0.1:5555",
                           "META_ADDRESSES": "tcp://127.0.0.1:1 tcp://127.0.0.1:2"},
         "META_ADDRESSES has 2 entries, BROKER_ADDRESSES has 1"),
        ("fedbroker", ["--meta-address", "tcp://x:y"], {}, "--meta-address='tcp://x:y' is not"),
        ("fedworker", [], {"IS_ORIGIN": "maybe"}, "IS_ORIGIN='maybe' must be 1 or 0"),
        # a worker took these and crashed later (Lock.acquire: OverflowError)
        ("fedworker", [], {"FUTUREFED_HEARTBEAT": "inf"},
         "FUTUREFED_HEARTBEAT='inf' must be a number from 0.01 to 3600"),
        ("fedworker", [], {"FUTUREFED_HEARTBEAT": "1e300"},
         "FUTUREFED_HEARTBEAT='1e300' must be a number from 0.01 to 3600"),
        ("fedbroker", [], {"FUTUREFED_HEARTBEAT": "nan"},
         "FUTUREFED_HEARTBEAT='nan' must be a number from 0.01 to 3600"),
    ],
)
def test_bad_configuration_is_one_line_and_status_2(name, args, env, message):
    result = subprocess.run(
        command(name) + args, env=dict(os.environ, **env), capture_output=True, text=True,
        timeout=GUARD,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300", "3600.5", "0.001"])
def test_heartbeat_must_be_a_finite_number_in_range(value):
    from futurefed.config import from_environ, heartbeat_from_environ
    from futurefed.errors import ConfigError

    for read in (from_environ, heartbeat_from_environ):  # a worker's, an origin's
        with pytest.raises(ConfigError, match=r"^FUTUREFED_HEARTBEAT=.* must be a number from"):
            read({"FUTUREFED_HEARTBEAT": value})
    assert heartbeat_from_environ({"FUTUREFED_HEARTBEAT": "3600"}) == 3600.0
    assert from_environ({"FUTUREFED_HEARTBEAT": "0.01"}).heartbeat == 0.01


def test_broker_refuses_an_address_in_use(broker):
    result = subprocess.run(
        command("fedbroker") + ["--address", broker], capture_output=True, text=True, timeout=GUARD
    )
    assert result.returncode == 1
    assert f"cannot bind BROKER_ADDRESS={broker}" in result.stderr
    assert "Traceback" not in result.stderr


def closed_port_address() -> str:
    """A loopback address nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_broker_refuses_a_meta_address_in_use(broker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        meta = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            command("fedbroker"), capture_output=True, text=True, timeout=GUARD,
            env=dict(os.environ, BROKER_ADDRESS="tcp://127.0.0.1:0", META_ADDRESS=meta),
        )
    assert result.returncode == 1
    assert f"cannot bind META_ADDRESS={meta}" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_gives_up_on_an_unreachable_broker():
    address = closed_port_address()
    result = subprocess.run(
        command("fedworker") + ["--connect-timeout", "0.5"], capture_output=True, text=True,
        timeout=GUARD, env=dict(os.environ, BROKER_ADDRESS=address, IS_ORIGIN="0"),
    )
    assert result.returncode == 1
    assert f"fedworker: no broker answered at BROKER_ADDRESS={address} within 0.5 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_origin_gives_up_on_an_unreachable_broker(monkeypatch):
    import futurefed.executor
    from futurefed.errors import FederationLost

    address = closed_port_address()
    monkeypatch.setattr(futurefed.executor, "CONNECT_TIMEOUT", 0.5)
    monkeypatch.setenv("BROKER_ADDRESS", address)
    monkeypatch.setenv("IS_ORIGIN", "1")
    with pytest.raises(FederationLost, match=f"no broker answered at BROKER_ADDRESS={address}"):
        FederatedExecutor()
    with pytest.raises(FederationLost, match=f"no broker answered at address={address}"):
        FederatedExecutor(address=address)


def test_origin_with_a_malformed_broker_address(monkeypatch):
    from futurefed.errors import ConfigError

    monkeypatch.setenv("BROKER_ADDRESS", "tcp://nowhere")
    monkeypatch.setenv("IS_ORIGIN", "1")
    with pytest.raises(ConfigError, match="BROKER_ADDRESS='tcp://nowhere' is not an address"):
        FederatedExecutor()


BIND_ONLY = ["tcp://*:5555", "tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "inproc://here"]


@pytest.mark.parametrize("address", BIND_ONLY)
def test_an_origin_refuses_an_address_it_could_only_bind(monkeypatch, address):
    from futurefed.errors import ConfigError

    with pytest.raises(ConfigError, match="address="):
        FederatedExecutor(address=address)
    monkeypatch.setenv("BROKER_ADDRESS", address)
    monkeypatch.setenv("IS_ORIGIN", "1")
    with pytest.raises(ConfigError, match="BROKER_ADDRESS="):
        FederatedExecutor()


def test_a_port_in_other_digits_than_ascii_is_refused():
    from futurefed.errors import ConfigError

    with pytest.raises(ConfigError, match="is not an address"):
        FederatedExecutor(address="tcp://127.0.0.1:\u0665\u0665")


@pytest.mark.parametrize("address", BIND_ONLY)
def test_a_worker_refuses_an_address_it_could_only_bind(address):
    env = dict(os.environ, BROKER_ADDRESS=address, IS_ORIGIN="0")
    done = subprocess.run(command("fedworker"), env=env, capture_output=True, text=True,
                          timeout=GUARD)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedworker: BROKER_ADDRESS="), done.stderr


def test_peer_addresses_must_be_ones_to_connect_to(monkeypatch):
    from futurefed import config
    from futurefed.errors import ConfigError

    monkeypatch.setenv("BROKER_ADDRESSES", "tcp://a:1 tcp://*:2")
    with pytest.raises(ConfigError, match="BROKER_ADDRESSES='tcp://\\*:2'"):
        config.from_environ()


def test_origin_of_another_version_is_refused_with_both_versions(broker, monkeypatch):
    import futurefed._agent
    from futurefed._versions import local_versions
    from futurefed.errors import FederationLost

    ours = local_versions()
    monkeypatch.setattr(futurefed._agent, "local_versions", lambda: {**ours, "cloudpickle": "0.1"})
    with pytest.raises(FederationLost) as caught:
        FederatedExecutor(address=broker)
    assert (
        f"refused us: version mismatch: the peer has cloudpickle 0.1;"
        f" this broker has cloudpickle {ours['cloudpickle']}"
    ) in str(caught.value)


def test_a_peer_of_an_older_protocol_is_refused_in_words_it_can_read(broker):
    """A peer of protocol version 1 (futurefed 0.1) says HELLO in version 1;
    the broker answers REFUSE in version 1, naming both versions."""
    import json
    import struct

    import zmq

    import futurefed
    from futurefed import protocol as p
    from futurefed._versions import local_versions

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(broker)
        versions = {**local_versions(), "protocol": "1", "futurefed": "0.1.0"}
        hello = {"role": "worker", "name": "old", "versions": versions}
        dealer.send_multipart([struct.pack("!2sBB", b"FF", 1, 1), json.dumps(hello).encode()])
        assert dealer.poll(GUARD * 1000), "no answer to an old HELLO"
        header, reason = dealer.recv_multipart()
        assert header == struct.pack("!2sBB", b"FF", 1, p.Command.REFUSE)
        assert reason.decode() == (
            f"version mismatch: the peer has protocol 1, futurefed 0.1.0;"
            f" this broker has protocol {p.VERSION}, futurefed {futurefed.__version__}"
        )
    finally:
        dealer.close()
        ctx.term()
