"""What DNS says about a service: the answer-mode policy (DESIGN.md, "Answer modes").

A pure function of the service's configuration, a snapshot of its state and the time; no I/O
and no trio, so that the DNS answer logic stays pure and never imports the supervisor. The
supervisor builds the snapshots (:meth:`Supervisor.snapshot`).

* ``handoff`` (default): the front address(es) with ``booting_ttl`` until an instance is
  ready, then the instance's own address with ``ttl`` when it has one. An instance address
  replaces the front of its own family only: a service with an IPv6 front whose instance has
  only an IPv4 address keeps answering AAAA with the IPv6 front (the proxy still serves it),
  and the other way round.
* ``proxy``: always the front address(es); ``ttl`` once ready.
* ``wait``: while no instance is ready, ``pending`` (hold the reply), or ``servfail`` when
  no boot is under way and the service is backing off after a failed one; once ready, as
  ``handoff``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ServiceConfig
from .state import LIVE, State


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """A service's state as far as DNS is concerned, at one moment."""

    #: The current instance's state; None when there is no instance.
    state: State | None = None
    #: The instance's own address, when it has one clients can reach.
    address: str | None = None
    #: No new boot before this time (the backoff after a failed boot).
    retry_at: float = -math.inf
    #: False when the lookup that asked started nothing and nothing runs (the start was
    #: refused, wake-limited, or the service backs off): a ``wait`` lookup fails at once.
    starting: bool = True


@dataclass(frozen=True, slots=True)
class ServiceAnswer:
    """What DNS should say about a service right now.

    ``pending`` means a ``wait`` service is booting: hold the reply. ``servfail`` means the
    service cannot be had now (its boot failed).
    """

    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()
    ttl: int = 0
    pending: bool = False
    servfail: bool = False


PENDING = ServiceAnswer(pending=True)
SERVFAIL = ServiceAnswer(servfail=True)


def answer_for(svc: ServiceConfig, snap: ServiceSnapshot, now: float) -> ServiceAnswer:
    """The answer for service ``svc`` in state ``snap`` at time ``now`` (see above)."""
    ready = snap.state is State.READY
    if ready and snap.address and svc.answer != "proxy":
        if ":" in snap.address:
            return ServiceAnswer(svc.front_v4, (snap.address,), svc.ttl)
        return ServiceAnswer((snap.address,), svc.front_v6, svc.ttl)
    if svc.answer == "wait" and not ready:
        if not snap.starting or (snap.state not in LIVE and now < snap.retry_at):
            return SERVFAIL
        return PENDING
    return ServiceAnswer(svc.front_v4, svc.front_v6, svc.ttl if ready else svc.booting_ttl)
