"""One libvirt domain as the supervisor sees it (see backend.py for the domains' life):
its console scanned for READY, its stop in each mode, its resume and restore. What it needs
of its backend is the :class:`Keeper` protocol."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import trio

from ...config import ServiceConfig
from ...errors import BootFailed
from ...statedir import nofollow
from ..base import PROBE_INTERVAL, Handle
from ..bridge import Address
from ..console import KVM_FAILURE, READY, ConsoleScanner
from ..vm import HostPorts
from .conn import ERR_NO_DOMAIN, ERR_OPERATION_INVALID, Connection, error_code, import_libvirt
from .settings import LibvirtSettings
from .stream import ConsoleStream

log = logging.getLogger("jitlaunch.libvirt")

#: libvirt's domain states (virDomainState).
_STATE = {0: "in no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
          5: "shut off", 6: "crashed", 7: "suspended by the guest"}
#: libvirt's VIR_DOMAIN_SAVE_PAUSED (restoreFlags).
RESTORE_PAUSED = 4


class Keeper(Protocol):
    """What a handle needs of its backend (the LibvirtBackend)."""

    limiter: trio.CapacityLimiter
    domains: dict[str, LibvirtHandle]
    host_ports: HostPorts

    def saved_path(self, service: str) -> Path:
        """Where ``service``'s saved domain goes."""


class LibvirtHandle(Handle):
    def __init__(self, backend: Keeper, service: ServiceConfig, number: int,
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
            self.backend.host_ports.forget(self.host_ports)
