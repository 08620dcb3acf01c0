"""The process backend: an instance is a host process started from a command template.

The template is split like a shell would (no shell runs) and each word is formatted with
``{address}``, ``{port}``, ``{name}``, ``{instance}`` and ``{python}`` (this interpreter). The
child runs in its own session and process group, with its output appended to a per-service
log file in the state directory (the previous instance's log is kept as ``.log.1``). It is
stopped with SIGTERM to the whole group, then SIGKILL after the grace period.

Leftovers: every child gets ``JITLAUNCH_INSTANCE=<state dir>:<service>#<n>`` in its
environment, and its own children inherit it. A daemon that was killed outright cannot stop
them, so at start the backend kills every process whose environment carries its state
directory's marker: it can prove they are its own, and a daemon owns its state directory.

Addresses: with ``subnet`` set (for example ``127.77.1.0/24``), each instance gets a free
address of its own in it and listens on the service's own ports there, so DNS can hand that
address over. Without it, the instance listens on ``127.0.0.1`` on a free port the proxy
connects to, and clients always go through the front address. A handed-over instance's
traffic is its TCP connections to its address (traffic.py: the kernel's table, no privilege).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import signal
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

from ..config import ServiceConfig, Table
from ..errors import BootFailed
from ..identity import USER_VARS, Identity, enter_problem, parse_user_group, resolve
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
from .traffic import ConnectionCounter, SocketTable

log = logging.getLogger(__name__)

STOP_MODES = ("destroy", "shutdown")
#: Variables systemd gives the daemon (sd_notify(3), the watchdog, sd_listen_fds(3)) that a
#: process instance must not inherit: they name the daemon's channel to its manager.
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                "LISTEN_FDNAMES")

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
        sockets: SocketTable | None = None,
    ) -> None:
        self.process = process
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
            # Kill the whole group even if the leader is gone: it may have left children.
            self._signal(signal.SIGKILL)
            await self.process.wait()
        finally:
            self._logfile.close()
            self._release()
        return False

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass


class ProcessBackend(Backend):
    name = "process"

    def __init__(self, state_dir: Path) -> None:
        self.log_dir = state_dir / "logs"
        self.marker = f"{MARKER}={state_dir.resolve()}:"
        self._in_use: set[str] = set()
        #: The TCP table that handed-over instances' traffic is read from, shared by them.
        self.sockets = SocketTable()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for pid in await trio.to_thread.run_sync(self._kill_leftovers):
            log.warning("killed process %d left over from an earlier run", pid)
        task_status.started()
        await trio.sleep_forever()

    def _kill_leftovers(self) -> list[int]:
        """SIGKILL every process carrying our marker (none of ours is running yet); wait,
        bounded, until they are gone, since they may still hold addresses and ports."""
        marker = self.marker.encode()
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:  # gone, or not ours to read
                continue
            if any(var.startswith(marker) for var in env):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(int(entry))
        wait_gone(killed)
        return killed

    def _allocate(self, settings: ProcessSettings) -> str:
        assert settings.subnet is not None
        hosts = settings.subnet.hosts() if settings.subnet.num_addresses > 2 else iter(settings.subnet)
        for addr in hosts:
            text = str(addr)
            if text not in self._in_use:
                self._in_use.add(text)
                return text
        raise BootFailed(f"no free address left in subnet {settings.subnet}")

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        settings: ProcessSettings = service.settings
        drop: dict[str, Any] = {}
        user_env: dict[str, str] = {}
        if settings.user is not None:
            # The user database and the directory's permissions are read in a thread (NSS may
            # ask a network service).
            ident = await trio.to_thread.run_sync(_identity, settings)
            drop = ident.popen_kwargs()
            user_env = ident.environment()
        if settings.subnet is not None:
            host = self._allocate(settings)
            port_map = {p: p for p in service.ports}
            routable = True
        else:
            host = "127.0.0.1"
            port_map = {p: free_port(host) for p in service.ports}
            routable = False
        values = {
            "address": host,
            "port": str(port_map[service.ports[0]]),
            "name": service.name,
            "instance": str(number),
            "python": sys.executable,
        }
        argv = [word.format(**values) for word in settings.command]

        def release() -> None:
            self._in_use.discard(host)

        try:
            logfile = open_instance_log(self.log_dir, service.name, number, argv)
        except OSError as exc:
            release()
            raise BootFailed(f"cannot open the instance log in {self.log_dir}: {exc}") from exc
        env = dict(os.environ)
        for var in SYSTEMD_VARS:  # the daemon's systemd channel is not the instance's
            env.pop(var, None)
        if settings.user is not None:
            for var in USER_VARS:  # the daemon's (root's HOME) are not the user's
                env.pop(var, None)
        env.update(user_env)
        env.update(settings.environment)
        env[MARKER] = f"{self.marker[len(MARKER) + 1:]}{service.name}#{number}"
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=settings.directory,
                **drop,
            )
        except OSError as exc:
            logfile.close()
            release()
            who = f" as user {settings.user}" if settings.user is not None else ""
            raise BootFailed(f"cannot run {argv[0]!r}{who}: {exc.strerror or exc}") from exc
        return ProcessHandle(process, host, port_map, routable, logfile, release, self.sockets)
