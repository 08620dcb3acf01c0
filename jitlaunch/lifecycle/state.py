"""The instance state machine: the one place where instance states and their transitions live.

Rules:

* An instance is born ``STOPPED`` and moves only by the events in :data:`TRANSITIONS`; any
  other (state, event) pair raises :class:`~jitlaunch.errors.IllegalTransition` naming both.
* ``STARTING`` covers everything from "backend asked to start" to "ready": a fresh boot, a
  resume from a pause, a restore from a saved state. Concurrent lookups share it.
* ``READY`` means the instance accepts connections: the proxy may connect, DNS may hand its
  address over.
* ``DRAINING`` is a ready instance that takes no new work (daemon shutting down) and waits,
  bounded, for its open connections to end.
* ``STOPPING`` releases the instance: the backend stops it in the service's stop mode, or
  cleans up after an instance that died. It ends in ``STOPPED``, or in ``SAVED`` when the
  stop mode kept the instance's state (pause, save) so that the next start resumes it.
* ``FAILED`` is terminal for an instance whose boot failed (exit, error, timeout); the
  supervisor keeps the backoff for its service and starts a *new* instance later.
* ``STOPPED`` is terminal for an instance that has been released; a later start is a new
  instance. Only ``SAVED`` comes back to life.

Nothing in this file does I/O; the supervisor drives it.
"""

from __future__ import annotations

import enum

from ..errors import IllegalTransition


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    SAVED = "saved"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class Event(enum.Enum):
    START = "start"  # a lookup or a connection wants the service
    READY = "ready"  # the readiness check passed
    FAIL = "fail"  # the boot failed or timed out
    DRAIN = "drain"  # stop taking new work, let open connections finish
    STOP = "stop"  # release it: idle, shutdown, or drained
    DIED = "died"  # it went away on its own
    STOPPED = "stopped"  # the backend finished releasing it
    SAVED = "saved"  # the backend released it and kept its state

    def __str__(self) -> str:
        return self.value


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.STOPPED, E.START): S.STARTING,
    (S.SAVED, E.START): S.STARTING,
    (S.STARTING, E.READY): S.READY,
    (S.STARTING, E.FAIL): S.FAILED,
    (S.STARTING, E.DIED): S.FAILED,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.READY, E.DRAIN): S.DRAINING,
    (S.READY, E.STOP): S.STOPPING,
    (S.READY, E.DIED): S.STOPPING,
    (S.DRAINING, E.STOP): S.STOPPING,
    (S.DRAINING, E.DIED): S.STOPPING,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.STOPPING, E.SAVED): S.SAVED,
    (S.SAVED, E.STOP): S.STOPPING,
}

#: States in which an instance exists and counts against its service's maximum.
LIVE = frozenset({S.STARTING, S.READY, S.DRAINING, S.STOPPING})


def next_state(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``; IllegalTransition if none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        allowed = sorted(str(e) for (s, e) in TRANSITIONS if s is state)
        raise IllegalTransition(
            f"event {event} is not allowed in state {state} "
            f"(allowed: {', '.join(allowed) or 'none, it is terminal'})"
        ) from None
