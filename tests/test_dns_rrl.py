"""Response rate limiting: the pure decisions on a clock we pass in, then a real daemon."""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from dnslib import QTYPE, RR, A, DNSRecord

from jitlaunch.config import RrlConfig
from jitlaunch.dns import rrl as rrl_mod
from jitlaunch.dns.answer import Catalog, respond
from jitlaunch.dns.rrl import (
    ERROR_IDENTITY,
    RateLimiter,
    Verdict,
    answer_identity,
    nodata_identity,
    nxdomain_identity,
    truncated,
)
from jitlaunch.lifecycle.answers import ServiceSnapshot
from jitlaunch.lifecycle.state import State

from .conftest import DEMO, config_text, load, query_tcp, running

SEND, SLIP, DROP = Verdict.SEND, Verdict.SLIP, Verdict.DROP


def limiter(**kw: object) -> RateLimiter:
    return RateLimiter(RrlConfig(**kw))  # type: ignore[arg-type]


#: One answer's identity: the tests of the rules below are about a single one.
HELLO_A = answer_identity(b"\x05hello\x03jit\x04test\x00", 1, 1)


def burst(rrl: RateLimiter, n: int, now: float, host: str = "192.0.2.1",
          identity: int = HELLO_A) -> list[Verdict]:
    return [rrl.check(host, now, identity) for _ in range(n)]


def test_a_burst_of_rate_then_every_other_limited_reply_slips() -> None:
    rrl = limiter(rate=5, slip=2)
    assert burst(rrl, 5, 0.0) == [SEND] * 5
    assert burst(rrl, 6, 0.0) == [DROP, SLIP] * 3
    assert (rrl.limited, rrl.slipped, rrl.dropped) == (6, 3, 3)


@pytest.mark.parametrize(("slip", "expected"), [
    (0, [DROP] * 6), (1, [SLIP] * 6), (3, [DROP, DROP, SLIP] * 2),
])
def test_slip(slip: int, expected: list[Verdict]) -> None:
    rrl = limiter(rate=1, slip=slip)
    assert burst(rrl, 1, 0.0) == [SEND]
    assert burst(rrl, 6, 0.0) == expected


def test_rate_is_refilled_per_second_up_to_one_seconds_worth() -> None:
    rrl = limiter(rate=10, slip=0)
    assert burst(rrl, 10, 0.0) == [SEND] * 10
    assert burst(rrl, 1, 0.0) == [DROP]  # balance now -1
    assert burst(rrl, 5, 0.6) == [SEND] * 5  # 6 credited: back to 5, then 0
    assert burst(rrl, 1, 0.6) == [DROP]
    # A long pause credits one second's worth, never more.
    assert burst(rrl, 11, 100.0) == [SEND] * 10 + [DROP]


def test_a_persistent_flood_stays_limited_and_recovers_within_the_window() -> None:
    rrl = limiter(rate=10, window=5, slip=0)
    # 100 replies a second for 20 s: after the first second's burst, all limited.
    verdicts = [rrl.check("192.0.2.1", t / 100, HELLO_A) for t in range(2000)]
    assert verdicts[:10] == [SEND] * 10
    assert SEND not in verdicts[20:]
    # The debt is bounded by rate * window: after `window` seconds of silence, served again.
    last = 1999 / 100
    assert rrl.check("192.0.2.1", last + 5.0 + 0.1, HELLO_A) is SEND
    rrl2 = limiter(rate=10, window=5, slip=0)
    for t in range(2000):
        rrl2.check("192.0.2.1", t / 100, HELLO_A)
    assert rrl2.check("192.0.2.1", last + 4.0, HELLO_A) is DROP


def test_sources_are_grouped_by_prefix() -> None:
    rrl = limiter(rate=2, slip=0)
    assert burst(rrl, 2, 0.0, "192.0.2.1") == [SEND, SEND]
    assert burst(rrl, 1, 0.0, "192.0.2.200") == [DROP]  # same /24
    assert burst(rrl, 1, 0.0, "192.0.3.1") == [SEND]  # another /24
    assert burst(rrl, 2, 0.0, "2001:db8:0:ff::1") == [SEND, SEND]
    assert burst(rrl, 1, 0.0, "2001:db8:0:1::2%lo") == [DROP]  # same /56
    assert burst(rrl, 1, 0.0, "2001:db8:0:100::1") == [SEND]  # another /56
    narrow = limiter(rate=1, slip=0, ipv4_prefix=32)
    assert burst(narrow, 1, 0.0, "192.0.2.1") == [SEND]
    assert burst(narrow, 1, 0.0, "192.0.2.2") == [SEND]


def test_exempt_networks_are_never_limited() -> None:
    rrl = limiter(rate=1, slip=0, exempt=("127.0.0.0/8", "2001:db8::/32"))
    assert burst(rrl, 100, 0.0, "127.1.2.3") == [SEND] * 100
    assert burst(rrl, 100, 0.0, "2001:db8:ffff::1") == [SEND] * 100
    assert burst(rrl, 2, 0.0, "128.0.0.1") == [SEND, DROP]


def test_off() -> None:
    rrl = limiter(rate=0)
    assert burst(rrl, 10000, 0.0) == [SEND] * 10000
    assert repr(rrl) == "<RateLimiter off>"


def test_state_is_bounded_whatever_the_sources() -> None:
    """A flood from a million spoofed sources costs no memory: the table has a fixed size,
    and sources sharing a bucket can only be limited sooner."""
    rrl = RateLimiter(RrlConfig(rate=1, slip=0), buckets=1024)
    size = rrl._full.buffer_info()[1]
    for n in range(200_000):
        rrl.check(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", n / 1e6, HELLO_A)
    assert rrl._full.buffer_info()[1] == size == 1024
    # 200,000 sources, 782 /24 prefixes, 1024 buckets, 1 reply a second each: mostly limited.
    assert rrl.limited > 190_000


# ---- what counts as one reply (the Vixie-Schryver identity, as BIND and NSD key it) ---------

HELLO = b"\x05hello\x03jit\x04test\x00"
APEX = b"\x03jit\x04test\x00"


def test_each_identity_of_a_prefix_has_its_own_budget() -> None:
    """A resolver behind one prefix asking many names is not limited as one: each name,
    type and class is its own budget of ``rate`` replies a second."""
    rrl = limiter(rate=2, slip=0)
    # 50 names whose buckets differ for this prefix: two identities that share a bucket (a
    # keyed hash into 65,536; about one run in 50 would have a pair) share its budget, by
    # design, and that is not what this test is about.
    source = rrl._source("192.0.2.7")
    names, buckets = [], set()
    for i in itertools.count():
        name = b"\x03s" + bytes([48 + i // 75, 48 + i % 75]) + APEX
        bucket = (source ^ answer_identity(name, 1, 1)) & rrl._mask
        if bucket not in buckets:
            buckets.add(bucket)
            names.append(name)
        if len(names) == 50:
            break
    for name in names:
        assert burst(rrl, 2, 0.0, "192.0.2.7", answer_identity(name, 1, 1)) == [SEND, SEND]
    for name in names:
        assert burst(rrl, 1, 0.0, "192.0.2.8", answer_identity(name, 1, 1)) == [DROP]
    # Another type, another class: other identities. Another prefix: another budget. (A
    # name whose other identities land in buckets of their own, as above.)
    other = rrl._source("192.0.3.9")
    name = next(n for n in names
                if not {(source ^ answer_identity(n, 28, 1)) & rrl._mask,
                        (source ^ answer_identity(n, 1, 255)) & rrl._mask,
                        (other ^ answer_identity(n, 1, 1)) & rrl._mask} & buckets)
    assert burst(rrl, 2, 0.0, "192.0.2.9", answer_identity(name, 28, 1)) == [SEND, SEND]
    assert burst(rrl, 2, 0.0, "192.0.2.9", answer_identity(name, 1, 255)) == [SEND, SEND]
    assert burst(rrl, 2, 0.0, "192.0.3.9", answer_identity(name, 1, 1)) == [SEND, SEND]
    assert rrl.limited == 50


def test_identities_by_kind() -> None:
    """NODATA is keyed by the name (any type), NXDOMAIN by the zone, errors by nothing."""
    assert nodata_identity(HELLO, 1) == nodata_identity(HELLO, 1)
    assert nodata_identity(HELLO, 1) != answer_identity(HELLO, 15, 1)
    assert nodata_identity(HELLO, 1) != nodata_identity(b"\x01x" + APEX, 1)
    assert nxdomain_identity(APEX) != nxdomain_identity(b"\x05other\x00")
    kinds = {answer_identity(HELLO, 1, 1) & 3, nodata_identity(HELLO, 1) & 3,
             nxdomain_identity(APEX) & 3, ERROR_IDENTITY & 3}
    assert kinds == {rrl_mod.ANSWER, rrl_mod.NXDOMAIN, rrl_mod.ERROR}


def test_each_kind_has_its_rate() -> None:
    rrl = limiter(rate=3, nxdomain_rate=1, error_rate=2, slip=0)
    assert rrl.rates == (3, 1, 2)
    assert burst(rrl, 4, 0.0, identity=HELLO_A) == [SEND] * 3 + [DROP]
    assert burst(rrl, 2, 0.0, identity=nxdomain_identity(APEX)) == [SEND, DROP]
    assert burst(rrl, 3, 0.0, identity=ERROR_IDENTITY) == [SEND, SEND, DROP]
    # Unset, the other two follow `rate`; 0 leaves that kind alone.
    assert limiter(rate=7).rates == (7, 7, 7)
    free = limiter(rate=1, nxdomain_rate=0, slip=0)
    assert burst(free, 100, 0.0, identity=nxdomain_identity(APEX)) == [SEND] * 100
    assert burst(free, 2, 0.0, identity=HELLO_A) == [SEND, DROP]
    # With every rate 0 it is off; one rate alone keeps it on.
    assert not limiter(rate=0).enabled
    assert limiter(rate=0, error_rate=5).enabled


def test_a_collision_only_limits_sooner() -> None:
    """Identities that share a bucket share its balance, each reply debiting its own kind's
    cost: together they get no more than either would alone."""
    one = RateLimiter(RrlConfig(rate=4, nxdomain_rate=2, slip=0), buckets=1)
    a, b = answer_identity(HELLO, 1, 1), answer_identity(HELLO, 28, 1)
    assert burst(one, 2, 0.0, identity=a) + burst(one, 3, 0.0, identity=b) == [SEND] * 4 + [DROP]
    # An NXDOMAIN costs twice an answer here (2/s against 4/s): one of them takes half the second.
    one = RateLimiter(RrlConfig(rate=4, nxdomain_rate=2, slip=0), buckets=1)
    nx = nxdomain_identity(APEX)
    assert burst(one, 1, 0.0, identity=nx) + burst(one, 3, 0.0, identity=a) == [SEND] * 3 + [DROP]


def test_sources_are_remembered_within_a_bound() -> None:
    rrl = limiter(rate=1)
    for n in range(3 * rrl_mod.SOURCES):
        rrl.check(f"10.0.{n >> 8 & 255}.{n & 255}", 0.0, HELLO_A)
    assert 0 < len(rrl._sources) <= rrl_mod.SOURCES


def test_the_answer_logic_gives_each_reply_its_identity(tmp_path: Path) -> None:
    """What ``respond`` (fast path and general path alike) tags its replies with."""
    services = SERVICE.replace("FRONT", "192.0.2.1").replace("DEMO", "true")
    config = load(config_text(tmp_path, services))
    catalog = Catalog(config.dns, config.services)

    def identity(name: str, qtype: int = 1, qclass: int = 1, flags: int = 0) -> int:
        q = DNSRecord.question(name, QTYPE[qtype])
        q.header.bitmap = flags
        q.q.qclass = qclass
        snap = ServiceSnapshot(State.STOPPED, None, 0.0)
        resp = respond(q.pack(), catalog, lambda n: snap, 0.0, udp=True)
        assert resp.reply is not None
        return resp.identity

    hello_a = identity("hello.jit.test")
    assert hello_a == identity("HeLLo.JIT.test") == answer_identity(HELLO, 1, 1)
    assert identity("hello.jit.test", 28) not in (hello_a, identity("hello.jit.test", 255))
    # NODATA of any type of one name: one identity; of another name, another.
    assert identity("hello.jit.test", 15) == identity("hello.jit.test", 16) == nodata_identity(HELLO, 1)
    assert identity("jit.test", 15) == nodata_identity(APEX, 1) != identity("hello.jit.test", 15)
    # Answers at the apex are answers.
    assert identity("jit.test", 6) == answer_identity(APEX, 6, 1)
    # Every NXDOMAIN of the zone is one identity, in any case, of either class.
    nx = {identity(f"nope{i}.jit.test", qtype) for i in range(20) for qtype in (1, 28, 15)}
    assert nx == {nxdomain_identity(APEX)} == {identity("a.b.c.JIT.test", 1, 255)}
    # Every error is one identity: REFUSED, FORMERR (an RCODE in the query), NOTIMP.
    errors = {identity("example.org"), identity("other.example", 28),
              identity("hello.jit.test", flags=0x0001), identity("hello.jit.test", flags=0x2000),
              identity("jit.test", 252)}
    assert errors == {ERROR_IDENTITY}


QUESTION = DNSRecord.question("hello.jit.test", "A")


def test_truncated_keeps_header_and_question_only() -> None:
    reply = QUESTION.reply()
    reply.add_answer(RR("hello.jit.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=30))
    wire = reply.pack()
    cut = truncated(wire)
    rec = DNSRecord.parse(cut)
    assert rec.header.tc == 1 and rec.header.id == QUESTION.header.id
    assert rec.q == QUESTION.q and not rec.rr and not rec.auth and not rec.ar
    assert len(cut) == len(QUESTION.pack())  # never larger than the query: no amplification
    formerr = struct.pack("!HHHHHH", 7, 0x8001, 0, 0, 0, 0)
    assert truncated(formerr) == struct.pack("!HHHHHH", 7, 0x8201, 0, 0, 0, 0)
    # A question that does not parse: the header alone.
    flags = struct.unpack_from("!H", wire, 2)[0]
    assert truncated(wire[:14]) == struct.pack("!HHHHHH", QUESTION.header.id, flags | 0x200, 0, 0, 0, 0)


# ---- a real daemon ------------------------------------------------------------------------


SERVICE = """
[[service]]
name = "hello"
front = ["FRONT"]
ports = [18080]
answer = "proxy"
[service.process]
command = "DEMO"
"""


async def test_a_burst_from_loopback_is_limited_and_slips_tc(tmp_path: Path, block: str) -> None:
    services = SERVICE.replace("FRONT", f"{block}.1").replace("DEMO", DEMO)
    cfg = load(config_text(tmp_path, services, "[dns.rrl]\nrate = 5\nslip = 2\nwindow = 60"))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((ep.host, ep.port))
            for _ in range(40):
                await sock.send(QUESTION.pack())
            with trio.fail_after(10):
                while d.dns.rrl.checked < 40:
                    await trio.sleep(0.01)
            limited = d.dns.rrl.limited
            # Real time passes during the burst: at most a token or two more than the rate.
            assert 33 <= limited <= 35
            slipped, dropped = d.dns.counts["rrl_slipped"], d.dns.counts["rrl_dropped"]
            assert slipped + dropped == limited and abs(slipped - dropped) <= 1
            replies = []
            with trio.fail_after(10):
                while len(replies) < 40 - dropped:
                    replies.append(DNSRecord.parse(await sock.recv(4096)))
            # And nothing more: the rest were dropped.
            with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_DGRAM) as dup:
                with pytest.raises(BlockingIOError):
                    dup.recv(4096, socket.MSG_DONTWAIT)
        full = [r for r in replies if not r.header.tc]
        cut = [r for r in replies if r.header.tc]
        assert len(full) == 40 - limited and all(r.rr for r in full)
        assert len(cut) == slipped and all(not r.rr and not r.auth and not r.ar for r in cut)
        assert all(r.q == QUESTION.q for r in replies)
        # TCP is never limited.
        recs = await query_tcp((ep.host, ep.port), [("hello.jit.test", "A")] * 20)
        assert all(r.rr for r in recs)


async def test_an_exempt_network_is_not_limited(tmp_path: Path, block: str) -> None:
    services = SERVICE.replace("FRONT", f"{block}.1").replace("DEMO", DEMO)
    rrl = '[dns.rrl]\nrate = 5\nexempt = ["127.0.0.0/8"]'
    async with running(load(config_text(tmp_path, services, rrl))) as d:
        ep = d.dns_endpoints[0]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((ep.host, ep.port))
            for _ in range(40):
                await sock.send(QUESTION.pack())
            with trio.fail_after(10):
                replies = [DNSRecord.parse(await sock.recv(4096)) for _ in range(40)]
        assert all(r.rr and not r.header.tc for r in replies)
        assert d.dns.rrl.limited == 0


async def test_ipv6_sources_are_limited_too(tmp_path: Path, block: str) -> None:
    services = SERVICE.replace("FRONT", f"{block}.1").replace("DEMO", DEMO)
    text = config_text(tmp_path, services, "[dns.rrl]\nrate = 2\nslip = 1")
    cfg = load(text.replace('listen = ["127.0.0.1:0"]', 'listen = ["[::1]:0"]'))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect(("::1", ep.port))
            for _ in range(10):
                await sock.send(QUESTION.pack())
            with trio.fail_after(10):
                replies = [DNSRecord.parse(await sock.recv(4096)) for _ in range(10)]  # slip 1
        # Two sent whole, the rest truncated (a token more if time passed in between).
        truncated_count = sum(r.header.tc for r in replies)
        assert 7 <= truncated_count <= 8 and d.dns.rrl.limited == truncated_count


# ---- a resolver, a reflector and a random-name flood, against a real daemon ---------------

RESOLVER_NAMES = [f"s{i}.jit.test" for i in range(50)]
RESOLVER_SERVICE = """
[[service]]
name = "many"
names = [NAMES]
front = ["FRONT"]
ports = [18080]
answer = "proxy"
boot_timeout = "5m"
[service.process]
command = "sleep 300"
"""


def resolver_config(tmp_path: Path, block: str, rrl: str = "") -> str:
    names = ", ".join(f'"{n}"' for n in RESOLVER_NAMES)
    services = RESOLVER_SERVICE.replace("NAMES", names).replace("FRONT", f"{block}.1")
    return config_text(tmp_path, services, rrl)


async def udp_from(address: str, server: tuple[str, int]) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((address, 0))
    await sock.connect(server)
    return sock


@asynccontextmanager
async def collecting(socks: list[trio.socket.SocketType]) -> AsyncIterator[list[DNSRecord]]:
    """Replies to ``socks``, read as they come (a burst would overflow a socket's buffer)
    until the block ends, then what is left waiting."""
    replies: list[DNSRecord] = []

    async def receive(sock: trio.socket.SocketType) -> None:
        while True:
            replies.append(DNSRecord.parse(await sock.recv(4096)))

    async with trio.open_nursery() as nursery:
        for sock in socks:
            nursery.start_soon(receive, sock)
        yield replies
        nursery.cancel_scope.cancel()
    for sock in socks:
        with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_DGRAM) as dup:
            while True:
                try:
                    replies.append(DNSRecord.parse(dup.recv(4096, socket.MSG_DONTWAIT)))
                except BlockingIOError:
                    break


async def checked(d: object, n: int) -> None:
    """Wait until the daemon's rate limiter has judged ``n`` replies."""
    with trio.fail_after(15):
        while d.dns.rrl.checked < n:  # type: ignore[attr-defined]
            await trio.sleep(0.01)


@pytest.mark.slow
async def test_a_resolver_behind_one_prefix_gets_every_answer(tmp_path: Path, block: str) -> None:
    """Many addresses of one /24 (a large resolver's) ask 50 names 8 times a second each,
    400 queries a second: with RRL at its default (200 identical answers a second), every
    answer comes whole. (Limited per prefix alone, a third of them were lost.)"""
    cfg = load(resolver_config(tmp_path, block))
    assert cfg.dns.rrl.rate == 200 and cfg.dns.rrl.exempt == ()
    rounds = 20  # 2.5 s
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        socks = [await udp_from(f"{block}.{100 + i}", (ep.host, ep.port)) for i in range(10)]
        try:
            async with collecting(socks) as replies:
                start = trio.current_time()
                for r in range(rounds):
                    await trio.sleep_until(start + r / 8)  # the resolver's pace, not a wait
                    for k, name in enumerate(RESOLVER_NAMES):
                        q = DNSRecord.question(name, "A")
                        q.header.id = r * 100 + k
                        await socks[k % len(socks)].send(q.pack())
                await checked(d, rounds * len(RESOLVER_NAMES))
        finally:
            for s in socks:
                s.close()
        assert d.dns.rrl.limited == 0
        assert len(replies) == rounds * len(RESOLVER_NAMES)
        assert all(not r.header.tc and r.rr for r in replies)
        assert sorted(r.header.id for r in replies) == sorted(
            r * 100 + k for r in range(rounds) for k in range(len(RESOLVER_NAMES)))


async def test_one_name_asked_a_thousand_times_a_second_is_limited(tmp_path: Path, block: str) -> None:
    """The reflection pattern: one identical answer, 1,000 times in a second, to one source.
    At most ``rate`` (200) a second of them are sent whole; of the rest every other one is
    sent truncated (``slip = 2``), the others dropped."""
    async with running(load(resolver_config(tmp_path, block))) as d:
        ep = d.dns_endpoints[0]
        sock = await udp_from(f"{block}.7", (ep.host, ep.port))
        with sock:
            query = DNSRecord.question(RESOLVER_NAMES[0], "A").pack()
            async with collecting([sock]) as replies:
                start = trio.current_time()
                for i in range(20):  # 50 every 50 ms
                    await trio.sleep_until(start + i / 20)
                    for _ in range(50):
                        await sock.send(query)
                await checked(d, 1000)
                elapsed = trio.current_time() - start
        whole = [r for r in replies if not r.header.tc]
        cut = [r for r in replies if r.header.tc]
        # One second's burst, plus the rate for the time it took: bounded in count and time.
        assert 200 <= len(whole) <= 200 * (1 + elapsed) + 1
        rrl = d.dns.rrl
        assert rrl.limited == 1000 - len(whole) and len(cut) == rrl.slipped
        assert abs(rrl.slipped - rrl.dropped) <= 1 and len(replies) == 1000 - rrl.dropped
        assert all(r.rr for r in whole) and all(not r.rr for r in cut)


async def test_nxdomain_for_random_names_is_limited_as_one(tmp_path: Path, block: str) -> None:
    """Random names from several addresses of one prefix: every NXDOMAIN of the zone is one
    identity (``nxdomain_rate``), so a random-name flood is limited as if it were one name;
    answers to that prefix are not."""
    cfg = load(resolver_config(tmp_path, block, "[dns.rrl]\nnxdomain_rate = 20\nslip = 0"))
    assert (cfg.dns.rrl.rate, cfg.dns.rrl.nxdomain_rate, cfg.dns.rrl.error_rate) == (200, 20, None)
    async with running(cfg) as d:
        assert d.dns.rrl.rates == (200, 20, 200)
        ep = d.dns_endpoints[0]
        socks = [await udp_from(f"{block}.{50 + i}", (ep.host, ep.port)) for i in range(5)]
        try:
            async with collecting(socks) as replies:
                start = trio.current_time()
                for i in range(200):
                    q = DNSRecord.question(f"r{i}x{start:.0f}.jit.test", "A")
                    await socks[i % 5].send(q.pack())
                await checked(d, 200)
                elapsed = trio.current_time() - start
            assert all(r.header.rcode == 3 and not r.header.tc for r in replies)
            assert 20 <= len(replies) <= 20 * (1 + elapsed) + 1
            assert d.dns.rrl.limited == 200 - len(replies)
            # The names the prefix asks for are still answered.
            await socks[0].send(DNSRecord.question(RESOLVER_NAMES[3], "A").pack())
            await checked(d, 201)
            with trio.fail_after(5):
                assert DNSRecord.parse(await socks[0].recv(4096)).rr
        finally:
            for s in socks:
                s.close()
