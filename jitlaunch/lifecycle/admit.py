"""The admission applier: admission.py decides (the host budget, eviction, wake limits),
this applies its decisions to the supervisor's services.

Every start goes through a bounded FIFO queue of services; the head starts when it fits the
host budget, after evicting idle instances when that makes it fit, and otherwise waits
there, bounded by ``queue_timeout`` (then AdmissionRefused). The queue is pumped whenever room
may have appeared: a release, a boot's end, a last connection closed, an instance no longer
in use. Only a proven request is queued and may evict; an unproven one starts only into
free room, now, with nobody queued.
"""

from __future__ import annotations

import logging
import math

import trio

from ..errors import AdmissionRefused
from . import admission as adm
from .core import SupervisorCore, limited
from .runtime import Instance, ServiceRuntime
from .state import Event, State


class Admitting(SupervisorCore):
    """The admission part of the supervisor (a base class of it)."""

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
            mode = inst.run.evict_mode or inst.service.stop
            if state is State.STARTING:
                kind = adm.Kind.BOOTING
            elif state is State.READY and not inst.run.stop_wanted.is_set():
                kind = adm.Kind.RUNNING
            elif state is State.SAVED:
                if inst.run.evict_mode is not None:
                    kind = adm.Kind.LEAVING
                elif inst.handle is not None and self._alive(inst):
                    kind = adm.Kind.PAUSED
                else:
                    continue  # saved to disk: holds nothing
            else:  # draining, stopping, failed (being released), or told to stop
                kind = adm.Kind.LEAVING
                if inst.run.condemned.is_set() or state is State.FAILED or self._closing:
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
        if inst is None or inst.run.evict_mode is not None:
            return
        inst.run.evict_mode = mode
        self.admission["evicted"] += 1
        self._admission_log.log(
            logging.INFO, "evicted", "evicting %s (%s, idle for %.1f s) to make room for %s",
            inst.label, mode, trio.current_time() - rt.last_activity, why)
        if inst.state is State.READY:
            inst.run.stop_wanted.set()
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
            limited.error("evict", "%s: unexpected error while evicting it", inst.label,
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
