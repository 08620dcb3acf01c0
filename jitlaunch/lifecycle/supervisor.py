"""The supervisor: drives each service's instances through the state machine in state.py.

It decides synchronously (which instance, which transition) and then does the I/O (backend
calls) in one task per instance (course.py), so that concurrent lookups and connections
during a boot share that boot. This module is its public API; admission is applied in
admit.py, an instance's course runs in course.py, the records are in runtime.py. Rules:

* :meth:`Supervisor.request` notes activity and makes sure an instance is starting or ready;
  it never blocks. :meth:`Supervisor.acquire` waits until that instance is ready.
* Activity is the latest lookup or proxied byte, and for an instance whose address was handed
  over, its traffic as its backend sees it (activity.py). With a connection open, or traffic
  within a few seconds, a service is never idle nor evicted; after ``idle_timeout`` without
  activity its instance is stopped in its stop mode.
* Only a proven request (``proven=True``: a connection, a lookup over TCP or with a valid
  DNS cookie) is queued and may evict (admit.py). Boots caused by a source prefix are
  rate-limited.
* Reload (:meth:`Supervisor.reconfigure`, the plan from reload.py) is applied synchronously.
  An instance runs with the ServiceConfig it was started with (``inst.service``); the
  service's runtime holds the current one (``rt.config``). A removed service's runtime stays
  (``removed``) until its instance is stopped (reason ``reload``) and its last connection
  closed: it starts nothing more.
* Status is read through :meth:`Supervisor.status` (frozen snapshots, status.py), and DNS
  reads a service through :meth:`Supervisor.snapshot`, which changes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import trio

from ..backends.base import Backend
from ..config import Config, ServiceConfig
from ..errors import AdmissionRefused, BootFailed, InBackoff
from ..logutil import LimitedLog
from . import admission as adm
from .admit import Admitting
from .answers import ServiceSnapshot
from .core import limited, log
from .course import UNREACHABLE_PROBE_TIMEOUT, InstanceCourse
from .reload import ReloadPlan
from .runtime import Instance, ServiceRuntime, host_budget, read_host
from .state import Event, State
from .status import ServiceStatus, SupervisorStatus

__all__ = ["Instance", "ServiceRuntime", "Supervisor"]


class Supervisor(Admitting, InstanceCourse):
    """Owns every instance. Start it with ``await nursery.start(supervisor.run)``."""

    def __init__(
        self, config: Config, backends: Mapping[str, Backend], budget: adm.Budget | None = None,
        *, on_ready: Callable[[Instance], None] | None = None,
    ) -> None:
        """``on_ready`` is called with each instance as it becomes ready (the metrics'
        wake-up histogram); it must not raise."""
        self.config = config
        self.backends = backends
        self.services = {s.name: ServiceRuntime(s) for s in config.services}
        #: The host budget (derived from the machine where [host] leaves it open).
        self.budget = budget or host_budget(config.host, *read_host())
        self.pools = adm.reserved(config.services)
        self.queue = adm.AdmissionQueue(config.host.max_queued)
        self._queue_grew = trio.Event()
        self.wake = adm.WakeLimiter(config.host.wake)
        #: Admission counters (read by tests and metrics): ``admitted`` (started at once or
        #: from the queue), ``queued``, ``evicted``, ``refused_full`` (the queue was full),
        #: ``refused_timeout``, ``refused_never`` (can never fit), ``refused_closing``,
        #: ``refused_unproven`` (no room for an unproven request), ``wake_limited``.
        self.admission: collections.Counter[str] = collections.Counter()
        self._admission_log = LimitedLog(logging.getLogger("jitlaunch.admission"))
        #: Bumped on every change of any service's state; DNS answer caches key on it.
        self.generation = 0
        self._nursery: trio.Nursery | None = None
        self._closing = False
        #: Called with each instance as it becomes ready (the metrics' wake-up histogram).
        self.on_ready = on_ready
        #: The ``stops`` counters of services a reload removed, by ``(service, reason, mode)``.
        self.retired_stops: collections.Counter[tuple[str, str, str]] = collections.Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; on the way out stop every instance (shielded, bounded)."""
        log.info("host budget: %s; warm pools hold %d instance(s), %d MiB; admission queue "
                 "%d, queue_timeout %g s", self.budget, self.pools.instances, self.pools.memory,
                 self.queue.bound, self.config.host.queue_timeout)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._expire_queue)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closing = True
            self._nursery = None
            self._refuse_all("the daemon is shutting down")
            with trio.CancelScope(shield=True):
                # Paused or saved instances hold resources too (a paused VM is a process).
                for rt in self.services.values():
                    inst = rt.instance
                    if inst is not None and inst.state is State.SAVED:
                        inst.fire(Event.STOP)
                        await self._release(rt, inst, None)

    async def drain(self) -> None:
        """Stop starting instances and wait for open connections to end. Called (bounded by
        the caller) before the daemon cancels everything on a clean shutdown."""
        self._closing = True
        self._refuse_all("the daemon is shutting down")
        for rt in self.services.values():
            inst = rt.instance
            if inst is not None and inst.state is State.READY and rt.connections:
                inst.fire(Event.DRAIN)
                self._notify(rt)
        for rt in list(self.services.values()):  # (a removed service may go meanwhile)
            await rt.no_connections.wait()

    def reconfigure(self, config: Config, plan: ReloadPlan, budget: adm.Budget | None = None) -> None:
        """Apply a reload plan (see reload.py) synchronously, so nothing sees half of it.

        Added services get a runtime; removed ones start nothing from now on, their queued
        start is refused and a task stops their instance once their connections end (at
        most ``daemon.drain_timeout``), reason ``reload``; the runtime goes when its last
        connection closed. A changed service takes the new config for its next instance
        and its backoff is forgotten (the new settings deserve a try); its saved (paused or
        saved-to-disk) instance is discarded; its running one is stopped at once only when
        the plan replaces it. Unchanged services are not touched.
        """
        old = self.config
        self.config = config
        if dataclasses.replace(config.host, wake=old.host.wake) != old.host:
            # (the caller read the machine before this synchronous commit)
            self.budget = budget or host_budget(config.host, *read_host())
        if config.host.wake != old.host.wake:
            self.wake = adm.WakeLimiter(config.host.wake)
        self.pools = adm.reserved(config.services)
        self.queue.bound = config.host.max_queued
        self._queue_grew.set()  # queue_timeout may have changed
        changed = set(plan.changed_names)
        for svc in config.services:
            rt = self.services.get(svc.name)
            if rt is None:
                self.services[svc.name] = ServiceRuntime(svc)
                continue
            if svc.name not in changed and not rt.removed:
                continue
            rt.removed = False  # (re-added while its old instance still stops: a new one next)
            rt.config = svc
            rt.failures = 0
            rt.retry_at = -math.inf
            rt.reconfigured.set()
            rt.reconfigured = trio.Event()
            inst = rt.instance
            if inst is not None and inst.state is State.SAVED and self._nursery is not None:
                inst.run.reloaded = True
                self._nursery.start_soon(self._evict_paused, rt, inst)
            elif inst is not None and svc.name in plan.replaced and \
                    inst.state in (State.STARTING, State.READY):
                inst.run.reloaded = True
                inst.run.stop_wanted.set()
            self._notify(rt)
        for name in plan.removed:
            rt = self.services[name]
            rt.removed = True
            if rt.queued is not None:
                self._refuse(rt, "the service was removed by a reload")
            if self._nursery is not None:
                self._nursery.start_soon(self._retire, rt)
            self._notify(rt)
        self.generation += 1
        self._pump()

    async def _retire(self, rt: ServiceRuntime) -> None:
        """A removed service: let its connections end (bounded by the drain timeout), stop
        its instance for good, then forget it once no connection is open. Gives up as soon
        as a later reload adds the service back."""
        name = rt.config.name
        try:
            with trio.move_on_after(self.config.daemon.drain_timeout):
                await rt.no_connections.wait()
            while rt.removed and (inst := rt.instance) is not None:
                inst.run.reloaded = True
                if inst.state is State.SAVED:
                    await self._evict_paused(rt, inst)
                    if rt.instance is inst:
                        break  # it could not be released (logged): keep the runtime
                    continue
                if inst.state in (State.STARTING, State.READY, State.DRAINING):
                    inst.run.stop_wanted.set()
                await inst.run.released.wait()
            while rt.removed and rt.connections:
                await rt.no_connections.wait()
            if rt.removed and rt.instance is None and self.services.get(name) is rt:
                del self.services[name]
                for (reason, mode), count in rt.stops.items():
                    self.retired_stops[(name, reason, mode)] += count
                self.generation += 1
                log.info("%s: removed by a reload; its instance is stopped", name)
        except Exception:
            limited.error("retire", "%s: unexpected error while removing it", name,
                           exc_info=True)

    def status_lines(self) -> list[str]:
        """One line per service: its instance and state, connections and counters (logged
        on SIGUSR1)."""
        lines = []
        for rt in self.services.values():
            inst = rt.instance
            what = inst.summary() if inst is not None else "no instance"
            backoff = ""
            if trio.current_time() < rt.retry_at:
                backoff = f", backing off for {rt.retry_at - trio.current_time():.1f} s"
            lines.append(
                f"{rt.config.name}: {what}, {rt.connections} connection(s), {rt.boots} boot(s), "
                f"{rt.boot_failures} failed, {rt.deaths} died, {rt.hung} hung, "
                f"{rt.idle_stops} idle stop(s){backoff}"
            )
        for backend in self.backends.values():
            lines += backend.status_lines()
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.admission.items())) or "nothing yet"
        lines.append(f"host: {self.budget}; {len(self.queue)} queued; admission: {counts}")
        return lines

    def request(self, name: str, source: str | None = None, *,
                proven: bool = True) -> Instance | None:
        """Note activity for service ``name`` and make sure an instance is starting or ready.

        Returns that instance (one not yet started while it waits in the admission queue),
        or None when the service is backing off after a failed boot, the start was refused
        (queue full, ``source``'s prefix has used up its wake limit, or an unproven request
        found no room) or the daemon is shutting down. Never blocks. ``source`` is the
        client's address (a lookup's or a connection's); requests for a service that is
        starting, ready or queued never count against its wake limit. ``proven`` says the
        source cannot be forged (a connection, DNS over TCP, a valid DNS server cookie):
        only then may the start wait in the queue and evict.
        """
        rt = self.services[name]
        if rt.removed:
            return None
        now = trio.current_time()
        rt.last_activity = now
        inst = rt.instance
        if inst is not None and inst.state is State.READY and not self._alive(inst):
            self._condemn(rt, inst, "its process is gone", hung=False)
        if inst is not None and inst.state in (State.STARTING, State.READY):
            return inst
        if inst is not None and inst.state in (State.DRAINING, State.STOPPING):
            rt.restart_wanted = True
            rt.restart_proven = rt.restart_proven or proven
            return inst
        if rt.queued is not None:
            return rt.queued
        if self._closing or self._nursery is None or now < rt.retry_at:
            return None
        # The wake limit first: it is cheap, and bounds how often a flood of unproven
        # lookups makes the admission decision below run.
        if source is not None and not self.wake.allow(source, now, proven=proven):
            self.admission["wake_limited"] += 1
            self._admission_log.log(
                logging.INFO, "wake_limited", "%s reached %s wake limit; not starting %s for it",
                *(("a source prefix", "its") if proven else ("unproven lookups", "their")), name)
            return None
        if not proven and not self._room_for_unproven(rt):
            return None
        return self._enqueue(rt)

    async def acquire(self, name: str, *, proven: bool = True) -> Instance:
        """Request service ``name`` and wait until an instance is ready; return it.

        Raises BootFailed (BootTimeout, InBackoff) if no instance can be had. The wait is
        bounded by the boot timeout because the boot itself is; callers may bound it more.
        ``proven`` as for :meth:`request`.
        """
        rt = self.services[name]
        while True:
            inst = self.request(name, proven=proven)
            if inst is None and rt.removed:
                raise BootFailed(f"{name} was removed by a reload")
            if inst is None:
                raise InBackoff(rt.last_error or "the daemon is shutting down")
            if inst is rt.queued:
                while rt.queued is inst:
                    await rt.changed.wait()
                if inst.refused is not None:
                    raise AdmissionRefused(*inst.refused.args)
                continue
            while inst.state is State.STARTING:
                await rt.changed.wait()
            if inst.state is State.READY:
                if self._alive(inst):
                    return inst
                self._condemn(rt, inst, "its process is gone", hung=False)
            if inst.state is State.FAILED:
                # A fresh exception of the same kind for each waiter (BootTimeout stays one).
                failure = inst.run.error or BootFailed("boot failed")
                raise type(failure)(*failure.args)
            # Draining or stopping: a new instance starts once this one is released.
            while inst.state in (State.DRAINING, State.STOPPING):
                await rt.changed.wait()

    async def report_unreachable(self, inst: Instance, reason: str) -> None:
        """The proxy could not reach READY instance ``inst``: the connect was refused, reset
        before any byte, or no first byte came in time (``reason`` says which).

        Checks it at once: if its process is gone or a health probe (bounded by
        ``min(health_timeout, 1 s)``) fails, the instance is released (logged, counted,
        destroyed) before this returns, so the next :meth:`acquire` starts a new one. If it
        is healthy it is left as it is (the client's problem was transient). Never raises
        for the instance's failures; cancellation propagates.
        """
        rt = self.services[inst.service.name]
        rt.unreachable_reports += 1
        if inst.state is State.READY and inst.handle is not None:
            if not self._alive(inst):
                self._condemn(rt, inst, f"its process is gone ({reason})", hung=False)
            elif inst.run.checking is not None:
                await inst.run.checking.wait()  # a burst of reports shares one check
            else:
                inst.run.checking = trio.Event()
                try:
                    timeout = min(inst.service.health_timeout, UNREACHABLE_PROBE_TIMEOUT)
                    found = await self._probe(inst, timeout)
                    if found is not None and inst.state is State.READY:
                        self._condemn(
                            rt, inst, f"unreachable ({reason}) and its health probe failed: "
                            f"{found}", hung=self._alive(inst),
                        )
                finally:
                    inst.run.checking.set()
                    inst.run.checking = None
        if inst.run.condemned.is_set():
            await inst.run.released.wait()

    def stop(self, name: str) -> Instance | None:
        """Stop service ``name``'s instance now, in its stop mode, as if it had gone idle
        (open connections are cut); one that is booting stops once ready. Returns that
        instance (wait on its ``released``), or None when none is starting or ready."""
        inst = self.services[name].instance
        if inst is None or inst.state not in (State.STARTING, State.READY):
            return None
        inst.run.stop_wanted.set()
        return inst

    def touch(self, name: str) -> None:
        """Note activity (a proxied byte) without starting anything."""
        self.services[name].last_activity = trio.current_time()

    def connection_opened(self, name: str) -> None:
        rt = self.services[name]
        rt.connections += 1
        rt.last_activity = trio.current_time()
        if rt.connections == 1:
            rt.no_connections = trio.Event()

    def connection_closed(self, name: str) -> None:
        rt = self.services[name]
        rt.connections -= 1
        rt.last_activity = trio.current_time()
        if rt.connections == 0:
            rt.no_connections.set()
            if len(self.queue):
                self._pump()  # its instance may be evicted now

    def status(self) -> SupervisorStatus:
        """Every service's status now, frozen (see status.py)."""
        return SupervisorStatus(
            tuple(ServiceStatus.of(rt) for rt in self.services.values()),
            tuple(self.retired_stops.items()), tuple(self.admission.items()), len(self.queue),
            self.budget, self.generation,
        )

    def service_names(self) -> tuple[str, ...]:
        """The services it knows now (a removed one included until it has gone)."""
        return tuple(self.services)

    def service_config(self, name: str) -> ServiceConfig:
        """Service ``name``'s current config (a removed one's while it goes); KeyError for a
        name it does not know. Cheap: the proxy asks it per connection."""
        return self.services[name].config

    def is_removed(self, name: str) -> bool:
        """Whether a reload removed service ``name`` (it starts nothing more)."""
        return self.services[name].removed

    def service_status(self, name: str) -> ServiceStatus:
        """Service ``name``'s status now, frozen; KeyError for a name it does not know."""
        return ServiceStatus.of(self.services[name])

    def snapshot(self, name: str) -> ServiceSnapshot:
        """Service ``name``'s state as DNS needs it (the policy is in answers.py). Changes
        nothing: a lookup first asks through :meth:`request`, which notices a dead instance."""
        rt = self.services[name]
        inst = rt.instance
        if inst is None:
            return ServiceSnapshot(None, None, rt.retry_at)
        address = inst.handle.address if inst.handle is not None else None
        return ServiceSnapshot(inst.state, address, rt.retry_at)
