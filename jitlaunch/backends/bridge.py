"""Bridge networking: a Linux bridge with a subnet, one tap per instance, created over netlink.

The bridge (created if absent, its address the subnet's first host, which instances use as
their gateway) stays; each instance gets a tap named ``jlt<hex>`` attached to it and the next
free address of the subnet (one another service had stays that service's while clients may
have it cached: addresses.py). Each tap carries its daemon's state directory identity in its
alias (``jitlaunch <state id>``). Taps are removed when their instance is released and, at
daemon start, every tap of that identity an earlier run left (:func:`remove_leftover_taps`),
never one of another state directory's daemon, live or not. Where someone
else makes the tap (libvirt, for ``<interface type='bridge'>``), :func:`reserve_address` gives
an address and makes the bridge, without a tap. Needs root or CAP_NET_ADMIN; netlink calls
are blocking, so they run in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import BootFailed
from .addresses import AddressPool

log = logging.getLogger("jitlaunch.net")

TAP_PREFIX = "jlt"
#: A tap's alias (IFLA_IFALIAS) is this and its daemon's state directory identity.
ALIAS = "jitlaunch"
#: Each bridge's addresses, in use or held for the service that had them (addresses.py).
_pools: dict[str, AddressPool] = {}
_taps = itertools.count(1)


@dataclass
class Lease:
    """A tap and an address for one instance; :meth:`release` gives both back."""

    bridge: str
    tap: str
    ip: str
    gateway: str
    #: The service it is for, and how long the address is held for it after the release.
    service: str = ""
    hold: float = 0.0
    released: bool = field(default=False)

    async def release(self) -> None:
        """Delete the tap (netlink, in a worker thread), then free the address. Idempotent;
        never raises: a tap that cannot be removed is logged (a later start removes it)."""
        if self.released:
            return
        self.released = True
        # Shielded: a cancelled caller must not leave the tap behind (netlink is quick).
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_delete_link, self.tap, self.bridge, self.ip)
            except Exception as exc:  # it must not stop the rest of the release
                log.warning("cannot remove tap %s: %s", self.tap, exc)
            finally:
                _pool(self.bridge).release(self.ip, self.service, self.hold)


@dataclass
class Address:
    """An address on a bridge for an instance whose tap someone else makes and removes;
    :meth:`release` frees it. ``local``: the bridge is on this host (we made it, and forget
    the address's neighbour entry there on release); else it is on a remote libvirt host."""

    bridge: str
    ip: str
    gateway: str
    local: bool
    service: str = ""
    hold: float = 0.0
    released: bool = field(default=False)

    async def release(self) -> None:
        """Forget the host's neighbour entry for the address, then free it. Idempotent;
        never raises."""
        if self.released:
            return
        self.released = True
        with trio.CancelScope(shield=True):
            try:
                if self.local:
                    await trio.to_thread.run_sync(_forget_neighbour, self.bridge, self.ip)
            except Exception as exc:
                log.warning("cannot forget %s on bridge %s: %s", self.ip, self.bridge, exc)
            finally:
                _pool(self.bridge).release(self.ip, self.service, self.hold)


def _pool(bridge: str) -> AddressPool:
    return _pools.setdefault(bridge, AddressPool())


def _ipr() -> Any:
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:
        raise BootFailed("bridge networking needs pyroute2 (pip install pyroute2)") from exc
    return IPRoute()


def _delete_link(name: str, bridge: str | None = None, ip: str | None = None) -> None:
    """Delete link ``name``; with ``bridge`` and ``ip``, also forget the host's neighbour
    entry for ``ip`` there: the next instance to get the address has another MAC, and a
    stale entry would send its first packets to the old one for seconds."""
    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])
        if bridge and ip:
            _forget(ipr, bridge, ip)


def _forget_neighbour(bridge: str, ip: str) -> None:
    with _ipr() as ipr:
        _forget(ipr, bridge, ip)


def _forget(ipr: Any, bridge: str, ip: str) -> None:
    br = ipr.link_lookup(ifname=bridge)
    if br:
        with contextlib.suppress(Exception):  # no entry: nothing to forget
            ipr.neigh("del", dst=ip, ifindex=br[0])


def _bridge_mac(name: str) -> str:
    h = hashlib.sha256(f"jitlaunch bridge {name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02 | (h[0] & 0xFC), *h[1:6]))


@contextlib.contextmanager
def _unless_exists() -> Iterator[None]:
    """Ignore netlink's EEXIST: attaches run in worker threads, two may create one thing."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "code", None) != errno.EEXIST:
            raise


def _ensure_bridge(ipr: Any, name: str, subnet: ipaddress.IPv4Network) -> int:
    gateway = next(subnet.hosts())
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        log.info("creating bridge %s with %s/%d", name, gateway, subnet.prefixlen)
        # A MAC of its own: otherwise the bridge takes the lowest of its ports' MACs, and
        # changes it (under the guests' ARP caches) as taps come and go.
        with _unless_exists():  # a concurrent attach made it first
            ipr.link("add", ifname=name, kind="bridge", address=_bridge_mac(name))
        idx = ipr.link_lookup(ifname=name)
    index: int = idx[0]
    addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
    if str(gateway) not in addrs:
        with _unless_exists():
            ipr.addr("add", index=index, address=str(gateway), prefixlen=subnet.prefixlen)
    ipr.link("set", index=index, state="up")
    return index


def _reserve(bridge: str, subnet: ipaddress.IPv4Network, service: str) -> tuple[str, str]:
    """Take a free address of the subnet on ``bridge`` for ``service`` (on the event loop,
    so that two concurrent attaches never get the same one; one another service had is held
    for it while its answers may be cached: addresses.py); returns (gateway, address)."""
    hosts = subnet.hosts()
    gateway = str(next(hosts))
    ip = _pool(bridge).take((str(h) for h in hosts), service, f"{subnet} on bridge {bridge}")
    return gateway, ip


def _add_tap(bridge: str, subnet: ipaddress.IPv4Network, tap: str, owner: str) -> None:
    try:
        with _ipr() as ipr:
            bridge_index = _ensure_bridge(ipr, bridge, subnet)
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            tap_index = ipr.link_lookup(ifname=tap)[0]
            ipr.link("set", index=tap_index, ifalias=f"{ALIAS} {owner}")
            ipr.link("set", index=tap_index, master=bridge_index, state="up")
    except BootFailed:
        raise
    except Exception as exc:
        try:
            _delete_link(tap)
        except Exception:
            pass
        raise BootFailed(f"cannot attach a tap to bridge {bridge}: {exc}") from exc


def _link_name(prefix: str, serial: int) -> str:
    """``prefix`` + our pid + a counter: fits IFNAMSIZ and says whose link it is."""
    return f"{prefix}{os.getpid():06x}{serial & 0xFFFFF:05x}"


async def attach(bridge: str, subnet: ipaddress.IPv4Network, owner: str, *, service: str = "",
                 hold: float = 0.0) -> Lease:
    """A new tap on ``bridge`` (created with ``subnet`` if absent) and a free address; the
    tap's alias names ``owner``, the daemon's state directory identity
    (:func:`~jitlaunch.backends.owner.state_id`). The address is reserved before any
    blocking call and freed again if the tap cannot be made; BootFailed says why. Released,
    the address stays ``service``'s for ``hold`` seconds (addresses.py)."""
    gateway, ip = _reserve(bridge, subnet, service)
    tap = _link_name(TAP_PREFIX, next(_taps))
    try:
        await trio.to_thread.run_sync(_add_tap, bridge, subnet, tap, owner)
    except BaseException:
        _pool(bridge).release(ip, service, 0)
        raise
    return Lease(bridge, tap, ip, gateway, service, hold)


def _add_veth(bridge: str, subnet: ipaddress.IPv4Network, host: str, peer: str, owner: str,
              pid: int) -> None:
    try:
        with _ipr() as ipr:
            bridge_index = _ensure_bridge(ipr, bridge, subnet)
            ipr.link("add", ifname=host, kind="veth", peer=peer)
            index = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=index, ifalias=f"{ALIAS} {owner}")
            ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_pid=pid)
            ipr.link("set", index=index, master=bridge_index, state="up")
    except BootFailed:
        raise
    except Exception as exc:
        with contextlib.suppress(Exception):
            _delete_link(host)
        raise BootFailed(f"cannot attach a veth to bridge {bridge}: {exc}") from exc


async def attach_veth(bridge: str, subnet: ipaddress.IPv4Network, owner: str, pid: int, *,
                      service: str = "", hold: float = 0.0) -> Lease:
    """A veth pair for the network namespace of ``pid`` (a container's): the host end, named
    and aliased as a tap (so the same sweep finds a leftover), on ``bridge``; the other end
    moved into the namespace as ``eth0`` with a free address of ``subnet`` and a default
    route through the bridge. As :func:`attach` otherwise."""
    gateway, ip = _reserve(bridge, subnet, service)
    serial = next(_taps)
    host, peer = _link_name(TAP_PREFIX, serial), _link_name("jlp", serial)
    lease = Lease(bridge, host, ip, gateway, service, hold)
    try:
        await trio.to_thread.run_sync(_add_veth, bridge, subnet, host, peer, owner, pid)
    except BaseException:
        _pool(bridge).release(ip, service, 0)
        raise
    try:
        # Inside the namespace, by iproute2 under nsenter: one short process, where netlink
        # would need this thread moved into the namespace and back.
        script = (f"link set dev {peer} name eth0\n"
                  f"addr add {ip}/{subnet.prefixlen} dev eth0\n"
                  "link set dev eth0 up\nlink set dev lo up\n"
                  f"route add default via {gateway}\n")
        done = await trio.run_process(
            ["nsenter", "--target", str(pid), "--net", "ip", "-batch", "-"],
            stdin=script.encode(), capture_stdout=True, capture_stderr=True, check=False)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()
            raise BootFailed(f"cannot set up eth0 in the container: {why[-1] if why else done.returncode}")
    except BaseException:
        await lease.release()
        raise
    return lease


def _make_bridge(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    try:
        with _ipr() as ipr:
            _ensure_bridge(ipr, bridge, subnet)
    except BootFailed:
        raise
    except Exception as exc:
        raise BootFailed(f"cannot make bridge {bridge}: {exc}") from exc


async def reserve_address(bridge: str, subnet: ipaddress.IPv4Network, *, local: bool,
                          service: str = "", hold: float = 0.0) -> Address:
    """A free address of ``subnet`` on ``bridge`` for an instance whose tap someone else
    makes. With ``local`` the bridge is created here (with ``subnet``) if absent, as by
    :func:`attach`; else it is a remote host's, and only the address is ours to give.
    The address is reserved before any blocking call and freed again on failure; released,
    it stays ``service``'s for ``hold`` seconds (addresses.py)."""
    gateway, ip = _reserve(bridge, subnet, service)
    if local:
        try:
            await trio.to_thread.run_sync(_make_bridge, bridge, subnet)
        except BaseException:
            _pool(bridge).release(ip, service, 0)
            raise
    return Address(bridge, ip, gateway, local, service, hold)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(TAP_PREFIX) : len(TAP_PREFIX) + 6], 16)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"jitlaunch" in f.read()
    except (OSError, ValueError):
        return False


def remove_leftover_taps(owner: str) -> list[str]:
    """Delete the ``jlt*`` taps of state directory identity ``owner`` (the alias, compared
    whole), which an earlier run left: call it before this run makes any. A tap without an
    alias (made before taps had one) goes if the daemon that made it is gone; one with
    another identity never does."""
    removed = []
    with _ipr() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if not name.startswith(TAP_PREFIX) or len(name) != 14:
                continue
            alias = link.get_attr("IFLA_IFALIAS")
            if alias == f"{ALIAS} {owner}" or (not alias and not _owner_alive(name)):
                ipr.link("del", index=link["index"])
                removed.append(name)
    return removed
