"""The qemu backend: launching QEMU for a service's instances, the warm pool, the
accelerator choice and the sweep of an earlier run's leftovers."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import IO

import trio

from ...aio import first_of
from ...config import ServiceConfig
from ...errors import BootFailed
from ...identity import resolve
from ...statedir import ensure_subdir, is_private_file, read_private
from ..base import Backend, Handle, map_errors, open_instance_log, wait_gone
from ..bridge import Lease
from ..childenv import child_environment
from ..owner import state_id
from ..pool import WarmPools
from ..vm import USER_GATEWAY, USER_IP, USER_PREFIX, HostPorts, image_id, instance_mac, kvm_usable
from .argv import build_argv, tap_netdev, user_netdev
from .handle import RESUME_TIMEOUT, QemuHandle
from .settings import (
    MARKER,
    REDUCED_BINARY,
    QemuSettings,
    choose_binary,
    is_reduced,
    reduced_cannot,
    saved_mac,
)

log = logging.getLogger("jitlaunch.qemu")

#: A launch whose host port was taken is retried at once with new ports, this many times in all.
HOSTFWD_ATTEMPTS = 5


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, state_dir: Path, services: list[ServiceConfig]) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.saved_dir = state_dir / "saved"
        self.log_dir = state_dir / "logs"
        self.services = services
        self.warm: WarmPools[QemuHandle] = WarmPools(
            services, size=lambda s: s.settings.pool,
            fillable=lambda s: s.settings.kernel in self.image_ids,
            make=self._pool_member, log=log,
        )
        self.pools = self.warm.pools
        self.image_ids: dict[Path, str] = {}
        self._kvm: bool | None = None
        self._kvm_broken: set[Path] = set()
        self._reduced_installed: bool | None = None
        #: ``--version`` of each QEMU program, by (path, inode, mtime): an upgrade is seen.
        self._versions: dict[tuple[str, int, int], str] = {}
        self._counter = 0
        #: Host ports of our user-networking instances, so that two launches never pick one.
        self.host_ports = HostPorts()

    # ---- lifecycle of the backend itself ------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for d in (self.run_dir, self.saved_dir, self.log_dir):
            ensure_subdir(d)  # QEMU opens its pid file and QMP socket in run/ by path
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
        task_status.started()
        await self.warm.keep()

    async def learn_images(self, services: list[ServiceConfig]) -> None:
        """Note the ids of the kernel images of ``services`` not known yet (a reload that
        adds a service or gives one another kernel: saving an instance records its id)."""
        for svc in services:
            kernel = svc.settings.kernel
            if kernel not in self.image_ids and kernel.is_file():
                try:
                    self.image_ids[kernel] = await trio.to_thread.run_sync(image_id, kernel)
                except OSError as exc:  # unreadable: its boot fails and says why
                    log.warning("%s: cannot read the kernel image %s: %s", svc.name, kernel, exc)

    async def clean_leftovers(self) -> None:
        """Kill our QEMU processes from an earlier run and remove their files and taps. Saved
        states of configured services are kept: the next request restores one if its kernel
        image and QEMU settings are unchanged (see :meth:`start`)."""
        for pid in await trio.to_thread.run_sync(self._kill_leftovers):
            log.warning("killed QEMU pid %d left over from an earlier run", pid)
        keep = {self.saved_path(s.name).name for s in self.services}
        keep |= {self.saved_path(s.name).with_suffix(".image").name for s in self.services}
        for leftover in [*self.run_dir.iterdir(), *self.saved_dir.iterdir()]:
            if leftover.name in keep:
                if leftover.suffix == ".state":
                    log.info("%s: keeping its saved state from an earlier run for its next "
                             "request", leftover.stem)
                continue
            with contextlib.suppress(OSError):
                leftover.unlink()
        if any(s.settings.network == "bridge" for s in self.services):
            from ..bridge import remove_leftover_taps

            try:
                for tap in await trio.to_thread.run_sync(remove_leftover_taps,
                                                         state_id(self.state_dir)):
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
        return self.warm.status_lines()

    async def aclose(self) -> None:
        for member in self.warm.drain():
            await member.destroy()

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

    def _binary(self, settings: QemuSettings, accel: str) -> str:
        """The QEMU program for an instance (:func:`choose_binary`); BootFailed if it is the
        reduced build and ``accel`` resolved to TCG, which it cannot run."""
        if self._reduced_installed is None:
            self._reduced_installed = shutil.which(REDUCED_BINARY) is not None
        binary = choose_binary(settings, accel, self._reduced_installed)
        if is_reduced(binary) and (why := reduced_cannot(accel, settings.network)):
            cause = ("KVM failed on this kernel (an emulation failure)"
                     if settings.kernel in self._kvm_broken else "/dev/kvm is not usable here")
            raise BootFailed(f'binary = "{binary}" is QEMU\'s reduced build, which {why}, and '
                             f'{cause}; set binary = "auto" or "qemu-system-x86_64"')
        return binary

    async def qemu_version(self, binary: str) -> str:
        """The first line of ``binary --version`` (cached per program file), or "" if it
        cannot be run: what a saved state records and a restore must match."""
        def key() -> tuple[str, int, int] | None:
            path = shutil.which(binary)
            if path is None:
                return None
            st = os.stat(path)
            return path, st.st_ino, st.st_mtime_ns

        try:
            found = await trio.to_thread.run_sync(key)
        except OSError:
            found = None
        if found is None:
            return ""
        if found not in self._versions:
            try:
                with trio.fail_after(10):
                    res = await trio.run_process([found[0], "--version"], capture_stdout=True,
                                                 stderr=subprocess.DEVNULL, check=False)
            except (OSError, trio.TooSlowError):
                return ""
            lines = res.stdout.decode(errors="replace").splitlines()
            if res.returncode != 0 or not lines:
                return ""
            self._versions[found] = lines[0].strip()
        return self._versions[found]

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        if isinstance(saved, QemuHandle):
            if saved.paused and saved.alive():
                if await self._resumed(saved, "paused instance"):
                    log.info("%s#%d resumed (%s)", service.name, number, saved.accel)
                    saved.wake = "resume"
                    return saved
            else:
                await saved.destroy()  # a paused one that died: its files and lease go
        while (handle := self.warm.take(service.name)) is not None:
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
        mac = saved.mac if isinstance(saved, QemuHandle) else None  # the guest knows its MAC
        if state.is_symlink() or (state.exists() and not is_private_file(state)):
            log.warning("%s: %s is not a regular file of ours; removing it, not restoring "
                        "from it", service.name, state)
            with contextlib.suppress(OSError):
                state.unlink()
        if state.exists():
            meta = state.with_suffix(".image")
            try:
                text = read_private(meta).decode() if meta.exists() or meta.is_symlink() else ""
            except (OSError, UnicodeDecodeError) as exc:
                raise BootFailed(f"cannot read the saved state's description {meta}: {exc}") \
                    from exc
            accel = self._accel(settings)
            binary = self._binary(settings, accel)
            version = await self.qemu_version(binary)
            if not version:  # perhaps passing (a loaded host): never discard a state for it
                raise BootFailed(f"cannot tell the version of {binary} (`{binary} --version` "
                                 f"failed or took over 10 s), which restoring the saved state "
                                 f"{state} depends on; the state is kept for the next start")
            kept_mac = saved_mac(text, self.image_ids.get(settings.kernel, ""), settings, accel,
                                 version)
            if kept_mac is not None:
                incoming = state
                mac = mac or kept_mac
            else:
                log.info("%s: the kernel image, the QEMU settings or QEMU's version changed "
                         "since it was saved (now: %s); discarding its saved state", service.name,
                         version or "QEMU's version unknown")
                for p in (state, meta):
                    with contextlib.suppress(OSError):
                        p.unlink()
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
        # The user database is read in a thread (NSS may ask a network service).
        runas = (await trio.to_thread.run_sync(qemu_runas, settings)
                 if settings.user is not None else None)
        self._counter += 1
        tag = f"{service.name}-{os.getpid()}-{self._counter}"
        qmp_path = self.run_dir / f"{tag}.qmp"
        pidfile = self.run_dir / f"{tag}.pid"
        accel = self._accel(settings)
        binary = self._binary(settings, accel)
        if mac is None:
            mac = instance_mac(self.state_dir, service.name, f"pool{self._counter}" if pool else number)
        release_net, ip, address, cmdline = await self._network(service, number)
        logfile: IO[bytes] | None = None
        for attempt in range(1, HOSTFWD_ATTEMPTS + 1):
            netdev, host_ports = self._netdev(service, release_net)
            argv = build_argv(
                settings, binary=binary, accel=accel, cmdline=cmdline, qmp_path=qmp_path, pidfile=pidfile,
                service=service.name, number=number, netdev=netdev, mac=mac, incoming=incoming,
                runas=runas,
            )
            try:
                if logfile is None:
                    # Pool members log apart until taken, so they never rotate a running one's log.
                    log_name = f"{service.name}.pool" if pool else service.name
                    logfile = open_instance_log(self.log_dir, log_name, number, argv)
                else:
                    logfile.write(f"# jitlaunch: again, with other host ports: {shlex.join(argv)}\n"
                                  .encode())
            except OSError as exc:
                self.host_ports.forget(host_ports)
                await self._release_net(release_net)
                if logfile is not None:
                    logfile.close()
                raise BootFailed(f"cannot write the instance log in {self.log_dir}: {exc}") from exc
            try:
                proc = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env=child_environment(),  # never the daemon's (its secrets)
                )
            except OSError as exc:
                logfile.close()
                self.host_ports.forget(host_ports)
                await self._release_net(release_net)
                raise BootFailed(f"cannot run {binary}: {exc.strerror or exc}") from exc
            handle = QemuHandle(
                self, service, number, binary, accel, proc, logfile, qmp_path, pidfile, host_ports, ip,
                address, release_net, mac,
            )
            handle.restoring = incoming
            log.info("%s#%d: QEMU pid %d (%s, %s%s%s)", service.name, number, proc.pid,
                     os.path.basename(binary), accel, ", for the warm pool" if pool else "",
                     ", restoring" if incoming else "")
            if not host_ports or await _forwards_bound(handle, attempt):
                return handle
            log.info("%s#%d: a host port was taken before QEMU could bind it; retrying at once "
                     "with other ports", service.name, number)
        raise AssertionError("unreachable")

    def _netdev(self, service: ServiceConfig, release_net: list[Lease]) -> tuple[str, dict[int, int]]:
        """The -netdev argument, and for user networking the host ports picked for it."""
        settings: QemuSettings = service.settings
        if release_net:
            return tap_netdev(release_net[0].tap), {}
        try:
            host_ports = self.host_ports.pick(service.ports)
        except OSError as exc:
            raise BootFailed(f"cannot find a free host port: {exc.strerror or exc}") from exc
        return user_netdev(host_ports, dict(zip(service.ports, settings.guest_ports,
                                                strict=True))), host_ports

    async def _network(self, service: ServiceConfig, number: int
                       ) -> tuple[list[Lease], str, str | None, str]:
        """The instance's network: the leases to release (a tap and address on the bridge,
        or none for user networking), the guest's IP, its address for DNS (bridge only) and
        its kernel command line."""
        settings: QemuSettings = service.settings
        release_net: list[Lease] = []
        address: str | None = None
        if settings.network == "user":
            ip, prefix, gateway = USER_IP, USER_PREFIX, USER_GATEWAY
        else:
            from ..addresses import hold_time
            from ..bridge import attach

            lease = await attach(settings.bridge, settings.subnet, state_id(self.state_dir),
                                 service=service.name, hold=hold_time(service))
            release_net.append(lease)
            ip, prefix, gateway = lease.ip, settings.subnet.prefixlen, lease.gateway
            address = lease.ip
        cmdline = settings.cmdline.format(
            ip=ip, prefix=prefix, gateway=gateway, port=settings.guest_ports[0],
            name=service.name, instance=number,
        )
        return release_net, ip, address, cmdline


    async def release(self, handle: QemuHandle) -> None:
        self.host_ports.forget(handle.host_ports)
        leases, handle.release_net = handle.release_net, []
        await self._release_net(leases)

    async def _release_net(self, leases: list[Lease]) -> None:
        for lease in leases:
            await lease.release()


async def _forwards_bound(handle: QemuHandle, attempt: int) -> bool:
    """Wait until QEMU has bound its host forwards: True. False when a port was taken since
    it was picked and another attempt is left (the handle is destroyed, its log kept open);
    BootFailed when QEMU exited otherwise (destroyed, log closed)."""
    try:
        exited = await handle.until_up()
    except BaseException:
        await handle.destroy()
        raise
    if exited is None:
        return True
    again = handle.host_port_taken() and attempt < HOSTFWD_ATTEMPTS
    await handle.destroy(close_log=not again)
    if not again:
        raise BootFailed(handle.exit_message(" while starting"))
    return False


def qemu_runas(settings: QemuSettings) -> str | None:
    """``-runas``'s value for ``settings.user``, looked up now (UnknownIdentity, a boot
    failure, names what is missing): a user name alone lets QEMU take the user's primary
    group and its supplementary groups (initgroups); with ``group``, or a uid, it is
    ``uid:gid`` and the only group is that gid. Never the daemon's groups."""
    if settings.user is None:
        return None
    ident = resolve(settings.user, settings.group)
    if isinstance(settings.user, str) and settings.group is None:
        return settings.user
    return f"{ident.uid}:{ident.gid}"
