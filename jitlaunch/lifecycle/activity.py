"""Activity the proxy cannot see: the traffic of an instance whose address was handed over.

Once DNS hands an instance's own address over (answer mode ``handoff`` or ``wait``, and a
backend that gives the instance an address clients can reach), clients talk to it directly:
the daemon sees neither their connections nor their bytes, only their lookups, which stop for
the answer's TTL. Its backend can see more: the handle's
:meth:`~jitlaunch.backends.base.Handle.traffic` is a counter that grows while the instance is
used (packets the guest sent on its tap, connections to the process's address). A
:class:`TrafficWatch` turns samples of that counter into activity. No I/O and no trio here:
the supervisor samples and passes the times in.

Rules:

* The supervisor samples a ready, handed-over instance at most once per
  :data:`SAMPLE_INTERVAL`, and only while it waits for the instance to go idle with no proxied
  connection open (with one open the instance is in use anyway). Before it declares the
  instance idle it takes one more sample, compared with the one before, at or after the
  deadline: traffic up to the deadline is never missed.
* The first sample only sets the baseline. A counter that grew by more than its allowance
  since the last sample is activity at the sample's time: the service's last activity moves
  there. One that went down (a reset: a new tap, a new process) only sets a new baseline.
* The allowance: the handle's ``traffic_noise`` (what the counter may do by itself between
  two samples: a guest's ARP answer), plus its ``probe_traffic`` for each health probe of
  ours that started since the sample before last (a probe is a connection to the instance,
  and its last packets may come after it returned). A client's traffic that small, in a
  second with a probe, goes unseen; its next request is seen.
* In use (:meth:`TrafficWatch.in_use`): activity seen within :data:`IN_USE_WINDOW`. An
  instance in use is never idle and never evicted, as one with an open proxied connection.
  The window is short and fixed (not ``idle_timeout``): a proxied instance is evictable as
  soon as its last connection closes, and a handed-over one once its traffic has stopped for
  a few samples; the least recently active still go first.
* A counter that cannot be read (the handle raised: logged once by the supervisor) is
  *unknown*: no evidence either way. The baseline is dropped and the instance is judged as
  one without a counter, on its lookups and proxied traffic, until a read works again. Unknown
  must not count as in use: an instance whose counter broke would then hold its share of the
  host for ever and be stopped by nothing but ``jitlaunch stop``; a stop it did not need is
  the lesser harm (the next lookup wakes it again).
"""

from __future__ import annotations

import math

#: The shortest time between two samples of one instance's counter (seconds).
SAMPLE_INTERVAL = 1.0
#: An instance whose counter moved within this many seconds is in use: never idle, never
#: evicted. Five samples: a client that pauses a few seconds between requests keeps it.
IN_USE_WINDOW = 5.0


class TrafficWatch:
    """Samples of one ready instance's traffic counter (see the module's rules).

    ``noise`` is how far the counter may move between two samples by itself, ``per_probe``
    how far one health probe of ours moves it.
    """

    def __init__(self, noise: int = 0, per_probe: int = 0) -> None:
        self.noise = noise
        self.per_probe = per_probe
        #: The last good sample, or None before the first (and after a failure).
        self.value: int | None = None
        #: When the counter was last seen to move (trio time), or -inf.
        self.moved_at = -math.inf
        #: When a sample last compared with the one before (trio time), or -inf.
        self.compared_at = -math.inf
        #: When the next sample may be taken: inf once the handle said it has no counter.
        self.next_sample = -math.inf
        #: Whether the last sample failed (a later good one clears it); whether a failure
        #: was logged (once per instance).
        self.failing = False
        self.logged = False
        #: Whether it was in use at the last sample (its end is when it may be evicted).
        self.busy = False
        #: Probes started since the last sample, and in the interval before it.
        self._probes = 0
        self._probes_before = 0

    def __repr__(self) -> str:
        if not self.active:
            return "<TrafficWatch none>"
        state = "failing" if self.failing else f"value={self.value}"
        return f"<TrafficWatch {state} moved_at={self.moved_at:.1f}>"

    @property
    def active(self) -> bool:
        """False once the handle said it has no counter: nothing more to sample."""
        return not (math.isinf(self.next_sample) and self.next_sample > 0)

    def due(self, now: float) -> bool:
        """Whether a sample may be taken at ``now``."""
        return now >= self.next_sample

    def judged(self, deadline: float) -> bool:
        """Whether the samples allow declaring the instance idle at ``deadline``: one at or
        after it compared with the one before, or the counter is unknown or absent."""
        return self.compared_at >= deadline or self.failing or not self.active

    def note(self, value: int | None, now: float) -> bool:
        """A sample read at ``now``. Returns True when it is activity (the counter moved by
        more than its allowance since the last sample). None: the handle has no counter;
        sampling ends."""
        self.failing = False
        if value is None:
            self.next_sample = math.inf
            self.value = None
            return False
        self.next_sample = now + SAMPLE_INTERVAL
        allowance = self.noise + self.per_probe * (self._probes + self._probes_before)
        self._probes_before, self._probes = self._probes, 0
        last, self.value = self.value, value
        if last is None or value < last:
            return False
        self.compared_at = now
        moved = value - last > allowance  # (noise does not add up: each sample is a baseline)
        if moved:
            self.moved_at = now
        self.busy = self.in_use(now)
        return moved

    def failed(self, now: float) -> None:
        """A sample could not be read at ``now``: unknown (see the module's rules)."""
        self.failing = True
        self.value = None
        self.next_sample = now + SAMPLE_INTERVAL
        self.busy = self.in_use(now)

    def probe_started(self) -> None:
        """A health probe of ours starts: its traffic is allowed for (the module's rules)."""
        self._probes += 1

    def in_use(self, now: float) -> bool:
        """Whether the counter moved within :data:`IN_USE_WINDOW` before ``now``."""
        return now - self.moved_at < IN_USE_WINDOW
