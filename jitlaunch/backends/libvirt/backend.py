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
import time
from pathlib import Path
from typing import Any

import trio

from ...aio import first_of
from ...config import ServiceConfig
from ...errors import BootFailed
from ...statedir import ensure_subdir, nofollow
from ..addresses import hold_time
from ..base import PROBE_INTERVAL, Backend, Handle, free_port, map_errors
from ..bridge import Address, reserve_address
from ..console import KVM_FAILURE, READY, ConsoleScanner, last_words
from ..owner import state_id
from ..pool import WarmPools
from ..qemu.settings import USER_GATEWAY, USER_IP, USER_PREFIX, instance_mac, kvm_usable
from .conn import ERR_NO_DOMAIN, ERR_OPERATION_INVALID, Connection, error_code, import_libvirt
from .settings import LibvirtSettings
from .stream import ConsoleStream
from .xml import domain_xml, user_net_args

log = logging.getLogger("jitlaunch.libvirt")

#: Concurrent blocking libvirt calls (worker threads) of one backend.
MAX_THREADS = 8
#: libvirt's lifecycle event numbers (virDomainEventType) and STOPPED's details.
EVENT_STOPPED, STOPPED_SAVED = 5, 4
_STOPPED_DETAIL = {0: "shut down", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                   5: "failed", 6: "stopped for a snapshot"}
#: libvirt's domain states (virDomainState).
_STATE = {0: "in no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
          5: "shut off", 6: "crashed", 7: "suspended by the guest"}
#: libvirt's VIR_DOMAIN_START_PAUSED (createXML) and VIR_DOMAIN_SAVE_PAUSED (restoreFlags).
START_PAUSED, RESTORE_PAUSED = 1, 4
#: QEMU could not bind a host forward's port (taken since free_port() chose it).
_HOSTFWD_TAKEN = "host forwarding"
HOSTFWD_ATTEMPTS = 3


class LibvirtHandle(Handle):
    def __init__(self, backend: LibvirtBackend, service: ServiceConfig, number: int,
                 conn: Connection, name: str, console: Path, host_ports: dict[int, int],
                 mac: str, net: Address | None = None) -> None:
        self.backend = backend
        self.service = service
        self.number = number
        self.conn = conn
        self.name = name
        self.console_path = console
        self.host_ports = host_ports
        self.mac = mac
        #: The guest's address on the bridge (bridge networking), handed over by DNS.
        self.net = net
        self.address = net.ip if net is not None else None
        self.settings: LibvirtSettings = service.settings
        self.scanner = ConsoleScanner()
        self._offset = 0
        self._ready = trio.Event()
        self._failure: BootFailed | None = None
        self._gone = trio.Event()
        self.how = ""
        self.paused = False
        self.saved_file: Path | None = None
        self.expect_stop = False
        #: Our saves whose STOPPED/SAVED event has not arrived yet: it may come after the
        #: restore, and must not end the restored domain.
        self.saves_pending = 0
        #: trio times of a cold start's steps (``create``, ``created``, with a console
        #: stream ``console``: opened and the domain resumed, ``first byte``, ``ready``), for
        #: the benchmark's breakdown of where the time goes.
        self.times: dict[str, float] = {}
        #: The last resume's time in seconds: the whole call, and libvirt's RPC in the worker
        #: thread (the rest is the hop to the thread and back), for the benchmark.
        self.resumed: tuple[float, float] | None = None
        #: (connection, domain): the libvirt domain object, see :meth:`_domain`.
        self._dom: tuple[Any, Any] | None = None
        #: The console read through libvirt (``console = "stream"``), while open.
        self.stream: ConsoleStream | None = None

    def __repr__(self) -> str:
        state = "gone" if self._gone.is_set() else "paused" if self.paused else "running"
        return f"<LibvirtHandle {self.name} {state} {self.conn.uri}>"

    def describe(self) -> str:
        return f"{self.name} {super().describe()}".strip()

    def endpoint(self, port: int) -> tuple[str, int]:
        if self.net is not None:
            return self.net.ip, self.settings.guest_ports[self.service.ports.index(port)]
        return "127.0.0.1", self.host_ports[port]

    def alive(self) -> bool:
        return not self._gone.is_set() and self.saved_file is None

    def gone(self, how: str) -> None:
        """Called (on the trio loop) when the domain has stopped."""
        if not self._gone.is_set():
            self.how = how
            self._gone.set()
            self._ready.set()  # a waiter for READY learns of it from wait_exited's race

    # ---- readiness -----------------------------------------------------------------------

    @property
    def streamed(self) -> bool:
        return self.settings.console == "stream"

    async def wait_ready(self) -> None:
        """Read the console until the READY line (BootFailed on a KVM failure): the file
        every PROBE_INTERVAL, or the stream as its bytes come (:meth:`_console_data`)."""
        while not self._ready.is_set():
            if self.streamed:
                await self._ready.wait()
                break
            await trio.to_thread.run_sync(self._read_console)
            if self._offset and "first byte" not in self.times:
                self.times["first byte"] = trio.current_time()
            if not self._ready.is_set():
                await trio.sleep(PROBE_INTERVAL)
        self.times.setdefault("ready", trio.current_time())
        if self._failure is not None:
            raise self._failure
        if self._gone.is_set():
            await trio.sleep_forever()  # wait_exited reports it

    def _read_console(self) -> None:
        try:
            with open(self.console_path, "rb", opener=nofollow) as f:
                f.seek(self._offset)
                data = f.read(1 << 20)
        except OSError:
            return  # not created yet
        self._offset += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        for event in self.scanner.feed(data):
            if event == READY:
                self._ready.set()
            elif event == KVM_FAILURE and self._failure is None:
                self._failure = BootFailed(
                    f"KVM emulation failure (see {self.console_path}); set accel = \"tcg\"")
                self._ready.set()

    def _console_data(self, data: bytes) -> None:
        """On the trio loop: bytes from the console stream."""
        self.times.setdefault("first byte", trio.current_time())
        self._feed(data)

    def _console_end(self, stream: ConsoleStream, reason: str) -> None:
        """On the trio loop: the stream ended. With the domain that is expected (its death
        is the lifecycle events' business); with the connection, :meth:`LibvirtBackend._resync`
        opens it again. Either way only worth a line of the log."""
        if stream is self.stream and self.alive() and not self.expect_stop:
            log.info("%s: the console stream ended (%s)", self.name, reason)

    async def open_console(self) -> None:
        """Open the domain's console through libvirt (it replaces an earlier one of ours,
        which a lost connection or a restore has ended). BootFailed with libvirt's message
        if it cannot be opened."""
        await self.close_console()
        stream: ConsoleStream = ConsoleStream(
            self.name, self.console_path, trio.lowlevel.current_trio_token(),
            self._console_data, lambda reason: self._console_end(stream, reason))
        self.stream = stream

        def open_it(conn: Any) -> None:
            try:
                stream.open(import_libvirt(), conn, self._domain(conn))
            except OSError as exc:
                raise BootFailed(f"opening the console of {self.name}: cannot write "
                                 f"{self.console_path}: {exc.strerror or exc}") from exc

        await self.conn.call(f"opening the console of {self.name}", open_it)

    async def close_console(self) -> None:
        """Close the console stream if one is open (shielded; never raises)."""
        stream, self.stream = self.stream, None
        if stream is not None and stream.ended is None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(stream.close, limiter=self.backend.limiter)

    async def wait_exited(self) -> str:
        await self._gone.wait()
        return self.how

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - a timeout is a reason
        """Healthy while libvirt says the domain is running."""
        if self._gone.is_set():
            return f"the domain is gone: {self.how}"
        with trio.move_on_after(timeout):
            try:
                state = await self.conn.call("domain state", lambda c: self._domain(c).state()[0])
            except BootFailed as exc:
                return str(exc)
            return None if state == 1 else f"the domain is {_STATE.get(state, state)}"
        return f"libvirt did not answer within {timeout:g} s"

    #: A lone ARP answer (or a guest's own chatter) between two samples is no client; the
    #: health probe asks libvirt, not the guest.
    traffic_noise = 1

    async def traffic(self) -> int | None:
        """With bridge networking, the packets the guest sent on its interface: libvirt's
        ``virDomainInterfaceStats`` for its MAC, whose counters are the domain's view (its
        ``tx``: what the guest sent), so that a remote host's domain is seen too. None with
        user networking (never handed over). BootFailed when libvirt cannot tell."""
        if self.net is None:
            return None
        stats = await self.conn.call(
            f"interface stats of {self.name}", lambda c: self._domain(c).interfaceStats(self.mac))
        return int(stats[5])

    # ---- control -------------------------------------------------------------------------

    def _domain(self, conn: Any) -> Any:
        """In a worker thread: the domain's libvirt object on ``conn``, looked up once per
        connection (a lookup is an RPC of its own, ~0.2 ms of a ~2 ms resume). libvirtd finds
        the domain by its UUID, which a restore keeps; a domain that is gone fails the call
        as the lookup would ("no domain")."""
        cached = self._dom
        if cached is not None and cached[0] is conn:
            return cached[1]
        dom = conn.lookupByName(self.name)
        self._dom = (conn, dom)
        return dom

    async def _domain_call(self, what: str, method: str, *args: Any) -> Any:
        return await self.conn.call(
            f"{what} {self.name}", lambda c: getattr(self._domain(c), method)(*args))

    async def resume(self) -> None:
        start = trio.current_time()

        def resume(conn: Any) -> float:
            dom = self._domain(conn)
            t = time.perf_counter()
            dom.resume()
            return time.perf_counter() - t

        rpc = await self.conn.call(f"resume {self.name}", resume)
        self.resumed = (trio.current_time() - start, rpc)
        self.paused = False

    async def suspend(self) -> None:
        await self._domain_call("suspend", "suspend")
        self.paused = True

    async def restore(self) -> None:
        """Restore the saved domain from :attr:`saved_file` (removed afterwards, even on
        failure: a state that does not restore is no use). It was ready when saved."""
        path = self.saved_file
        assert path is not None
        self._gone = trio.Event()
        self._ready = trio.Event()
        self.how = ""
        self.expect_stop = False
        self._dom = None
        self.backend.domains[self.name] = self
        try:
            if self.streamed:  # paused until its new pty is open: see the module
                await self.conn.call(f"restore {self.name} from {path}",
                                     lambda c: c.restoreFlags(str(path), None, RESTORE_PAUSED))
            else:
                await self.conn.call(f"restore {self.name} from {path}",
                                     lambda c: c.restore(str(path)))
        finally:
            self.saved_file = None
            with contextlib.suppress(OSError):
                path.unlink()
        if self.streamed:
            try:
                await self.open_console()
                await self._domain_call("resume", "resume")
            except BaseException:
                await self.destroy()
                raise
        self._ready.set()

    async def stop(self, mode: str, grace: float) -> bool:
        try:
            if self.alive() and (mode != "destroy" or grace > 0):
                with trio.move_on_after(grace + 5):
                    if mode == "pause":
                        await self.suspend()
                        return True
                    if mode == "save":
                        return await self._save()
                    if mode == "shutdown":
                        self.expect_stop = True
                        await self._domain_call("shut down", "shutdown")
                        with trio.move_on_after(grace):
                            await self._gone.wait()
        except BootFailed as exc:
            log.warning("%s#%d: %s; destroying the domain", self.service.name, self.number, exc)
        await self.destroy()
        return False

    async def _save(self) -> bool:
        path = self.backend.saved_path(self.service.name)
        self.expect_stop = True
        self.saves_pending += 1
        try:
            await self._domain_call(f"save to {path}", "save", str(path))
        except BaseException:
            self.saves_pending -= 1
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self.saved_file = path
        self.gone("saved")
        await self.close_console()
        return True

    async def destroy(self) -> None:
        """Destroy the domain if it still exists and release its ports (and its address,
        unless its state is saved). Shielded; never raises (a domain that is already gone
        is fine)."""
        with trio.CancelScope(shield=True):
            self.expect_stop = True
            if not self._gone.is_set():
                try:
                    await self._domain_call("destroy", "destroy")
                except BootFailed as exc:
                    if error_code(exc.__cause__ or exc) not in (ERR_NO_DOMAIN, ERR_OPERATION_INVALID):
                        log.warning("%s", exc)
                self.gone("destroyed by jitlaunch")
            await self.close_console()
            if self.saved_file is None:
                self.backend.domains.pop(self.name, None)
                if ".pool-" in self.console_path.name:  # one file per pool member: no pile-up
                    with contextlib.suppress(OSError):
                        self.console_path.unlink()
                if self.net is not None:  # its tap went with the domain (libvirt's)
                    await self.net.release()
            self.backend.forget_ports(self.host_ports)


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
        self._host_ports: set[int] = set()
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

    def forget_ports(self, ports: dict[int, int]) -> None:
        self._host_ports.difference_update(ports.values())

    def _pick_ports(self, fronts: tuple[int, ...]) -> dict[int, int]:
        ports: dict[int, int] = {}
        while len(ports) < len(fronts):
            port = free_port()
            if port not in self._host_ports:
                self._host_ports.add(port)
                ports[fronts[len(ports)]] = port
        return ports

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
                    host_ports = {} if net is not None else self._pick_ports(service.ports)
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
                    self.forget_ports(host_ports)
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
