"""Admission decisions, the queue and the wake limiter, on their own (pure: no trio, no I/O)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from jitlaunch.config import HostConfig, WakeConfig
from jitlaunch.lifecycle import admission as adm
from jitlaunch.lifecycle.admission import Budget, Decision, Eviction, Holder, Kind, Usage, Verdict

from .conftest import load

MEMINFO = "MemTotal:       24683652 kB\nMemFree:        22433812 kB\n"
NONE = Usage()


def running(service: str, last: float, **kw: object) -> Holder:
    return Holder(service, Kind.RUNNING, 48, last_active=last, **kw)  # type: ignore[arg-type]


def test_budget_derived_from_the_machine_unless_configured() -> None:
    b = adm.derive_budget(HostConfig(), MEMINFO, 2)
    assert b.memory == int(24683652 // 1024 * 0.8) == 19284
    assert b.max_instances == 19284 // 32
    assert b.max_booting == 2 * adm.BOOTING_PER_CPU
    b = adm.derive_budget(HostConfig(max_instances=20, memory=1000, max_booting=3), MEMINFO, 2)
    assert b == Budget(20, 1000, 3)
    assert adm.derive_budget(HostConfig(), "garbage", 0).max_booting == adm.BOOTING_PER_CPU


def test_instance_memory_is_guest_memory_plus_overhead() -> None:
    cfg = load("""
[dns]
zones = ["jit.test"]
[[service]]
name = "vm"
backend = "qemu"
front = ["127.77.0.1"]
ports = [80]
max_instances = 3
[service.qemu]
kernel = "x.elf"
memory = 64
pool = 2
[[service]]
name = "py"
front = ["127.77.0.2"]
ports = [80]
pinned = true
priority = 5
[service.process]
command = "x"
""")
    vm, py = cfg.services
    assert adm.instance_memory(vm) == 64 + adm.QEMU_OVERHEAD
    assert adm.instance_memory(py) == adm.PROCESS_MEMORY
    assert adm.reserved(cfg.services) == Usage(2, 2 * (64 + adm.QEMU_OVERHEAD))
    assert (py.pinned, py.priority, vm.pinned, vm.priority) == (True, 5, False, 0)


def test_a_start_that_fits_starts() -> None:
    d = adm.decide(Budget(2, 1000, 4), NONE, [running("a", 1)], "b", 48)
    assert d == Decision(Verdict.START)


def test_max_booting_makes_a_fitting_start_wait() -> None:
    booting = [Holder(s, Kind.BOOTING, 48) for s in "ab"]
    d = adm.decide(Budget(10, 1000, 2), NONE, booting, "c", 48)
    assert d.verdict is Verdict.WAIT and "max_booting" in d.reason
    assert adm.decide(Budget(10, 1000, 3), NONE, booting, "c", 48).verdict is Verdict.START


def test_the_least_recently_active_idle_instance_is_evicted() -> None:
    hs = [running("a", 5), running("b", 2), running("c", 9)]
    d = adm.decide(Budget(3, 1000, 4), NONE, hs, "d", 48)
    assert d == Decision(Verdict.EVICT, d.reason, (Eviction("b", "destroy"),))


def test_pinned_and_connected_instances_are_never_evicted() -> None:
    hs = [running("a", 1, pinned=True), running("b", 2, idle=False), running("c", 3)]
    d = adm.decide(Budget(3, 1000, 4), NONE, hs, "d", 48)
    assert d.evictions == (Eviction("c", "destroy"),)
    hs = hs[:2]
    d = adm.decide(Budget(2, 1000, 4), NONE, hs, "d", 48)
    assert d.verdict is Verdict.WAIT and d.evictions == ()


def test_lower_priority_goes_first_then_lru() -> None:
    hs = [running("a", 1, priority=1), running("b", 9, priority=0), running("c", 5, priority=0)]
    d = adm.decide(Budget(3, 1000, 4), NONE, hs, "d", 48)
    assert d.evictions == (Eviction("c", "destroy"),)
    d = adm.decide(Budget(3, 164, 4), NONE, hs, "d", 48 * 2)
    assert d.evictions == (Eviction("c", "destroy"), Eviction("b", "destroy"))


def test_eviction_mode_frees_memory() -> None:
    hs = [running("p", 1, stop="pause"), running("s", 2, stop="save"),
          running("sh", 3, stop="shutdown"), Holder("z", Kind.PAUSED, 48, last_active=0)]
    d = adm.decide(Budget(4, 48 * 4, 4), NONE, hs, "d", 48 * 4)  # needs them all gone
    assert d.evictions == (
        Eviction("z", "destroy"), Eviction("p", "destroy"), Eviction("s", "save"),
        Eviction("sh", "shutdown"),
    )


def test_nothing_is_evicted_unless_the_start_then_fits() -> None:
    hs = [running("a", 1), running("b", 2, idle=False)]
    d = adm.decide(Budget(5, 100, 4), NONE, hs, "c", 60)  # a's 48 MiB are not enough
    assert d == Decision(Verdict.WAIT, d.reason)


def test_instances_on_their_way_out_are_waited_for_not_replaced() -> None:
    hs = [Holder("a", Kind.LEAVING, 48), running("b", 1)]
    d = adm.decide(Budget(2, 1000, 4), NONE, hs, "c", 48)
    assert d.verdict is Verdict.WAIT and d.evictions == ()
    # A pause gives nothing back: then b goes.
    hs = [Holder("a", Kind.LEAVING, 48, frees=False), running("b", 1)]
    assert adm.decide(Budget(2, 1000, 4), NONE, hs, "c", 48).evictions == (Eviction("b", "destroy"),)


def test_a_start_that_can_never_fit_is_refused() -> None:
    d = adm.decide(Budget(10, 100, 4), NONE, [], "big", 200)
    assert d.verdict is Verdict.REFUSE and "200 MiB" in d.reason
    # Warm pools hold their share all the time.
    d = adm.decide(Budget(10, 100, 4), Usage(1, 60), [], "b", 48)
    assert d.verdict is Verdict.REFUSE
    d = adm.decide(Budget(3, 1000, 4), Usage(2, 96), [running("a", 1)], "b", 48)
    assert d.evictions == (Eviction("a", "destroy"),)


def test_a_service_never_exceeds_its_own_max_instances() -> None:
    # Its old instance is still stopping (with a pause: kept), its pool holds one more.
    hs = [Holder("a", Kind.LEAVING, 48, frees=False)]
    d = adm.decide(Budget(10, 1000, 4), Usage(1, 48), hs, "a", 48, service_max=2, service_pool=1)
    assert d.verdict is Verdict.WAIT and "max_instances" in d.reason
    hs = [Holder("a", Kind.LEAVING, 48)]  # a destroy: gone soon, does not count
    d = adm.decide(Budget(10, 1000, 4), Usage(1, 48), hs, "a", 48, service_max=2, service_pool=1)
    assert d.verdict is Verdict.START


def test_resuming_a_paused_instance_needs_only_a_boot_slot() -> None:
    hs = [Holder("a", Kind.PAUSED, 48), running("b", 1, idle=False)]
    assert adm.decide(Budget(2, 96, 4), NONE, hs, "a", 48).verdict is Verdict.START
    hs.append(Holder("c", Kind.BOOTING, 48))
    assert adm.decide(Budget(3, 200, 1), NONE, hs, "a", 48).verdict is Verdict.WAIT


def test_decisions_never_break_the_budget() -> None:
    """Random holders: a START always fits, an EVICT's victims make it fit, and no victim is
    pinned, connected, booting, leaving or the service itself."""
    rng = random.Random(7)
    for _ in range(2000):
        hs = []
        for i in range(rng.randrange(0, 8)):
            kind = rng.choice(list(Kind))
            hs.append(Holder(
                f"s{i}", kind, rng.choice([20, 48, 100]), idle=rng.random() < 0.7,
                pinned=rng.random() < 0.2, priority=rng.randrange(-1, 2),
                last_active=rng.random(), stop=rng.choice(["destroy", "pause", "save"]),
                frees=rng.random() < 0.8,
            ))
        budget = Budget(rng.randrange(1, 9), rng.randrange(50, 600), rng.randrange(1, 4))
        want = rng.choice([20, 48, 100])
        d = adm.decide(budget, NONE, hs, "new", want, service_max=5)
        n, m = len(hs), sum(h.memory for h in hs)
        if d.verdict is Verdict.START:
            assert n + 1 <= budget.max_instances and m + want <= budget.memory
            assert sum(h.kind is Kind.BOOTING for h in hs) < budget.max_booting
        elif d.verdict is Verdict.EVICT:
            by = {h.service: h for h in hs}
            victims = [by[e.service] for e in d.evictions]
            assert all(not v.pinned and v.kind in (Kind.RUNNING, Kind.PAUSED) for v in victims)
            assert all(v.idle for v in victims if v.kind is Kind.RUNNING)
            gone = victims + [h for h in hs if h.kind is Kind.LEAVING and h.frees]
            assert n - len(gone) + 1 <= budget.max_instances
            assert m - sum(h.memory for h in gone) + want <= budget.memory


def test_the_queue_is_fifo_bounded_and_expires() -> None:
    q = adm.AdmissionQueue(2)
    assert q.push("a", 1.0) and q.push("b", 2.0)
    assert q.push("a", 5.0)  # already queued: kept in its place, with its first time
    assert not q.push("c", 3.0)
    assert (q.head(), len(q), "b" in q, "c" in q) == ("a", 2, True, False)
    assert q.next_expiry(10) == 11.0
    assert q.expired(11.5, 10) == ["a"] and q.expired(12.0, 10) == ["a", "b"]
    assert q.remove("a") == 1.0 and q.remove("a") is None
    assert q.head() == "b" and q.push("c", 4.0)
    assert adm.AdmissionQueue(0).push("a", 0) is False
    assert adm.AdmissionQueue(1).next_expiry(5) == math.inf


def test_wake_limit_is_a_token_bucket_per_prefix() -> None:
    w = adm.WakeLimiter(WakeConfig(rate=2, burst=3))
    assert [w.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not w.allow("192.0.2.200", 0.0)  # the same /24
    assert w.allow("198.51.100.1", 0.0)  # another /24
    assert w.allow("192.0.2.9", 0.5) and not w.allow("192.0.2.9", 0.5)  # 2 per second
    assert [w.allow("192.0.2.9", 10.0) for _ in range(4)] == [True, True, True, False]
    # IPv6: by /56; the proxy's /64 keys and scoped addresses are understood.
    assert all(w.allow("2001:db8:0:1::1", 0.0) for _ in range(3))
    assert not w.allow("2001:db8:0:2::/64", 0.0)
    assert w.allow("2001:db8:1::1%lo", 0.0)
    assert (w.allowed, w.limited) == (12, 5)


def test_wake_limit_off_and_garbage_never_raises() -> None:
    off = adm.WakeLimiter(WakeConfig(rate=0))
    assert all(off.allow("192.0.2.1", 0.0) for _ in range(100)) and repr(off) == "<WakeLimiter off>"
    w = adm.WakeLimiter(WakeConfig(rate=1, burst=1), buckets=16)
    for junk in ["", "x", "300.1.1.1", "::zz", "1.2.3.4/99", "\x00"]:
        w.allow(junk, 0.0)
    with pytest.raises(ValueError):
        adm.WakeLimiter(WakeConfig(), buckets=3)


def test_wake_limit_memory_is_fixed_under_a_spoofed_flood() -> None:
    w = adm.WakeLimiter(WakeConfig(rate=1, burst=1), buckets=64)
    size = len(w._tokens)
    for i in range(20000):
        w.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
    assert len(w._tokens) == size == 64
    assert w.limited > 0  # many /24s share the 64 buckets: limited sooner, never later


def test_host_config_is_parsed_and_checked() -> None:
    base = """
[dns]
zones = ["jit.test"]
[[service]]
name = "vm"
backend = "qemu"
front = ["127.77.0.1"]
ports = [80]
max_instances = 3
[service.qemu]
kernel = "x.elf"
pool = 2
"""
    cfg = load(base + """
[host]
max_instances = 20
memory = 4096
max_booting = 6
max_queued = 10
queue_timeout = "5s"
[host.wake]
rate = 0.5
burst = 4
ipv4_prefix = 32
""")
    assert cfg.host == HostConfig(20, 4096, 6, 10, 5.0, WakeConfig(0.5, 4, 32, 56))
    assert load(base).host == replace(HostConfig(), wake=WakeConfig())
    with pytest.raises(Exception, match=r"host.max_instances: must be more than the warm pool"):
        load(base + "[host]\nmax_instances = 2\n")
    with pytest.raises(Exception, match=r"host.wake.rate: expected boots per second"):
        load(base + "[host.wake]\nrate = -1\n")
    with pytest.raises(Exception, match=r"host.colour: unknown key"):
        load(base + "[host]\ncolour = 1\n")
