"""``fedrun``: run a program as the origin of a federation started for it on
this machine, on ssh hosts, or on a SLURM/PBS/SGE allocation (docs/fedrun.md)."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from .. import hosts as hostlist
from ..errors import ConfigError
from ..security import FederationKey
from .channels import AgentCommand, Channel, LocalChannel, srun_channel

_EPILOG = """hosts: each --hosts item (or hostfile line) is host, host:slots,
user@host, user@host:port, host:port:slots or user@host:port:slots; an ssh
config alias works as host (HostName, User, Port and IdentityFile are read
from ~/.ssh/config). A host named twice has the slots of both. Without
--hosts or --hostfile, fedrun uses the SLURM, PBS/Torque or SGE allocation
it runs in, and otherwise this machine alone.

examples:
  fedrun -N 4 prog.py arg                      # on this machine
  fedrun --hosts node1 node2:8 -N 16 prog.py   # over ssh
  fedrun --hosts node1 node2 -- ./prog arg     # -- ends the host list
  fedrun --hostfile hosts.txt prog.py          # a worker per slot
  srun: fedrun --launcher srun prog.py         # in an sbatch script

exit status: the program's; 1 if fedrun could not start or lost a host (one
line on stderr names the host and the reason); 2 for bad arguments; 130 on
Ctrl-C, 143 on SIGTERM. Every process fedrun started is ended in all cases.
"""


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="fedrun",
        description="Start a futurefed broker on every host and workers spread over them,"
        " run PROGRAM as the origin (FederatedExecutor() joins the federation), and tear"
        " everything down when it ends.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = cli.add_argument_group("where")
    where.add_argument("--hosts", nargs="+", metavar="HOST", help="hosts to run on (see below)")
    where.add_argument("--hostfile", metavar="FILE", help="a file of 'host [slots]' lines; # comments")
    where.add_argument(
        "-N", "-n", "--workers", type=int, metavar="N",
        help="workers in all (default: the hosts' slots, or their cores), spread in proportion"
        " to slots",
    )
    where.add_argument(
        "--launcher", choices=("ssh", "srun"), default="ssh",
        help="how to start the hosts' agents: ssh (default) or, inside SLURM, srun",
    )
    remote = cli.add_argument_group("the hosts' environment")
    remote.add_argument(
        "--python-interpreter", metavar="PATH", default=sys.executable,
        help="Python on the hosts (default: this Python, %(default)s)",
    )
    remote.add_argument(
        "--path", metavar="DIR", default=os.getcwd(),
        help="working directory on the hosts (default: the current one)",
    )
    remote.add_argument(
        "--pythonpath", nargs="+", metavar="DIR", default=None,
        help="put these first on the hosts' PYTHONPATH (default: the program's directory)",
    )
    remote.add_argument("--prolog", metavar="FILE", help="a shell script sourced on each host first")
    remote.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="set this variable for the workers and the program (repeatable)",
    )
    remote.add_argument(
        "--nice", type=int, default=0, metavar="N",
        help="niceness added to the workers, -20 to 19 (a negative N needs privileges on"
        " the hosts)",
    )
    net = cli.add_argument_group("network")
    net.add_argument(
        "--external-hostname", action="append", default=[], metavar="[HOST=]ADDRESS",
        help="the address other hosts and the program use for HOST's broker (default: the"
        " address fedrun connects to); without HOST=, for this machine",
    )
    net.add_argument(
        "--tunnel", action="store_true",
        help="the program reaches the first host's broker through its ssh connection"
        " (when that host is not reachable directly from here)",
    )
    net.add_argument(
        "--key-file", metavar="FILE",
        help="use this federation key (made by fedkeys) instead of a new one for this run,"
        " so that processes started by hand can join (docs/security.md)",
    )
    net.add_argument(
        "--broker-port", type=int, default=0, metavar="PORT",
        help="the brokers' task port (meta: PORT + 1); default: any free port",
    )
    ssh = cli.add_argument_group("ssh")
    ssh.add_argument("--ssh-config", metavar="FILE", help="default: ~/.ssh/config, if it exists")
    ssh.add_argument(
        "--known-hosts", metavar="FILE",
        help="default: the ssh config's UserKnownHostsFile, else ~/.ssh/known_hosts;"
        " /etc/ssh/ssh_known_hosts is read too, after it",
    )
    ssh.add_argument("-i", "--identity", metavar="FILE", help="private key (overrides IdentityFile)")
    ssh.add_argument(
        "--accept-unknown-hosts", action="store_true",
        help="connect to hosts whose key is not in known_hosts (a warning is printed)",
    )
    ssh.add_argument(
        "--connect-timeout", type=float, default=10.0, metavar="SECONDS",
        help="give up on a host that does not answer within this long (above 0; default 10)",
    )
    output = cli.add_argument_group("output")
    output.add_argument(
        "--log-dir", metavar="DIR",
        help="also append each broker's and worker's output to DIR/NAME.log (DIR is created"
        " if missing)",
    )
    output.add_argument(
        "--no-prefix", action="store_true", help="print remote lines without the [host name] prefix"
    )
    output.add_argument("-v", "--verbose", action="store_true", help="say what fedrun does")
    cli.add_argument("-m", "--module", metavar="MODULE", help="run MODULE as the program (like python -m)")
    cli.add_argument("program", nargs="?", metavar="PROGRAM", help="the program (a .py file or an executable)")
    cli.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return cli


def _program(args: argparse.Namespace) -> List[str]:
    if args.module:
        return [sys.executable, "-m", args.module, *args.args]
    if not args.program:
        raise ConfigError("give a PROGRAM to run (or -m MODULE)")
    program = args.program
    if program.endswith(".py") or not os.access(program, os.X_OK) or os.path.isdir(program):
        if not os.path.isfile(program):
            raise ConfigError(f"PROGRAM {program!r}: no such file")
        return [sys.executable, program, *args.args]
    return [program, *args.args]


def _env(items: Sequence[str]) -> Dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    return env


def _external(items: Sequence[str]) -> Tuple[Optional[str], Dict[str, str]]:
    default, per_host = None, {}
    for item in items:
        host, sep, address = item.rpartition("=")
        if not address or (sep and not host):
            raise ConfigError(f"--external-hostname {item!r} is not [HOST=]ADDRESS")
        if sep:
            per_host[host] = address
        else:
            default = address
    return default, per_host


#: --nice N: os.nice(N) adds N to the workers' niceness; Linux keeps it in -20..19.
NICE_RANGE = (-20, 19)


def _check_numbers(args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"-N {args.workers}: at least one worker is needed")
    if not 0 <= args.broker_port <= 65534:
        raise ConfigError(f"--broker-port {args.broker_port} is out of range")
    low, high = NICE_RANGE
    if not low <= args.nice <= high:
        raise ConfigError(f"--nice {args.nice} is out of range ({low} to {high})")
    timeout = args.connect_timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--connect-timeout {timeout:g}: give a number of seconds above 0")


def _check_log_dir(path: str) -> None:
    """--log-dir: make it if missing, and make sure files can be made in
    it now, not when the first process starts (docs/fedrun.md, Output)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--log-dir {path}: not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"--log-dir {path}: cannot write there: {exc.strerror or exc}") from None


def _hosts(args: argparse.Namespace) -> Tuple[str, List[hostlist.Host]]:
    """Where to run: (``local``/``hosts``/the batch system, hosts)."""
    found: List[hostlist.Host] = []
    if args.hosts:
        found += hostlist.parse_hosts(args.hosts)
    if args.hostfile:
        found += hostlist.parse_hostfile(args.hostfile)
    if found:
        return "hosts", found
    allocation = hostlist.from_allocation(os.environ)
    if allocation is not None:
        return allocation
    return "local", []


def build(args: argparse.Namespace) -> Tuple[List[Channel], List[hostlist.Host], str]:
    """The channels to open, the hosts they stand for, and the bind host."""
    kind, hosts = _hosts(args)
    if args.launcher == "srun" and kind != "slurm" and "SLURM_JOB_ID" not in os.environ:
        raise ConfigError("--launcher srun works only inside a SLURM allocation")
    default_external, external = _external(args.external_hostname)
    if kind != "local" and default_external is not None:
        raise ConfigError(
            f"--external-hostname {default_external!r}: with hosts, say which one (HOST=ADDRESS)"
        )
    if args.tunnel and (kind == "local" or args.launcher != "ssh"):
        raise ConfigError("--tunnel needs hosts reached by ssh")
    if kind == "local":
        channel = LocalChannel(socket.gethostname())
        channel.advertise = default_external
        return [channel], [hostlist.Host(channel.label)], default_external and "*" or "127.0.0.1"
    channels: List[Channel] = []
    if args.launcher == "srun":
        for host in hosts:
            channel = srun_channel(host.name, host.slots)
            channel.advertise = external.get(host.name, host.name)
            channels.append(channel)
    else:
        try:
            from .ssh import SshChannel, SshOptions
        except ImportError as exc:
            raise ConfigError(
                f"ssh hosts need paramiko ({exc}): pip install 'futurefed[ssh]'"
            ) from None

        options = SshOptions(
            config_file=args.ssh_config, known_hosts=args.known_hosts, identity=args.identity,
            accept_unknown=args.accept_unknown_hosts, timeout=args.connect_timeout,
        )
        for host in hosts:
            ssh_channel = SshChannel(host, options)
            ssh_channel.advertise = external.get(host.name, ssh_channel.advertise)
            channels.append(ssh_channel)
    return channels, hosts, "*"


#: fedrun's options that take one value, and those that take a list.
_VALUE_OPTIONS = {
    "--hostfile", "-N", "-n", "--workers", "--launcher", "--python-interpreter", "--path",
    "--prolog", "--env", "--nice", "--external-hostname", "--broker-port", "--ssh-config",
    "--known-hosts", "-i", "--identity", "--connect-timeout", "--log-dir", "--key-file",
}
_LIST_OPTIONS = {"--hosts", "--pythonpath"}


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(fedrun's own arguments, the program and its arguments).

    The program starts at ``--``, after ``-m MODULE``, or at the first
    positional argument; within ``--hosts``/``--pythonpath`` lists, at the
    first item that is a file or ends in ``.py``. Everything after it is
    the program's, options included.
    """
    argv = list(argv)
    index, in_list = 0, False
    while index < len(argv):
        token = argv[index]
        if token == "--":
            return argv[:index], argv[index + 1:]
        if token.startswith("-") and token != "-":
            name, has_value = token.split("=", 1)[0], "=" in token
            in_list = name in _LIST_OPTIONS and not has_value
            if name in ("-m", "--module"):
                end = index + (1 if has_value else 2)
                return argv[:end], argv[end:]
            index += 2 if name in _VALUE_OPTIONS and not has_value else 1
            continue
        if in_list and not (token.endswith(".py") or os.path.isfile(token)):
            index += 1
            continue
        return argv[:index], argv[index:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    cli = parser()
    own, program_argv = split_argv(sys.argv[1:] if argv is None else argv)
    args = cli.parse_args(own)
    if program_argv and not args.module:
        args.program, args.args = program_argv[0], program_argv[1:]
    else:
        args.program, args.args = None, program_argv
    try:
        program = _program(args)
        env = _env(args.env)
        _check_numbers(args)
        channels, hosts, bind_host = build(args)
        key = FederationKey.load(args.key_file, "--key-file") if args.key_file else None
        if args.log_dir:
            _check_log_dir(args.log_dir)
    except ConfigError as exc:
        print(f"fedrun: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fedrun: {exc}", file=sys.stderr)
        return 2
    from .channels import LaunchError
    from .session import Plan, Session

    pythonpath = args.pythonpath
    if pythonpath is None:
        pythonpath = [os.path.dirname(os.path.abspath(program[1 if program[0] == sys.executable else 0]))]
    remote_env = {  # the user's --env goes to the agents over stdin, not here
        "PYTHONPATH": os.pathsep.join([*map(os.path.abspath, pythonpath), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }

    def command(channel: Channel) -> AgentCommand:
        return AgentCommand(
            python=args.python_interpreter, workdir=args.path, env=remote_env, prolog=args.prolog,
        )

    def distribute(total: int, cores: Dict[str, int]) -> List[int]:
        """Workers per host; without -N, one per slot (or core, where the
        host list gives no slots)."""
        if total < 1:
            total = sum(host.slots or cores.get(host.name, 1) for host in hosts)
        return hostlist.distribute(total, hosts, cores)

    plan = Plan(
        program=program, workers=args.workers, bind_host=bind_host, broker_port=args.broker_port,
        env=env, nice=args.nice, log_dir=args.log_dir, verbose=args.verbose,
        prefix_output=not args.no_prefix, tunnel=args.tunnel, key=key,
    )
    try:
        return Session(plan, channels, command, distribute).run()
    except LaunchError as exc:
        print(f"fedrun: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
