"""What every part of the supervisor shares: its state, and the steps one part asks of
another. :class:`~jitlaunch.lifecycle.supervisor.Supervisor` is the one concrete class; it
combines the admission applier (admit.py), the instance course (course.py) and the public
API (supervisor.py). Rules for all of them:

* Decisions are synchronous (no checkpoint between reading state and changing it); the I/O
  (backend calls) happens afterwards, in the instance's own task, shielded when it releases.
* Every change of an instance's or a service's state is followed by :meth:`_notify`, which
  wakes waiters and bumps :attr:`generation` (DNS answer caches key on it).
* Only these classes change :class:`~.runtime.Instance` and :class:`~.runtime.ServiceRuntime`;
  everyone else reads the frozen snapshots of status.py.
"""

from __future__ import annotations

import abc
import collections
import logging
from collections.abc import Callable, Mapping

import trio

from ..backends.base import Backend
from ..config import Config
from ..logutil import LimitedLog
from . import admission as adm
from .runtime import Instance, ServiceRuntime

log = logging.getLogger("jitlaunch.supervisor")
limited = LimitedLog(log)


class SupervisorCore(abc.ABC):
    """The supervisor's shared state (set by ``Supervisor.__init__``) and shared steps."""

    config: Config
    backends: Mapping[str, Backend]
    services: dict[str, ServiceRuntime]
    budget: adm.Budget
    pools: adm.Usage
    queue: adm.AdmissionQueue
    wake: adm.WakeLimiter
    admission: collections.Counter[str]
    generation: int
    on_ready: Callable[[Instance], None] | None
    retired_stops: collections.Counter[tuple[str, str, str]]
    _queue_grew: trio.Event
    _admission_log: LimitedLog
    _nursery: trio.Nursery | None
    _closing: bool

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
            limited.error("alive", "%s: alive() failed", inst.label, exc_info=True)
            return True

    @staticmethod
    def _traffic_in_use(inst: Instance) -> bool:
        """Whether a handed-over instance's traffic moved within the last few seconds."""
        return inst.run.traffic is not None and inst.run.traffic.in_use(trio.current_time())

    @abc.abstractmethod
    def request(self, name: str, source: str | None = None, *,
                proven: bool = True) -> Instance | None:
        """See :meth:`Supervisor.request`."""

    @abc.abstractmethod
    def _pump(self) -> None:
        """Start what the admission queue lets start (admit.py)."""

    @abc.abstractmethod
    def _start(self, rt: ServiceRuntime, fresh: Instance | None = None) -> Instance:
        """Start (or resume) ``rt``'s instance in a task of its own (course.py)."""

    @abc.abstractmethod
    async def _release(self, rt: ServiceRuntime, inst: Instance, died: str | None) -> None:
        """Stop the instance through its backend and settle its state (course.py)."""
