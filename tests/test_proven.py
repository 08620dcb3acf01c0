"""Who may take room from others: only a proven client (a connection, a lookup over TCP, a UDP
lookup with a valid DNS server cookie) may cause an eviction; an unproven UDP lookup (its
source may be forged) may only start an instance into free room. Real processes, real DNS and
the real proxy on loopback; forged /24s are UDP sockets bound in other loopback blocks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio

from jitlaunch.config import WakeConfig
from jitlaunch.lifecycle import admission as adm
from jitlaunch.lifecycle.admission import Budget, Decision, Eviction, Holder, Kind, Usage, Verdict
from jitlaunch.lifecycle.state import State

from .conftest import config_text, fresh_block, http_get, load, running, wait_until
from .helpers import get, host, pid, scrape, services
from .helpers import instance_state as state

COOKIE = 10


# ---- the rule, pure (admission.py) ----------------------------------------------------------


def test_an_unproven_start_takes_free_room_only() -> None:
    budget = Budget(max_instances=2, memory=1000, max_booting=1)
    one = [Holder("a", Kind.RUNNING, 48, last_active=1.0)]
    assert adm.decide(budget, Usage(), one, "c", 48, proven=False) == Decision(Verdict.START)
    full = [*one, Holder("b", Kind.RUNNING, 48, last_active=2.0)]
    proven = adm.decide(budget, Usage(), full, "c", 48)
    assert proven.verdict is Verdict.EVICT and proven.evictions == (Eviction("a", "destroy"),)
    unproven = adm.decide(budget, Usage(), full, "c", 48, proven=False)
    assert unproven.verdict is Verdict.UNPROVEN and not unproven.evictions
    assert "not proven" in unproven.reason
    # What would wait (a boot slot, the service's own max_instances, instances on their way
    # out, nothing to evict) is refused too; what can never fit stays REFUSE.
    booting = [Holder("a", Kind.BOOTING, 48)]
    assert adm.decide(budget, Usage(), booting, "c", 48).verdict is Verdict.WAIT
    assert adm.decide(budget, Usage(), booting, "c", 48, proven=False).verdict is Verdict.UNPROVEN
    leaving = [Holder("a", Kind.LEAVING, 48), Holder("b", Kind.LEAVING, 48)]
    assert adm.decide(budget, Usage(), leaving, "c", 48).verdict is Verdict.WAIT
    assert adm.decide(budget, Usage(), leaving, "c", 48, proven=False).verdict is Verdict.UNPROVEN
    assert adm.decide(budget, Usage(), [], "c", 2000, proven=False).verdict is Verdict.REFUSE
    # A paused instance of the service resumes: it needs a boot slot only.
    paused = [Holder("c", Kind.PAUSED, 48), Holder("b", Kind.RUNNING, 48)]
    assert adm.decide(budget, Usage(), paused, "c", 48, proven=False).verdict is Verdict.START


def test_unproven_wakes_share_one_bucket() -> None:
    """Unproven boots take from one bucket whatever prefix they claim; they never touch a
    prefix's own bucket, which proven boots use."""
    w = adm.WakeLimiter(WakeConfig(rate=1, burst=3))
    forged = [f"10.{i}.0.1" for i in range(50)]
    allowed = [w.allow(source, 0.0, proven=False) for source in forged]
    assert allowed == [True] * 3 + [False] * 47
    assert w.limited_unproven == 47 == w.limited
    # Every prefix keeps its whole burst for proven boots.
    assert all(w.allow("10.7.0.1", 0.0) for _ in range(3)) and not w.allow("10.7.0.1", 0.0)
    assert w.allow("192.0.2.1", 0.0)
    # The shared bucket refills at the rate.
    assert w.allow("10.99.0.1", 1.0, proven=False) and not w.allow("10.98.0.1", 1.0, proven=False)
    off = adm.WakeLimiter(WakeConfig(rate=0))
    assert all(off.allow(s, 0.0, proven=False) for s in forged)


def query(name: str, ident: int = 1, cookie: bytes | None = None) -> bytes:
    """An A query with RD, and an OPT (payload 1232) carrying ``cookie`` when given."""
    wire = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0 if cookie is None else 1)
    wire += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    wire += struct.pack("!HH", 1, 1)
    if cookie is not None:
        rdata = struct.pack("!HH", COOKIE, len(cookie)) + cookie
        wire += b"\0" + struct.pack("!HHIH", 41, 1232, 0, len(rdata)) + rdata
    return wire


def reply_cookie(reply: bytes) -> bytes | None:
    """The COOKIE option's data in a reply whose last record is its OPT, or None."""
    if struct.unpack_from("!H", reply, 10)[0] == 0:
        return None
    # Walk the OPT's options from the end: find the OPT by its rdlength.
    for start in range(len(reply) - 11, 11, -1):
        if reply[start : start + 3] == b"\0\0\x29":
            rdlen = struct.unpack_from("!H", reply, start + 9)[0]
            if start + 11 + rdlen == len(reply):
                pos = start + 11
                while pos < len(reply):
                    code, length = struct.unpack_from("!HH", reply, pos)
                    if code == COOKIE:
                        return reply[pos + 4 : pos + 4 + length]
                    pos += 4 + length
                return None
    return None


async def exchange(server: tuple[str, int], wire: bytes, source: str = "127.0.0.1") -> bytes:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((source, 0))
        await sock.connect(server)
        await sock.send(wire)
        with trio.fail_after(10):
            return await sock.recv(65535)


async def exchange_tcp(server: tuple[str, int], wire: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(struct.pack("!H", len(wire)) + wire)
        buf = b""
        with trio.fail_after(10):
            while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
                data = await stream.receive_some(65536)
                assert data
                buf += data
    return buf[2:]


FORGED = 20  # /24s the forged lookups come from


@pytest.mark.parametrize("wake", ["", "rate = 0"], ids=["wake-limits", "no-wake-limits"])
async def test_forged_lookups_never_evict_an_instance_a_proven_client_woke(
        tmp_path: Path, block: str, wake: str) -> None:
    """80 lookups from 20 /24s (sources that could be forged: UDP, no cookie) for other
    services, while the host is full of instances woken by connections: nothing is evicted,
    nothing starts, and the refusals are counted. On the old code the per-/24 wake limit let
    each /24 evict. With the default wake limits, all unproven lookups share one bucket: its
    burst (10) reach admission, the rest are wake-limited."""
    names = "a b c d e f"
    cfg = load(config_text(tmp_path, services(block, names), top=host(max_instances=2, wake=wake)))
    forged = [f"{fresh_block()}.1" for _ in range(FORGED)]
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        for i, name in enumerate("ab", start=1):  # woken by connections: proven
            assert b"Hello from " + name.encode() in await http_get(f"{block}.{i}", 8080)
        pid_a, pid_b = pid(sup, "a"), pid(sup, "b")
        ident = 1
        for source in forged:
            for name in "cdef":
                ident += 1
                reply = await exchange(dns, query(f"{name}.jit.test", ident), source)
                assert reply[3] & 0xF == 0  # answered (the front address), but nothing starts
        assert state(sup, "a") is State.READY and state(sup, "b") is State.READY
        assert pid(sup, "a") == pid_a and pid(sup, "b") == pid_b
        assert all(state(sup, n) is None for n in "cdef")
        assert sup.admission["evicted"] == 0 and sup.admission["queued"] == 0
        refused = FORGED * 4 if wake else 10
        assert sup.admission["refused_unproven"] == refused
        assert sup.admission["wake_limited"] == FORGED * 4 - refused
        samples = await scrape(d)
        assert get(samples, "jitlaunch_admission_total", outcome="refused_unproven") == refused


async def test_unproven_lookups_start_into_free_room(tmp_path: Path, block: str) -> None:
    """With room free, an unproven lookup starts its service (once: a flood wakes what one
    wake-limit bucket shared by every unproven source allows)."""
    cfg = load(config_text(tmp_path, services(block, "a b c d"),
                           top=host(max_instances=8, wake="rate = 0.001\nburst = 2")))
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        # Each from another /24: per-prefix buckets would let all four start.
        for i, name in enumerate("abcd"):
            await exchange(dns, query(f"{name}.jit.test", i + 1), f"{fresh_block()}.1")
        assert sup.admission["admitted"] == 2 and sup.wake.limited == 2
        assert [state(sup, n) is not None for n in "abcd"] == [True, True, False, False]
        # The same prefixes keep their own buckets for proven requests: a connection wakes c.
        assert b"Hello from c" in await http_get(f"{block}.3", 8080)


async def test_a_valid_server_cookie_proves_the_source(tmp_path: Path, block: str) -> None:
    """A first UDP query with a client cookie learns a server cookie (unproven: it cannot
    evict); the same lookup carrying that server cookie is proven and evicts."""
    cfg = load(config_text(tmp_path, services(block, "a b c"), top=host(max_instances=2)))
    source = f"{fresh_block()}.1"
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        await sup.acquire("a")
        await sup.acquire("b")
        pid_a = pid(sup, "a")
        client = bytes.fromhex("0123456789abcdef")
        reply = await exchange(dns, query("c.jit.test", 1, client), source)
        got = reply_cookie(reply)
        assert got is not None and len(got) == 24 and got[:8] == client and got[8] == 1
        assert state(sup, "c") is None and sup.admission["refused_unproven"] == 1
        # A server cookie that is not ours (one bit off) proves nothing either.
        bad = got[:-1] + bytes([got[-1] ^ 1])
        reply = await exchange(dns, query("c.jit.test", 2, bad), source)
        assert reply_cookie(reply) is not None and state(sup, "c") is None
        assert sup.admission["refused_unproven"] == 2
        # From another address the cookie is not valid (the hash covers the client address).
        reply = await exchange(dns, query("c.jit.test", 3, got), "127.0.0.1")
        assert state(sup, "c") is None and sup.admission["refused_unproven"] == 3
        # The real one: proven, so c evicts a (the least recently active) and starts.
        reply = await exchange(dns, query("c.jit.test", 4, got), source)
        assert reply_cookie(reply) == got  # less than half an hour old: the same comes back
        await wait_until(lambda: state(sup, "c") is State.READY)
        assert sup.admission["evicted"] == 1 and state(sup, "a") is None
        assert sup.services["a"].stops == {("evicted", "destroy"): 1}
        assert pid_a not in (pid(sup, "b"), pid(sup, "c"))
        assert d.dns.authority.cookies_seen == {"none": 1, "invalid": 2, "valid": 1}
        samples = await scrape(d)
        for result, n in (("none", 1), ("invalid", 2), ("valid", 1)):
            assert get(samples, "jitlaunch_dns_cookies_total", server_cookie=result) == n


async def test_tcp_lookups_are_proven(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, services(block, "a b c"), top=host(max_instances=2)))
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        await sup.acquire("a")
        await sup.acquire("b")
        reply = await exchange_tcp(dns, query("c.jit.test", 1))
        assert reply[3] & 0xF == 0
        await wait_until(lambda: state(sup, "c") is State.READY)
        assert sup.admission["evicted"] == 1 and sup.admission["refused_unproven"] == 0
