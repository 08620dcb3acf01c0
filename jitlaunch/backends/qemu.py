"""The qemu backend: ``qemu-system-x86_64 -M microvm`` booting a kernel image directly.

An instance is one QEMU process. Its serial console goes to a pipe that jitlaunch reads: the
guest's ``READY <ip>:<port>`` line is readiness (``ready = "tcp"`` probes the port instead, for
images that print nothing), every byte is appended to the service's log, and a KVM
``emulation failure`` in QEMU's output fails the boot with that cause instead of hanging.
QEMU is controlled over QMP on a unix socket in ``<state_dir>/run``.

Launch: each guest gets its own MAC (:func:`instance_mac`). With user networking a start
returns once QMP answers, which QEMU does only after binding its host forwards; a forward's
port taken by someone else since free_port() chose it makes QEMU exit at once, and the launch
is retried with new ports (HOSTFWD_ATTEMPTS), invisibly to the supervisor. When QEMU exits,
its console is read to EOF (bounded) before the exit is reported, and the report quotes its
last words (:func:`last_words`) and names the log.

Accelerator: ``accel = "auto"`` uses KVM when /dev/kvm opens and TCG otherwise; if a kernel
hits a KVM emulation failure under ``auto``, later boots of that kernel use TCG. The choice is
logged for every instance.

Stop modes: ``destroy`` (QMP quit, SIGKILL after the grace period), ``shutdown``
(system_powerdown, SIGKILL after the grace period), ``pause`` (QMP stop; the next start is a
QMP cont) and ``save`` (the state is migrated to a file in ``<state_dir>/saved``, QEMU quits;
the next start runs QEMU with ``-incoming`` from it and removes the file; a changed kernel
image invalidates it).

Warm pool: ``pool = N`` keeps N instances booted to their READY line and then paused (QMP
stop): kernel loaded, network attached, listener up. A start takes one and resumes it (QMP
cont), so it is ready at once, and the pool refills in the background. (Pausing before the
first instruction, ``-S``, would save only QEMU's own start-up, not the guest's boot.)

Leftovers: at start the backend kills QEMU processes whose pid files lie in its run directory
and whose command line carries our marker, and removes stale sockets, pid files and saved
states from an earlier run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import math
import os
import re
import shlex
import signal
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trio

from ..aio import first_of
from ..config import ServiceConfig, Table
from ..errors import BootFailed, ProtocolError
from ..lifecycle.backoff import backoff_delay
from ..net.bridge import Lease
from .base import (
    PROBE_INTERVAL,
    Backend,
    Handle,
    connect_check,
    free_port,
    map_errors,
    open_instance_log,
    probe_tcp,
    process_state,
    wait_gone,
)
from .qmp import QMP

log = logging.getLogger("jitlaunch.qemu")

STOP_MODES = ("destroy", "shutdown", "pause", "save")
MARKER = "jitlaunch"
DEFAULT_CMDLINE = "ip={ip}/{prefix} gw={gateway} port={port} name={name}"
CMDLINE_FIELDS = ("ip", "prefix", "gateway", "port", "name", "instance")
#: User networking: the guest's address and gateway are QEMU's slirp defaults.
USER_IP, USER_PREFIX, USER_GATEWAY = "10.0.2.15", 24, "10.0.2.2"
_READY = re.compile(rb"^READY\s")
#: A taken pool member is refilled this long after, so that the new member's boot (tens of
#: ms of host CPU) does not compete with the instance just woken for its first requests.
POOL_REFILL_DELAY = 0.25
#: The longest a QMP stop (into the pool) or cont (out of it, or out of a pause) may take.
RESUME_TIMEOUT = 2.0
_KVM_FAILURE = re.compile(rb"KVM internal error|emulation failure")
#: QEMU could not bind a host forward's port: someone took it after free_port() chose it.
_HOSTFWD_TAKEN = re.compile(rb"Could not set up host forwarding rule")
#: A launch whose host port was taken is retried at once with new ports, this many times in all.
HOSTFWD_ATTEMPTS = 5
#: After QEMU exits, how long its console may take to reach EOF (its last words can still be
#: in the pipe, or on their way from a child that shares it, such as a migration's ``cat``).
CONSOLE_DRAIN = 1.0
#: Console lines kept for a failure's message (QEMU's own error is usually the last one).
TAIL_LINES = 8
#: QEMU's error lines start with its program name (``qemu-system-x86_64: ...``).
_QEMU_SAYS = re.compile(r"^[\w./-]*qemu[\w.-]*: ")
#: Connections in these states of slirp's side toward the guest prove that the guest answered
#: the SYN (``info usernet``; libslirp's ``tcpstates`` names).
_ANSWERED = frozenset(
    ("ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSING", "LAST_ACK", "TIME_WAIT")
)
_USERNET_TCP = re.compile(
    r"^\s*TCP\[(?P<state>[A-Z_0-9]+)\]\s+(?P<fd>-?\d+)\s+\S+\s+\d+\s+\S+\s+(?P<port>\d+)\s", re.M
)


@dataclass(frozen=True)
class QemuSettings:
    kernel: Path
    binary: str
    machine: str
    memory: int
    cpus: int
    accel: str
    network: str
    guest_ports: tuple[int, ...]
    cmdline: str
    ready: str
    pool: int
    grace: float
    extra_args: tuple[str, ...]
    bridge: str
    subnet: ipaddress.IPv4Network


def parse_settings(t: Table, base_dir: Path, ports: tuple[int, ...]) -> QemuSettings:
    kernel = t.string("kernel")
    guest_ports = t.raw("guest_ports", list(ports))
    if isinstance(guest_ports, int) and not isinstance(guest_ports, bool):
        guest_ports = [guest_ports]
    if (
        not isinstance(guest_ports, list)
        or len(guest_ports) != len(ports)
        or not all(isinstance(p, int) and 1 <= p <= 65535 for p in guest_ports)
    ):
        raise t.error(
            "guest_ports", f"expected {len(ports)} port number(s), one for each of the "
            f"service's ports {list(ports)}"
        )
    cmdline = t.string("cmdline", DEFAULT_CMDLINE)
    try:
        cmdline.format(**{f: "x" for f in CMDLINE_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise t.error(
            "cmdline", f"bad placeholder {exc} (allowed: "
            f"{', '.join('{' + f + '}' for f in CMDLINE_FIELDS)})"
        ) from None
    extra = t.raw("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise t.error("extra_args", "expected a list of strings (QEMU arguments)")
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
    settings = QemuSettings(
        kernel=(base_dir / kernel).resolve(),
        binary=t.string("binary", "qemu-system-x86_64"),
        machine=t.string("machine", "microvm"),
        memory=t.integer("memory", 16, low=2, high=1 << 20),
        cpus=t.integer("cpus", 1, low=1, high=256),
        accel=t.string("accel", "auto", choices=("auto", "kvm", "tcg")),
        network=t.string("network", "user", choices=("user", "bridge")),
        guest_ports=tuple(guest_ports),
        cmdline=cmdline,
        ready=t.string("ready", "serial", choices=("serial", "tcp")),
        pool=t.integer("pool", 0, low=0, high=64),
        grace=t.duration("grace", 5, allow_zero=True),
        extra_args=tuple(extra),
        bridge=bridge,
        subnet=subnet,
    )
    t.done()
    return settings


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def image_id(path: Path) -> str:
    """Identifies a kernel image's contents: a saved state is only valid for the same one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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


def last_words(lines: list[bytes], binary: str) -> str:
    """The cause to quote from the end of an instance's console: QEMU's own error lines
    (``qemu-system-x86_64: ...``) if there are any, else the last line; printable, bounded."""
    text = [" ".join(ln.decode(errors="replace").split()) for ln in lines]
    text = ["".join(c if c.isprintable() else "?" for c in t) for t in text if t]
    prog = os.path.basename(binary) + ":"
    own = [t for t in text if _QEMU_SAYS.match(t) or t.startswith(prog)]
    words = " / ".join(own[-2:] or text[-1:])
    # QEMU's messages end with the point (``prog: -option value: what is wrong``): a long
    # one keeps its start and its end.
    return words if len(words) <= 300 else f"{words[:95]} ... {words[-200:]}"


def qemu_opt(value: str) -> str:
    """``value`` as one value in a QEMU option list, where a comma is written twice."""
    return value.replace(",", ",,")


def instance_mac(state_dir: Path, service: str, instance: int | str) -> str:
    """A locally administered unicast MAC for one instance, the same for the same daemon
    (state directory), service and instance, so it survives pause and save/restore. Without
    it QEMU gives every guest 52:54:00:12:34:56, and on a bridge the newest guest with that
    MAC takes every frame meant for the others."""
    h = hashlib.sha256(f"{state_dir}\0{service}\0{instance}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02 | (h[0] & 0xFC), *h[1:6]))


class QemuHandle(Handle):
    def __init__(
        self,
        backend: QemuBackend,
        service: ServiceConfig,
        number: int,
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
        self._line = bytearray()
        self._tail: deque[bytes] = deque(maxlen=TAIL_LINES)
        self._console_lock = trio.Lock()
        self._console_eof = trio.Event()
        self._ready = trio.Event()
        self._failure: BootFailed | None = None
        self.restoring: Path | None = None
        self.paused = False
        self._probing = trio.Lock()

    def describe(self) -> str:
        return f"{super().describe()} {self.accel}".strip()

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
        return any(_HOSTFWD_TAKEN.search(line) for line in [*self._tail, bytes(self._line)])

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
        words = last_words([*self._tail, bytes(self._line)], self.settings.binary)
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
                self._line += data
                while (nl := self._line.find(b"\n")) >= 0:
                    line = bytes(self._line[:nl])
                    del self._line[: nl + 1]
                    self._console_line(line)
                if len(self._line) > 4096:
                    del self._line[:-4096]

    def _console_line(self, line: bytes) -> None:
        if line.strip():
            self._tail.append(line[:1024])
        if _READY.match(line):
            self._ready.set()
        elif _KVM_FAILURE.search(line) and self._failure is None:
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
        try:
            await qmp.execute("stop")
            # exec: runs through /bin/sh, so the path is quoted (a state_dir may have spaces).
            await qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
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
            path.with_suffix(".image").write_text(self.backend.image_ids[self.settings.kernel])
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


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, state_dir: Path, services: list[ServiceConfig]) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.saved_dir = state_dir / "saved"
        self.log_dir = state_dir / "logs"
        self.services = services
        self.pools: dict[str, list[QemuHandle]] = {s.name: [] for s in services}
        self.image_ids: dict[Path, str] = {}
        self._kvm: bool | None = None
        self._kvm_broken: set[Path] = set()
        self._counter = 0
        self._refill = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._net: dict[str, object] = {}
        #: Host ports of our user-networking instances, so that two launches never pick one.
        self._host_ports: set[int] = set()

    # ---- lifecycle of the backend itself ------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for d in (self.run_dir, self.saved_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        await self.clean_leftovers()
        for svc in self.services:
            settings: QemuSettings = svc.settings
            if not settings.kernel.is_file():
                log.error("%s: kernel image %s does not exist (make -C images builds the "
                          "bundled one)", svc.name, settings.kernel)
                continue
            self.image_ids[settings.kernel] = await trio.to_thread.run_sync(
                image_id, settings.kernel
            )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._keep_pools()

    async def clean_leftovers(self) -> None:
        """Kill our QEMU processes from an earlier run and remove their files and taps."""
        for pid in await trio.to_thread.run_sync(self._kill_leftovers):
            log.warning("killed QEMU pid %d left over from an earlier run", pid)
        for leftover in [*self.run_dir.iterdir(), *self.saved_dir.iterdir()]:
            with contextlib.suppress(OSError):
                leftover.unlink()
        if any(s.settings.network == "bridge" for s in self.services):
            from ..net.bridge import remove_leftover_taps

            try:
                for tap in await trio.to_thread.run_sync(remove_leftover_taps):
                    log.warning("removed tap %s left over from an earlier run", tap)
            except Exception as exc:
                log.warning("cannot look for leftover taps: %s", exc)

    def _kill_leftovers(self) -> list[int]:
        killed = []
        for pidfile in self.run_dir.glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except (OSError, ValueError):
                continue
            # Ours only if its command line names this very pid file and carries our marker.
            if str(pidfile).encode() in argv and any(a.startswith(MARKER.encode()) for a in argv):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        wait_gone(killed)  # they may still hold our taps
        return killed

    async def _keep_pools(self) -> None:
        """Keep every service's pool full. A member that fails to boot is tried again after
        the service's retry backoff (doubling up to its maximum), not only after a take.
        Nothing that goes wrong with one member ends this loop (or the daemon)."""
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        while True:
            for svc in self.services:
                settings: QemuSettings = svc.settings
                pool = self.pools[svc.name]
                if retry_at.get(svc.name, -math.inf) > trio.current_time():
                    continue
                while len(pool) < settings.pool and settings.kernel in self.image_ids:
                    try:
                        handle = await self._pool_member(svc)
                    except Exception as exc:
                        failures[svc.name] = n = failures.get(svc.name, 0) + 1
                        delay = backoff_delay(n, svc.retry_backoff, svc.retry_backoff_max)
                        retry_at[svc.name] = trio.current_time() + delay
                        log.error("%s: cannot fill the warm pool: %s; next attempt in %g s",
                                  svc.name, exc, delay, exc_info=not isinstance(exc, BootFailed))
                        break
                    failures.pop(svc.name, None)
                    pool.append(handle)
                    log.info("%s: a warm pool member is ready (%s)", svc.name, handle.describe())
            self._refill = trio.Event()
            with trio.move_on_at(min(retry_at.values(), default=math.inf)):
                await self._refill.wait()
                await trio.sleep(POOL_REFILL_DELAY)
            retry_at = {k: v for k, v in retry_at.items() if v > trio.current_time()}

    async def _pool_member(self, svc: ServiceConfig) -> QemuHandle:
        """An instance booted to its READY line and then paused: taking it is a QMP cont.
        BootFailed if it cannot be had; the half-made member is destroyed on every path."""
        handle = await self._launch(svc, pool=True)
        try:
            with map_errors("pool instance not ready"):
                with trio.fail_after(svc.boot_timeout):
                    which, exited = await first_of(handle.wait_ready, handle.wait_exited)
                    if which == 1:
                        raise BootFailed(f"{exited} before it was ready")
                with trio.fail_after(RESUME_TIMEOUT):
                    await (await handle.qmp()).execute("stop")
        except BaseException:
            await handle.destroy()
            raise
        handle.paused = True
        return handle

    def status_lines(self) -> list[str]:
        lines = []
        for svc in self.services:
            size = svc.settings.pool
            if size:
                members = " ".join(f"pid={h.pid}" for h in self.pools[svc.name])
                lines.append(f"{svc.name}: warm pool {len(self.pools[svc.name])} of {size}"
                             f"{': ' + members if members else ''}")
        return lines

    async def aclose(self) -> None:
        for pool in self.pools.values():
            while pool:
                await pool.pop().destroy()

    # ---- instances ---------------------------------------------------------------------------

    def kvm_failed(self, kernel: Path) -> None:
        self._kvm_broken.add(kernel)

    def saved_path(self, service: str) -> Path:
        return self.saved_dir / f"{service}.state"

    def _accel(self, settings: QemuSettings) -> str:
        if settings.accel != "auto":
            return settings.accel
        if self._kvm is None:
            self._kvm = kvm_usable()
        if not self._kvm:
            return "tcg"
        if settings.kernel in self._kvm_broken:
            return "tcg"
        return "kvm"

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        if isinstance(saved, QemuHandle):
            if saved.paused and saved.alive():
                if await self._resumed(saved, "paused instance"):
                    log.info("%s#%d resumed (%s)", service.name, number, saved.accel)
                    saved.wake = "resume"
                    return saved
            else:
                await saved.destroy()  # a paused one that died: its files and lease go
        pool = self.pools.get(service.name, [])
        while pool:
            handle = pool.pop(0)
            self._refill.set()
            if not handle.alive():
                await handle.destroy()
                continue
            handle.number = number
            if await self._resumed(handle, "warm pool member"):
                log.info("%s#%d taken from the warm pool (%s)", service.name, number, handle.accel)
                handle.wake = "pool"
                return handle
        state = self.saved_path(service.name)
        settings: QemuSettings = service.settings
        incoming = None
        if state.exists():
            meta = state.with_suffix(".image")
            try:
                valid = meta.exists() and meta.read_text() == self.image_ids.get(settings.kernel)
            except OSError as exc:
                raise BootFailed(f"cannot read the saved state's image id {meta}: {exc}") from exc
            if valid:
                incoming = state
            else:
                log.info("%s: the kernel image changed; discarding its saved state", service.name)
                for p in (state, meta):
                    with contextlib.suppress(OSError):
                        p.unlink()
        mac = saved.mac if isinstance(saved, QemuHandle) else None  # the guest knows its MAC
        launched = await self._launch(service, number=number, incoming=incoming, mac=mac)
        launched.wake = "restore" if incoming is not None else "cold"
        return launched

    async def _resumed(self, handle: QemuHandle, what: str) -> bool:
        """Resume ``handle``; if that fails (or is cancelled) destroy it, so that a paused
        QEMU never outlives its use. False when it failed: the caller boots a fresh one."""
        try:
            await handle.resume()
        except BootFailed as exc:
            await handle.destroy()
            log.warning("%s: %s pid %s: %s; destroyed it, booting a fresh instance",
                        handle.service.name, what, handle.pid, exc)
            return False
        except BaseException:
            await handle.destroy()
            raise
        return True

    async def _launch(
        self, service: ServiceConfig, *, number: int = 0, pool: bool = False,
        incoming: Path | None = None, mac: str | None = None,
    ) -> QemuHandle:
        """Run QEMU for instance ``number`` (or a pool member). With user networking, return
        once QEMU has bound its host forwards; a port taken between free_port() and QEMU's
        bind is retried at once with new ports (HOSTFWD_ATTEMPTS in all). BootFailed, naming
        the cause, if QEMU cannot be run or exits while starting. Releases everything on
        every error path, cancellation included."""
        settings: QemuSettings = service.settings
        if not settings.kernel.is_file():
            raise BootFailed(f"kernel image {settings.kernel} does not exist")
        self._counter += 1
        tag = f"{service.name}-{os.getpid()}-{self._counter}"
        qmp_path = self.run_dir / f"{tag}.qmp"
        pidfile = self.run_dir / f"{tag}.pid"
        accel = self._accel(settings)
        if mac is None:
            mac = instance_mac(self.state_dir, service.name, f"pool{self._counter}" if pool else number)
        release_net: list[Lease] = []
        address: str | None = None
        if settings.network == "user":
            ip, prefix, gateway = USER_IP, USER_PREFIX, USER_GATEWAY
        else:
            from ..net.bridge import attach

            lease = await attach(settings.bridge, settings.subnet)
            release_net.append(lease)
            ip, prefix, gateway = lease.ip, settings.subnet.prefixlen, lease.gateway
            address = lease.ip
        cmdline = settings.cmdline.format(
            ip=ip, prefix=prefix, gateway=gateway, port=settings.guest_ports[0],
            name=service.name, instance=number,
        )
        logfile: IO[bytes] | None = None
        for attempt in range(1, HOSTFWD_ATTEMPTS + 1):
            host_ports: dict[int, int] = {}
            if release_net:
                netdev = f"tap,id=n0,ifname={release_net[0].tap},script=no,downscript=no"
            else:
                try:
                    host_ports = self._pick_ports(service.ports)
                except OSError as exc:
                    raise BootFailed(f"cannot find a free host port: {exc.strerror or exc}") from exc
                fwd = [f"hostfwd=tcp:127.0.0.1:{host_ports[front]}-:{guest}"
                       for front, guest in zip(service.ports, settings.guest_ports, strict=True)]
                netdev = ",".join(["user", "id=n0", *fwd])
            argv = [
                settings.binary, "-M", settings.machine, "-accel", accel, "-nodefaults",
                "-no-user-config", "-display", "none", "-m", f"{settings.memory}M",
                "-smp", str(settings.cpus), "-kernel", str(settings.kernel), "-append", cmdline,
                "-serial", "stdio", "-qmp", f"unix:{qemu_opt(str(qmp_path))},server=on,wait=off",
                "-name", f"{MARKER}:{service.name}:{number}", "-pidfile", str(pidfile),
                "-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,mac={mac}",
                *settings.extra_args,
            ]
            if incoming is not None:
                argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
            try:
                if logfile is None:
                    # Pool members log apart until taken, so they never rotate a running one's log.
                    log_name = f"{service.name}.pool" if pool else service.name
                    logfile = open_instance_log(self.log_dir, log_name, number, argv)
                else:
                    logfile.write(f"# jitlaunch: again, with other host ports: {shlex.join(argv)}\n"
                                  .encode())
            except OSError as exc:
                self._forget_ports(host_ports)
                await self._release_net(release_net)
                if logfile is not None:
                    logfile.close()
                raise BootFailed(f"cannot write the instance log in {self.log_dir}: {exc}") from exc
            try:
                proc = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                logfile.close()
                self._forget_ports(host_ports)
                await self._release_net(release_net)
                raise BootFailed(f"cannot run {settings.binary}: {exc.strerror or exc}") from exc
            handle = QemuHandle(
                self, service, number, accel, proc, logfile, qmp_path, pidfile, host_ports, ip,
                address, release_net, mac,
            )
            handle.restoring = incoming
            log.info(
                "%s#%d: QEMU pid %d (%s%s%s)", service.name, number, proc.pid, accel,
                ", for the warm pool" if pool else "", ", restoring" if incoming else "",
            )
            if not host_ports:
                return handle
            try:
                exited = await handle.until_up()
            except BaseException:
                await handle.destroy()
                raise
            if exited is None:
                return handle
            again = handle.host_port_taken() and attempt < HOSTFWD_ATTEMPTS
            await handle.destroy(close_log=not again)
            if not again:
                raise BootFailed(handle.exit_message(" while starting"))
            log.info("%s#%d: a host port was taken before QEMU could bind it; retrying at once "
                     "with other ports", service.name, number)
        raise AssertionError("unreachable")

    def _pick_ports(self, fronts: tuple[int, ...]) -> dict[int, int]:
        """A free host port for each front port, none of them one our live instances hold
        (free_port() only knows about bound sockets, and a starting QEMU binds later)."""
        ports: dict[int, int] = {}
        while len(ports) < len(fronts):
            port = free_port()
            if port not in self._host_ports:
                self._host_ports.add(port)
                ports[fronts[len(ports)]] = port
        return ports

    def _forget_ports(self, ports: dict[int, int]) -> None:
        self._host_ports.difference_update(ports.values())

    async def release(self, handle: QemuHandle) -> None:
        self._forget_ports(handle.host_ports)
        leases, handle.release_net = handle.release_net, []
        await self._release_net(leases)

    async def _release_net(self, leases: list[Lease]) -> None:
        for lease in leases:
            await lease.release()
