"""The process backend: an instance is a host process started from a command template.

The template is split like a shell would (no shell runs) and each word is formatted with
``{address}``, ``{port}``, ``{name}``, ``{instance}`` and ``{python}`` (this interpreter). The
child runs in its own session and process group, with its output appended to a per-service
log file in the state directory (the previous instance's log is kept as ``.log.1``), in a
container of its own that the kernel keeps track of (a cgroup, else a PID namespace:
:mod:`.procgroup`). It is stopped with SIGTERM to every process in it, then SIGKILL to all
after the grace period. Its environment is a fresh one (:mod:`.childenv`), never the daemon's.

Leftovers: a daemon that was killed outright cannot stop its instances. At start the
backend removes the cgroups named with its state directory's identity, and kills every
process whose environment carries ``JITLAUNCH_INSTANCE=<state dir>:<service>#<n>`` with
exactly its state directory (every child gets it, and its own children inherit it): it can
prove they are its own, and a daemon owns its state directory.

Addresses: with ``subnet`` set (for example ``127.77.1.0/24``), each instance gets a free
address of its own in it and listens on the service's own ports there, so DNS can hand that
address over. Without it, the instance listens on ``127.0.0.1`` on a free port the proxy
connects to, and clients always go through the front address. A handed-over instance's
traffic is its TCP connections to its address (traffic.py: the kernel's table, no privilege).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

from ..config import ServiceConfig, Table
from ..errors import BootFailed
from ..identity import Identity, enter_problem, parse_user_group, resolve
from .addresses import AddressPool, hold_time
from .base import (
    Backend,
    Handle,
    connect_check,
    free_port,
    open_instance_log,
    probe_tcp,
    process_state,
    wait_gone,
)
from .childenv import child_environment
from .procgroup import Container, Containers, open_containers
from .traffic import ConnectionCounter, SocketTable

log = logging.getLogger(__name__)

STOP_MODES = ("destroy", "shutdown")

MARKER = "JITLAUNCH_INSTANCE"
PLACEHOLDERS = ("address", "port", "name", "instance", "python")


@dataclass(frozen=True)
class ProcessSettings:
    command: tuple[str, ...]
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    grace: float
    environment: tuple[tuple[str, str], ...]
    directory: Path | None
    #: Who instances run as (a name or a number, looked up at boot); None: the daemon's user.
    user: str | int | None = None
    group: str | int | None = None


def parse_settings(t: Table, base_dir: Path, ports: tuple[int, ...]) -> ProcessSettings:
    template = t.string("command")
    try:
        words = tuple(shlex.split(template))
    except ValueError as exc:
        raise t.error("command", f"cannot split the command line: {exc}") from None
    if not words:
        raise t.error("command", "expected a command line, got an empty string")
    for word in words:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(word) if f is not None]
        except ValueError as exc:
            raise t.error("command", f"bad placeholder in {word!r}: {exc}") from None
        for f in fields:
            if f not in PLACEHOLDERS:
                allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise t.error(
                    "command", f"unknown placeholder {{{f}}} (allowed: {allowed}; "
                    "write {{ and }} for literal braces)"
                )
    subnet = None
    if t.has("subnet"):
        raw = t.string("subnet")
        try:
            subnet = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise t.error("subnet", f"expected a network such as '127.77.1.0/24', got {raw!r}") \
                from None
        if subnet.num_addresses < 2:
            raise t.error("subnet", "expected a network with room for instances")
    env = t.raw("environment", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise t.error("environment", "expected a table of strings")
    directory = t.raw("directory")
    if directory is not None and not isinstance(directory, str):
        raise t.error("directory", "expected a path")
    user, group = parse_user_group(t)
    settings = ProcessSettings(
        command=words,
        subnet=subnet,
        grace=t.duration("grace", 5, allow_zero=True),
        environment=tuple(sorted(env.items())),
        directory=(base_dir / directory) if directory else None,
        user=user,
        group=group,
    )
    t.done()
    return settings


def _identity(settings: ProcessSettings) -> Identity:
    """The instance's user, looked up at each boot (a user created after the daemon started
    works). The child's chdir happens before it drops privileges, so the directory is checked
    as the user here: it must not start in a directory it cannot enter. BootFailed (an
    unknown user or group, a closed directory) names the problem."""
    assert settings.user is not None
    ident = resolve(settings.user, settings.group)
    if settings.directory is not None and (problem := enter_problem(settings.directory, ident)):
        raise BootFailed(f"cannot use the working directory: {problem}")
    return ident


class ProcessHandle(Handle):
    def __init__(
        self,
        process: trio.Process,
        host: str,
        port_map: dict[int, int],
        routable: bool,
        logfile: IO[bytes],
        release: Any,
        box: Container,
        sockets: SocketTable | None = None,
    ) -> None:
        self.process = process
        self.box = box
        self.pid = self.pgid = process.pid
        self.host = host
        self.port_map = port_map
        self.address = host if routable else None
        self._logfile = logfile
        self._release = release
        self._sockets = sockets
        self._connections = ConnectionCounter(host, port_map.values()) if routable else None

    def endpoint(self, port: int) -> tuple[str, int]:
        return self.host, self.port_map.get(port, port)

    async def wait_ready(self) -> None:
        await probe_tcp(self.host, next(iter(self.port_map.values())))

    def alive(self) -> bool:
        # trio's returncode polls (waitpid WNOHANG): a zombie child counts as gone at once.
        return self.process.returncode is None

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - a timeout is a reason
        """Healthy if the process is not stopped (SIGSTOP) and its first port accepts."""
        if self.process.returncode is not None:
            return "the process has exited"
        state = process_state(self.process.pid)
        if state == "T":
            return "the process is stopped (SIGSTOP)"
        if state in ("Z", "X", None):
            return "the process is exiting"
        return await connect_check(self.host, next(iter(self.port_map.values())), timeout)

    #: A health probe is a connection of ours: its two ends, each new in the table.
    probe_traffic = 2

    async def traffic(self) -> int | None:
        """Connections to the instance's own address and ports (traffic.py); None without
        an address of its own (clients always go through the proxy then)."""
        if self._connections is None or self._sockets is None:
            return None
        return self._connections.update(await self._sockets.entries(self.host))

    async def wait_exited(self) -> str:
        code = await self.process.wait()
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    async def stop(self, mode: str, grace: float) -> bool:
        try:
            if self.process.returncode is None:
                self._signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await self.process.wait()
            # Kill all of it even if the leader is gone: it may have left children.
            self.box.kill()
            await self.process.wait()
        finally:
            try:
                await trio.to_thread.run_sync(self.box.remove)
            except OSError as exc:
                log.warning("%s: cannot remove its container %s: %s", self.process.pid,
                            self.box, exc.strerror or exc)
            finally:
                self._logfile.close()
                self._release()
        return False

    def _signal(self, sig: int) -> None:
        self.box.signal(sig)


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.marker = f"{MARKER}={state_dir.resolve()}:"
        #: The addresses of every service's subnet, in use or held (addresses.py).
        self.addresses = AddressPool()
        #: How instances are contained (chosen in :meth:`run`); a test may set it first.
        self.containers: Containers | None = None
        #: HOME, USER, LOGNAME of the daemon's own user, for instances without ``user``.
        self._own_env: dict[str, str] = {}
        #: The TCP table that handed-over instances' traffic is read from, shared by them.
        self.sockets = SocketTable()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.containers is None:
            self.containers = await trio.to_thread.run_sync(open_containers, self.state_dir)
        for path in await trio.to_thread.run_sync(self.containers.sweep):
            log.warning("removed cgroup %s left over from an earlier run", path)
        for pid in await trio.to_thread.run_sync(self._kill_leftovers):
            log.warning("killed process %d left over from an earlier run", pid)
        with contextlib.suppress(BootFailed):
            self._own_env = (await trio.to_thread.run_sync(resolve, os.geteuid())).environment()
        task_status.started()
        await trio.sleep_forever()

    def _kill_leftovers(self) -> list[int]:
        """SIGKILL every process carrying our marker (none of ours is running yet): one
        whose state directory is exactly ours, never one that merely starts like it (the
        marker of ``<dir>:b`` begins with ``<dir>:``). Wait, bounded, until they are gone,
        since they may still hold addresses and ports."""
        prefix = f"{MARKER}=".encode()
        ours = self.marker[len(prefix):-1].encode()
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:  # gone, or not ours to read
                continue
            # <state dir>:<service>#<n>, and a service name has no ':'.
            if any(var.startswith(prefix) and var[len(prefix):].rpartition(b":")[0] == ours
                   for var in env):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(int(entry))
        wait_gone(killed)
        return killed

    def _allocate(self, settings: ProcessSettings, service: str) -> str:
        """A free address of the service's subnet (addresses.py: one handed out to another
        service is held for it until its answers have expired)."""
        assert settings.subnet is not None
        hosts = settings.subnet.hosts() if settings.subnet.num_addresses > 2 else iter(settings.subnet)
        return self.addresses.take((str(a) for a in hosts), service, f"subnet {settings.subnet}")

    def _where(self, settings: ProcessSettings, service: ServiceConfig
               ) -> tuple[str, dict[int, int], bool]:
        """The instance's address, its port for each front port, and whether clients can
        reach it there (an address of the service's subnet: DNS hands it over)."""
        if settings.subnet is not None:
            return self._allocate(settings, service.name), {p: p for p in service.ports}, True
        host = "127.0.0.1"
        return host, {p: free_port(host) for p in service.ports}, False

    def _environment(self, settings: ProcessSettings, user_env: Mapping[str, str],
                     service: str, number: int) -> dict[str, str]:
        """Never the daemon's environment (its secrets, its systemd channel, its HOME): a
        clean one, the user's, the service's ``env``, and our marker."""
        env = child_environment()
        env.update(user_env)
        env.update(settings.environment)
        env[MARKER] = f"{self.marker[len(MARKER) + 1:]}{service}#{number}"
        return env

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        settings: ProcessSettings = service.settings
        drop: dict[str, Any] = {}
        user_env = self._own_env
        if settings.user is not None:
            # The user database and the directory's permissions are read in a thread (NSS may
            # ask a network service).
            ident = await trio.to_thread.run_sync(_identity, settings)
            drop = ident.popen_kwargs()
            user_env = ident.environment()
        host, port_map, routable = self._where(settings, service)
        values = {
            "address": host,
            "port": str(port_map[service.ports[0]]),
            "name": service.name,
            "instance": str(number),
            "python": sys.executable,
        }
        argv = [word.format(**values) for word in settings.command]

        def release(hold: float = hold_time(service)) -> None:
            # Held for the service as long as a client may have it cached (addresses.py).
            if settings.subnet is not None:
                self.addresses.release(host, service.name, hold)

        try:
            logfile = open_instance_log(self.log_dir, service.name, number, argv)
        except OSError as exc:
            release(0)  # never answered
            raise BootFailed(f"cannot open the instance log in {self.log_dir}: {exc}") from exc
        env = self._environment(settings, user_env, service.name, number)
        who = f" as user {settings.user}" if settings.user is not None else ""
        what = f"run {argv[0]!r}{who}"
        box: Container | None = None
        assert self.containers is not None, "start() before run()"
        try:
            if "/" not in argv[0] and shutil.which(argv[0], path=env["PATH"]) is None:
                # Run through the container's shell, it would say so only in the log.
                raise FileNotFoundError(errno.ENOENT, f"not found in PATH ({env['PATH']})")
            what = f"make its {self.containers.kind}"
            box = self.containers.open(service.name, number)
            what = f"run {argv[0]!r}{who}"
            process = await trio.lowlevel.open_process(
                box.command(argv),
                stdin=box.stdin,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=settings.directory,
                **drop,
            )
        except OSError as exc:
            logfile.close()
            release(0)  # never answered
            if box is not None:
                with contextlib.suppress(OSError), trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(box.remove)
            raise BootFailed(f"cannot {what}: {exc.strerror or exc}") from exc
        try:
            box.started(process.pid)
        except OSError as exc:
            handle = ProcessHandle(process, host, port_map, routable, logfile, release, box)
            with trio.CancelScope(shield=True):
                await handle.stop("destroy", 0)
            raise BootFailed(f"cannot put {argv[0]!r} into its {box.kind}: "
                             f"{exc.strerror or exc}") from exc
        return ProcessHandle(process, host, port_map, routable, logfile, release, box,
                             self.sockets)
