"""Response rate limiting: the pure decisions on a clock we pass in, then a real daemon."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio
from dnslib import QTYPE, RR, A, DNSRecord

from jitlaunch.config import RrlConfig
from jitlaunch.dns.rrl import RateLimiter, Verdict, truncated

from .conftest import DEMO, config_text, load, query_tcp, running

SEND, SLIP, DROP = Verdict.SEND, Verdict.SLIP, Verdict.DROP


def limiter(**kw: object) -> RateLimiter:
    return RateLimiter(RrlConfig(**kw))  # type: ignore[arg-type]


def burst(rrl: RateLimiter, n: int, now: float, host: str = "192.0.2.1") -> list[Verdict]:
    return [rrl.check(host, now) for _ in range(n)]


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
    verdicts = [rrl.check("192.0.2.1", t / 100) for t in range(2000)]
    assert verdicts[:10] == [SEND] * 10
    assert SEND not in verdicts[20:]
    # The debt is bounded by rate * window: after `window` seconds of silence, served again.
    last = 1999 / 100
    assert rrl.check("192.0.2.1", last + 5.0 + 0.1) is SEND
    rrl2 = limiter(rate=10, window=5, slip=0)
    for t in range(2000):
        rrl2.check("192.0.2.1", t / 100)
    assert rrl2.check("192.0.2.1", last + 4.0) is DROP


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
    size = rrl._balance.buffer_info()[1]
    for n in range(200_000):
        rrl.check(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", n / 1e6)
    assert rrl._balance.buffer_info()[1] == size == 1024
    # 200,000 sources, 782 /24 prefixes, 1024 buckets, 1 reply a second each: mostly limited.
    assert rrl.limited > 190_000


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
