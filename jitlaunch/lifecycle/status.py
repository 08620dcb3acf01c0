"""Frozen snapshots of the supervisor, as trio's ``statistics()`` returns them: what
metrics, the control socket, systemd's STATUS line, the proxy and the tests read, instead of
the supervisor's live records. A snapshot is taken synchronously on the event loop (the
records change there) and never changes afterwards, so it may be read in a worker thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ServiceConfig
from . import admission as adm
from .runtime import Instance, ServiceRuntime
from .state import State


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    label: str
    #: Its state in the table, and as people read it (``queued``, ``paused`` included).
    state: State
    shown: str
    wake: str
    pid: int | None
    address: str | None
    #: trio times; NaN when it has not happened.
    started_at: float
    ready_at: float

    @classmethod
    def of(cls, inst: Instance) -> InstanceStatus:
        handle = inst.handle
        return cls(
            inst.label, inst.state, inst.shown_state,
            handle.wake if handle is not None else "cold",
            handle.pid if handle is not None else None,
            handle.address if handle is not None else None,
            inst.started_at, inst.ready_at,
        )

    @property
    def boot_time(self) -> float:
        """Seconds from its start to READY (NaN before)."""
        return self.ready_at - self.started_at


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One service: its config, its current instance and its counters."""

    config: ServiceConfig
    instance: InstanceStatus | None
    connections: int
    #: trio times (``-inf``: never).
    last_activity: float
    last_error: str | None
    last_error_at: float
    retry_at: float
    #: Failed boots in a row (the backoff's exponent).
    failures: int
    boots: int
    boot_failures: int
    boot_timeouts: int
    readies: int
    deaths: int
    hung: int
    idle_stops: int
    unreachable_reports: int
    #: Instances stopped by ``(reason, mode)``.
    stops: tuple[tuple[tuple[str, str], int], ...]
    #: Traffic samples of handed-over instances: moved, still, unknown.
    traffic_samples: tuple[int, int, int]
    removed: bool

    @classmethod
    def of(cls, rt: ServiceRuntime) -> ServiceStatus:
        inst = rt.instance
        samples = rt.traffic_samples
        return cls(
            rt.config, InstanceStatus.of(inst) if inst is not None else None, rt.connections,
            rt.last_activity, rt.last_error, rt.last_error_at, rt.retry_at, rt.failures,
            rt.boots, rt.boot_failures, rt.boot_timeouts, rt.readies, rt.deaths, rt.hung,
            rt.idle_stops, rt.unreachable_reports, tuple(rt.stops.items()),
            (samples["moved"], samples["still"], samples["unknown"]), rt.removed,
        )

    @property
    def name(self) -> str:
        return self.config.name

    def backing_off(self, now: float) -> float | None:
        """Seconds left of the backoff after a failed boot, or None."""
        return self.retry_at - now if self.retry_at > now and math.isfinite(self.retry_at) else None


@dataclass(frozen=True, slots=True)
class SupervisorStatus:
    """Every service, and the host's admission figures."""

    services: tuple[ServiceStatus, ...]
    #: The ``stops`` of services a reload removed, by ``(service, reason, mode)``.
    retired_stops: tuple[tuple[tuple[str, str, str], int], ...]
    admission: tuple[tuple[str, int], ...]
    queued: int
    budget: adm.Budget
    #: Bumped on every change of any service's state.
    generation: int


__all__ = ["InstanceStatus", "ServiceStatus", "SupervisorStatus"]
