"""One QEMU instance: its process, console, QMP connection, readiness, health and stop."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Protocol

import trio

from ...aio import first_of
from ...config import ServiceConfig
from ...errors import BootFailed, ProtocolError
from ...statedir import write_private
from ..base import PROBE_INTERVAL, Handle, connect_check, map_errors, probe_tcp, process_state
from ..bridge import Lease
from ..console import KVM_FAILURE, READY, ConsoleScanner, last_words
from ..qmp import QMP
from ..traffic import tap_packets_sent
from .settings import QemuSettings, saved_meta
from .usernet import guest_answered, slirp_fd

log = logging.getLogger("jitlaunch.qemu")


class Keeper(Protocol):
    """What a handle needs of whoever runs it (the QemuBackend): no more."""

    @property
    def image_ids(self) -> Mapping[Path, str]:
        """A kernel image's id (vm.image_id), by path: a saved state records it."""

    def kvm_failed(self, kernel: Path) -> None:
        """KVM could not run ``kernel``: later boots use TCG."""

    def saved_path(self, service: str) -> Path:
        """Where ``service``'s saved state goes."""

    async def qemu_version(self, binary: str) -> str:
        """The first line of ``binary --version`` (cached)."""

    async def release(self, handle: QemuHandle) -> None:
        """Give back what the instance held (host ports, its tap and address)."""

#: The longest a QMP stop (into the pool) or cont (out of it, or out of a pause) may take.
RESUME_TIMEOUT = 2.0
#: After QEMU exits, how long its console may take to reach EOF (its last words can still be
#: in the pipe, or on their way from a child that shares it, such as a migration's ``cat``).
CONSOLE_DRAIN = 1.0
#: QEMU could not bind a host forward's port: someone took it after free_port() chose it.
_HOSTFWD_TAKEN = re.compile(rb"Could not set up host forwarding rule")


class QemuHandle(Handle):
    def __init__(
        self,
        backend: Keeper,
        service: ServiceConfig,
        number: int,
        binary: str,
        accel: str,
        proc: trio.Process,
        logfile: IO[bytes],
        qmp_path: Path,
        pidfile: Path,
        host_ports: dict[int, int],
        guest_ip: str,
        address: str | None,
        release_net: list[Lease],
        mac: str,
    ) -> None:
        self.backend = backend
        self.service = service
        self.number = number
        self.binary = binary
        self.accel = accel
        self.proc = proc
        self.pid = proc.pid
        self.logfile = logfile
        self.qmp_path = qmp_path
        self.pidfile = pidfile
        self.host_ports = host_ports
        self.guest_ip = guest_ip
        self.address = address
        self.release_net = release_net
        self.mac = mac
        self.settings: QemuSettings = service.settings
        self._qmp: QMP | None = None
        self._qmp_lock = trio.Lock()
        self.console = ConsoleScanner()
        self._console_lock = trio.Lock()
        self._console_eof = trio.Event()
        self._ready = trio.Event()
        self._failure: BootFailed | None = None
        self.restoring: Path | None = None
        self.paused = False
        self._probing = trio.Lock()

    def describe(self) -> str:
        return f"{super().describe()} {os.path.basename(self.binary)} {self.accel}".strip()

    #: On its tap: a lone ARP answer between two samples is no client; a health probe makes
    #: the guest send its SYN-ACK, the ACK of our FIN and its own FIN (2 or 3 packets).
    traffic_noise = 1
    probe_traffic = 3

    async def traffic(self) -> int | None:
        """With bridge networking, the packets the guest sent on its tap (traffic.py); with
        user networking None: its address is never handed over, the proxy sees everything."""
        if not self.release_net:
            return None
        return tap_packets_sent(self.release_net[0].tap)

    def endpoint(self, port: int) -> tuple[str, int]:
        if self.host_ports:
            return "127.0.0.1", self.host_ports[port]
        guest = self.settings.guest_ports[self.service.ports.index(port)]
        return self.guest_ip, guest

    # ---- readiness -------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Return once the guest is ready; BootFailed with the cause if it cannot become so
        (a KVM failure, a failed restore, QMP not answering)."""
        try:
            if self.restoring is not None:
                await self._wait_restored()
                return
            if self.settings.ready == "tcp":
                await self._probe()
                return
        except ProtocolError as exc:
            raise BootFailed(f"readiness check failed: {exc}") from exc
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure

    async def _probe(self) -> None:
        """``ready = "tcp"``: poll until the guest accepts a connection on its first port,
        every PROBE_INTERVAL, until the caller's boot timeout cancels us."""
        host, port = self.endpoint(self.service.ports[0])
        if not self.host_ports:
            while True:
                try:
                    await probe_tcp(host, port)
                    return
                except OSError as exc:
                    # The guest's address does not answer ARP yet: not ready, not failed.
                    if exc.errno not in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise BootFailed(f"readiness check failed: {exc}") from exc
                await trio.sleep(PROBE_INTERVAL)
        qmp = await self.qmp()
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                pass  # the forward is not bound yet: not ready, not failed
            else:
                async with stream:
                    if await self._guest_answers(qmp, stream):
                        return
            await trio.sleep(PROBE_INTERVAL)

    async def _guest_answers(self, qmp: QMP, stream: trio.SocketStream) -> bool:
        """Through user networking slirp accepts our connection before the guest has seen it
        (and keeps it open while the guest does not answer at all), so an open connection
        proves nothing. The guest answered once slirp's connection toward it is established
        (``info usernet``) or it sent a byte; slirp closing ours means the guest refused.
        Other clients' connections to the same port are told apart by slirp's host socket
        (:func:`slirp_fd`), so that an old established one does not answer for ours."""
        guest_port = self.settings.guest_ports[0]
        host_port = stream.socket.getpeername()[1]
        client_port = stream.socket.getsockname()[1]
        fd: int | None = None
        while True:
            usernet = await qmp.execute("human-monitor-command", **{"command-line": "info usernet"})
            # Cheap first: /proc is read only once some connection has been answered.
            if isinstance(usernet, str) and guest_answered(usernet, guest_port):
                if fd is None:
                    try:
                        fd = await trio.to_thread.run_sync(
                            slirp_fd, self.proc.pid, host_port, client_port)
                    except OSError:
                        return True  # /proc unreadable: any answered connection counts
                if fd is not None and guest_answered(usernet, guest_port, fd):
                    return True
            with trio.move_on_after(PROBE_INTERVAL):
                try:
                    return bool(await stream.receive_some(1))
                except trio.BrokenResourceError:
                    return False

    def discard_restore(self) -> str | None:
        state = self.restoring
        if state is None:
            return None
        for path in (state, state.with_suffix(".image")):
            with contextlib.suppress(OSError):
                path.unlink()
        self.restoring = None
        words = last_words(self.console.last_lines(), self.binary)
        return f"{state}{' (QEMU: ' + words + ')' if words else ''}"

    async def _wait_restored(self) -> None:
        qmp = await self.qmp()
        while True:
            status = (await qmp.execute("query-status")).get("status")
            if status == "running":
                break
            if status == "paused":
                # The state was saved from a stopped VM, so it arrives stopped: start it.
                await qmp.execute("cont")
                continue
            if status not in ("inmigrate", "prelaunch"):
                raise BootFailed(f"restoring the saved state failed: status {status}")
            await trio.sleep(0.002)
        assert self.restoring is not None
        with contextlib.suppress(OSError):
            self.restoring.unlink()
        with contextlib.suppress(OSError):
            self.restoring.with_suffix(".image").unlink()
        self.restoring = None
        self._ready.set()  # it was ready when it was saved

    async def until_up(self) -> str | None:
        """Wait until QEMU's QMP monitor answers, and return None; or, if QEMU exits first,
        return how (:meth:`wait_exited`). QEMU sets up its netdevs, host forwards included,
        before its monitor starts: once QMP answers, every port of ours is bound."""
        try:
            index, value = await first_of(self.qmp, self.wait_exited)
        except ProtocolError as exc:
            # Most often QEMU closed the socket as it exited: then its exit is the answer.
            with trio.move_on_after(CONSOLE_DRAIN + 1):
                exited: str = await self.wait_exited()
                return exited
            raise BootFailed(f"QEMU's monitor did not start: {exc}") from exc
        return value if index == 1 else None

    def host_port_taken(self) -> bool:
        """Whether QEMU said it could not bind a host forward's port."""
        return self.console.said(_HOSTFWD_TAKEN)

    async def wait_exited(self) -> str:
        """Return how QEMU ended once it has exited and its console has been read to the end
        (bounded by CONSOLE_DRAIN), so that its last words reach the log and the message."""
        async with trio.open_nursery() as n:
            n.start_soon(self._read_console)
            await self.proc.wait()
            with trio.move_on_after(CONSOLE_DRAIN):
                await self._console_eof.wait()
            n.cancel_scope.cancel()
        return self.exit_message()

    def exit_message(self, when: str = "") -> str:
        """How QEMU ended (``when`` goes after the verb: " while starting"), with the cause
        from its console's last lines, and where its log is."""
        if self._failure is not None:
            return f"{self._failure}"
        code = self.proc.returncode
        where = f"(log: {self.logfile.name})"
        if code is None:
            return f"QEMU is still running {where}"
        if code < 0:
            try:
                return f"QEMU killed by {signal.Signals(-code).name}{when} {where}"
            except ValueError:
                return f"QEMU killed by signal {-code}{when} {where}"
        words = last_words(self.console.last_lines(), self.binary)
        return f"QEMU exited with status {code}{when}{': ' + words if words else ''} {where}"

    async def _read_console(self) -> None:
        """Copy the console to the log; spot the READY line and KVM failures. One reader at
        a time (a second waits for the first to be cancelled); returns at EOF."""
        stdout = self.proc.stdout
        assert stdout is not None
        async with self._console_lock:
            while not self._console_eof.is_set():
                try:
                    data = await stdout.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    data = b""
                if not data:
                    self._console_eof.set()
                    return
                with contextlib.suppress(ValueError, OSError):  # a log closed or full
                    self.logfile.write(data)
                for event in self.console.feed(data):
                    self._console_event(event)

    def _console_event(self, event: str) -> None:
        if event == READY:
            self._ready.set()
        elif event == KVM_FAILURE and self._failure is None:
            self.backend.kvm_failed(self.settings.kernel)
            self._failure = BootFailed(
                f"KVM emulation failure: /dev/kvm could not run an instruction of "
                f"{self.settings.kernel.name} (see {self.logfile.name} for QEMU's register "
                'dump); set accel = "tcg" for this image'
            )
            self._ready.set()
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # QEMU only pauses on it; nothing more will happen

    # ---- health ----------------------------------------------------------------------------

    def alive(self) -> bool:
        # trio's returncode polls (waitpid WNOHANG): a zombie counts as gone at once.
        return self.proc.returncode is None

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - a timeout is a reason
        """Healthy if QEMU runs (not SIGSTOPped), QMP ``query-status`` says ``running`` (not
        paused by a ``stop``, not crashed), and the guest accepts a connection on the
        service's first port: on its own address, or through the host forward, where slirp
        accepts for the guest, so the guest's answer is checked as for ``ready = "tcp"``.
        Probes are serialized: the QMP connection carries one command at a time."""
        if self.proc.returncode is not None:
            return "QEMU has exited"
        if process_state(self.proc.pid) == "T":
            return "QEMU is stopped (SIGSTOP)"
        with trio.move_on_after(timeout):
            async with self._probing:
                try:
                    qmp = await self.qmp()
                    status = (await qmp.execute("query-status")).get("status")
                except (ProtocolError, OSError) as exc:
                    return f"QMP query-status failed: {exc}"
                if status != "running":
                    return f"the guest is {status} (QMP query-status)"
                host, port = self.endpoint(self.service.ports[0])
                if not self.host_ports:
                    return await connect_check(host, port, timeout)
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError as exc:
                    return f"connect to the host forward {host}:{port} failed: {exc.strerror or exc}"
                async with stream:
                    try:
                        if await self._guest_answers(qmp, stream):
                            return None
                    except (ProtocolError, OSError) as exc:
                        return f"QMP info usernet failed: {exc}"
                return f"the guest refused a connection on port {self.settings.guest_ports[0]}"
        return f"no answer within {timeout:g} s"

    # ---- control ---------------------------------------------------------------------------

    async def qmp(self) -> QMP:
        """The QMP connection, opened on first use. QEMU creates the socket file a moment
        before it listens on it, so a refused connection is retried; QMP answers once QEMU
        has started, which is part of the boot: bounded by the boot timeout. ProtocolError if
        QEMU exits first or does not answer in time."""
        async with self._qmp_lock:
            if self._qmp is None:
                limit = self.service.boot_timeout
                with trio.move_on_after(limit) as scope:
                    self._qmp = await self._connect_qmp()
                if scope.cancelled_caught:
                    raise ProtocolError(f"QMP did not answer within {limit:g} s")
        assert self._qmp is not None
        return self._qmp

    async def _connect_qmp(self) -> QMP:
        while True:
            if self.proc.returncode is not None:
                raise ProtocolError("QEMU exited before its QMP socket was ready")
            if self.qmp_path.exists():
                try:
                    return await QMP.connect(str(self.qmp_path))
                except ProtocolError as exc:
                    if not isinstance(exc.__cause__, ConnectionRefusedError):
                        raise
            await trio.sleep(0.001)

    async def resume(self) -> None:
        """Run a paused instance again (QMP cont); BootFailed if QEMU does not answer within
        RESUME_TIMEOUT. The caller destroys it when this fails or is cancelled."""
        with map_errors("cannot resume it"), trio.fail_after(RESUME_TIMEOUT):
            await (await self.qmp()).execute("cont")
        self.paused = False

    async def stop(self, mode: str, grace: float) -> bool:
        kept = False
        try:
            # destroy with no grace (a dead or hung instance) kills at once: a frozen QEMU
            # would not answer QMP.
            if self.proc.returncode is None and (mode != "destroy" or grace > 0):
                with trio.move_on_after(grace + 5):
                    kept = await self._stop(mode, grace)
        except (ProtocolError, OSError) as exc:
            log.warning("%s#%d: %s; killing QEMU", self.service.name, self.number, exc)
        finally:
            if not kept:
                await self.destroy()
        return kept

    async def _stop(self, mode: str, grace: float) -> bool:
        qmp = await self.qmp()
        if mode == "pause":
            await qmp.execute("stop")
            self.paused = True
            return True
        if mode == "save":
            return await self._save(qmp)
        if mode == "shutdown":
            await qmp.execute("system_powerdown")
            with trio.move_on_after(grace):
                await self.proc.wait()
            return False
        with contextlib.suppress(ProtocolError):
            await qmp.execute("quit")
        with trio.move_on_after(grace):
            await self.proc.wait()
        return False

    async def _save(self, qmp: QMP) -> bool:
        path = self.backend.saved_path(self.service.name)
        tmp = path.with_suffix(".tmp")
        version = await self.backend.qemu_version(self.binary)
        try:
            await qmp.execute("stop")
            # The file is opened here and handed over (QMP getfd): QEMU may run as a user
            # (-runas) that could not create it in our state directory.
            with contextlib.suppress(FileNotFoundError):  # a fresh file, never a planted one
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                await qmp.send_fd("jl-save", fd)
            finally:
                os.close(fd)
            await qmp.execute("migrate", uri="fd:jl-save")
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise ProtocolError(
                        f"saving the state failed: {info.get('error-desc', status)}")
                await trio.sleep(0.002)
            tmp.replace(path)
            write_private(path.with_suffix(".image"), saved_meta(
                self.backend.image_ids[self.settings.kernel], self.settings, self.accel, self.mac,
                version).encode())
        except BaseException:
            for p in (tmp, path, path.with_suffix(".image")):  # no half-written state
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        await self.destroy()
        return True

    async def destroy(self, *, close_log: bool = True) -> None:
        """Kill QEMU if it still runs and release everything this instance holds: the
        process, its console pipe, QMP, the log (unless ``close_log`` is false: a launch
        retried with another host port keeps writing to it), files and network."""
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
            if self._qmp is not None:
                await self._qmp.aclose()
                self._qmp = None
            if self.proc.stdout is not None:
                await self.proc.stdout.aclose()
            if close_log:
                self.logfile.close()
            for path in (self.qmp_path, self.pidfile):
                with contextlib.suppress(OSError):
                    path.unlink()
            await self.backend.release(self)
