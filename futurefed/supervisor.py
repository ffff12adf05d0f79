"""What the parent of worker processes tells their broker when one ends.

fedrun's host agent and the embedded federation start workers as their own
children, so they see each one end (``waitpid``) and they read its stderr.
:func:`report_exit` hands that to the broker as a WORKER_EXIT
(docs/protocol.md): the broker then loses the worker at once, instead of
after three silent heartbeats, and a task that fails with ``WorkerLost``
says how the process ended and what it last wrote on stderr.

Each report is one short connection: HELLO (role ``supervisor``),
WORKER_EXIT, BYE. Nothing is kept open between reports, so nothing needs
heartbeats, and a report needs no thread of its own.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Optional, Sequence

__all__ = ["STDERR_TAIL", "report_exit"]

logger = logging.getLogger(__name__)

#: Lines of a worker's stderr a supervisor keeps and reports.
STDERR_TAIL = 20
#: How long ZeroMQ keeps trying to deliver a report after it was handed over.
LINGER_MS = 2000


def report_exit(address: str, worker: str, pid: int, returncode: int, stderr: Sequence[str],
                context: Optional[Any] = None, key: Optional[Any] = None) -> None:
    """Tell the broker at ``address`` that worker ``worker`` (process
    ``pid``) ended with ``returncode`` (as ``subprocess`` gives it: negative
    for a signal), with its last ``stderr`` lines; ``key`` is the
    federation key, if its brokers use one. Does not wait for the broker; a
    failure to send is logged, never raised."""
    import zmq

    from . import protocol as p
    from ._sockets import task_socket
    from ._versions import local_versions
    from .errors import LocalProtocolError
    from .security import make_client

    try:
        notice = p.WorkerExit.of(worker, pid, returncode, stderr, lines=STDERR_TAIL)
        frames = [
            p.encode(p.Hello({
                "role": "supervisor", "name": f"supervisor-{os.getpid()}",
                "host": socket.gethostname(), "pid": os.getpid(), "versions": local_versions(),
            })),
            p.encode(notice),
            p.encode(p.Bye()),
        ]
    except LocalProtocolError as exc:
        logger.warning("cannot report that worker %s (pid %d) ended: %s", worker, pid, exc)
        return
    sock = task_socket(context or zmq.Context.instance(), zmq.DEALER, linger_ms=LINGER_MS)
    make_client(sock, key)
    try:
        sock.connect(address)
        for message in frames:
            sock.send_multipart(message, zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        logger.warning("cannot report to %s that worker %s (pid %d) ended: %s",
                       address, worker, pid, exc)
    finally:
        sock.close()
