"""fedbroker and fedworker started by hand, as separate processes configured
by flags and environment variables."""

from __future__ import annotations

import os
import re
import signal
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


def test_broker_refuses_an_address_in_use(broker):
    result = subprocess.run(
        command("fedbroker") + ["--address", broker], capture_output=True, text=True, timeout=GUARD
    )
    assert result.returncode == 1
    assert f"cannot bind BROKER_ADDRESS={broker}" in result.stderr
    assert "Traceback" not in result.stderr
