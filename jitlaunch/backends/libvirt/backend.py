"""The libvirt backend: one transient domain (``createXML``) per instance.

Domains are named ``jl-<id>-<service>-<n>``, where ``<id>`` identifies the state directory:
a restarted daemon destroys the domains with its own prefix that an earlier run left and
never touches anyone else's. The console (``console = "file"``, the default for a local
libvirtd) is a file in ``<state_dir>/logs`` (the service's log), read every PROBE_INTERVAL for
the READY line through the shared console scanner; with ``console = "stream"`` (the default
for a remote host, whose files we cannot read) it is a pty that libvirt relays to us
(:mod:`.stream`), fed to the same scanner and appended to the same local log. Such a domain
is created (or restored) paused, its console opened, then resumed, so no byte is lost; after
a restore or a reconnect the console is opened again.
Stop modes: ``destroy``; ``shutdown`` (ACPI, then destroy after ``grace``); ``pause``
(suspend, and resume on the next start); ``save`` (``virDomainSave`` to
``<state_dir>/libvirt``, restored on the next start, which removes the file). A domain that
stops by itself (crash, ``virsh destroy``) is noticed at once through libvirt's lifecycle
events. Blocking calls run in worker threads (:mod:`.conn`).

Networking: ``user`` (QEMU's user networking with host forwards on 127.0.0.1, passed in
``<qemu:commandline>``) or ``bridge``: libvirt makes the domain's tap on our bridge and
removes it with the domain; we give the guest an address of the subnet (on its kernel
command line), which DNS hands over once it is ready, and free it when the domain is gone
for good (not while it is paused or saved: the guest keeps its address).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import trio

from ...aio import first_of
from ...config import ServiceConfig
from ...errors import BootFailed
from ...statedir import ensure_subdir
from ..addresses import hold_time
from ..base import Backend, Handle, map_errors
from ..bridge import Address, reserve_address
from ..console import last_words
from ..owner import state_id
from ..pool import WarmPools
from ..vm import USER_GATEWAY, USER_IP, USER_PREFIX, HostPorts, instance_mac, kvm_usable
from .conn import ERR_NO_DOMAIN, ERR_OPERATION_INVALID, Connection, error_code
from .handle import LibvirtHandle
from .settings import LibvirtSettings
from .xml import domain_xml, user_net_args

log = logging.getLogger("jitlaunch.libvirt")

#: Concurrent blocking libvirt calls (worker threads) of one backend.
MAX_THREADS = 8
#: libvirt's lifecycle event numbers (virDomainEventType) and STOPPED's details.
EVENT_STOPPED, STOPPED_SAVED = 5, 4
_STOPPED_DETAIL = {0: "shut down", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                   5: "failed", 6: "stopped for a snapshot"}
#: libvirt's VIR_DOMAIN_START_PAUSED (createXML).
START_PAUSED = 1
#: QEMU could not bind a host forward's port (taken since free_port() chose it).
_HOSTFWD_TAKEN = "host forwarding"
HOSTFWD_ATTEMPTS = 3


class LibvirtBackend(Backend):
    name = "libvirt"

    def __init__(self, state_dir: Path, services: list[ServiceConfig]) -> None:
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.saved_dir = state_dir / "libvirt"
        self.services = services
        self.prefix = f"jl-{state_id(state_dir)}-"
        self.domains: dict[str, LibvirtHandle] = {}
        self._conns: dict[str, Connection] = {}
        self.limiter = trio.CapacityLimiter(MAX_THREADS)
        self.host_ports = HostPorts()
        self._counter = 0
        self._kvm: bool | None = None
        self.warm: WarmPools[LibvirtHandle] = WarmPools(
            services, size=lambda s: s.settings.pool,
            fillable=lambda s: s.settings.kernel.is_file(),
            make=self._pool_member, log=log,
        )
        self.pools = self.warm.pools

    def __repr__(self) -> str:
        return f"<LibvirtBackend {self.prefix}* {len(self.domains)} domains {list(self._conns)}>"

    def connection(self, uri: str) -> Connection:
        conn = self._conns.get(uri)
        if conn is None:
            conn = self._conns[uri] = Connection(
                uri, limiter=self.limiter,
                on_event=lambda name, event, detail: self._event(uri, name, event, detail),
                on_reconnect=lambda: self._resync_soon(uri),
            )
        return conn

    def saved_path(self, service: str) -> Path:
        return self.saved_dir / f"{service}.state"

    # ---- the backend's own life ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for d in (self.log_dir, self.saved_dir):
            ensure_subdir(d)  # libvirtd writes console files and saved states there by path
        for leftover in self.saved_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for uri in sorted({s.settings.uri for s in self.services}):
                conn = self.connection(uri)
                try:
                    await self.clean_leftovers(conn)
                except BootFailed as exc:
                    log.error("%s (the libvirt services cannot boot until it answers)", exc)
                nursery.start_soon(self._keep_connected, conn)
            task_status.started()
            await self.warm.keep()

    async def clean_leftovers(self, conn: Connection) -> list[str]:
        """Destroy the domains with our prefix (an earlier run's) on ``conn``; return their
        names. Domains of anyone else are never touched."""
        prefix = self.prefix

        def sweep(c: Any) -> list[str]:
            names = []
            for dom in c.listAllDomains():
                name = dom.name()
                if name.startswith(prefix) and name not in self.domains:
                    try:
                        dom.destroy()
                    except Exception as exc:
                        if error_code(exc) not in (ERR_NO_DOMAIN, ERR_OPERATION_INVALID):
                            raise
                    names.append(name)
            return names

        names = await conn.call(f"looking for leftover domains at {conn.uri}", sweep)
        for name in names:
            log.warning("destroyed domain %s left over from an earlier run", name)
        return names

    async def _keep_connected(self, conn: Connection) -> None:
        while True:
            await conn.lost.wait()
            await conn.reopen()

    def _resync_soon(self, uri: str) -> None:
        nursery = getattr(self, "_nursery", None)
        if nursery is not None:
            nursery.start_soon(self._resync, uri)

    async def _resync(self, uri: str) -> None:
        """After a reconnect: a domain of ours that vanished meanwhile is reported gone. Only
        the domains that existed before the listing are judged: one whose createXML or
        restore is still under way (or ends after the listing) is not in it."""
        created = {name for name, h in self.domains.items()
                   if "created" in h.times and h.saved_file is None}
        try:
            names = set(await self.connection(uri).call(
                "listing domains", lambda c: [d.name() for d in c.listAllDomains()]))
        except BootFailed as exc:
            log.warning("%s", exc)
            return
        for name, handle in list(self.domains.items()):
            if handle.conn.uri != uri or handle.saved_file is not None or name not in created:
                continue
            if name not in names:
                handle.gone("the domain vanished while the libvirt connection was down")
            elif handle.streamed and handle.alive():
                # The old connection's console stream went with it.
                try:
                    await handle.open_console()
                except BootFailed as exc:
                    log.warning("%s (its READY line and console log are lost)", exc)

    def _event(self, uri: str, name: str, event: int, detail: int) -> None:
        handle = self.domains.get(name)
        if handle is None or handle.conn.uri != uri or event != EVENT_STOPPED:
            return
        if detail == STOPPED_SAVED and handle.saves_pending:
            handle.saves_pending -= 1  # ours, perhaps arriving after the restore
            return
        how = f"the domain {_STOPPED_DETAIL.get(detail, f'stopped ({detail})')}"
        if not handle.expect_stop:
            words = last_words(handle.scanner.last_lines(), "qemu")
            how += f"{': ' + words if words else ''} (console: {handle.console_path})"
            log.warning("%s#%d: %s", handle.service.name, handle.number, how)
        handle.gone(how)

    def status_lines(self) -> list[str]:
        return self.warm.status_lines()

    async def _pool_member(self, svc: ServiceConfig) -> LibvirtHandle:
        """A domain booted to its READY line and then suspended; destroyed on every error
        path. BootFailed if it cannot be had."""
        handle = await self._create(svc, 0, pool=True)
        try:
            with map_errors("pool domain not ready"), trio.fail_after(svc.boot_timeout):
                which, exited = await first_of(handle.wait_ready, handle.wait_exited)
                if which == 1:
                    raise BootFailed(f"{exited} before it was ready")
                await handle.suspend()
        except BaseException:
            await handle.destroy()
            raise
        return handle

    async def aclose(self) -> None:
        for member in self.warm.drain():
            await member.destroy()
        for conn in self._conns.values():
            await conn.aclose()

    # ---- instances -----------------------------------------------------------------------

    def _domain_type(self, settings: LibvirtSettings) -> str:
        if settings.accel != "auto":
            return "kvm" if settings.accel == "kvm" else "qemu"
        if self._kvm is None:
            self._kvm = kvm_usable()
        local = settings.uri.split(":", 1)[0] in ("qemu", "test")
        return "kvm" if self._kvm or not local else "qemu"

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        if isinstance(saved, LibvirtHandle):
            if saved.paused and saved.alive():
                try:
                    await saved.resume()
                except BootFailed as exc:
                    log.warning("%s: %s; booting a fresh domain", service.name, exc)
                    await saved.destroy()
                else:
                    saved.wake = "resume"
                    return saved
            elif saved.saved_file is not None:
                try:
                    await saved.restore()
                except BootFailed as exc:
                    log.warning("%s: %s; booting a fresh domain", service.name, exc)
                    await saved.destroy()
                else:
                    saved.wake = "restore"
                    return saved
            else:
                await saved.destroy()
        while (member := self.warm.take(service.name)) is not None:
            if not member.alive():
                await member.destroy()
                continue
            try:
                await member.resume()
            except BaseException as exc:
                await member.destroy()
                if not isinstance(exc, BootFailed):
                    raise
                log.warning("%s: warm pool member: %s; booting a fresh domain", service.name, exc)
                continue
            member.number = number
            member.wake = "pool"
            log.info("%s#%d taken from the warm pool (%s)", service.name, number, member.name)
            return member
        handle = await self._create(service, number)
        handle.wake = "cold"
        return handle

    async def _create(self, service: ServiceConfig, number: int, *, pool: bool = False
                      ) -> LibvirtHandle:
        """Create the domain of instance ``number`` (or a pool member); return at once.
        BootFailed if libvirt refuses; its address and ports are released on every error
        path, cancellation included."""
        settings: LibvirtSettings = service.settings
        conn = self.connection(settings.uri)
        self._counter += 1
        name = f"{self.prefix}{service.name}-{os.getpid()}-{self._counter}"
        mac = instance_mac(self.state_dir, service.name, f"pool{self._counter}" if pool else number)
        # Pool members log apart, so they never rotate a running instance's console.
        console = self.log_dir / f"{service.name}{'.pool-' + str(self._counter) if pool else ''}.log"
        net: Address | None = None
        ip, prefix, gateway = USER_IP, USER_PREFIX, USER_GATEWAY
        if settings.network == "bridge":
            net = await reserve_address(settings.bridge, settings.subnet, local=settings.local,
                                        service=service.name, hold=hold_time(service))
            ip, prefix, gateway = net.ip, settings.subnet.prefixlen, net.gateway
        cmdline = settings.cmdline.format(
            ip=ip, prefix=prefix, gateway=gateway, port=settings.guest_ports[0],
            name=service.name, instance=number,
        )
        guest_ports = dict(zip(service.ports, settings.guest_ports, strict=True))
        try:
            for attempt in range(1, HOSTFWD_ATTEMPTS + 1):
                try:
                    host_ports = {} if net is not None else self.host_ports.pick(service.ports)
                    if console.exists():
                        console.replace(console.with_suffix(".log.1"))
                except OSError as exc:
                    raise BootFailed(f"cannot prepare the domain: {exc.strerror or exc}") from exc
                xml = domain_xml(settings, name=name, domain_type=self._domain_type(settings),
                                 cmdline=cmdline, console=console, mac=mac,
                                 qemu_args=user_net_args(host_ports, guest_ports, mac),
                                 bridge=settings.bridge if net is not None else None,
                                 pty=settings.console == "stream")
                handle = LibvirtHandle(self, service, number, conn, name, console, host_ports,
                                       mac, net)
                self.domains[name] = handle
                handle.times["create"] = trio.current_time()
                streamed = settings.console == "stream"
                try:
                    await conn.call(f"creating domain {name}",
                                    _create_xml(xml, START_PAUSED if streamed else 0))
                    handle.times["created"] = trio.current_time()
                except BaseException as exc:
                    self.domains.pop(name, None)
                    self.host_ports.forget(host_ports)
                    if isinstance(exc, BootFailed) and _HOSTFWD_TAKEN in str(exc) \
                            and attempt < HOSTFWD_ATTEMPTS:
                        log.info("%s: a host port was taken; retrying with others", name)
                        continue
                    raise
                if streamed:  # created paused: see the module
                    try:
                        await handle.open_console()
                        await handle._domain_call("resume", "resume")
                    except BaseException:
                        await handle.destroy()  # releases its ports and address too
                        net = None
                        raise
                    handle.times["console"] = trio.current_time()
                log.info("%s#%d: domain %s created (%s%s)", service.name, number, name, conn.uri,
                         f", {net.ip} on {net.bridge}" if net is not None else "")
                return handle
        except BaseException:
            if net is not None:
                await net.release()
            raise
        raise AssertionError("unreachable")


def _create_xml(xml: str, flags: int) -> Any:
    return lambda c: c.createXML(xml, flags)
