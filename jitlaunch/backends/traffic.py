"""Where backends see a handed-over instance's traffic (Handle.traffic; lifecycle/activity.py).

* A tap on our bridge (qemu): the packets the guest sent, from the tap's counters in sysfs
  (``/sys/class/net/<tap>/statistics/rx_packets``: the host receives what the guest sends).
  Only that direction: what the host sends the guest includes the bridge's own multicast
  (IPv6 neighbour discovery, MLD) and every broadcast on the bridge, which arrive with no
  client at all; a guest that sends nothing has served nobody. Two small reads, no netlink.
* A process with an address of its own (a loopback ``subnet``): its TCP connections, from the
  kernel's table (``/proc/net/tcp``, ``/proc/net/tcp6``): the connections whose local address
  and port are the instance's (the server's side) or whose remote ones are (a client on this
  host). :class:`ConnectionCounter` turns them into a counter: it grows by each connection
  not seen in the previous sample (a connection that ended between two samples is still
  there, in TIME_WAIT, on the side that closed first) and by each one established at the
  sample (an open connection is in use, as a proxied one is). The table is read once per
  :data:`TABLE_AGE` for all instances (:class:`SocketTable`), in a worker thread. No
  conntrack, no sock_diag: nothing needs a kernel module or a privilege.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable

import trio

SYSFS_NET = "/sys/class/net"
PROC_TCP = {4: "/proc/net/tcp", 6: "/proc/net/tcp6"}
#: A table read this recently serves every instance that asks (seconds).
TABLE_AGE = 0.5
#: TCP states in /proc/net/tcp (include/net/tcp_states.h).
ESTABLISHED = 0x01
LISTEN = 0x0A


def tap_packets_sent(tap: str, sysfs: str = SYSFS_NET) -> int:
    """The packets the guest behind ``tap`` has sent (the tap's ``rx_packets``). OSError when
    the tap is gone or sysfs unreadable."""
    with open(f"{sysfs}/{tap}/statistics/rx_packets", "rb") as f:
        return int(f.read())


def link_packets_received(name: str, dev: str = "/proc/self/net/dev") -> int:
    """The packets interface ``name`` has received (a veth's host end: what its container
    sent), from /proc/self/net/dev, which shows this process's network namespace whatever
    sysfs is mounted. OSError when there is no such interface."""
    with open(dev, "rb") as f:
        for line in f:
            iface, sep, counters = line.partition(b":")
            if sep and iface.strip() == name.encode():
                return int(counters.split()[1])
    raise FileNotFoundError(f"no interface {name} in {dev}")


def hex_address(ip: str) -> str:
    """``ip`` as /proc/net/tcp{,6} prints it: each 32-bit word of the network-order address
    in host byte order, as 8 upper-case hex digits (``127.0.0.1`` -> ``0100007F`` on a
    little-endian host)."""
    packed = ipaddress.ip_address(ip).packed
    return "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}"
                   for i in range(0, len(packed), 4))


#: One connection as the table shows it: (local "ADDR:PORT", remote "ADDR:PORT", state).
Entry = tuple[str, str, int]


def index_table(text: str) -> dict[str, list[Entry]]:
    """The entries of a /proc/net/tcp{,6} ``text`` by address (hex, :func:`hex_address`):
    each under its local and its remote address (once when both are the same); listening
    sockets left out. Lines it cannot read are skipped."""
    out: dict[str, list[Entry]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split(None, 4)
        if len(fields) < 4:
            continue
        local, remote, st = fields[1], fields[2], fields[3]
        try:
            state = int(st, 16)
        except ValueError:
            continue
        if state == LISTEN:
            continue
        entry = (local, remote, state)
        a, b = local.partition(":")[0], remote.partition(":")[0]
        out.setdefault(a, []).append(entry)
        if b != a:
            out.setdefault(b, []).append(entry)
    return out


class SocketTable:
    """The kernel's TCP table, read and indexed at most once per :data:`TABLE_AGE` for every
    instance that asks at about the same time, in a worker thread (a few thousand
    connections: a few ms).
    One per backend."""

    def __init__(self, paths: dict[int, str] | None = None) -> None:
        self.paths = paths or PROC_TCP
        self._tables: dict[int, tuple[float, dict[str, list[Entry]]]] = {}
        self._lock: trio.Lock | None = None
        #: Reads of the table (for tests: instances share them).
        self.reads = 0

    async def entries(self, ip: str) -> list[Entry]:
        """The connections with ``ip`` at either end (listening sockets left out). OSError if
        the table cannot be read."""
        version = ipaddress.ip_address(ip).version
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            cached = self._tables.get(version)
            if cached is None or trio.current_time() - cached[0] >= TABLE_AGE:
                table = await trio.to_thread.run_sync(self._read, self.paths[version])
                cached = self._tables[version] = (trio.current_time(), table)
        return cached[1].get(hex_address(ip), [])

    def _read(self, path: str) -> dict[str, list[Entry]]:
        self.reads += 1
        with open(path) as f:
            return index_table(f.read())


class ConnectionCounter:
    """A counter over samples of one instance's connections (see the module's docstring):
    each sample adds the connections new since the last one and those established now."""

    def __init__(self, ip: str, ports: Iterable[int]) -> None:
        prefix = hex_address(ip) + ":"
        self._ends = {f"{prefix}{port:04X}" for port in ports}
        self._seen: set[tuple[str, str]] = set()
        self.value = 0

    def update(self, entries: Iterable[Entry]) -> int:
        """Take one sample of the table's ``entries`` for the instance's address; returns the
        counter."""
        current: set[tuple[str, str]] = set()
        established = 0
        for local, remote, state in entries:
            if local not in self._ends and remote not in self._ends:
                continue  # not to one of the service's ports (the instance's own client)
            key = (local, remote)
            current.add(key)
            established += state == ESTABLISHED
        self.value += len(current - self._seen) + established
        self._seen = current
        return self.value
