"""The multi-host test infrastructure (tests/netns.py) works.

Real sshd in three network namespaces, paramiko from a fourth (the client),
as the fedrun launcher will use them. Skips, with the reason, where network
namespaces or sshd are unavailable (not root, no openssh-server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import netns
from netns import IP, SshCluster, ssh_cluster_fixture

cluster = ssh_cluster_fixture(scope="module")

#: Runs in the client namespace: paramiko with the cluster's ssh config,
#: known_hosts (RejectPolicy) and identity, as a launcher would.
CLIENT = textwrap.dedent(
    r"""
    import json, sys, time
    import paramiko

    ssh_config, known_hosts, mode, *args = sys.argv[1:]
    config = paramiko.SSHConfig.from_path(ssh_config)

    def connect(alias, timeout):
        o = config.lookup(alias)
        c = paramiko.SSHClient()
        c.load_host_keys(o.get("userknownhostsfile", known_hosts))
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.connect(o["hostname"], port=int(o.get("port", 22)), username=o["user"],
                  key_filename=o["identityfile"], look_for_keys=False, allow_agent=False,
                  timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        return c

    def run(c, cmd, env=None):
        _, out, err = c.exec_command(cmd, environment=env, timeout=30)
        return {"out": out.read().decode(), "err": err.read().decode(),
                "rc": out.channel.recv_exit_status()}

    result = {}
    if mode == "probe":          # args: alias... then "--" then remote commands as JSON
        sep = args.index("--")
        aliases, commands = args[:sep], json.loads(args[sep + 1])
        for alias in aliases:
            c = connect(alias, 5)
            result[alias] = [run(c, cmd, env) for cmd, env in commands]
            c.close()
    elif mode == "connect":      # args: alias timeout
        t0 = time.monotonic()
        try:
            connect(args[0], float(args[1])).close()
            result = {"ok": True}
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = time.monotonic() - t0
    print(json.dumps(result))
    """
)


def client(cluster: SshCluster, mode: str, *args: str, timeout: float = 30):
    path = os.path.join(cluster.tmp, "client.py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(CLIENT)
    p = cluster.run_in_client(
        [cluster.python, path, cluster.ssh_config, cluster.known_hosts, mode, *args],
        timeout=timeout,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def ns_names() -> set:
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_layout(cluster):
    assert cluster.aliases == ["node1", "node2", "node3"]
    assert cluster.hosts == [str(cluster.subnet.network_address + k) for k in (11, 12, 13)]
    assert cluster.client_ip == str(cluster.subnet.network_address + 10)
    assert set(cluster.namespaces) <= ns_names()
    assert all(n.startswith(f"ffc{os.getpid()}") for n in cluster.namespaces)
    for path in (cluster.ssh_config, cluster.known_hosts, cluster.identity):
        assert os.path.isfile(path)
    assert cluster.setup_seconds < 10


def test_range_exists_only_inside_namespaces(cluster):
    # Not routed, nor addressed, in the root namespace ...
    assert not any(cluster.subnet.overlaps(n) for n in netns._root_ns_networks())
    # ... and no namespace has a route anywhere but the subnet (and lo): nothing leaves.
    for ns in [*cluster.host_ns, cluster.client_ns]:
        routes = json.loads(
            subprocess.run(
                [IP, "-n", ns, "-j", "-4", "route"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert [r["dst"] for r in routes] == [str(cluster.subnet)], (ns, routes)
    bridge_routes = subprocess.run(
        [IP, "-n", cluster.bridge_ns, "-4", "route"], capture_output=True, text=True, check=True
    ).stdout
    assert bridge_routes.strip() == ""


def test_paramiko_from_client_reaches_every_host(cluster):
    repo, py = cluster.repo, cluster.python
    check = "import futurefed, os, socket; print(futurefed.__file__); print(os.getcwd())"
    commands = [
        ("hostname -I", None),
        ("hostname", None),
        # the recommended form: cd + PYTHONPATH + absolute interpreter
        (cluster.remote_python(check), None),
        # PYTHONPATH sent with the exec request (sshd has AcceptEnv *)
        (f"cd / && {py} -c '{check}'", {"PYTHONPATH": repo}),
        # loopback inside the host namespace works (brokers bind 127.0.0.1 there)
        (
            f'{py} -c \'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); '
            f's.listen(); socket.create_connection(s.getsockname()).close(); print("lo ok")\'',
            None,
        ),
    ]
    result = client(cluster, "probe", *cluster.aliases, "--", json.dumps(commands))
    for alias, ip in zip(cluster.aliases, cluster.hosts):
        ips, name, via_cd, via_env, lo = result[alias]
        assert all(r["rc"] == 0 for r in result[alias]), result[alias]
        assert ips["out"].split() == [ip]  # the session runs in that host's namespace
        assert name["out"].strip() == alias  # and in its UTS namespace
        assert via_cd["out"].splitlines() == [f"{repo}/futurefed/__init__.py", repo]
        assert via_env["out"].splitlines() == [f"{repo}/futurefed/__init__.py", "/"]
        assert lo["out"].strip() == "lo ok"


def test_unknown_host_key_is_rejected(cluster):
    # RejectPolicy without the cluster's known_hosts: the host key is refused
    script = (
        "import paramiko, sys\n"
        "c = paramiko.SSHClient(); c.set_missing_host_key_policy(paramiko.RejectPolicy())\n"
        "try:\n"
        f"    c.connect({cluster.hosts[0]!r}, username='root', key_filename={cluster.identity!r},"
        " look_for_keys=False, allow_agent=False, timeout=5)\n"
        "except paramiko.SSHException as e: print('rejected', e)\n"
    )
    p = cluster.run_in_client([cluster.python, "-c", script], timeout=30)
    assert p.stdout.startswith("rejected"), (p.stdout, p.stderr)


def test_cut_host_fails_connect_within_timeout(cluster):
    cluster.cut("node2")
    try:
        out = client(cluster, "connect", "node2", "2")
        assert out["ok"] is False, out
        assert out["seconds"] < 5, out
        assert client(cluster, "connect", "node1", "5")["ok"] is True  # others unaffected
    finally:
        cluster.uncut("node2")
    out = client(cluster, "connect", "node2", "5")
    assert out["ok"] is True, out


def test_pids_in_sees_processes_of_that_namespace_only(cluster):
    sshd = cluster.sshd_pids["node1"]
    assert sshd in cluster.pids_in("node1", include_sshd=True)
    assert cluster.pids_in("node1") == []
    p = cluster.exec_in("node1", ["sleep", "30"])
    try:
        assert wait_until(lambda: p.pid in cluster.pids_in("node1"))
        assert p.pid not in cluster.pids_in("node2")
        assert p.pid not in cluster.pids_in("client")
        assert sshd not in cluster.pids_in("node1")
    finally:
        p.kill()
        p.wait()
    assert cluster.pids_in("node1") == []

    # a process left behind by an ssh session (detached) is seen on its host
    cmd = "setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $!"
    res = client(cluster, "probe", "node3", "--", json.dumps([[cmd, None]]))["node3"][0]
    pid = int(res["out"])
    try:
        assert wait_until(lambda: cluster.pids_in("node3") == [pid]), cluster.describe(
            cluster.pids_in("node3")
        )
        assert pid not in cluster.pids_in("node2")
    finally:
        os.kill(pid, 9)
    assert wait_until(lambda: cluster.pids_in("node3") == [])


def test_cleanup_removes_everything_even_on_error():
    with pytest.raises(ZeroDivisionError):
        with SshCluster(n_hosts=1) as c:
            # a second cluster alongside the module one: distinct names
            assert c.prefix.startswith(f"ffc{os.getpid()}_")
            names, tmp, etc = list(c.namespaces), c.tmp, f"/etc/netns/{c.host_ns[0]}"
            assert set(names) <= ns_names() and os.path.isdir(etc)
            left = c.exec_in("node1", ["sleep", "60"], start_new_session=True)
            stray = c.exec_in(
                "client", ["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, text=True
            )
            grandchild = int(stray.stdout.readline())
            stray.wait()
            sshd = c.sshd_pids["node1"]
            1 / 0
    assert not set(names) & ns_names()
    assert not os.path.exists(tmp) and not os.path.exists(etc)
    assert left.poll() is not None
    assert wait_until(lambda: not netns._pid_alive(grandchild) or _is_zombie(grandchild), 5)
    assert not netns._pid_alive(sshd) or _is_zombie(sshd)
    c.close()  # idempotent


def _is_zombie(pid: int) -> bool:
    st = netns._proc_stat(pid)
    if st is None:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_reap_stale_removes_namespaces_of_dead_runs():
    if netns.preflight():
        pytest.skip(netns.preflight())
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"ffc{dead.pid}-h1"
    assume_dead = not netns._pid_alive(dead.pid)
    if not assume_dead or name in ns_names():
        pytest.skip("pid reused")
    subprocess.run([IP, "netns", "add", name], check=True)
    try:
        assert name in netns.reap_stale()
        assert name not in ns_names()
    finally:
        subprocess.run([IP, "netns", "delete", name], capture_output=True)


def test_skips_with_reason_when_not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="root"):
        SshCluster().start()


def test_python_for_hosts_is_this_interpreter(cluster):
    assert cluster.python == sys.executable
    assert cluster.remote_python(module="futurefed.launch", args=["--help"]).endswith(
        "-m futurefed.launch --help"
    )
