"""Which address an instance of a service gets, and when a released one may go to another.

An instance's own address is handed out in DNS answers (the hand-over) with the service's
TTL, so a client may keep using it that long after the last answer, which can be as late as
the instance's release. A released address is therefore held for its service for ``hold``
seconds (the longest TTL it can have been answered with, plus a margin): that service may
take it again at once (a client that cached it still reaches the service it asked for),
another service only once the hold has passed. Among the addresses it may take, a service
gets its own held one first, then one never used, then the one free the longest (least
recently used), so that an address goes back into use no sooner than it must.

Pure: no I/O, the clock is passed in. One pool per subnet (per bridge), shared by every
service that draws from it; the process backend's subnets and bridge networking use it.
The holds live in memory: a restarted daemon does not know what its predecessor handed out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import BootFailed

if TYPE_CHECKING:
    from ..config import ServiceConfig

#: Seconds added to a service's TTL before its released address may go to another service
#: (a reply cached by the daemon for a few milliseconds after a release; clocks).
HOLD_MARGIN = 5.0


class AddressesHeld(BootFailed):
    """No address is free for this service: the free ones are held for other services whose
    clients may still have them cached."""


class AddressPool:
    """The addresses of one subnet: in use, or released and held for their service."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.in_use: set[str] = set()
        #: Released addresses: the service that had it, when, and until when it is held.
        self._held: dict[str, tuple[str, float, float]] = {}

    def take(self, candidates: Iterable[str], service: str, where: str) -> str:
        """Reserve an address of ``candidates`` for ``service`` (the order above). Raises
        BootFailed when every candidate is in use, AddressesHeld when the free ones are held
        for other services (saying when the first frees); ``where`` names the subnet."""
        now = self._clock()
        best: str | None = None
        best_key = (3, 0.0)
        held_until = math.inf
        for address in candidates:
            if address in self.in_use:
                continue
            held = self._held.get(address)
            if held is None:
                key = (1, 0.0)
            elif held[0] == service:
                key = (0, 0.0)
            elif now >= held[2]:
                key = (2, held[1])
            else:
                held_until = min(held_until, held[2])
                continue
            if key < best_key:
                best, best_key = address, key
                if key[0] == 0:
                    break
        if best is None:
            if held_until < math.inf:
                raise AddressesHeld(
                    f"no free address in {where} for {service}: the free ones are held for the "
                    f"services that had them until their DNS answers expire (the first in "
                    f"{held_until - now:.0f} s)")
            raise BootFailed(f"no free address left in {where}")
        self.in_use.add(best)
        self._held.pop(best, None)
        return best

    def release(self, address: str, service: str, hold: float) -> None:
        """Give ``address`` back, held for ``service`` for ``hold`` seconds (0: an address
        that was never answered, free at once)."""
        self.in_use.discard(address)
        if hold > 0:
            now = self._clock()
            self._held[address] = (service, now, now + hold)

    def held_for(self, address: str) -> str | None:
        """The service ``address`` is held for now, if any."""
        held = self._held.get(address)
        return held[0] if held is not None and self._clock() < held[2] else None


def hold_time(service: ServiceConfig) -> float:
    """How long ``service``'s instance address is held for it after its release: its TTL
    plus the margin; none in answer mode ``proxy``, whose answers never carry it."""
    return 0.0 if service.answer == "proxy" else service.ttl + HOLD_MARGIN
