"""Reading QEMU's user networking (slirp): has the guest itself answered a connection made
through a host forward? slirp accepts for the guest, so an open connection proves nothing."""

from __future__ import annotations

import contextlib
import os
import re

#: Connections in these states of slirp's side toward the guest prove that the guest answered
#: the SYN (``info usernet``; libslirp's ``tcpstates`` names).
_ANSWERED = frozenset(
    ("ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSING", "LAST_ACK", "TIME_WAIT")
)
_USERNET_TCP = re.compile(
    r"^\s*TCP\[(?P<state>[A-Z_0-9]+)\]\s+(?P<fd>-?\d+)\s+\S+\s+\d+\s+\S+\s+(?P<port>\d+)\s", re.M
)



def guest_answered(usernet: str, guest_port: int, fd: int | None = None) -> bool:
    """Whether QEMU's ``info usernet`` shows a TCP connection to ``guest_port`` (the one on
    slirp's host socket ``fd``, if given) that the guest has answered. Through a host forward
    slirp accepts the host's connection at once and only then sends its SYN to the guest
    (``SYN_SENT``); a guest that refuses makes slirp close it."""
    return any(
        m["state"] in _ANSWERED and int(m["port"]) == guest_port
        and (fd is None or int(m["fd"]) == fd)
        for m in _USERNET_TCP.finditer(usernet)
    )


def slirp_fd(qemu_pid: int, host_port: int, client_port: int) -> int | None:
    """QEMU's file descriptor for the host side of our connection from 127.0.0.1:client_port
    to its forward on 127.0.0.1:host_port (the FD column of ``info usernet``), or None while
    slirp has not accepted it yet. Blocking (/proc); OSError if /proc cannot be read."""
    want = f"0100007F:{host_port:04X} 0100007F:{client_port:04X} "
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 9 and f"{fields[1]} {fields[2]} " == want:
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for fd in os.listdir(f"/proc/{qemu_pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{qemu_pid}/fd/{fd}") == target:
                return int(fd)
    return None

