"""The daemon: one nursery that starts the supervisor, DNS, the proxy and metrics, in that order.

Reload (:meth:`Daemon.reload`: SIGHUP, ``jitlaunch reload``, ``systemctl reload``): one at a
time (a second waits for the first, then reads the file again; a SIGHUP while one already
waits is merged into it), refused while the daemon stops. The file is read and parsed
completely, the plan made (lifecycle/reload.py; keys that need a restart refuse it), the
services it adds or changes checked as ``jitlaunch check`` does (an error such as a missing
binary refuses it), the fronts it adds bound and a process backend it needs started; any
failure there rejects the reload with nothing changed. Then it is committed synchronously
(supervisor, proxy, DNS, metrics), so that no query or connection sees half of it. systemd
hears ``RELOADING=1`` with ``MONOTONIC_USEC=`` before and ``READY=1`` with a ``STATUS=`` line
after, either way.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from . import systemd as sd
from .aio import run_sync_abandoned
from .backends import SETTINGS, Backend, create_backends
from .checks import host_findings
from .config import Config, Endpoint, load_config
from .control import ControlServer, claim_control_path, control_path
from .dns.server import DnsServer
from .errors import ConfigError, ListenError, StateDirInUse
from .frontmetrics import FrontendCollector
from .lifecycle.admission import Budget
from .lifecycle.reload import ReloadPlan, ReloadResult, plan_reload
from .lifecycle.runtime import host_budget, read_host
from .lifecycle.supervisor import Supervisor
from .logcap import serve_log_caps
from .metrics import Metrics, Observations, new_registry
from .proxy import Proxy
from .proxy.shared import SharedFronts
from .statedir import LockHeld, lock_file, open_private, prepare_state_dir

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
    try:  # never through a symlink someone planted (see statedir.py)
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise ListenError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        lock_file(fd, path, f"{os.getpid()}\n")
    except LockHeld as held:
        pid = held.args[0].strip()
        holder = f" (pid {pid})" if pid.isdigit() else ""
        raise StateDirInUse(
            f"the state directory {state_dir} is in use by another jitlaunch daemon{holder}; "
            "one daemon per state directory"
        ) from None
    except OSError as exc:
        raise ListenError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    return fd


#: The longest a reload may take to read its config file and check what it names.
RELOAD_READ_TIMEOUT = 10.0

#: The path a config loaded without a file (the built-in one) reports.
DEFAULT_CONFIG_PATH = "<default config>"


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
    shared: SharedFronts = field(init=False)
    frontend_endpoints: list[Endpoint] = field(default_factory=list)
    #: The daemon's own metrics registry (never the global default one).
    registry: CollectorRegistry = field(default_factory=new_registry)
    metrics: Metrics = field(init=False)
    metrics_endpoints: list[Endpoint] = field(default_factory=list)
    #: Sockets systemd passed (socket activation); None: read them from the environment.
    passed: sd.PassedSockets | None = None
    notifier: sd.Notifier = field(default_factory=sd.Notifier)
    control: ControlServer | None = None
    _stop: trio.Event = field(default_factory=trio.Event)
    _reload_lock: trio.Lock = field(default_factory=trio.Lock)
    _reload_waiting: bool = False
    _nursery: trio.Nursery | None = None
    _serving: bool = False  # every listener is up: a reload may run
    _reading: trio.CancelScope | None = None  # a reload reading and checking its file

    def __post_init__(self) -> None:
        if not self.backends:
            self.backends = create_backends(self.config)
        observed = Observations(self.config, self.registry)
        self.supervisor = Supervisor(self.config, self.backends, on_ready=observed.ready)
        self.proxy = Proxy(self.config, self.supervisor, on_held=observed.held)
        self.shared = SharedFronts(self.config, self.proxy)
        # With no endpoint nobody reads them: spare the DNS hot path its one increment.
        self.dns = DnsServer(self.config, self.supervisor,
                             counting=bool(self.config.metrics.listen))
        self.metrics = Metrics(
            self.config, self.registry, supervisor=self.supervisor, dns=self.dns,
            proxy=self.proxy, backends=self.backends,
        )
        self.registry.register(FrontendCollector(self.shared))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask for an orderly shutdown; :meth:`serve` returns when it is done. A reload
        still reading its file is cancelled (it says so)."""
        self._stop.set()
        if self._reading is not None:
            self._reading.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        prepare_state_dir(self.config.daemon.state_dir)  # StateDirUnsafe: not ours alone
        lock = lock_state_dir(self.config.daemon.state_dir)
        try:
            control_lock = claim_control_path(
                control_path(self.config, os.environ), self.config.daemon.state_dir)
        except BaseException:
            os.close(lock)
            raise
        try:
            if self.passed is None:
                self.passed = sd.sort_passed(sd.listen_fds(os.environ, os.getpid()), self.config)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for backend in self.backends.values():
                    await nursery.start(backend.run)
                await nursery.start(self.supervisor.run)
                self.dns.passed = self.passed.dns
                self.dns_endpoints = await nursery.start(self.dns.serve)
                self.proxy.passed = self.passed.fronts
                self.proxy_endpoints = await nursery.start(self.proxy.serve)
                self.frontend_endpoints = await nursery.start(self.shared.serve)
                self.metrics_endpoints = await nursery.start(self.metrics.serve)
                nursery.start_soon(
                    serve_log_caps, self.config.daemon.state_dir / "logs",
                    self.config.daemon.instance_log_max,
                )
                self.control = ControlServer(
                    self.config, self.supervisor, control_path(self.config, os.environ),
                    reload=self.reload)
                self.metrics.control = self.control
                await nursery.start(self.control.serve)
                log.info(
                    "serving %d service(s) in %s", len(self.config.services),
                    ", ".join(z.name for z in self.config.dns.zones),
                )
                self._serving = True
                task_status.started(self)
                nursery.start_soon(
                    sd.serve_notify, self.notifier, self.supervisor,
                    sd.watchdog_interval(os.environ, os.getpid()), self._stop,
                )
                await self._stop.wait()
                async with self._reload_lock:  # a reload under way finishes first
                    pass
                self.notifier.send(STOPPING=1, STATUS="stopping: draining, then every instance")
                nursery.start_soon(sd.extend_stop_timeout, self.notifier)
                self.proxy.stop_accepting()
                self.shared.stop_accepting()
                with trio.move_on_after(self.config.daemon.drain_timeout):
                    await self.supervisor.drain()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._serving = False
            try:
                with trio.CancelScope(shield=True):
                    for backend in self.backends.values():
                        await backend.aclose()
            finally:
                self.notifier.close()
                if control_lock is not None:
                    os.close(control_lock)
                os.close(lock)  # last: every instance is gone, the next daemon may sweep
            log.info("stopped")

    # ---- reload ------------------------------------------------------------------------

    async def reload_on_signal(self) -> None:
        """SIGHUP: reload and log the outcome; merged into a reload already waiting."""
        if self._reload_waiting:
            log.info("SIGHUP: a reload is already waiting; it reads the newest file")
            return
        try:
            await self.reload("SIGHUP")
        except Exception:  # a bug outside the reload itself must not end the daemon
            self.metrics.reloads["rejected"] += 1
            self.metrics.last_reload_ok = False
            log.exception("reload (SIGHUP) failed unexpectedly")

    async def reload(self, trigger: str = "request") -> ReloadResult:
        """Re-read the config file and apply it (see the module docstring). Never raises
        for a bad config or a failed bind: the result says why it was rejected (also logged
        once). ``trigger`` names the cause in the log."""
        if self.stopping:
            return self._rejected(trigger, "the daemon is stopping")
        if not self._serving:
            return self._rejected(trigger, "the daemon is not serving yet (or any more)")
        self._reload_waiting = True
        try:
            await self._reload_lock.acquire()
        finally:
            self._reload_waiting = False
        try:
            if self.stopping or not self._serving:
                return self._rejected(trigger, "the daemon is stopping")
            self.notifier.send(
                RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                STATUS=f"reloading {self.config.path}",
            )
            try:
                result = await self._reload(trigger)
            except Exception as exc:  # a bug: it must neither end the daemon nor pass unseen
                self.metrics.reloads["rejected"] += 1
                self.metrics.last_reload_ok = False
                log.exception("reload (%s) failed unexpectedly; the config may be applied "
                              "only in part: check it, then reload again or restart", trigger)
                result = ReloadResult(False, f"failed unexpectedly ({exc!r}); see the "
                                             "daemon's log")
            finally:
                status = sd.status_line(self.supervisor)
                self.notifier.send(READY=1, STATUS=status)
            return result
        finally:
            self._reload_lock.release()

    def _rejected(self, trigger: str, why: str) -> ReloadResult:
        self.metrics.reloads["rejected"] += 1
        self.metrics.last_reload_ok = False
        log.error("reload (%s) rejected, the running config stays: %s", trigger, why)
        return ReloadResult(False, why)

    async def _reload(self, trigger: str) -> ReloadResult:
        path = self.config.path
        read = await self._read_new(trigger)
        if isinstance(read, ReloadResult):
            return read
        new, plan, touched = read
        from .backends.qemu import QemuBackend

        qemu = self.backends.get("qemu")
        if isinstance(qemu, QemuBackend):  # (a saved instance records its image's id)
            await qemu.learn_images(
                [s for s in new.services if s.name in touched and s.backend == "qemu"])
        try:
            bound = await self.proxy.bind_fronts(new)
        except ListenError as exc:
            return self._rejected(trigger, str(exc))
        try:
            added = await self._start_backends(new)
        except BaseException as exc:
            for listener in bound.values():
                listener.socket.close()
            if isinstance(exc, Exception):
                return self._rejected(trigger, f"cannot start a backend: {exc}")
            raise
        self.backends.update(added)
        self._commit(new, plan, bound, host_budget(new.host, *read_host()))
        self.metrics.reloads["ok"] += 1
        self.metrics.last_reload = time.time()
        self.metrics.last_reload_ok = True
        summary = plan.summary()
        log.info("reloaded %s (%s): %s", path, trigger, summary)
        return ReloadResult(True, summary, plan)

    async def _read_new(self, trigger: str) -> tuple[Config, ReloadPlan, set[str]] | ReloadResult:
        """The new config, its plan and the services it adds or changes; or the rejection."""
        path = self.config.path
        # Reading the file and checking what it names (binaries, images) touch file systems
        # that may hang (a network mount): in worker threads abandoned (cancellable) at
        # RELOAD_READ_TIMEOUT, or at once when the daemon stops.
        with trio.move_on_after(RELOAD_READ_TIMEOUT) as reading:
            self._reading = reading
            if self.stopping:
                reading.cancel()
            try:
                new = await run_sync_abandoned(functools.partial(
                    load_config, None if path == DEFAULT_CONFIG_PATH else path,
                    backends=SETTINGS, regular_only=True))
                plan = plan_reload(self.config, new, self.backends, self.proxy.passed_fronts)
                if plan.rejected:
                    return self._rejected(trigger, plan.error())
                # What `jitlaunch check` finds, for the services this reload adds or changes
                # (the others were checked at start, and their instances may be running): an
                # error rejects the reload, a warning is logged.
                touched = set(plan.added) | set(plan.changed_names)
                checked = await run_sync_abandoned(
                    functools.partial(host_findings, new, ports=False))
            except ConfigError as exc:
                return self._rejected(trigger, str(exc))
            finally:
                self._reading = None
        if reading.cancelled_caught:
            if self.stopping:
                return self._rejected(trigger, f"cancelled: the daemon is stopping (the reload "
                                               f"was still reading {path})")
            return self._rejected(trigger, f"reading {path} and checking what it names took "
                                           f"over {RELOAD_READ_TIMEOUT:g} s (a hung file "
                                           "system?); nothing changed")
        findings = [f for f in checked if f.service in touched]
        errors = [f.text(path) for f in findings if f.error]
        if errors:
            return self._rejected(trigger, "; ".join(errors))
        for finding in findings:
            log.warning("check: %s", finding.text(path))
        return new, plan, touched

    def _commit(self, new: Config, plan: ReloadPlan,
                bound: dict[tuple[str, int], trio.SocketListener], budget: Budget) -> None:
        """Hand the new config to every part at once: synchronous (no checkpoint), so
        nothing sees half of it. The one place a reload's config goes."""
        old = self.config
        self.config = new
        self.supervisor.reconfigure(new, plan, budget)
        self.proxy.reconfigure(new, bound)
        self.shared.reconfigure(new)
        self.dns.reconfigure(new)
        self.metrics.reconfigure(new)
        if self.control is not None:
            self.control.reconfigure(new)
        if new.daemon.log_level != old.daemon.log_level:
            logging.getLogger("jitlaunch").setLevel(new.daemon.log_level.upper())
            self.dns.query_log.refresh()  # on at debug level only

    async def _start_backends(self, config: Config) -> dict[str, Backend]:
        """The backends ``config`` needs and the daemon does not run yet, started. Only the
        process backend can come up this way (the plan refuses the others)."""
        if "process" in self.backends or not any(s.backend == "process" for s in config.services):
            return {}
        from .backends.process import ProcessBackend

        assert self._nursery is not None
        backend = ProcessBackend(config.daemon.state_dir)
        await self._nursery.start(backend.run)
        return {"process": backend}
