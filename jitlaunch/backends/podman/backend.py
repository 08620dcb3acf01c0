"""The podman backend: an instance is a container, made from a local image by ``podman run``
(see :mod:`.settings` for the command line and :mod:`.cli` for how podman is driven).

* Ready: a TCP socket listens on the service's first port inside the container's network
  namespace (read from /proc, no connection: the published port's forwarder accepts before
  anything listens), or, with ``ready = "log:TEXT"``, a line of its output holds TEXT.
* Stop modes: ``destroy`` (``podman rm --force --time 0``), ``shutdown`` (``podman stop``
  within the grace, then removed), ``pause`` (``podman pause``: the freezer; the next start
  unpauses it) and ``save`` (``podman container checkpoint``, CRIU; where CRIU cannot work,
  said once at start, an idle instance is paused instead: nothing is lost).
* Exits: the container's first process is watched with a pidfd; a container that exits or
  is removed from outside is noticed at once. The health probe also says unhealthy when the
  container is frozen by someone else (``podman pause`` from outside).
* Leftovers: every container carries the state directory as a label; at start the backend
  removes the containers whose label is exactly its state directory, and no other.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
from pathlib import Path

import trio

from ...config import ServiceConfig
from ...errors import BootFailed
from ...statedir import ensure_subdir
from ..addresses import hold_time
from ..base import Backend, Handle, map_errors, process_state
from ..bridge import Lease, attach_veth, remove_leftover_taps
from ..owner import state_id
from ..pool import WarmPools
from ..traffic import link_packets_received
from ..vm import HostPorts
from .check import criu_problem_now
from .cli import freeze, freezer_of, frozen, listening, podman, read_pid, set_frozen, wait_pid_gone
from .settings import LABEL_STATE_DIR, PodmanSettings, container_name, run_argv

log = logging.getLogger("jitlaunch.podman")

STOP_MODES = ("destroy", "shutdown", "pause", "save")
#: How often readiness is polled (a /proc read, or the log file).
READY_POLL = 0.005
#: How long a removal waits for the container's conmon to exit.
CONMON_TIMEOUT = 5.0


class PodmanHandle(Handle):
    #: With bridge networking: a probe makes no traffic (it reads /proc); the container's
    #: own ARP answers on its veth may move the counter by one between two samples.
    traffic_noise = 1
    probe_traffic = 0

    def __init__(self, backend: PodmanBackend, service: ServiceConfig, name: str, pid: int,
                 publish: dict[int, int], log_path: Path, lease: Lease | None = None) -> None:
        self.backend = backend
        self.service = service
        self.settings: PodmanSettings = service.settings
        self.name = name
        self.main = self.pid = pid  # the container's first process (not our child)
        #: podman's conmon of this container (the first process's parent), which outlives
        #: the container by a little: a removal waits for it.
        self.conmon = parent_of(pid)
        #: The container's freezer cgroup: a pause writes it directly (microseconds, where
        #: ``podman pause`` and ``unpause`` cost ~30 ms each), so podman keeps calling it
        #: running; None where it cannot be found (then podman pauses it).
        self.freezer = freezer_of(pid)
        #: Frozen by us through :attr:`freezer` (thawed before anything else is done).
        self.frozen_by_us = False
        self.publish = publish
        self.log_path = log_path
        self.checkpointed = False
        self.removed = False
        #: The veth and address on the bridge (``network = "bridge"``), else None.
        self.lease = lease
        self.address = lease.ip if lease is not None else None

    def __repr__(self) -> str:
        return f"<PodmanHandle {self.name} pid={self.pid}>"

    def describe(self) -> str:
        return f"{self.name} pid={self.pid}"

    def endpoint(self, port: int) -> tuple[str, int]:
        if self.lease is not None:
            ports = dict(zip(self.service.ports, self.settings.container_ports, strict=True))
            return self.lease.ip, ports.get(port, port)
        return "127.0.0.1", self.publish.get(port, port)

    async def traffic(self) -> int | None:
        """With bridge networking, the packets the container sent on its veth (traffic.py:
        clients handed over reach it there, unseen by the proxy)."""
        if self.lease is None:
            return None
        return link_packets_received(self.lease.tap)

    async def wait_ready(self) -> None:
        port = self.settings.container_ports[0]
        needle = self.settings.ready_log.encode() if self.settings.ready_log else None
        while True:
            if needle is not None:
                try:
                    if needle in self.log_path.read_bytes():
                        return
                except OSError:
                    pass
            elif listening(self.main, port):
                return
            await trio.sleep(READY_POLL)

    async def wait_exited(self) -> str:
        await wait_pid_gone(self.main)
        return "the container has exited"

    def alive(self) -> bool:
        if self.checkpointed:
            return True  # (no process while checkpointed; the restore makes one)
        return _running(self.main)

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - a timeout is a reason
        if not self.alive():
            return "the container has exited"
        if process_state(self.main) == "T":
            return "the container's process is stopped (SIGSTOP)"
        if self.freezer is not None and frozen(self.freezer):
            return "the container is frozen (podman pause, from outside)"
        port = self.settings.container_ports[0]
        if self.settings.ready_log is None and not listening(self.main, port):
            return f"nothing listens on port {port} in the container"
        return None

    async def stop(self, mode: str, grace: float) -> bool:
        binary = self.settings.binary
        if mode == "save" and self.backend.criu_problem is None:
            try:
                await podman(binary, "container", "checkpoint", self.name)
            except BootFailed as exc:
                log.warning("%s: checkpoint failed (%s); pausing it instead", self.name, exc)
            else:
                self.checkpointed = True
                return True
        if mode in ("pause", "save"):
            try:
                await self.pause()
                return True
            except (BootFailed, OSError) as exc:
                log.warning("%s: cannot pause it (%s); removing it", self.name, exc)
        await self.remove(grace if mode == "shutdown" else 0)
        return False

    async def pause(self) -> None:
        """Freeze the container: through its freezer cgroup, else ``podman pause``."""
        if self.freezer is not None:
            await freeze(self.freezer)
            self.frozen_by_us = True
        else:
            await podman(self.settings.binary, "pause", self.name)

    def _thaw(self) -> None:
        if self.frozen_by_us:
            assert self.freezer is not None
            set_frozen(self.freezer, False)
            self.frozen_by_us = False

    async def remove(self, grace: float) -> None:
        """Stop (within ``grace``; 0: kill) and remove the container; release its ports."""
        if self.removed:
            return
        binary = self.settings.binary
        try:
            try:
                self._thaw()  # (a frozen process takes no signal)
            except OSError as exc:
                log.warning("%s: cannot thaw it: %s", self.name, exc)
            if grace > 0:
                await podman(binary, "stop", "--time", str(max(1, round(grace))), self.name,
                             timeout=grace + 30)
            await podman(binary, "rm", "--force", "--time", "0", self.name)
        except BootFailed as exc:
            log.error("%s: cannot remove the container: %s", self.name, exc)
        finally:
            self.removed = True
            self.backend.ports.forget(self.publish)
            if self.lease is not None:
                await self.lease.release()
        if self.conmon is not None:
            with trio.move_on_after(CONMON_TIMEOUT):
                await wait_pid_gone(self.conmon)

    async def resume(self) -> None:
        """Thaw a paused container, or restore a checkpointed one."""
        binary = self.settings.binary
        if self.checkpointed:
            await podman(binary, "container", "restore", self.name)
            self.checkpointed = False
            self.main = self.pid = int(await podman(
                binary, "inspect", "--format", "{{.State.Pid}}", self.name))
            self.conmon, self.freezer = parent_of(self.main), freezer_of(self.main)
            self.wake = "restore"
        elif self.frozen_by_us:
            try:
                self._thaw()
            except OSError as exc:
                raise BootFailed(f"cannot thaw {self.name}: {exc}") from exc
            self.wake = "resume"
        else:
            await podman(binary, "unpause", self.name)
            self.wake = "resume"


class PodmanBackend(Backend):
    name = "podman"

    def __init__(self, state_dir: Path, services: list[ServiceConfig]) -> None:
        self.state_dir = state_dir.resolve()
        self.id = state_id(state_dir)
        self.log_dir = self.state_dir / "logs"
        self.run_dir = self.state_dir / "podman"
        self.ports = HostPorts()
        self.services = services
        self._serial = itertools.count(1)
        #: Why CRIU cannot checkpoint here (None: it can), for stop = "save".
        self.criu_problem: str | None = "not checked yet"
        self.pools: WarmPools[PodmanHandle] = WarmPools(
            services, size=lambda s: s.settings.pool, fillable=lambda s: True,
            make=self._pool_member, log=log)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        binary = self.services[0].settings.binary if self.services else "podman"
        for line in await self.sweep(binary):
            log.warning("removed a container left by an earlier run: %s", line)
        if any(s.settings.network == "bridge" for s in self.services):
            for tap in await trio.to_thread.run_sync(remove_leftover_taps, self.id):
                log.warning("removed veth %s left by an earlier run", tap)
        if any(s.stop == "save" for s in self.services):
            self.criu_problem = await criu_problem()
            if self.criu_problem is not None:
                for svc in self.services:
                    if svc.stop == "save":
                        log.warning('%s: stop = "save" cannot work here: %s; idle instances '
                                    "are paused instead", svc.name, self.criu_problem)
        task_status.started()
        await self.pools.keep()

    async def sweep(self, binary: str) -> list[str]:
        """Remove every container labelled with exactly this state directory."""
        if shutil.which(binary) is None:
            return []
        out = await podman(binary, "ps", "--all", "--filter",
                           f"label={LABEL_STATE_DIR}={self.state_dir}",
                           "--format", "{{.ID}} {{.Names}}")
        found = [line.split() for line in out.splitlines() if line.strip()]
        if found:
            await podman(binary, "rm", "--force", "--time", "0", *(f[0] for f in found))
        return [" ".join(f) for f in found]

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        if isinstance(saved, PodmanHandle):
            await saved.resume()
            return saved
        member = self.pools.take(service.name)
        if member is not None:
            if member.alive():
                await member.resume()
                member.wake = "pool"
                return member
            await member.remove(0)
        return await self._run(service, number)

    async def _run(self, service: ServiceConfig, number: int) -> PodmanHandle:
        s: PodmanSettings = service.settings
        name = container_name(self.id, service.name, number, next(self._serial))
        try:
            ensure_subdir(self.log_dir)
            ensure_subdir(self.run_dir)
            with contextlib.suppress(FileNotFoundError):  # the previous one's, as .log.1
                os.rename(self.log_dir / f"{service.name}.log",
                          self.log_dir / f"{service.name}.log.1")
            publish = self.ports.pick(service.ports) if s.network == "user" else {}
        except OSError as exc:
            raise BootFailed(f"cannot prepare the container: {exc.strerror or exc}") from exc
        log_path = self.log_dir / f"{service.name}.log"
        pidfile = self.run_dir / f"{name}.pid"
        argv = run_argv(s, name=name, state_dir=self.state_dir, service=service.name,
                        publish=publish, log_path=log_path)
        argv[2:2] = ["--pidfile", str(pidfile)]
        lease = None
        try:
            await podman(*argv)
            pid = read_pid(pidfile)
            if s.network == "bridge":
                with map_errors("bridge networking"):
                    lease = await attach_veth(s.bridge, s.subnet, self.id, pid,
                                              service=service.name, hold=hold_time(service))
        except BaseException:
            with trio.CancelScope(shield=True):
                await _forget(s.binary, name)
            self.ports.forget(publish)
            raise
        finally:
            pidfile.unlink(missing_ok=True)
        handle = PodmanHandle(self, service, name, pid, publish, log_path, lease)
        handle.wake = "cold"
        return handle

    async def _pool_member(self, service: ServiceConfig) -> PodmanHandle:
        handle = await self._run(service, 0)
        try:
            with trio.fail_after(service.boot_timeout):
                await handle.wait_ready()
            await handle.pause()
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.remove(0)
            raise
        return handle

    def status_lines(self) -> list[str]:
        return self.pools.status_lines()

    async def aclose(self) -> None:
        for member in self.pools.drain():
            await member.remove(0)


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"


async def _forget(binary: str, name: str) -> None:
    """Remove a container that may or may not have been made."""
    try:
        await podman(binary, "rm", "--force", "--ignore", "--time", "0", name)
    except BootFailed as exc:
        log.error("%s: cannot remove the container: %s", name, exc)


async def criu_problem() -> str | None:
    """Why ``podman container checkpoint`` cannot work on this host (CRIU's own words), or
    None if ``criu check`` passes."""
    return await trio.to_thread.run_sync(criu_problem_now)
