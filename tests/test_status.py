"""``fedstatus`` and ``fedbroker --status``: the federation as the brokers'
meta sockets describe it, read from real broker processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import pytest

from futurefed import FederatedExecutor
from futurefed import protocol as p
from futurefed.status import Collector, render

from fedprocs import GUARD, ROOT, BrokerInfo

HOST = socket.gethostname()


def fedstatus(
    *args: str, env: Optional[Dict[str, str]] = None
) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "fedstatus"), *args],
        capture_output=True, text=True, timeout=GUARD, env={**os.environ, **(env or {})},
    )


def fedbroker_status(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "fedbroker"), "--status", *args],
        capture_output=True, text=True, timeout=GUARD,
    )


def rows(stdout: str) -> Dict[str, List[str]]:
    """The table's rows by broker name: [task, workers, queued, running, lent, done, idle]."""
    lines = stdout.splitlines()
    assert lines[0].split() == [
        "BROKER", "TASK", "ADDRESS", "WORKERS", "QUEUED", "RUNNING", "LENT", "DONE", "IDLE"
    ], stdout
    table = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, *cells = line.split()
        table[name] = cells
    return table


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chain(federation):
    """A, B peering with A, C peering with B; one worker on B, two on C."""
    a = federation.broker("A")
    b = federation.broker("B", peers=[a])
    c = federation.broker("C", peers=[b])
    federation.worker("B.w0", b)
    federation.worker("C.w0", c)
    federation.worker("C.w1", c)
    return {"A": a, "B": b, "C": c}


def check_table(stdout: str, brokers: Dict[str, BrokerInfo]) -> None:
    table = rows(stdout)
    assert set(table) == set(brokers), stdout
    for name, info in brokers.items():
        assert table[name][0] == info.task, stdout
    assert [table[name][1] for name in "ABC"] == ["0", "1", "2"], stdout
    words = [line.split() for line in stdout.splitlines()]
    assert ["B", f"{HOST}:", "1", "worker"] in words, stdout
    assert ["C", f"{HOST}:", "2", "workers"] in words, stdout
    assert ["A", "(no", "workers)"] in words, stdout
    assert "total: 3 brokers, 3 workers on 1 host;" in stdout, stdout
    assert "silent" not in stdout and "malformed" not in stdout, stdout


def test_status_follows_peers_through_the_whole_federation(chain, federation):
    done = fedstatus(chain["A"].meta)
    assert done.returncode == 0, done.stderr + federation.log()
    assert done.stderr == ""
    check_table(done.stdout, chain)


def test_json_status_counts_the_tasks_run(chain, federation):
    with FederatedExecutor(address=chain["A"].task) as executor:
        assert list(executor.map(abs, range(-200, 0))) == list(range(200, 0, -1))
    done = fedstatus("--json", chain["C"].meta)  # from the far end, this time
    assert done.returncode == 0, done.stderr + federation.log()
    report = json.loads(done.stdout)
    assert report["address"] == chain["C"].meta
    assert report["silent"] == [] and report["malformed"] == 0
    brokers = {load["name"]: load for load in report["brokers"]}
    assert set(brokers) == {"A", "B", "C"}
    for name, info in chain.items():
        assert brokers[name]["task"] == info.task
        assert brokers[name]["meta"] == info.meta
    assert [brokers[name]["workers"] for name in "ABC"] == [0, 1, 2]
    assert [brokers[name]["hosts"] for name in "ABC"] == [{}, {HOST: 1}, {HOST: 2}]
    assert sum(load["done"] for load in report["brokers"]) >= 200
    assert all(load["queued"] == 0 for load in report["brokers"])


def test_fedbroker_status_gives_the_same_brokers(chain, federation):
    done = fedbroker_status(chain["B"].meta)
    assert done.returncode == 0, done.stderr + federation.log()
    check_table(done.stdout, chain)


def test_status_reads_the_meta_address_from_the_environment(chain, federation):
    done = fedstatus("--json", env={"META_ADDRESS": chain["A"].meta})
    assert done.returncode == 0, done.stderr + federation.log()
    assert {load["name"] for load in json.loads(done.stdout)["brokers"]} == {"A", "B", "C"}


def test_nobody_publishing_is_exit_status_1_and_fast():
    address = f"tcp://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    done = fedstatus("--timeout", "0.5", address)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        f"fedstatus: no broker published on {address} (is a broker running there?)\n"
    )
    assert time.monotonic() - started < 10  # the 0.5 s wait plus starting Python


@pytest.mark.parametrize("args, env", [
    (["tcp://127.0.0.1"], {}),
    (["not an address"], {}),
    (["tcp://127.0.0.1:99999"], {}),
    (["tcp://*:5556"], {}),
    (["--timeout", "-1", "tcp://127.0.0.1:5556"], {}),
    ([], {"META_ADDRESS": "nonsense"}),
    ([], {"META_ADDRESS": "", "BROKER_ADDRESS": "127.0.0.1:5555"}),
])
def test_bad_address_is_one_line_and_exit_status_2(args, env):
    done = fedstatus(*args, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("fedstatus: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_fedbroker_status_flags_without_status_are_a_usage_error():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "fedbroker"), "--json"],
        capture_output=True, text=True, timeout=GUARD,
    )
    assert done.returncode == 2
    assert done.stderr.endswith("fedbroker: error: --timeout and --json go with --status\n")


def test_fedbroker_status_bad_address_is_one_line_and_exit_status_2():
    done = fedbroker_status("tcp://127.0.0.1")
    assert done.returncode == 2
    assert done.stderr.startswith("fedstatus: ") and done.stderr.count("\n") == 1, done.stderr


# -- the collector without sockets ------------------------------------------------------


def load(name: str, port: int, peers: Sequence[int] = (), **counts: object) -> List[bytes]:
    """The frames of a LOAD for broker ``name`` on task port ``port``."""
    return p.encode(p.Load({
        "name": name, "task": f"tcp://127.0.0.1:{port}", "meta": f"tcp://127.0.0.1:{port + 1}",
        "seq": counts.pop("seq", 1), "queued": 0, "running": 0, "lent": 0, "done": 0,
        "credit": 0, "idle": 0, "workers": 0, "hosts": {},
        "peers": [
            {"task": f"tcp://127.0.0.1:{peer}", "meta": f"tcp://127.0.0.1:{peer + 1}"}
            for peer in peers
        ],
        **counts,
    }))


def test_collector_follows_peers_and_waits_one_interval():
    collector = Collector("tcp://127.0.0.1:1001", interval=0.25)
    assert not collector.complete(0.0) and collector.wait(0.0) is None
    collector.take(load("A", 1000, peers=[2000]), now=1.0)
    assert collector.to_connect() == ["tcp://127.0.0.1:2001"]
    assert collector.silent() == ["tcp://127.0.0.1:2000"]
    assert not collector.complete(5.0)  # B not heard from yet
    collector.take(load("B", 2000, peers=[1000, 3000]), now=1.1)
    assert collector.to_connect() == ["tcp://127.0.0.1:3001"]
    collector.take(load("C", 3000, peers=[2000]), now=1.2)
    assert collector.to_connect() == []
    assert not collector.complete(1.3)  # C was learned of at 1.1
    assert collector.wait(1.3) == pytest.approx(0.05)
    assert collector.complete(1.35)
    assert [b["name"] for b in collector.brokers()] == ["A", "B", "C"]


def test_collector_keeps_the_latest_load_and_counts_malformed_messages():
    collector = Collector("tcp://127.0.0.1:1001")
    collector.take(load("A", 1000, seq=5, queued=3), now=0.0)
    collector.take(load("A", 1000, seq=4, queued=9), now=0.0)  # an older one
    for junk in (
        [b"garbage"],
        [],
        p.encode(p.Heartbeat()),
        p.encode(p.Load({"name": "no task address"})),
        [p.encode(p.Load({}))[0], b"{not json"],
    ):
        collector.take(junk, now=0.0)
    assert collector.malformed == 5
    (only,) = collector.brokers()
    assert only["queued"] == 3
    text = render(collector)
    assert "ignored 5 malformed meta messages" in text
    assert rows(text)["A"][2] == "3"


def test_render_survives_odd_values_and_lists_silent_brokers():
    collector = Collector("tcp://127.0.0.1:1001")
    collector.take(load(
        "A\x1b[2J", 1000, peers=[2000], workers=-1, hosts={"h\n1": 2, "h2": "x"}, done=True,
    ), now=0.0)
    text = render(collector)
    assert "\x1b" not in text and "h\n1" not in text
    assert rows(text)["A?[2J"][1] == "?"  # workers
    assert rows(text)["A?[2J"][5] == "?"  # done
    assert "h?1: 2 workers" in text
    assert "silent: tcp://127.0.0.1:2000 (listed by A?[2J)" in text
    assert collector.report()["silent"] == [{
        "task": "tcp://127.0.0.1:2000", "meta": "tcp://127.0.0.1:2001", "listed_by": "A?[2J",
    }]
