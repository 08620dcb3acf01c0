"""The daemon: one nursery that starts the supervisor, DNS, the proxy and metrics, in that order."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from . import systemd as sd
from .backends import Backend, create_backends
from .config import Config, Endpoint
from .control import ControlServer, control_path
from .dns.server import DnsServer
from .errors import ListenError, StateDirInUse
from .lifecycle.supervisor import Supervisor
from .logcap import serve_log_caps
from .metrics import Metrics, new_registry
from .proxy import Proxy

log = logging.getLogger("jitlaunch")

#: The file in the state directory that a running daemon holds an exclusive flock on.
LOCK_FILE = "jitlaunch.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this process: an exclusive, non-blocking flock on
    ``<state_dir>/jitlaunch.lock``, which then holds our pid. Returns the open descriptor
    (the lock lives as long as it stays open; the kernel drops it if we die).

    Raises StateDirInUse, naming the directory and the holder's pid, if another daemon holds
    it: that daemon's instances must not be swept as leftovers. Call it before anything
    touches the directory's contents.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ListenError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ListenError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        raise StateDirInUse(
            f"the state directory {state_dir} is in use by another jitlaunch daemon{holder}; "
            "one daemon per state directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class Daemon:
    """A running jitlaunch. ``await nursery.start(Daemon(config).serve)`` returns once every
    socket is bound; :meth:`stop` shuts it down in order: the proxy stops accepting, open
    connections get ``daemon.drain_timeout`` to finish, then every instance is stopped."""

    config: Config
    backends: dict[str, Backend] = field(default_factory=dict)
    supervisor: Supervisor = field(init=False)
    proxy: Proxy = field(init=False)
    dns: DnsServer = field(init=False)
    dns_endpoints: list[Endpoint] = field(default_factory=list)
    proxy_endpoints: list[Endpoint] = field(default_factory=list)
    #: The daemon's own metrics registry (never the global default one).
    registry: CollectorRegistry = field(default_factory=new_registry)
    metrics: Metrics = field(init=False)
    metrics_endpoints: list[Endpoint] = field(default_factory=list)
    #: Sockets systemd passed (socket activation); None: read them from the environment.
    passed: sd.PassedSockets | None = None
    notifier: sd.Notifier = field(default_factory=sd.Notifier)
    control: ControlServer | None = None
    _stop: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        if not self.backends:
            self.backends = create_backends(self.config)
        self.supervisor = Supervisor(self.config, self.backends)
        self.proxy = Proxy(self.config, self.supervisor)
        self.dns = DnsServer(self.config, self.supervisor)
        self.metrics = Metrics(
            self.config, self.registry, supervisor=self.supervisor, dns=self.dns,
            proxy=self.proxy, backends=self.backends,
        )
        # With no endpoint nobody reads them: spare the DNS hot path its one increment.
        self.dns.authority.counting = bool(self.config.metrics.listen)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask for an orderly shutdown; :meth:`serve` returns when it is done."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.config.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ListenError(
                f"cannot create the state directory {self.config.daemon.state_dir}: {exc.strerror}"
            ) from exc
        lock = lock_state_dir(self.config.daemon.state_dir)
        try:
            if self.passed is None:
                self.passed = sd.sort_passed(sd.listen_fds(os.environ, os.getpid()), self.config)
            async with trio.open_nursery() as nursery:
                for backend in self.backends.values():
                    await nursery.start(backend.run)
                await nursery.start(self.supervisor.run)
                self.dns.passed = self.passed.dns
                self.dns_endpoints = await nursery.start(self.dns.serve)
                self.proxy.passed = self.passed.fronts
                self.proxy_endpoints = await nursery.start(self.proxy.serve)
                self.metrics_endpoints = await nursery.start(self.metrics.serve)
                nursery.start_soon(
                    serve_log_caps, self.config.daemon.state_dir / "logs",
                    self.config.daemon.instance_log_max,
                )
                self.control = ControlServer(
                    self.config, self.supervisor, control_path(self.config, os.environ))
                await nursery.start(self.control.serve)
                log.info(
                    "serving %d service(s) in %s", len(self.config.services),
                    ", ".join(z.name for z in self.config.dns.zones),
                )
                task_status.started(self)
                nursery.start_soon(
                    sd.serve_notify, self.notifier, self.supervisor,
                    sd.watchdog_interval(os.environ, os.getpid()), self._stop,
                )
                await self._stop.wait()
                self.notifier.send(STOPPING=1, STATUS="stopping: draining, then every instance")
                nursery.start_soon(sd.extend_stop_timeout, self.notifier)
                self.proxy.stop_accepting()
                with trio.move_on_after(self.config.daemon.drain_timeout):
                    await self.supervisor.drain()
                nursery.cancel_scope.cancel()
        finally:
            try:
                with trio.CancelScope(shield=True):
                    for backend in self.backends.values():
                        await backend.aclose()
            finally:
                os.close(lock)  # last: every instance is gone, the next daemon may sweep
            log.info("stopped")
