"""The supervisor: drives each service's instances through the state machine in state.py.

It decides synchronously (which instance, which transition) and then does the I/O (backend
calls) in one task per instance, so that concurrent lookups and connections during a boot
share that boot. Rules:

* :meth:`Supervisor.request` notes activity and makes sure an instance is starting or ready;
  it never blocks. :meth:`Supervisor.acquire` waits until that instance is ready.
* A boot is bounded by the service's boot timeout. A failed boot is logged once, fails every
  waiter with :class:`~jitlaunch.errors.BootFailed`, and starts an exponential backoff
  (``retry_backoff`` doubling up to ``retry_backoff_max``) before the next attempt.
* An instance that goes away by itself is noticed at once (the backend's ``wait_exited``),
  released, and the next request starts a new one.
* Activity is the latest lookup or proxied byte, and for an instance whose address was handed
  over, its traffic as its backend sees it (activity.py: sampled while it waits to go idle).
  With a connection open, or traffic within a few seconds, a service is never idle nor
  evicted; after ``idle_timeout`` without activity its instance is stopped in its stop mode.
* Stopping always runs shielded and bounded, so a cancelled daemon never leaves an instance.
* Admission (admission.py decides, this applies): every start goes through a bounded FIFO
  queue of services; the head starts when it fits the host budget, after evicting idle
  instances when that makes it fit, and otherwise waits there, bounded by
  ``queue_timeout`` (then AdmissionRefused). The queue is pumped whenever room may have
  appeared: a release, a boot's end, a last connection closed. A boot's timeout counts from
  its start, not from the queue. Boots caused by a source prefix are rate-limited.
* Only a proven request (``proven=True``: a connection, a lookup over TCP or with a valid
  DNS cookie) is queued and may evict. An unproven one starts only into free room, now,
  with nobody queued; otherwise it is refused at once (``refused_unproven``).
* Reload (:meth:`Supervisor.reconfigure`, the plan from reload.py) is applied synchronously.
  An instance runs with the ServiceConfig it was started with (``inst.service``); the
  service's runtime holds the current one (``rt.config``). A removed service's runtime stays
  (``removed``) until its instance is stopped (reason ``reload``) and its last connection
  closed: it starts nothing more.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from functools import partial

import trio

from ..aio import first_of
from ..backends.base import Backend, Handle, map_errors
from ..config import Config, HostConfig, ServiceConfig
from ..errors import AdmissionRefused, BootFailed, BootTimeout, InBackoff
from ..logutil import LimitedLog
from . import admission as adm
from .activity import TrafficWatch
from .answers import ServiceAnswer, ServiceSnapshot, answer_for
from .backoff import backoff_delay
from .reload import ReloadPlan
from .state import Event, State, next_state

log = logging.getLogger("jitlaunch.supervisor")

#: Extra time, beyond a service's stop grace, that a stop may take before we give up on it.
STOP_MARGIN = 10.0
#: The longest health probe :meth:`Supervisor.report_unreachable` waits for.
UNREACHABLE_PROBE_TIMEOUT = 1.0
#: Extra time a backend's probe may take beyond its timeout before we stop waiting.
PROBE_MARGIN = 0.5
#: The longest one read of an instance's traffic counter may take (else: unknown).
TRAFFIC_TIMEOUT = 5.0

_limited = LimitedLog(log)


async def _ready(handle: Handle) -> None:
    with map_errors("readiness check failed"):
        await handle.wait_ready()


def host_budget(host: HostConfig) -> adm.Budget:
    """The host budget: ``[host]`` as configured, the rest derived from this machine
    (/proc/meminfo, the CPU count)."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    except OSError:
        meminfo = ""
    return adm.derive_budget(host, meminfo, len(os.sched_getaffinity(0)))


class Instance:
    """One instance of a service, from its start to its release.

    An instance saved by a pause or a save is started again by a later request: each start
    (a boot, a resume, a restore) begins a new *run*. Everything that was asked of a run or
    says how it ended (a requested stop, a condemnation, an eviction, a reload's stop, its
    release) belongs to that run alone and is set afresh by :meth:`new_run`; a flag of an
    earlier run must never decide what a later one does (a stop requested of the run before
    a pause made every later run stop at once).
    """

    def __init__(self, service: ServiceConfig, number: int) -> None:
        self.service = service
        self.number = number
        self.state = State.STOPPED
        self.handle: Handle | None = None
        self.started_at = math.nan
        self.ready_at = math.nan
        #: While SAVED with a live process (a paused VM): the watch on it, and its end.
        self.saved_watch = trio.CancelScope()
        self.unwatched = trio.Event()
        self.unwatched.set()
        #: While it waits in the admission queue: when it was queued; and why it was refused.
        self.queued_at = math.nan
        self.refused: AdmissionRefused | None = None
        self.new_run()

    def new_run(self) -> None:
        """Forget what was asked of the previous run: called by each start."""
        self.error: BootFailed | None = None
        #: Why a ready instance was declared dead or hung (set once, by :meth:`Supervisor._condemn`).
        self.cause: str | None = None
        self.hung = False
        #: Set when the instance is condemned: its task stops watching and releases it.
        self.condemned = trio.Event()
        #: Set by :meth:`Supervisor.stop` (``jitlaunch stop``): stop it now, as if idle.
        self.stop_wanted = trio.Event()
        #: Set once this run's resources have been released (its task is done with it).
        self.released = trio.Event()
        #: Set while report_unreachable checks it: further reports wait for that check.
        self.checking: trio.Event | None = None
        #: Set when admission evicts it: the stop mode to use (frees its share of the host).
        self.evict_mode: str | None = None
        #: Set when a reload removed its service or replaced it: stop it for good (destroy).
        self.reloaded = False
        #: While it is ready with its address handed over: samples of its traffic (activity.py).
        self.traffic: TrafficWatch | None = None

    @property
    def label(self) -> str:
        return f"{self.service.name}#{self.number}"

    def fire(self, event: Event) -> State:
        """Apply ``event``; IllegalTransition if the table forbids it."""
        self.state = next_state(self.state, event)
        return self.state

    @property
    def shown_state(self) -> str:
        """Its state as people read it: ``queued`` while it waits for room, ``paused`` when
        saved with its process still there (a paused VM), else the state's name."""
        if self.state is State.STOPPED and not math.isnan(self.queued_at):
            return "queued"
        if self.state is State.SAVED and self.handle is not None:
            try:
                if self.handle.alive():
                    return "paused"
            except Exception:  # a backend's error: say what the table says
                pass
        return str(self.state)

    def summary(self) -> str:
        """``hello#3 ready (qemu, pid=4242 10.77.0.5)``: for status lines."""
        described = self.handle.describe() if self.handle else ""
        return (f"{self.label} {self.shown_state} ({self.service.backend}"
                f"{', ' + described if described else ''})")

    def __repr__(self) -> str:
        described = self.handle.describe() if self.handle else ""
        extra = f" {described}" if described else ""
        return f"<Instance {self.label} {self.shown_state} {self.service.backend}{extra}>"


class ServiceRuntime:
    """A service's live bookkeeping: its current instance, activity and backoff."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.instance: Instance | None = None
        self.numbers = 0
        self.failures = 0
        self.retry_at = -math.inf
        self.last_error: str | None = None
        self.last_error_at = -math.inf  # trio time of last_error
        self.last_activity = -math.inf
        self.connections = 0
        self.no_connections = trio.Event()
        self.no_connections.set()
        self.changed = trio.Event()
        self.restart_wanted = False
        #: Whether a request that wanted the restart was proven (the restart may evict then).
        self.restart_proven = False
        #: A start waiting in the admission queue: the instance it will be (or, when the
        #: service has a saved instance, a stand-in; the saved one is resumed).
        self.queued: Instance | None = None
        # Counters, read by tests and metrics.
        self.boots = 0
        self.boot_failures = 0
        self.deaths = 0
        self.hung = 0
        self.unreachable_reports = 0
        self.idle_stops = 0
        self.readies = 0  # boots that reached READY
        self.boot_timeouts = 0  # of boot_failures, those not ready within the boot timeout
        #: Samples of handed-over instances' traffic (activity.py), by result: ``moved``
        #: (activity), ``still`` or ``unknown`` (it could not be read).
        self.traffic_samples: collections.Counter[str] = collections.Counter()
        #: Instances stopped (not failed boots), by ``(reason, mode)``: reason ``idle``,
        #: ``requested``, ``evicted``, ``reload``, ``died``, ``hung`` or ``shutdown``; mode
        #: the stop mode used.
        self.stops: collections.Counter[tuple[str, str]] = collections.Counter()
        #: A reload removed the service: it starts nothing more and goes once its instance
        #: is stopped and its last connection closed.
        self.removed = False
        #: Set (and replaced) by each reload that changes the service.
        self.reconfigured = trio.Event()

    def __repr__(self) -> str:
        return f"<Service {self.config.name} {self.instance!r} connections={self.connections}>"


class Supervisor:
    """Owns every instance. Start it with ``await nursery.start(supervisor.run)``."""

    def __init__(
        self, config: Config, backends: Mapping[str, Backend], budget: adm.Budget | None = None
    ) -> None:
        self.config = config
        self.backends = backends
        self.services = {s.name: ServiceRuntime(s) for s in config.services}
        #: The host budget (derived from the machine where [host] leaves it open).
        self.budget = budget or host_budget(config.host)
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
        self.on_ready: Callable[[Instance], None] | None = None
        #: The ``stops`` counters of services a reload removed, by ``(service, reason, mode)``.
        self.retired_stops: collections.Counter[tuple[str, str, str]] = collections.Counter()

    # ---- running ---------------------------------------------------------------------

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

    # ---- reload ----------------------------------------------------------------------

    def reconfigure(self, config: Config, plan: ReloadPlan) -> None:
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
            self.budget = host_budget(config.host)
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
                inst.reloaded = True
                self._nursery.start_soon(self._evict_paused, rt, inst)
            elif inst is not None and svc.name in plan.replaced and \
                    inst.state in (State.STARTING, State.READY):
                inst.reloaded = True
                inst.stop_wanted.set()
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
                inst.reloaded = True
                if inst.state is State.SAVED:
                    await self._evict_paused(rt, inst)
                    if rt.instance is inst:
                        break  # it could not be released (logged): keep the runtime
                    continue
                if inst.state in (State.STARTING, State.READY, State.DRAINING):
                    inst.stop_wanted.set()
                await inst.released.wait()
            while rt.removed and rt.connections:
                await rt.no_connections.wait()
            if rt.removed and rt.instance is None and self.services.get(name) is rt:
                del self.services[name]
                for (reason, mode), count in rt.stops.items():
                    self.retired_stops[(name, reason, mode)] += count
                self.generation += 1
                log.info("%s: removed by a reload; its instance is stopped", name)
        except Exception:
            _limited.error("retire", "%s: unexpected error while removing it", name,
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

    # ---- requests from DNS and the proxy ----------------------------------------------

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
                failure = inst.error or BootFailed("boot failed")
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
            elif inst.checking is not None:
                await inst.checking.wait()  # a burst of reports shares one check
            else:
                inst.checking = trio.Event()
                try:
                    timeout = min(inst.service.health_timeout, UNREACHABLE_PROBE_TIMEOUT)
                    found = await self._probe(inst, timeout)
                    if found is not None and inst.state is State.READY:
                        self._condemn(
                            rt, inst, f"unreachable ({reason}) and its health probe failed: "
                            f"{found}", hung=self._alive(inst),
                        )
                finally:
                    inst.checking.set()
                    inst.checking = None
        if inst.condemned.is_set():
            await inst.released.wait()

    def stop(self, name: str) -> Instance | None:
        """Stop service ``name``'s instance now, in its stop mode, as if it had gone idle
        (open connections are cut); one that is booting stops once ready. Returns that
        instance (wait on its ``released``), or None when none is starting or ready."""
        inst = self.services[name].instance
        if inst is None or inst.state not in (State.STARTING, State.READY):
            return None
        inst.stop_wanted.set()
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

    def snapshot(self, name: str) -> ServiceSnapshot:
        """Service ``name``'s state as DNS needs it (the policy is in answers.py)."""
        rt = self.services[name]
        inst = rt.instance
        if inst is not None and inst.state is State.READY and not self._alive(inst):
            self._condemn(rt, inst, "its process is gone", hung=False)  # never hand it out
        if inst is None:
            return ServiceSnapshot(None, None, rt.retry_at)
        address = inst.handle.address if inst.handle is not None else None
        return ServiceSnapshot(inst.state, address, rt.retry_at)

    def answer(self, name: str) -> ServiceAnswer:
        """What DNS says about service ``name`` now (see answers.py)."""
        return answer_for(self.services[name].config, self.snapshot(name), trio.current_time())

    # ---- instance lifecycle ------------------------------------------------------------

    def _notify(self, rt: ServiceRuntime) -> None:
        self.generation += 1
        rt.changed.set()
        rt.changed = trio.Event()

    @staticmethod
    def _alive(inst: Instance) -> bool:
        """Whether the instance's process still exists; a backend error counts as alive (the
        health probe and wait_exited decide then)."""
        if inst.handle is None:
            return False
        try:
            return inst.handle.alive()
        except Exception:
            _limited.error("alive", "%s: alive() failed", inst.label, exc_info=True)
            return True

    async def _probe(self, inst: Instance, timeout: float) -> str | None:  # noqa: ASYNC109
        """One health probe, bounded by ``timeout`` (plus a margin for a slow backend), with
        every error of the backend turned into a reason. Cancelled when the instance stops
        being ready (its release must not share the backend's control channel with it)."""
        handle = inst.handle
        if handle is None:
            return "no handle"

        async def probe() -> str | None:
            with trio.move_on_after(timeout + PROBE_MARGIN):
                try:
                    return await handle.probe(timeout)
                except Exception as exc:
                    return f"probe error: {exc!r}"
            return f"no answer within {timeout:g} s"

        if inst.traffic is not None:
            inst.traffic.probe_started()  # its traffic is ours, not a client's (activity.py)

        async def leaving() -> None:
            await inst.condemned.wait()

        which, found = await first_of(probe, leaving)
        return found if which == 0 else None

    def _condemn(self, rt: ServiceRuntime, inst: Instance, cause: str, *, hung: bool) -> None:
        """Declare a ready (or draining) instance dead or hung, synchronously: from now on it
        is never handed out; its task stops watching and destroys it at once."""
        if inst.state not in (State.READY, State.DRAINING) or inst.condemned.is_set():
            return
        inst.cause = cause
        inst.hung = hung
        inst.fire(Event.DIED)
        if hung:
            rt.hung += 1
            log.warning("%s is hung: %s; destroying it", inst.label, cause)
        else:
            rt.deaths += 1
            log.warning("%s went away by itself: %s", inst.label, cause)
        inst.condemned.set()
        self._notify(rt)

    async def _health(self, rt: ServiceRuntime, inst: Instance) -> None:
        """Probe the ready instance every ``health_interval``; after ``health_failures``
        failures in a row, condemn it as hung and return."""
        svc = inst.service
        failures = 0
        while True:
            await trio.sleep(svc.health_interval)
            found = await self._probe(inst, svc.health_timeout)
            if found is None:
                failures = 0
                continue
            failures += 1
            log.info("%s: health probe %d of %d failed: %s", inst.label, failures,
                     svc.health_failures, found)
            if failures >= svc.health_failures:
                self._condemn(
                    rt, inst, f"{failures} health probes failed in a row (last: {found})",
                    hung=self._alive(inst),
                )
                return

    # ---- admission ---------------------------------------------------------------------

    def _room_for_unproven(self, rt: ServiceRuntime) -> bool:
        """Whether an unproven start of ``rt`` may start now: nothing queued before it, and
        room without evicting; a refusal is counted and logged."""
        svc = rt.config
        if len(self.queue):
            verdict, reason = adm.Verdict.UNPROVEN, "other starts are queued"
        else:
            decision = adm.decide(
                self.budget, self.pools, self._holders(), svc.name, adm.instance_memory(svc),
                svc.max_instances, int(getattr(svc.settings, "pool", 0)), proven=False,
            )
            verdict, reason = decision.verdict, decision.reason
        if verdict is adm.Verdict.START:
            return True
        outcome = "refused_unproven" if verdict is adm.Verdict.UNPROVEN else "refused_never"
        self.admission[outcome] += 1
        self._admission_log.log(
            logging.INFO, outcome, "not starting %s for an unproven lookup (UDP without a "
            "valid DNS cookie): %s", svc.name, reason)
        return False

    def _enqueue(self, rt: ServiceRuntime) -> Instance | None:
        """Queue a start of ``rt`` and pump the queue: it starts now if it fits."""
        name = rt.config.name
        was_empty = not len(self.queue)
        if not self.queue.push(name, trio.current_time()):
            self.admission["refused_full"] += 1
            self._admission_log.warning(
                "refused_full", "the admission queue is full (%d); not starting %s",
                self.queue.bound, name)
            return None
        rt.numbers += 1
        inst = rt.queued = Instance(rt.config, rt.numbers)
        inst.queued_at = trio.current_time()
        if was_empty:
            self._queue_grew.set()
        self._pump()
        if rt.queued is inst:
            self.admission["queued"] += 1
            self._notify(rt)
            return inst
        return rt.instance if inst.refused is None else None

    def _pump(self) -> None:
        """Start what the queue's head lets start, in order; evict for the head when that
        makes it fit; stop at the first start that must wait."""
        while (name := self.queue.head()) is not None:
            rt = self.services[name]
            svc = rt.config
            if self._closing or self._nursery is None:
                return
            decision = adm.decide(
                self.budget, self.pools, self._holders(), name, adm.instance_memory(svc),
                svc.max_instances, int(getattr(svc.settings, "pool", 0)),
            )
            if decision.verdict is adm.Verdict.START:
                self.queue.remove(name)
                inst, rt.queued = rt.queued, None
                self.admission["admitted"] += 1
                self._start(rt, inst)
            elif decision.verdict is adm.Verdict.REFUSE:
                self.admission["refused_never"] += 1
                self._refuse(rt, decision.reason)
            else:
                for ev in decision.evictions:
                    self._evict(self.services[ev.service], ev.mode, name)
                return

    def _holders(self) -> list[adm.Holder]:
        """Every instance that holds part of the host budget, for admission.decide."""
        out = []
        for rt in self.services.values():
            inst = rt.instance
            if inst is None or inst.state is State.STOPPED:
                continue
            svc = rt.config
            state = inst.state
            mode = inst.evict_mode or inst.service.stop
            if state is State.STARTING:
                kind = adm.Kind.BOOTING
            elif state is State.READY and not inst.stop_wanted.is_set():
                kind = adm.Kind.RUNNING
            elif state is State.SAVED:
                if inst.evict_mode is not None:
                    kind = adm.Kind.LEAVING
                elif inst.handle is not None and self._alive(inst):
                    kind = adm.Kind.PAUSED
                else:
                    continue  # saved to disk: holds nothing
            else:  # draining, stopping, failed (being released), or told to stop
                kind = adm.Kind.LEAVING
                if inst.condemned.is_set() or state is State.FAILED or self._closing:
                    mode = "destroy"
            out.append(adm.Holder(
                svc.name, kind, adm.instance_memory(inst.service),
                idle=rt.connections == 0 and not self._traffic_in_use(inst),
                pinned=svc.pinned, priority=svc.priority, last_active=rt.last_activity,
                stop=svc.stop, frees=mode in adm.FREEING,
            ))
        return out

    def _evict(self, rt: ServiceRuntime, mode: str, why: str) -> None:
        inst = rt.instance
        if inst is None or inst.evict_mode is not None:
            return
        inst.evict_mode = mode
        self.admission["evicted"] += 1
        self._admission_log.log(
            logging.INFO, "evicted", "evicting %s (%s, idle for %.1f s) to make room for %s",
            inst.label, mode, trio.current_time() - rt.last_activity, why)
        if inst.state is State.READY:
            inst.stop_wanted.set()
        elif inst.state is State.SAVED and self._nursery is not None:
            self._nursery.start_soon(self._evict_paused, rt, inst)

    async def _evict_paused(self, rt: ServiceRuntime, inst: Instance) -> None:
        """Destroy a paused instance (evicted: a pause frees nothing)."""
        try:
            inst.saved_watch.cancel()
            await inst.unwatched.wait()
            if inst.state is State.SAVED and rt.instance is inst:
                inst.fire(Event.STOP)
                self._notify(rt)
                with trio.CancelScope(shield=True):
                    await self._release(rt, inst, None)
        except Exception:
            _limited.error("evict", "%s: unexpected error while evicting it", inst.label,
                           exc_info=True)

    def _refuse(self, rt: ServiceRuntime, reason: str) -> None:
        """Take ``rt``'s start out of the queue, failing whoever waits for it."""
        self.queue.remove(rt.config.name)
        inst, rt.queued = rt.queued, None
        if inst is not None:
            inst.queued_at = math.nan
            inst.refused = AdmissionRefused(f"{rt.config.name} not started: {reason}")
            if not self._closing:
                self._admission_log.warning("refused", "%s", inst.refused)
        self._notify(rt)

    def _refuse_all(self, reason: str) -> None:
        while (name := self.queue.head()) is not None:
            self.admission["refused_closing"] += 1
            self._refuse(self.services[name], reason)

    async def _expire_queue(self) -> None:
        """Refuse starts that waited in the queue longer than ``queue_timeout``."""
        while True:
            timeout = self.config.host.queue_timeout  # a reload may change it
            self._queue_grew = trio.Event()
            with trio.move_on_at(self.queue.next_expiry(timeout)):
                await self._queue_grew.wait()
            for name in self.queue.expired(trio.current_time(), timeout):
                self.admission["refused_timeout"] += 1
                self._refuse(self.services[name], f"no room on the host within the queue "
                             f"timeout of {timeout:g} s")

    def _start(self, rt: ServiceRuntime, fresh: Instance | None = None) -> Instance:
        assert self._nursery is not None
        saved = rt.instance if rt.instance is not None and rt.instance.state is State.SAVED else None
        if fresh is not None:
            fresh.queued_at = math.nan
            fresh.service = rt.config  # queued before a reload: boot the current settings
        if saved is not None:
            inst = saved  # resumed; the stand-in's waiters find it
            # A new run: nothing asked of the last one (a requested stop, an eviction that
            # was about to take it) carries over.
            inst.new_run()
        elif fresh is not None:
            inst = fresh
        else:
            rt.numbers += 1
            inst = Instance(rt.config, rt.numbers)
        inst.saved_watch.cancel()  # a resume: the task below waits until the watch is off
        inst.fire(Event.START)
        inst.started_at = trio.current_time()
        rt.instance = inst
        rt.restart_wanted = rt.restart_proven = False
        rt.boots += 1
        self._notify(rt)
        self._nursery.start_soon(self._run_instance, rt, inst, saved is not None)
        return inst

    async def _run_instance(self, rt: ServiceRuntime, inst: Instance, resume: bool) -> None:
        died: str | None = None
        try:
            try:
                await inst.unwatched.wait()  # the saved instance's watch shares its console
                await self._boot(rt, inst, resume)
            except BootFailed as exc:
                self._boot_failed(rt, inst, exc)
                return
            except Exception as exc:
                # A bug in a backend must not take the daemon down: fail this boot loudly.
                _limited.error("boot-bug", "%s: unexpected error while booting", inst.label,
                               exc_info=True)
                self._boot_failed(rt, inst, BootFailed(f"internal error: {exc!r}"))
                return
            inst.fire(Event.READY)
            inst.ready_at = trio.current_time()
            # The idle clock starts when the instance can first be used, not at the lookup.
            rt.last_activity = max(rt.last_activity, inst.ready_at)
            rt.failures = 0
            rt.readies += 1
            log.info(
                "%s ready in %.1f ms (%s)", inst.label,
                (inst.ready_at - inst.started_at) * 1000, inst.handle.describe() if inst.handle else "",
            )
            if self.on_ready is not None:
                self.on_ready(inst)
            self._notify(rt)
            self._pump()  # a boot slot is free
            died = await self._watch(rt, inst)
            if died is not None:
                self._condemn(rt, inst, died, hung=False)
                died = inst.cause or died
            elif inst.condemned.is_set():
                died = inst.cause or "condemned"
            elif inst.evict_mode is not None:
                inst.fire(Event.STOP)
                self._notify(rt)
            elif inst.stop_wanted.is_set():
                log.info("%s: stopping %s (%s)", inst.label,
                         "for a reload" if inst.reloaded else "on request",
                         "destroy" if inst.reloaded else inst.service.stop)
                inst.fire(Event.STOP)
                self._notify(rt)
            else:
                rt.idle_stops += 1
                log.info(
                    "%s idle for %g s; stopping (%s)", inst.label, rt.config.idle_timeout,
                    inst.service.stop,
                )
                inst.fire(Event.STOP)
                self._notify(rt)
        except Exception:
            # A bug here must end only this instance, never the daemon: log it and release.
            _limited.error("instance-task", "%s: unexpected error; releasing it", inst.label,
                           exc_info=True)
            died = died or "internal error"
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._release(rt, inst, died)
                except Exception:
                    _limited.error("release", "%s: unexpected error while releasing it",
                                   inst.label, exc_info=True)
                finally:
                    inst.released.set()

    async def _boot(self, rt: ServiceRuntime, inst: Instance, resume: bool) -> None:
        """Start the instance and wait until it is ready, bounded by the boot timeout.
        BootFailed (BootTimeout) with the cause; the backend's own errors are translated."""
        svc = inst.service
        backend = self.backends[svc.backend]
        with trio.move_on_after(svc.boot_timeout):
            saved = inst.handle if resume else None
            for attempt in (1, 2):
                with map_errors("cannot start it"):
                    inst.handle = await backend.start(svc, inst.number, saved)
                handle = inst.handle
                try:
                    which, exited = await first_of(partial(_ready, handle), handle.wait_exited)
                except BootFailed as exc:
                    failure = exc
                else:
                    if which == 0:
                        return
                    failure = BootFailed(f"{exited} before it was ready")
                # A saved state that cannot be restored is deleted and the same request
                # boots afresh, once: it must not fail every boot (and back off) for good.
                discarded = handle.discard_restore() if attempt == 1 else None
                if discarded is None:
                    raise failure
                log.warning("%s: restoring the saved state %s failed: %s; deleted it, booting "
                            "afresh", inst.label, discarded, failure)
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_MARGIN):
                    with contextlib.suppress(Exception):
                        await handle.stop("destroy", 0.0)
                inst.handle = None
                saved = None
        raise BootTimeout(f"not ready within the boot timeout of {svc.boot_timeout:g} s")

    def _boot_failed(self, rt: ServiceRuntime, inst: Instance, exc: BootFailed) -> None:
        svc = rt.config
        inst.error = exc
        inst.fire(Event.FAIL)
        rt.failures += 1
        rt.boot_failures += 1
        if isinstance(exc, BootTimeout):
            rt.boot_timeouts += 1
        delay = backoff_delay(rt.failures, svc.retry_backoff, svc.retry_backoff_max)
        rt.retry_at = trio.current_time() + delay
        rt.last_error = f"{inst.label} failed to boot: {exc}"
        rt.last_error_at = trio.current_time()
        log.error("%s; next attempt in %g s at the earliest", rt.last_error, delay)
        self._notify(rt)
        self._pump()  # a boot slot is free

    async def _watch(self, rt: ServiceRuntime, inst: Instance) -> str | None:
        """Wait until the instance dies (return how), is condemned (dead or hung: return
        None with ``inst.condemned`` set) or the service is idle (return None)."""
        assert inst.handle is not None
        handle = inst.handle

        async def health() -> None:
            await self._health(rt, inst)
            await trio.sleep_forever()  # condemned: the wait on the event below wins

        # Handed over, clients talk to the instance directly: its backend sees their traffic.
        if handle.address is not None and rt.config.answer != "proxy":
            inst.traffic = TrafficWatch(handle.traffic_noise, handle.probe_traffic)
        try:
            which, value = await first_of(
                handle.wait_exited, lambda: self._until_idle(rt, inst), inst.condemned.wait,
                health, inst.stop_wanted.wait,
            )
        finally:
            inst.traffic = None
        return value if which == 0 else None

    async def _watch_saved(self, rt: ServiceRuntime, inst: Instance, handle: Handle) -> None:
        """Watch a SAVED instance that still has a process (a paused VM) until it is started
        again (the scope is cancelled) or dies: then release it (files, addresses) so that
        the next start boots a fresh one."""
        try:
            with inst.saved_watch:
                how = await handle.wait_exited()
                if inst.state is State.SAVED and inst.handle is handle:
                    rt.deaths += 1
                    log.warning("%s went away while %s: %s; cleaning up", inst.label, inst.state,
                                how)
                    inst.fire(Event.STOP)
                    with trio.CancelScope(shield=True):
                        await self._release(rt, inst, how)
        except Exception:
            _limited.error("saved-watch", "%s: unexpected error while watching it", inst.label,
                           exc_info=True)
        finally:
            inst.unwatched.set()

    async def _until_idle(self, rt: ServiceRuntime, inst: Instance) -> None:
        while True:
            if rt.connections:
                await rt.no_connections.wait()
                continue
            watch = inst.traffic
            if watch is not None and watch.due(trio.current_time()):
                await self._sample_traffic(rt, inst, watch)
            deadline = rt.last_activity + rt.config.idle_timeout
            if trio.current_time() >= deadline and (watch is None or watch.judged(deadline)):
                return
            wake = deadline
            if watch is not None and watch.active:
                # Sample on; past the deadline, one more sample says whether it is idle.
                wake = min(wake, watch.next_sample) if trio.current_time() < deadline \
                    else watch.next_sample
            with trio.move_on_at(wake):
                await rt.reconfigured.wait()  # a reload may have changed idle_timeout

    async def _sample_traffic(self, rt: ServiceRuntime, inst: Instance, watch: TrafficWatch) -> None:
        """One sample of a handed-over instance's traffic counter (activity.py): a moved
        counter is activity now; one that cannot be read is unknown, logged once per instance.
        When the instance stops being in use while a start waits, the queue is pumped (it
        may be evicted now), as when a last connection closes."""
        handle = inst.handle
        if handle is None:
            return
        was_in_use = watch.busy
        try:
            with trio.move_on_after(TRAFFIC_TIMEOUT) as scope:
                value = await handle.traffic()
            if scope.cancelled_caught:
                raise TimeoutError(f"no answer within {TRAFFIC_TIMEOUT:g} s")
        except Exception as exc:
            if not watch.logged:
                watch.logged = True
                _limited.warning(
                    "traffic", "%s: cannot read its traffic (%s); judging it by lookups and "
                    "proxied traffic alone until it can", inst.label, exc)
            watch.failed(trio.current_time())
            rt.traffic_samples["unknown"] += 1
        else:
            now = trio.current_time()
            moved = watch.note(value, now)
            if moved:
                rt.last_activity = max(rt.last_activity, now)
            if value is not None:
                rt.traffic_samples["moved" if moved else "still"] += 1
        if was_in_use and not watch.busy and len(self.queue):
            self._pump()

    @staticmethod
    def _traffic_in_use(inst: Instance) -> bool:
        """Whether a handed-over instance's traffic moved within the last few seconds."""
        return inst.traffic is not None and inst.traffic.in_use(trio.current_time())

    async def _release(self, rt: ServiceRuntime, inst: Instance, died: str | None) -> None:
        """Runs shielded: stop the instance through its backend and settle its state."""
        svc = inst.service
        if inst.state in (State.STARTING, State.READY, State.DRAINING):
            inst.fire(Event.STOP)  # cancelled: the daemon is stopping
            self._notify(rt)
        kept = False
        if inst.handle is not None:
            # A dead or failed instance only needs its resources released; on the way out
            # nothing is kept, since a paused or saved instance would outlive the daemon.
            # A reload's stop destroys: a removed or replaced service's state is of no use.
            plain = died is not None or inst.state is State.FAILED or self._closing \
                or inst.reloaded
            mode = "destroy" if plain else inst.evict_mode or svc.stop
            if inst.state is not State.FAILED:
                reason = ("hung" if inst.hung else "died") if died is not None \
                    else "shutdown" if self._closing \
                    else "reload" if inst.reloaded \
                    else "evicted" if inst.evict_mode is not None \
                    else "requested" if inst.stop_wanted.is_set() else "idle"
                rt.stops[(reason, mode)] += 1
            # A dead or hung instance is killed at once: it would not stop politely.
            grace = 0.0 if died is not None else getattr(svc.settings, "grace", 5.0)
            with trio.move_on_after(grace + STOP_MARGIN) as scope:
                try:
                    kept = await inst.handle.stop(mode, grace)
                except Exception:
                    log.exception("%s: stopping it failed", inst.label)
            if scope.cancelled_caught:
                log.error("%s: did not stop within %g s", inst.label, grace + STOP_MARGIN)
        if inst.state is State.STOPPING:
            inst.fire(Event.SAVED if kept else Event.STOPPED)
            log.info("%s %s", inst.label, "saved" if kept else "stopped")
        if not kept:
            inst.handle = None
        if rt.instance is inst and inst.state is not State.SAVED:
            rt.instance = None
        if kept and inst.handle is not None and self._nursery is not None and not self._closing \
                and self._alive(inst):
            # A paused instance is still a process: if it dies, clean up after it at once.
            inst.saved_watch = trio.CancelScope()
            inst.unwatched = trio.Event()
            self._nursery.start_soon(self._watch_saved, rt, inst, inst.handle)
        inst.evict_mode = None  # a saved instance resumed later is not being evicted
        self._notify(rt)
        if rt.restart_wanted and not self._closing and self._nursery is not None:
            rt.restart_wanted = False
            proven, rt.restart_proven = rt.restart_proven, False
            self.request(rt.config.name, proven=proven)
        self._pump()  # its share of the host is free
