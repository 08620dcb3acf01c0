"""The course of one instance, in a task of its own: boot (bounded by the boot timeout;
a saved state that cannot be restored is discarded and booted afresh once), ready, watched
(its exit, its health probes, its idle clock and, when handed over, its traffic), stopped in
its mode, released. Runs that end are settled through the state table only.

* A failed boot is logged once, fails every waiter with BootFailed, and starts an
  exponential backoff (``retry_backoff`` doubling up to ``retry_backoff_max``).
* An instance that goes away by itself is noticed at once (the backend's ``wait_exited``),
  released, and the next request starts a new one; one whose health probes fail
  ``health_failures`` times in a row is condemned as hung and destroyed.
* Release always runs shielded and bounded (``grace`` + :data:`STOP_MARGIN`), so a cancelled
  daemon never leaves an instance; a dead or hung one is killed without a grace.
* A paused instance (kept, its process alive) is watched: if it dies, it is cleaned up.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import trio

from ..aio import first_of
from ..backends.base import Handle, map_errors
from ..backoff import backoff_delay
from ..errors import BootFailed, BootTimeout
from .activity import TrafficWatch
from .core import SupervisorCore, limited, log
from .runtime import Instance, ServiceRuntime
from .state import Event, State

#: Extra time, beyond a service's stop grace, that a stop may take before we give up on it.
STOP_MARGIN = 10.0
#: The longest health probe :meth:`Supervisor.report_unreachable` waits for.
UNREACHABLE_PROBE_TIMEOUT = 1.0
#: Extra time a backend's probe may take beyond its timeout before we stop waiting.
PROBE_MARGIN = 0.5
#: The longest one read of an instance's traffic counter may take (else: unknown).
TRAFFIC_TIMEOUT = 5.0


async def _ready(handle: Handle) -> None:
    with map_errors("readiness check failed"):
        await handle.wait_ready()


class InstanceCourse(SupervisorCore):
    """The per-instance part of the supervisor (a base class of it)."""

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
                limited.error("boot-bug", "%s: unexpected error while booting", inst.label,
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
                died = inst.run.cause or died
            elif inst.run.condemned.is_set():
                died = inst.run.cause or "condemned"
            elif inst.run.evict_mode is not None:
                inst.fire(Event.STOP)
                self._notify(rt)
            elif inst.run.stop_wanted.is_set():
                log.info("%s: stopping %s (%s)", inst.label,
                         "for a reload" if inst.run.reloaded else "on request",
                         "destroy" if inst.run.reloaded else inst.service.stop)
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
            limited.error("instance-task", "%s: unexpected error; releasing it", inst.label,
                           exc_info=True)
            died = died or "internal error"
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._release(rt, inst, died)
                except Exception:
                    limited.error("release", "%s: unexpected error while releasing it",
                                   inst.label, exc_info=True)
                finally:
                    inst.run.released.set()

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
        inst.run.error = exc
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
        None with ``inst.run.condemned`` set) or the service is idle (return None)."""
        assert inst.handle is not None
        handle = inst.handle

        async def health() -> None:
            await self._health(rt, inst)
            await trio.sleep_forever()  # condemned: the wait on the event below wins

        # Handed over, clients talk to the instance directly: its backend sees their traffic.
        if handle.address is not None and rt.config.answer != "proxy":
            inst.run.traffic = TrafficWatch(handle.traffic_noise, handle.probe_traffic)
        try:
            which, value = await first_of(
                handle.wait_exited, lambda: self._until_idle(rt, inst), inst.run.condemned.wait,
                health, inst.run.stop_wanted.wait,
            )
        finally:
            inst.run.traffic = None
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
            limited.error("saved-watch", "%s: unexpected error while watching it", inst.label,
                           exc_info=True)
        finally:
            inst.unwatched.set()

    async def _until_idle(self, rt: ServiceRuntime, inst: Instance) -> None:
        while True:
            if rt.connections:
                await rt.no_connections.wait()
                continue
            watch = inst.run.traffic
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
                limited.warning(
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
                or inst.run.reloaded
            mode = "destroy" if plain else inst.run.evict_mode or svc.stop
            if inst.state is not State.FAILED:
                reason = ("hung" if inst.run.hung else "died") if died is not None \
                    else "shutdown" if self._closing \
                    else "reload" if inst.run.reloaded \
                    else "evicted" if inst.run.evict_mode is not None \
                    else "requested" if inst.run.stop_wanted.is_set() else "idle"
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
        inst.run.evict_mode = None  # a saved instance resumed later is not being evicted
        self._notify(rt)
        if rt.restart_wanted and not self._closing and self._nursery is not None:
            rt.restart_wanted = False
            proven, rt.restart_proven = rt.restart_proven, False
            self.request(rt.config.name, proven=proven)
        self._pump()  # its share of the host is free

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

        if inst.run.traffic is not None:
            inst.run.traffic.probe_started()  # its traffic is ours, not a client's (activity.py)

        async def leaving() -> None:
            await inst.run.condemned.wait()

        which, found = await first_of(probe, leaving)
        return found if which == 0 else None

    def _condemn(self, rt: ServiceRuntime, inst: Instance, cause: str, *, hung: bool) -> None:
        """Declare a ready (or draining) instance dead or hung, synchronously: from now on it
        is never handed out; its task stops watching and destroys it at once."""
        if inst.state not in (State.READY, State.DRAINING) or inst.run.condemned.is_set():
            return
        inst.run.cause = cause
        inst.run.hung = hung
        inst.fire(Event.DIED)
        if hung:
            rt.hung += 1
            log.warning("%s is hung: %s; destroying it", inst.label, cause)
        else:
            rt.deaths += 1
            log.warning("%s went away by itself: %s", inst.label, cause)
        inst.run.condemned.set()
        self._notify(rt)
