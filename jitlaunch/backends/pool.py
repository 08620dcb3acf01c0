"""Warm pools, shared by the VM backends: per service, N instances booted to READY and then
paused, taken by a start (which resumes one) and refilled in the background.

The backend supplies how to make a member (boot it, wait for READY, pause it; BootFailed or
any error if it cannot) and which services want how many. A member that fails to boot is
tried again after the service's retry backoff (doubling up to its maximum), not only after a
take. Nothing that goes wrong with one member ends the refill loop (or the daemon).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from ..backoff import backoff_delay
from ..config import ServiceConfig
from ..errors import BootFailed
from .base import Handle

#: A taken pool member is refilled this long after, so that the new member's boot (tens of
#: ms of host CPU) does not compete with the instance just woken for its first requests.
POOL_REFILL_DELAY = 0.25

H = TypeVar("H", bound=Handle)


class WarmPools(Generic[H]):
    """The pools of one backend. ``size(svc)`` is a service's pool size (0: none),
    ``fillable(svc)`` whether it can be filled now (its image exists), ``make(svc)`` a new
    paused member."""

    def __init__(
        self, services: list[ServiceConfig], *, size: Callable[[ServiceConfig], int],
        fillable: Callable[[ServiceConfig], bool],
        make: Callable[[ServiceConfig], Awaitable[H]], log: logging.Logger,
    ) -> None:
        self.services = services
        self.pools: dict[str, list[H]] = {s.name: [] for s in services}
        self._size = size
        self._fillable = fillable
        self._make = make
        self._log = log
        self._refill = trio.Event()

    def __repr__(self) -> str:
        return "<WarmPools " + " ".join(f"{k}={len(v)}" for k, v in self.pools.items()) + ">"

    def take(self, service: str) -> H | None:
        """The oldest member of ``service``'s pool (the caller checks it is alive and resumes
        it), or None; the pool refills in the background."""
        pool = self.pools.get(service)
        if not pool:
            return None
        self._refill.set()
        return pool.pop(0)

    def drain(self) -> list[H]:
        """Every member, removed from the pools (for the backend's close)."""
        members = [h for pool in self.pools.values() for h in pool]
        for pool in self.pools.values():
            pool.clear()
        return members

    async def keep(self) -> None:
        """Keep every service's pool full; runs forever."""
        failures: dict[str, int] = {}
        retry_at: dict[str, float] = {}
        while True:
            for svc in self.services:
                pool = self.pools[svc.name]
                if retry_at.get(svc.name, -math.inf) > trio.current_time():
                    continue
                while len(pool) < self._size(svc) and self._fillable(svc):
                    try:
                        handle = await self._make(svc)
                    except Exception as exc:
                        failures[svc.name] = n = failures.get(svc.name, 0) + 1
                        delay = backoff_delay(n, svc.retry_backoff, svc.retry_backoff_max)
                        retry_at[svc.name] = trio.current_time() + delay
                        self._log.error(
                            "%s: cannot fill the warm pool: %s; next attempt in %g s",
                            svc.name, exc, delay, exc_info=not isinstance(exc, BootFailed))
                        break
                    failures.pop(svc.name, None)
                    pool.append(handle)
                    self._log.info("%s: a warm pool member is ready (%s)", svc.name,
                                   handle.describe())
            self._refill = trio.Event()
            with trio.move_on_at(min(retry_at.values(), default=math.inf)):
                await self._refill.wait()
                await trio.sleep(POOL_REFILL_DELAY)
            retry_at = {k: v for k, v in retry_at.items() if v > trio.current_time()}

    def status_lines(self) -> list[str]:
        lines = []
        for svc in self.services:
            size = self._size(svc)
            if size:
                members = " ".join(f"pid={h.pid}" for h in self.pools[svc.name])
                lines.append(f"{svc.name}: warm pool {len(self.pools[svc.name])} of {size}"
                             f"{': ' + members if members else ''}")
        return lines
