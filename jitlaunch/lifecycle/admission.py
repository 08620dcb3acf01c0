"""Admission: the host budget, eviction and wake limits, as pure decisions.

No trio and no I/O: the supervisor describes the instances it holds (:class:`Holder`), asks
:func:`decide` what a start may do, and applies the answer. Times are passed in.

Rules (README, "Capacity"):

* The budget (:class:`Budget`, from ``[host]``) bounds the instances of all services together
  (``max_instances``), their memory (``memory``, MiB) and the boots under way at once
  (``max_booting``). An instance costs its guest memory plus its backend's overhead
  (:func:`instance_memory`). Warm pool members are held all the time: their count and memory
  are reserved up front (:func:`reserved`). A paused instance (stop mode ``pause``) is a
  process and holds its share; a saved one (``save``, the state on disk) holds nothing.
* A service's own instances (its running or paused instance and its pool members) never
  exceed its ``max_instances``.
* A start that fits starts. One that does not fit, and would not fit even once the
  instances already on their way out are gone, evicts: the idle instances (no open
  connection) that are not ``pinned``, lowest ``priority`` first, then the least recently
  active, until the start fits. An evicted instance stops in its service's stop mode when
  that frees its share (``destroy``, ``shutdown``, ``save``); a ``pause`` frees nothing, so a
  running instance of a ``pause`` service, and any paused instance, is destroyed instead.
  Nothing is evicted unless the start then fits.
* What cannot start now waits in a bounded FIFO queue (:class:`AdmissionQueue`), one entry
  per service, in the order of first requests; the head is admitted first (a smaller start
  behind it waits too, so nobody starves). A start that can never fit is refused.
* Only a proven request may take room from others. A request is proven when its source
  address cannot be forged: a connection (the TCP handshake), a lookup over TCP, a UDP
  lookup with a valid DNS server cookie. An unproven one (a UDP lookup without a valid
  server cookie) may start an instance only into free room, now, with nobody queued before
  it: ``decide(..., proven=False)`` answers START, REFUSE or UNPROVEN (refused: it would
  have to evict or wait), never EVICT or WAIT. It is not queued either: a queued start holds
  up those behind it, and forged lookups would fill the queue.
* Wake limits (:class:`WakeLimiter`): boots caused by proven lookups and connections from one
  source prefix are limited by a token bucket; the table is fixed in size. Unproven boots
  share one more bucket of the same rate and burst, whatever their source says: forged
  sources can neither use up a real prefix's budget nor multiply their own by claiming many
  prefixes.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
import re
import socket
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import HostConfig, ServiceConfig, WakeConfig

#: Per-instance memory (MiB) a QEMU process needs beyond its guest's memory. Measured with the
#: bundled image booted to READY and serving (bench/storm, README "Capacity"): the full
#: qemu-system-x86_64 under TCG peaks at 36 MiB RSS with 16 MiB of guest memory, 22 MiB of it
#: shared libraries; the reduced qemu-system-x86_64-microvm idles at 14.5 MiB. One figure for
#: both, on the safe side: the budget may admit fewer reduced-build instances than would fit.
QEMU_OVERHEAD = 32
#: What a process-backend instance is assumed to take (MiB): it has no memory setting (nor
#: has a podman container without ``memory``).
PROCESS_MEMORY = 32
#: What podman's conmon and slirp4netns take per container beyond the container (MiB),
#: measured with bench/podman (idle RSS: conmon 2.1 MiB, slirp4netns 3.4 MiB), rounded up.
PODMAN_OVERHEAD = 8
#: Default ``max_instances``: one instance per this many MiB of the memory budget.
MIB_PER_INSTANCE = 32
#: Default ``memory``: this share of MemTotal.
MEMORY_SHARE = 0.8
#: Default ``max_booting``: this many per CPU. bench/storm on 2 shared cores: boots/s rose
#: with the cap (8: 17.6/s, 16: 19.1, 32: 24.0) and was best with none (24.5-31.5/s); a cap
#: below the storm's size makes the boots' fixed latency come in waves. So the default only
#: bounds a storm far larger than the CPUs can boot at once.
BOOTING_PER_CPU = 64
#: Stop modes that give an instance's share back.
FREEING = frozenset({"destroy", "shutdown", "save"})


@dataclass(frozen=True, slots=True)
class Budget:
    max_instances: int
    memory: int  # MiB
    max_booting: int

    def __str__(self) -> str:
        return (f"max_instances {self.max_instances}, memory {self.memory} MiB, "
                f"max_booting {self.max_booting}")


def mem_total(meminfo: str) -> int | None:
    """MemTotal in MiB from the text of /proc/meminfo, or None."""
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", meminfo, re.M)
    return int(m.group(1)) // 1024 if m else None


def derive_budget(host: HostConfig, meminfo: str, cpus: int) -> Budget:
    """The budget: each ``[host]`` key as configured, or derived from the machine: ``memory``
    80 % of MemTotal, ``max_instances`` one per 32 MiB of it, ``max_booting`` 64 per CPU."""
    memory = host.memory
    if memory is None:
        memory = max(1, int((mem_total(meminfo) or 1024) * MEMORY_SHARE))
    max_instances = host.max_instances or max(1, memory // MIB_PER_INSTANCE)
    max_booting = host.max_booting or max(1, BOOTING_PER_CPU * max(1, cpus))
    return Budget(max_instances, memory, max_booting)


def instance_memory(svc: ServiceConfig) -> int:
    """What one instance of ``svc`` counts against the memory budget, in MiB."""
    if svc.backend in ("qemu", "libvirt"):
        return int(getattr(svc.settings, "memory", 0)) + QEMU_OVERHEAD
    if svc.backend == "podman":
        memory = getattr(svc.settings, "memory", None)
        return (PROCESS_MEMORY if memory is None else int(memory)) + PODMAN_OVERHEAD
    return PROCESS_MEMORY


@dataclass(frozen=True, slots=True)
class Usage:
    instances: int = 0
    memory: int = 0


def reserved(services: Iterable[ServiceConfig]) -> Usage:
    """What warm pools hold all the time: their members and those members' memory."""
    n = m = 0
    for svc in services:
        pool = int(getattr(svc.settings, "pool", 0))
        n += pool
        m += pool * instance_memory(svc)
    return Usage(n, m)


class Kind(enum.Enum):
    BOOTING = "booting"  # starting: holds a boot slot as well
    RUNNING = "running"  # ready (or draining)
    PAUSED = "paused"  # saved with its process alive: holds its share
    LEAVING = "leaving"  # stopping or evicted: its share comes back when released (if frees)


@dataclass(frozen=True, slots=True)
class Holder:
    """One instance holding part of the budget, as the supervisor sees it now."""

    service: str
    kind: Kind
    memory: int
    #: No open connection (a RUNNING instance with one is never evicted).
    idle: bool = True
    pinned: bool = False
    priority: int = 0
    last_active: float = -math.inf
    #: The service's stop mode (how an eviction stops it, if that frees its share).
    stop: str = "destroy"
    #: For LEAVING: whether releasing it gives its share back (a pause does not).
    frees: bool = True


@dataclass(frozen=True, slots=True)
class Eviction:
    service: str
    mode: str  # the stop mode to use


class Verdict(enum.Enum):
    START = "start"
    EVICT = "evict"  # evict these, then wait for them to be released
    WAIT = "wait"
    REFUSE = "refuse"  # it can never fit
    UNPROVEN = "unproven"  # refused: not proven, and it would have to evict or wait


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    evictions: tuple[Eviction, ...] = ()


def decide(
    budget: Budget, pools: Usage, holders: Iterable[Holder], service: str, memory: int,
    service_max: int = 1, service_pool: int = 0, *, proven: bool = True,
) -> Decision:
    """What a start of ``service`` (costing ``memory`` MiB) may do now.

    ``holders`` are every instance the supervisor holds, ``pools`` what warm pools reserve,
    ``service_max`` and ``service_pool`` the service's ``max_instances`` and pool size. A
    service that has a paused instance resumes it, which needs a boot slot only. An
    unproven start (``proven=False``) that would have to evict or wait is UNPROVEN instead.
    """
    decision = _decide(budget, pools, holders, service, memory, service_max, service_pool)
    if proven or decision.verdict in (Verdict.START, Verdict.REFUSE):
        return decision
    return Decision(Verdict.UNPROVEN, f"not proven and no room now ({decision.reason})")


def _decide(
    budget: Budget, pools: Usage, holders: Iterable[Holder], service: str, memory: int,
    service_max: int, service_pool: int,
) -> Decision:
    hs = list(holders)
    resume = any(h.service == service and h.kind is Kind.PAUSED for h in hs)
    need_n, need_m = (0, 0) if resume else (1, memory)
    if need_m > budget.memory - pools.memory or need_n > budget.max_instances - pools.instances:
        return Decision(Verdict.REFUSE, f"needs {memory} MiB, more than the host's budget "
                        f"({budget.memory} MiB, {pools.memory} of it held by warm pools)")
    own = sum(1 for h in hs if h.service == service and not (h.kind is Kind.LEAVING and h.frees))
    if own + service_pool + need_n > service_max:
        return Decision(Verdict.WAIT, f"the service is at its max_instances ({service_max})")
    used_n = pools.instances + len(hs)
    used_m = pools.memory + sum(h.memory for h in hs)

    def fits(free_n: int, free_m: int) -> bool:
        return (used_n - free_n + need_n <= budget.max_instances
                and used_m - free_m + need_m <= budget.memory)

    if fits(0, 0):
        booting = sum(1 for h in hs if h.kind is Kind.BOOTING)
        if booting >= budget.max_booting:
            return Decision(Verdict.WAIT, f"{booting} boots under way (max_booting)")
        return Decision(Verdict.START)
    leaving = [h for h in hs if h.kind is Kind.LEAVING and h.frees]
    free_n, free_m = len(leaving), sum(h.memory for h in leaving)
    if fits(free_n, free_m):
        return Decision(Verdict.WAIT, "waiting for instances on their way out")
    victims = sorted(
        (h for h in hs if h.service != service and not h.pinned
         and (h.kind is Kind.PAUSED or (h.kind is Kind.RUNNING and h.idle))),
        key=lambda h: (h.priority, h.last_active),
    )
    chosen = []
    for h in victims:
        chosen.append(Eviction(h.service, h.stop if h.kind is Kind.RUNNING and h.stop in FREEING
                               else "destroy"))
        free_n += 1
        free_m += h.memory
        if fits(free_n, free_m):
            return Decision(Verdict.EVICT, "evicting to make room", tuple(chosen))
    return Decision(Verdict.WAIT, "the host is full and nothing can be evicted")


class AdmissionQueue:
    """Services waiting to start, first come first served; at most ``bound``, one entry per
    service. Times are the first request's."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._entries: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, service: object) -> bool:
        return service in self._entries

    def __repr__(self) -> str:
        return f"<AdmissionQueue {len(self)} of {self.bound}>"

    def push(self, service: str, now: float) -> bool:
        """Queue ``service`` (a no-op when it is queued already); False when full."""
        if service in self._entries:
            return True
        if len(self._entries) >= self.bound:
            return False
        self._entries[service] = now
        return True

    def head(self) -> str | None:
        return next(iter(self._entries), None)

    def remove(self, service: str) -> float | None:
        """Take ``service`` out; returns when it was queued (None if it was not)."""
        return self._entries.pop(service, None)

    def expired(self, now: float, timeout: float) -> list[str]:
        """The services queued at ``now - timeout`` or before, oldest first (not removed)."""
        out = []
        for service, since in self._entries.items():
            if since + timeout > now:
                break
            out.append(service)
        return out

    def next_expiry(self, timeout: float) -> float:
        head = self.head()
        return math.inf if head is None else self._entries[head] + timeout


#: Buckets in the wake limiter's table (a power of two): 16 bytes each.
WAKE_BUCKETS = 4096


class WakeLimiter:
    """Token buckets per source prefix for boots caused by lookups and connections.

    Each prefix (``ipv4_prefix``/``ipv6_prefix`` bits) may cause ``burst`` boots at once and
    ``rate`` per second after that. The table has a fixed number of buckets indexed by a
    keyed hash of the prefix, so a flood from spoofed sources costs no memory; prefixes that
    share a bucket share its tokens (they can only be limited sooner). ``rate = 0``: off.

    Only proven boots (``proven=True``: the source cannot be forged) are counted per prefix.
    Unproven ones all take from one more bucket of the same rate and burst, as if they came
    from one prefix: a forged source says nothing about who sent it.
    """

    def __init__(self, config: WakeConfig, buckets: int = WAKE_BUCKETS) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.config = config
        self.enabled = config.rate > 0
        self._mask = buckets - 1
        self._shift4 = 32 - config.ipv4_prefix
        self._shift6 = 128 - config.ipv6_prefix
        self._salt = random.getrandbits(64)
        size = buckets if self.enabled else 0
        self._tokens = array("d", [float(config.burst)]) * size
        self._stamp = array("d", [-math.inf]) * size
        # The bucket that every unproven source shares.
        self._unproven_tokens = array("d", [float(config.burst)])
        self._unproven_stamp = array("d", [-math.inf])
        #: Counters: boots allowed and refused (of those, unproven).
        self.allowed = 0
        self.limited = 0
        self.limited_unproven = 0

    def __repr__(self) -> str:
        if not self.enabled:
            return "<WakeLimiter off>"
        return (f"<WakeLimiter {self.config.rate:g}/s burst={self.config.burst} "
                f"limited={self.limited}>")

    def allow(self, host: str, now: float, *, proven: bool = True) -> bool:
        """Take a token for a boot caused by ``host`` (an address as the socket API gives
        it); False when its prefix has none left. An unproven boot takes from the bucket of
        all unproven sources instead. Never raises for such an address."""
        if not self.enabled:
            return True
        if not proven:
            if self._take(self._unproven_tokens, self._unproven_stamp, 0, now):
                return True
            self.limited_unproven += 1
            return False
        try:
            if ":" in host:
                version, shift = 6, self._shift6
                bare = host.partition("%")[0].partition("/")[0]  # the proxy keys IPv6 by /64
                value = int.from_bytes(socket.inet_pton(socket.AF_INET6, bare))
            else:
                version, shift = 4, self._shift4
                value = int(ipaddress.IPv4Address(host))
        except (OSError, ValueError):
            version, shift, value = 0, 0, 0  # not an address: one shared bucket
        i = hash((self._salt, version, value >> shift)) & self._mask
        return self._take(self._tokens, self._stamp, i, now)

    def _take(self, tokens_at: array[float], stamp_at: array[float], i: int, now: float) -> bool:
        rate, burst = self.config.rate, float(self.config.burst)
        tokens = min(burst, tokens_at[i] + (now - stamp_at[i]) * rate)
        stamp_at[i] = now
        if tokens >= 1.0:
            tokens_at[i] = tokens - 1.0
            self.allowed += 1
            return True
        tokens_at[i] = tokens
        self.limited += 1
        return False
