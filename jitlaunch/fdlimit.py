"""The daemon's file descriptor budget: raise RLIMIT_NOFILE at start, and derive from it how
many proxied connections fit.

Each proxied connection is budgeted three descriptors: its two sockets, and a share of the
splice pipes (at most one pipe, two descriptors, per two connections, see
:class:`jitlaunch.proxy.pipes.PipePool`). A reserve is kept for everything else the daemon
holds: DNS over TCP, listeners, instance processes, logs and QMP sockets.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("jitlaunch")

#: Descriptors budgeted per proxied connection (two sockets and half a pipe).
FDS_PER_CONNECTION = 3
#: Descriptors kept for the rest of the daemon, besides DNS's ``max_tcp_connections``.
BASE_RESERVE = 1024


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; log and return ``(soft, hard)``.

    Never raises: if the kernel refuses, the old limit stays and a warning says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, hard, exc)
        else:
            log.info("open file limit raised from %d to %d", soft, hard)
            soft = hard
    else:
        log.info("open file limit: %d", soft)
    return soft, hard


def nofile_limit() -> int:
    """The current soft RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reserve(limit: int, dns_tcp_connections: int) -> int:
    """Descriptors kept for everything but proxied connections: ``BASE_RESERVE`` plus DNS's
    TCP connections, but never more than a quarter of ``limit``."""
    return min(BASE_RESERVE + dns_tcp_connections, limit // 4)


def default_max_connections(limit: int, dns_tcp_connections: int) -> int:
    """Proxied connections that fit in ``limit`` descriptors: ``(limit - reserve) // 3``."""
    return max(1, (limit - reserve(limit, dns_tcp_connections)) // FDS_PER_CONNECTION)
