"""The supervisor's records: an :class:`Instance` (its state in the table, its handle, and
the :class:`Run` record of what was asked of its current run) and a :class:`ServiceRuntime`
(a service's current instance, activity, backoff and counters). No I/O but
:func:`read_host`; only the supervisor changes them (instance state only through
:meth:`Instance.fire`, i.e. the table in state.py). Everything else reads them through the
supervisor's snapshots (status.py).
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field

import trio

from ..backends.base import Handle
from ..config import HostConfig, ServiceConfig
from ..errors import AdmissionRefused, BootFailed
from . import admission as adm
from .activity import TrafficWatch
from .state import Event, State, next_state


def host_budget(host: HostConfig, meminfo: str, cpus: int) -> adm.Budget:
    """The host budget: ``[host]`` as configured, the rest derived from this machine's
    /proc/meminfo text and CPU count (read by the caller: see :func:`read_host`)."""
    return adm.derive_budget(host, meminfo, cpus)


def read_host() -> tuple[str, int]:
    """This machine's /proc/meminfo text ("" where it cannot be read) and usable CPUs."""
    try:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    except OSError:
        meminfo = ""
    return meminfo, len(os.sched_getaffinity(0))


@dataclass(eq=False)
class Run:
    """What was asked of one run of an instance (a boot, a resume, a restore) and how it
    ended. Each start makes a new one (:meth:`Instance.new_run`): nothing here outlives its
    run, so no flag of an earlier run decides what a later one does. The state itself is in
    the table (state.py); this holds the why."""

    #: Why its boot failed.
    error: BootFailed | None = None
    #: Why a ready instance was declared dead or hung (set once, when it is condemned).
    cause: str | None = None
    hung: bool = False
    #: Set when the instance is condemned: its task stops watching and releases it.
    condemned: trio.Event = field(default_factory=trio.Event)
    #: Set by a requested stop (``jitlaunch stop``, a reload's replacement, an eviction of a
    #: ready instance): stop it now, as if idle.
    stop_wanted: trio.Event = field(default_factory=trio.Event)
    #: Set once this run's resources have been released (its task is done with it).
    released: trio.Event = field(default_factory=trio.Event)
    #: Set while report_unreachable checks it: further reports wait for that check.
    checking: trio.Event | None = None
    #: Set when admission evicts it: the stop mode to use (frees its share of the host).
    evict_mode: str | None = None
    #: Set when a reload removed its service or replaced it: stop it for good (destroy).
    reloaded: bool = False
    #: While it is ready with its address handed over: samples of its traffic (activity.py).
    traffic: TrafficWatch | None = None


class Instance:
    """One instance of a service, from its start to its release.

    An instance saved by a pause or a save is started again by a later request: each start
    (a boot, a resume, a restore) begins a new *run*. Everything that was asked of a run or
    says how it ended (a requested stop, a condemnation, an eviction, a reload's stop, its
    release) belongs to that run alone, in :attr:`run`, which :meth:`new_run` replaces: what
    an earlier run was asked (a stop before a pause, say) never decides what a later one does.
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
        #: What was asked of the current run and how it ended.
        self.run = Run()

    def new_run(self) -> None:
        """Forget what was asked of the previous run: called by each start."""
        self.run = Run()

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
