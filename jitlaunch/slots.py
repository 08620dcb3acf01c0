"""Connection slots: what one client, one source prefix or one user may hold of a listener.

Every listener that keeps a task per connection (DNS over TCP, the metrics endpoint, the
control socket) admits connections through one :class:`Slots`. Its rules, which are all a
client can rely on:

* At most ``total`` slots are taken at once, and at most ``per_key`` by one key: a source
  prefix for the network listeners (:func:`source_prefix`: the /24 or the /56 a connection
  comes from, as response rate limiting counts them, so that one host cannot take every slot
  by using many of its addresses), a uid for the control socket.
* Past a cap, :meth:`Slots.take` with ``evict=True`` closes the oldest connection that is
  still *reading its request* (one that has asked for nothing yet, or is idle between two
  requests) in the scope of the cap that was hit (the same key for the per-key cap, any key
  for the total), and gives its slot to the new connection; a connection being answered is
  never closed this way. With nothing to close, or without ``evict``, the new connection is
  refused (:attr:`Slots.refusal` says which cap).
* An idle timer taken through :meth:`Slots.idle` is shortened to ``busy_idle`` (from when the
  connection went idle) once more than half of ``total`` is in use, including the timers
  already running when that happens, as NSD gives a 200 ms timeout to connections accepted
  while more than half of its ``tcp-count`` is in use.

No I/O: the owner of a slot runs its connection inside ``slot.scope`` (a CancelScope that an
eviction cancels) and calls :meth:`Slot.release` when the connection ends (idempotent: an
evicted slot was released already, when its room was given away).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Hashable, Iterator

import trio

#: Above this share of ``total`` in use, idle timers are shortened to ``busy_idle``.
BUSY_SHARE = 0.5


def source_prefix(host: str, ipv4_prefix: int = 24, ipv6_prefix: int = 56) -> str:
    """The network ``host`` (an address as the socket API gives it, optionally with a
    ``%scope``) belongs to, as text: ``"192.0.2.0/24"``. Never raises for an address the
    socket API can return; anything else is its own key."""
    addr = host.partition("%")[0]
    try:
        if ":" in addr:
            bits, family, size = ipv6_prefix, socket.AF_INET6, 128
        else:
            bits, family, size = ipv4_prefix, socket.AF_INET, 32
        value = int.from_bytes(socket.inet_pton(family, addr))
    except OSError:
        return host
    shift = size - bits
    network = (value >> shift) << shift
    return f"{socket.inet_ntop(family, network.to_bytes(size // 8))}/{bits}"


class Slot:
    """One admitted connection. ``reading`` is True while it waits for (a part of) a request:
    only then may a newcomer's eviction close it."""

    __slots__ = ("_idle", "_idle_since", "_owner", "evicted", "idle_shortened", "key", "opened",
                 "reading", "released", "scope")

    def __init__(self, owner: Slots, key: Hashable, now: float) -> None:
        self._owner = owner
        self.key = key
        self.opened = now
        self.reading = True
        self.released = False
        self.evicted = False
        #: The connection runs in this scope; an eviction cancels it.
        self.scope = trio.CancelScope()
        self._idle: trio.CancelScope | None = None
        self._idle_since = 0.0
        #: Whether the last idle timer (:meth:`Slots.idle`) was shortened for a busy listener.
        self.idle_shortened = False

    def __repr__(self) -> str:
        state = "evicted" if self.evicted else "released" if self.released else (
            "reading" if self.reading else "busy")
        return f"<Slot {self.key} {state}>"

    def release(self) -> None:
        """Give the slot back (the connection has ended). Idempotent."""
        if not self.released:
            self.released = True
            self._owner._release(self)


class Slots:
    """A listener's connection slots; see the module docstring for the rules.

    ``total`` and ``per_key`` may be changed at any time (a reload); they apply from the next
    :meth:`take`. ``busy_idle`` is the idle timeout, in seconds, while more than half of
    ``total`` is in use (``math.inf``: never shortened).
    """

    def __init__(self, total: int, per_key: int, busy_idle: float = math.inf) -> None:
        self.total = total
        self.per_key = per_key
        self.busy_idle = busy_idle
        #: Admitted and not yet released, oldest first.
        self._open: dict[Slot, None] = {}
        self.by_key: dict[Hashable, int] = {}
        #: Which cap the last refused :meth:`take` hit: ``"total"`` or ``"key"``.
        self.refusal = ""
        self._idle: set[Slot] = set()
        #: Connections closed to make room for a newer one, and idle timers shortened.
        self.evictions = 0
        self.shortened = 0

    def __repr__(self) -> str:
        return f"<Slots {len(self._open)}/{self.total} per key {self.per_key}>"

    @property
    def in_use(self) -> int:
        return len(self._open)

    @property
    def busy(self) -> bool:
        return len(self._open) > self.total * BUSY_SHARE

    def take(self, key: Hashable, *, evict: bool = False) -> Slot | None:
        """A slot for a new connection from ``key``, or None (see :attr:`refusal`)."""
        now = trio.current_time()
        if self.by_key.get(key, 0) >= self.per_key:
            if not (evict and self._evict(key)):
                self.refusal = "key"
                return None
        if len(self._open) >= self.total:
            if not (evict and self._evict(None)):
                self.refusal = "total"
                return None
        slot = Slot(self, key, now)
        was_busy = self.busy
        self._open[slot] = None
        self.by_key[key] = self.by_key.get(key, 0) + 1
        if not was_busy and self.busy:
            self._shorten(now)
        return slot

    def _evict(self, key: Hashable | None) -> bool:
        """Close the oldest connection reading its request (from ``key``, or from anyone)."""
        for slot in self._open:
            if slot.reading and (key is None or slot.key == key):
                slot.evicted = True
                slot.scope.cancel()
                slot.release()
                self.evictions += 1
                return True
        return False

    def _release(self, slot: Slot) -> None:
        del self._open[slot]
        left = self.by_key[slot.key] - 1
        if left:
            self.by_key[slot.key] = left
        else:
            del self.by_key[slot.key]
        self._idle.discard(slot)

    @contextlib.contextmanager
    def idle(self, slot: Slot, timeout: float) -> Iterator[trio.CancelScope]:
        """A scope for ``slot``'s wait for its next request: it ends the wait ``timeout``
        seconds from now, or ``busy_idle`` from now once the listener is busy (also if it
        becomes busy during the wait). Check ``cancelled_caught`` afterwards."""
        now = trio.current_time()
        slot.idle_shortened = False
        if self.busy and self.busy_idle < timeout:
            timeout = self.busy_idle
            slot.idle_shortened = True
            self.shortened += 1
        scope = trio.CancelScope(deadline=now + timeout)
        slot._idle = scope
        slot._idle_since = now
        self._idle.add(slot)
        try:
            with scope:
                yield scope
        finally:
            slot._idle = None
            self._idle.discard(slot)

    def _shorten(self, now: float) -> None:
        for slot in self._idle:
            scope = slot._idle
            if scope is None:
                continue
            deadline = max(now, slot._idle_since + self.busy_idle)
            if deadline < scope.deadline:
                scope.deadline = deadline
                slot.idle_shortened = True
                self.shortened += 1


__all__ = ["BUSY_SHARE", "Slot", "Slots", "source_prefix"]
