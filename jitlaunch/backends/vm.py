"""What the two VM backends (qemu, libvirt) share.

Pure: the guest's kernel command line fields and default, QEMU's user-network addresses,
the bridge settings' parser, and each instance's MAC. Doing I/O, and saying so:
:func:`kvm_usable` opens /dev/kvm; :func:`image_id` reads a kernel image whole;
:class:`HostPorts` asks the kernel for free ports (and remembers which of them our starting
instances will bind, which the kernel does not know yet).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from pathlib import Path

from ..config import Table
from .base import free_port

DEFAULT_CMDLINE = "ip={ip}/{prefix} gw={gateway} port={port} name={name}"
CMDLINE_FIELDS = ("ip", "prefix", "gateway", "port", "name", "instance")
#: User networking: the guest's address and gateway are QEMU's slirp defaults.
USER_IP, USER_PREFIX, USER_GATEWAY = "10.0.2.15", 24, "10.0.2.2"


def parse_bridge(t: Table) -> tuple[str, ipaddress.IPv4Network]:
    """The ``bridge`` and ``subnet`` keys of bridge networking (qemu and libvirt)."""
    raw_subnet = t.string("subnet", "10.77.0.0/24")
    try:
        subnet = ipaddress.IPv4Network(raw_subnet, strict=False)
    except ValueError:
        raise t.error("subnet", f"expected an IPv4 network such as 10.77.0.0/24, got {raw_subnet!r}") \
            from None
    if subnet.num_addresses < 4:
        raise t.error("subnet", "expected a network with room for a gateway and instances")
    bridge = t.string("bridge", "jl0")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
        raise t.error("bridge", f"expected an interface name of at most 15 characters, got {bridge!r}")
    return bridge, subnet


def kvm_usable() -> bool:
    """I/O: whether /dev/kvm can be opened for reading and writing."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def image_id(path: Path) -> str:
    """I/O: identifies a kernel image's contents: a saved state is only valid for the same one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def instance_mac(state_dir: Path, service: str, instance: int | str) -> str:
    """A locally administered unicast MAC for one instance, the same for the same daemon
    (state directory), service and instance, so it survives pause and save/restore. Without
    it QEMU gives every guest 52:54:00:12:34:56, and on a bridge the newest guest with that
    MAC takes every frame meant for the others."""
    h = hashlib.sha256(f"{state_dir}\0{service}\0{instance}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02 | (h[0] & 0xFC), *h[1:6]))


class HostPorts:
    """Host ports for user-network forwards: a free one for each front port, none that a
    live or starting instance of ours holds (free_port() only knows bound sockets, and a
    starting QEMU binds later). A port taken before QEMU binds it is the caller's to retry."""

    def __init__(self) -> None:
        self.held: set[int] = set()

    def pick(self, fronts: tuple[int, ...]) -> dict[int, int]:
        """Front port -> host port. OSError if the kernel has none to give."""
        ports: dict[int, int] = {}
        while len(ports) < len(fronts):
            port = free_port()
            if port not in self.held:
                self.held.add(port)
                ports[fronts[len(ports)]] = port
        return ports

    def forget(self, ports: dict[int, int]) -> None:
        self.held.difference_update(ports.values())
