"""The pure answer function: golden bytes for each rule, and random input that never raises.

Expected replies are assembled here byte by byte (not with dnslib), so that a change in how
replies are built shows up as a changed byte.
"""

from __future__ import annotations

import random
import re
import struct

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from jitlaunch.dns import answer, authority, rrl
from jitlaunch.dns import wire as wire_mod
from jitlaunch.dns.answer import Catalog, Response, respond
from jitlaunch.dns.authority import Authority
from jitlaunch.lifecycle.answers import ServiceAnswer, ServiceSnapshot, answer_for
from jitlaunch.lifecycle.state import State

from .conftest import parse_config
from .dnsgen import random_name, random_query
from .dnsreply import parse_reply
from .dnstest import (
    AA,
    CATALOG,
    CONFIG,
    NOW,
    QR,
    RD,
    TC,
    FakeSupervisor,
    header,
    name,
    opt,
    ptr,
    question,
    rr,
    run,
    snapshot,
    soa_rdata,
)

# ---- a tiny independent encoder for expected bytes -------------------------------------


# ---- golden replies --------------------------------------------------------------------


def test_a_for_a_service() -> None:
    q = header(0x1234, RD) + question("hello.jit.test", 1)
    expected = header(0x1234, QR | AA | RD, an=1) + question("hello.jit.test", 1) + rr(
        ptr(12), 1, 30, bytes([127, 77, 1, 5])
    )
    resp = run(q)
    assert resp.reply == expected
    assert resp.service == "hello" and resp.cacheable and not resp.pending


def test_question_echoed_as_asked_and_matched_case_insensitively() -> None:
    q = header(7, 0) + question("HeLLo.JiT.TeSt", 1)
    expected = header(7, QR | AA, an=1) + question("HeLLo.JiT.TeSt", 1) + rr(
        ptr(12), 1, 30, bytes([127, 77, 1, 5])
    )
    assert run(q).reply == expected


def test_aaaa_where_a_service_has_ipv6() -> None:
    q = header(9, 0) + question("six.jit.test", 28)
    v6 = bytes.fromhex("fd000000000000000000000000000002")
    expected = header(9, QR | AA, an=1) + question("six.jit.test", 28) + rr(ptr(12), 28, 1, v6)
    assert run(q).reply == expected


def test_nxdomain_with_soa() -> None:
    q = header(0xBEEF, RD) + question("nope.jit.test", 1)
    apex = ptr(12 + 5)  # "jit" starts after the 5 bytes of "\x04nope"
    expected = (
        header(0xBEEF, QR | AA | RD | 3, ns=1)
        + question("nope.jit.test", 1)
        + rr(apex, 6, 30, soa_rdata(apex))
    )
    resp = run(q)
    assert resp.reply == expected
    assert resp.service is None


def test_nodata_for_other_types_and_empty_non_terminals() -> None:
    for qname, qtype, skip in (("hello.jit.test", 15, 6), ("b.jit.test", 1, 2)):
        q = header(1, 0) + question(qname, qtype)
        apex = ptr(12 + skip)
        expected = header(1, QR | AA, ns=1) + question(qname, qtype) + rr(apex, 6, 30, soa_rdata(apex))
        assert run(q).reply == expected, qname
    # An MX query names the service but does not start it.
    assert run(header(1, 0) + question("hello.jit.test", 15)).service is None


def test_soa_and_ns_at_the_apex() -> None:
    q = header(2, 0) + question("jit.test", 6)
    expected = header(2, QR | AA, an=1) + question("jit.test", 6) + rr(ptr(12), 6, 300, soa_rdata(ptr(12)))
    assert run(q).reply == expected
    q = header(3, 0) + question("jit.test", 2)
    ns = b"\x02ns" + ptr(12)
    expected = (
        header(3, QR | AA, an=1, ar=1)
        + question("jit.test", 2)
        + rr(ptr(12), 2, 300, ns)
        + rr(ptr(12 + 14 + 12), 1, 300, bytes([127, 0, 0, 1]))  # "ns" in the NS rdata
    )
    assert run(q).reply == expected


def test_refused_outside_every_zone_and_for_other_classes() -> None:
    q = header(0x4242, RD) + question("example.org", 1)
    assert run(q).reply == header(0x4242, QR | RD | 5) + question("example.org", 1)
    q = header(5, 0) + question("hello.jit.test", 16, qclass=3)  # CH TXT
    assert run(q).reply == header(5, QR | 5) + question("hello.jit.test", 16, qclass=3)
    q = header(6, 0) + question("jit.test", 252)  # AXFR: NOTIMP over UDP, REFUSED over TCP
    assert run(q).reply == header(6, QR | 4) + question("jit.test", 252)
    assert run(q, udp=False).reply == header(6, QR | 5) + question("jit.test", 252)
    q = header(7, 0) + question("jit.test", 251)  # IXFR
    assert run(q).reply == header(7, QR | 5) + question("jit.test", 251)
    # Transfers of anything but a zone: NOTAUTH (as NSD); AXFR over TCP like IXFR.
    q = header(7, 0) + question("hello.jit.test", 251)
    assert run(q).reply == header(7, QR | 9) + question("hello.jit.test", 251)
    q = header(7, 0) + question("example.org", 252)
    assert run(q, udp=False).reply == header(7, QR | 9) + question("example.org", 252)
    assert run(q).reply == header(7, QR | 4) + question("example.org", 252)
    # The client's SOA in an IXFR query's authority section is allowed.
    soa = b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 0, 0)
    q = header(7, 0, ns=1) + question("jit.test", 251) + soa
    assert run(q).reply == header(7, QR | 5) + question("jit.test", 251)
    q = header(8, RD) + question("hello.jit.test", 1, qclass=4)  # HS: header only, as NSD
    assert run(q).reply == header(8, QR | RD | 5, qd=0)


def test_labels_are_compared_on_the_wire() -> None:
    """RFC 1035 3.1, RFC 2181 11: a dot inside a label is not a label boundary."""
    for qname in (b"\x0bpy.jit.test\0", b"\x08jit.test\0"):
        q = header(9, 0) + qname + struct.pack("!HH", 1, 1)
        resp = run(q)
        assert resp.reply == header(9, QR | 5) + qname + struct.pack("!HH", 1, 1)
        assert resp.service is None
    # A label that is not UTF-8 is a name like any other: NXDOMAIN inside the zone.
    q = header(10, 0) + b"\x02\xff\xfe\x03jit\x04test\0" + struct.pack("!HH", 1, 1)
    reply = parse_reply(run(q).reply)  # type: ignore[arg-type]
    assert reply.flags == QR | AA | 3 and reply.authority[0].rtype == 6
    # Upper case ASCII matches, but only ASCII: a Latin-1 capital does not fold.
    assert run(header(11, 0) + question("HELLO.JIT.TEST", 1)).service == "hello"
    q = header(12, 0) + b"\x05h\xc9llo\x03jit\x04test\0" + struct.pack("!HH", 1, 1)
    assert parse_reply(run(q).reply).flags & 0xF == 3  # type: ignore[arg-type]


def test_class_any_is_not_authoritative() -> None:
    """RFC 6895 3.2: the answer, with AA clear; negative answers without the SOA (as NSD)."""
    q = header(13, 0) + question("hello.jit.test", 1, qclass=255)
    expected = header(13, QR, an=1) + question("hello.jit.test", 1, qclass=255) + rr(
        ptr(12), 1, 30, bytes([127, 77, 1, 5]))
    assert run(q).reply == expected
    q = header(14, 0) + question("nope.jit.test", 1, qclass=255)
    assert run(q).reply == header(14, QR | 3) + question("nope.jit.test", 1, qclass=255)


def test_formerr_for_garbage_with_a_header() -> None:
    q = header(0xABCD, RD) + b"\x05hel"  # question cut short
    assert run(q).reply == struct.pack("!HHHHHH", 0xABCD, QR | RD | 1, 0, 0, 0, 0)
    two = header(8, 0, qd=2) + question("hello.jit.test", 1) + question("six.jit.test", 1)
    assert run(two).reply == header(8, QR | 1, qd=0)


def test_notimp_for_other_opcodes() -> None:
    q = header(0x0101, 2 << 11 | RD) + question("hello.jit.test", 1)  # STATUS
    # Header only, as NSD answers: the rest of the message may mean something else.
    assert run(q).reply == header(0x0101, QR | (2 << 11) | RD | 4, qd=0)
    q = header(0x0102, 5 << 11, ar=1) + question("jit.test", 6) + opt(4096, do=True)  # UPDATE
    assert run(q).reply == header(0x0102, QR | (5 << 11) | 4, qd=0, ar=1) + opt(1232, do=True)


def test_nothing_for_short_packets_and_responses() -> None:
    assert run(b"\x00" * 11).reply is None
    assert run(header(1, QR) + question("hello.jit.test", 1)).reply is None


def test_edns_echoed_with_our_payload_and_do_bit() -> None:
    q = header(10, 0, ar=1) + question("hello.jit.test", 1) + opt(4096, do=True)
    expected = (
        header(10, QR | AA, an=1, ar=1)
        + question("hello.jit.test", 1)
        + rr(ptr(12), 1, 30, bytes([127, 77, 1, 5]))
        + opt(1232, do=True)
    )
    assert run(q).reply == expected


def test_badvers_for_unknown_edns_version() -> None:
    q = header(11, RD, ar=1) + question("hello.jit.test", 1) + opt(4096, version=1, do=True)
    reply = run(q).reply
    assert reply == header(11, QR | RD, ar=1) + question("hello.jit.test", 1) + b"\x00" + struct.pack(
        "!HHIH", 41, 1232, 1 << 24, 0)


def test_edns_probe_without_a_question() -> None:
    q = header(12, RD, qd=0, ar=1) + opt(4096)
    assert run(q).reply == header(12, QR | RD, qd=0, ar=1) + opt(1232)
    # Not a probe: FORMERR, and with the question count wrong, RD is cleared too (as NSD).
    q = header(12, RD, qd=0, ar=1) + opt(4096, version=1)
    assert run(q).reply == header(12, QR | 1, qd=0, ar=1) + opt(1232)
    q = header(12, RD, qd=2) + question("hello.jit.test", 1) + question("six.jit.test", 1)
    assert run(q).reply == header(12, QR | 1, qd=0)
    # ...unless not even one question can be read (NSD reads one whatever QDCOUNT says).
    assert run(header(12, RD, qd=0)).reply == header(12, QR | RD | 1, qd=0)


def test_tc_when_udp_reply_too_large_and_edns_size_respected() -> None:
    q = header(12, 0) + question("many.jit.test", 1)
    small = run(q).reply
    assert small == header(12, QR | AA | TC) + question("many.jit.test", 1)
    full_tcp = run(q, udp=False).reply
    assert full_tcp is not None and len(DNSRecord.parse(full_tcp).rr) == 40
    q = header(13, 0, ar=1) + question("many.jit.test", 1) + opt(1232)
    big = run(q).reply
    assert big is not None and 512 < len(big) <= 1232
    assert len(DNSRecord.parse(big).rr) == 40 and not DNSRecord.parse(big).header.tc
    q = header(14, 0, ar=1) + question("many.jit.test", 1) + opt(600)
    assert DNSRecord.parse(run(q).reply).header.tc  # type: ignore[arg-type]


def test_wait_mode_holds_the_reply_and_servfail_when_failed() -> None:
    q = header(15, 0) + question("slow.jit.test", 1)
    resp = run(q)
    assert resp == Response(None, "slow", pending=True)
    failed = respond(q, CATALOG, lambda n: ServiceSnapshot(State.FAILED, None, NOW + 1), NOW, udp=True)
    assert failed.reply == header(15, QR | 2) + question("slow.jit.test", 1)


def test_any_gets_one_rrset() -> None:
    """RFC 8482 4.1, as NSD answers: the A records (or the AAAA records if there are none)
    of a service or a nameserver, the SOA alone at the apex; never more than one RRset."""
    def types(qname: str, qclass: int = 1) -> list[str]:
        resp = run(header(16, 0) + question(qname, 255, qclass))
        rec = DNSRecord.parse(resp.reply)  # type: ignore[arg-type]
        assert not rec.auth and not rec.ar
        return [QTYPE[r.rtype] for r in rec.rr]

    assert types("six.jit.test") == ["A"] and types("hello.jit.test") == ["A"]
    assert types("v6.jit.test") == ["AAAA"] and types("ns.jit.test") == ["A"]
    assert types("many.jit.test") == []  # 40 A records: TC without EDNS, as for A
    assert types("jit.test") == ["SOA"] == types("jit.test", 255)
    # At the apex the SOA query's very bytes, but for the type: 76 bytes for 26, where the
    # whole apex (SOA, NS and the glue) was 136 bytes.
    q = header(17, 0) + question("jit.test", 255)
    soa = run(header(17, 0) + question("jit.test", 6)).reply
    assert soa is not None and len(q) == 26
    assert run(q).reply == soa.replace(question("jit.test", 6), question("jit.test", 255))
    assert len(soa) == 76
    # ANY still starts a service, as A and AAAA do.
    assert run(header(18, 0) + question("six.jit.test", 255)).service == "six"


def tsig_record(key: str = "key.example", algorithm: str = "hmac-sha256", mac: bytes = b"m" * 32,
                original_id: int = 0x77, other: bytes = b"", rclass: int = 255, ttl: int = 0,
                cut: int = 0, pad: bytes = b"") -> bytes:
    rdata = (name(algorithm) + struct.pack("!HIH", 0x0001, 0x02030405, 300)
             + struct.pack("!H", len(mac)) + mac + struct.pack("!HHH", original_id, 0, len(other))
             + other)
    rdata = rdata[: len(rdata) - cut] + pad
    return name(key) + struct.pack("!HHIH", 250, rclass, ttl, len(rdata)) + rdata


def badkey(key: str = "key.example", algorithm: str = "hmac-sha256", original_id: int = 0x77) -> bytes:
    """Our reply's TSIG record: the query's names, time and fudge, no MAC, BADKEY (17)."""
    rdata = (name(algorithm) + struct.pack("!HIH", 0x0001, 0x02030405, 300) + b"\0\0"
             + struct.pack("!HHH", original_id, 17, 0))
    return name(key) + struct.pack("!HHIH", 250, 255, 0, len(rdata)) + rdata


def test_a_signed_query_gets_notauth_badkey() -> None:
    """RFC 8945 5.2.1, as NSD 4.6 answers an unknown key: NOTAUTH, no question, an unsigned
    TSIG record with error BADKEY; the names in lower case, time, fudge and original ID
    copied; other data left out (4.2: only BADTIME has any)."""
    q = header(0x55, RD, ar=1) + question("hello.jit.test", 1) + tsig_record()
    reply = run(q).reply
    assert reply == header(0x55, QR | RD | 9, qd=0, ar=1) + badkey()
    assert reply is not None and len(reply) < len(q)
    # Whatever is asked, even outside our zones or a transfer, over either transport.
    for qname, qtype in (("example.org", 1), ("jit.test", 252), ("nope.jit.test", 255)):
        q = header(0x56, 0, ar=1) + question(qname, qtype) + tsig_record(
            key="Key.EXAMPLE", algorithm="HMAC-SHA256", other=b"abcdef", original_id=9)
        for udp in (True, False):
            assert run(q, udp).reply == header(0x56, QR | 9, qd=0, ar=1) + badkey(original_id=9)
    # With an OPT (before the TSIG record), ours; with flags the query should not have set.
    q = header(0x57, 0x0700, ar=2) + question("jit.test", 6) + opt(4096, do=True) + tsig_record()
    assert run(q).reply == header(0x57, QR | RD | 9, qd=0, ar=2) + opt(1232, do=True) + badkey()
    assert run(q).identity == rrl.ERROR_IDENTITY


@pytest.mark.parametrize("shape", ["before the OPT", "class IN", "TTL", "data too long",
                                   "data too short", "two", "count too large", "no question"])
def test_a_tsig_record_out_of_place_or_shape_is_formerr(shape: str) -> None:
    """As NSD: the TSIG record must be the last, class ANY, TTL 0, its data exactly its
    fields (RFC 8945 4.2, 5.2), in an otherwise well-formed query."""
    tsig, ar, qd, body = tsig_record(), 1, 1, question("hello.jit.test", 1)
    if shape == "before the OPT":
        tsig, ar = tsig + opt(1232), 2
    elif shape == "class IN":
        tsig = tsig_record(rclass=1)
    elif shape == "TTL":
        tsig = tsig_record(ttl=5)
    elif shape == "data too long":
        tsig = tsig_record(pad=b"x")
    elif shape == "data too short":
        tsig = tsig_record(cut=1)
    elif shape == "two":
        tsig, ar = tsig + tsig, 2
    elif shape == "count too large":
        ar = 2
    elif shape == "no question":
        qd, body = 0, b""
    q = header(0x58, RD, qd=qd, ar=ar) + body + tsig
    reply = run(q).reply
    assert reply is not None and reply[:4] == struct.pack("!HH", 0x58, QR | (RD if qd else 0) | 1)


# ---- robustness --------------------------------------------------------------------------

VALID = [
    header(1, RD) + question("hello.jit.test", 1),
    header(2, 0, ar=1) + question("six.jit.test", 28) + opt(4096, do=True),
    header(3, 0) + question("nope.jit.test", 15),
    header(4, 0) + question("jit.test", 2),
    DNSRecord.question("many.jit.test", "A").pack(),
]


def check(wire: bytes) -> None:
    """The fuzz invariant: no internal error, and a reply (if any) that parses, is a response
    and echoes the ID; over UDP it fits the largest payload we ever allow."""
    for udp in (True, False):
        resp = run(wire, udp)
        assert isinstance(resp, Response)
        assert not resp.internal_error, wire.hex()
        if resp.reply is not None:
            assert len(resp.reply) >= 12
            assert resp.reply[:2] == wire[:2]  # same ID
            assert resp.reply[2] & 0x80  # QR set
            parse_reply(resp.reply)
            if udp:
                assert len(resp.reply) <= 1232
        else:
            assert len(wire) < 12 or wire[2] & 0x80 or resp.pending


def test_the_fuzz_invariant_catches_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the answer logic must fail the fuzz tests, not pass as a SERVFAIL."""

    def broken(*args: object) -> Response:
        raise RuntimeError("a bug")

    monkeypatch.setattr(answer, "_respond", broken)
    resp = run(VALID[0])
    assert resp.internal_error
    assert resp.reply == header(1, QR | RD | 2, qd=0)  # header-only SERVFAIL, built with struct
    with pytest.raises(AssertionError):
        check(VALID[0])


def test_bad_names_get_formerr_not_an_exception() -> None:
    """RFC 1035 2.3.4 and 4.1.4; dnslib's pack() raised on these in the SERVFAIL fallback."""
    bad = [
        b"\x40" + b"a" * 64 + b"\0",  # a 64-byte label
        (b"\x3f" + b"a" * 63) * 4 + b"\0",  # 256 octets
        b"\xc0\x0c",  # a pointer to itself
        b"\xc0\x02",  # a pointer into the header
        b"\x01a\xc0\x20",  # a pointer forwards
        b"\x41a\0",  # label type 0x40
    ]
    for qname in bad:
        # With the question unreadable, an OPT after it cannot be found either.
        for ar, tail in ((0, b""), (1, opt(4096))):
            q = header(0x77, RD, ar=ar) + qname + struct.pack("!HH", 1, 1) + tail
            for udp in (True, False):
                resp = run(q, udp)
                assert resp.reply == header(0x77, QR | RD | 1, qd=0), qname
                assert not resp.internal_error


def test_formerr_carries_an_opt_when_the_query_had_one() -> None:
    """RFC 6891 6.1.1 and 7: records in the answer section make the query malformed."""
    a_rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes(4)
    q = header(0x78, 0, an=1, ar=1) + question("hello.jit.test", 1) + a_rr + opt(4096, do=True)
    assert run(q).reply == header(0x78, QR | 1, qd=0, ar=1) + opt(1232, do=True)


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(wire: bytes) -> None:
    check(wire)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255), st.sampled_from("fid")), max_size=6),
)
def test_mutated_queries_never_raise(base: bytes, edits: list[tuple[int, int, str]]) -> None:
    wire = bytearray(base)
    for pos, value, kind in edits:
        pos %= len(wire) + 1
        if kind == "f" and pos < len(wire):
            wire[pos] = value
        elif kind == "i":
            wire.insert(pos, value)
        elif kind == "d" and pos < len(wire):
            del wire[pos]
    check(bytes(wire))


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 2**64), st.integers(0, 0xFFFF))
def test_generated_queries_never_take_the_internal_error_path(seed: int, ident: int) -> None:
    """Varied queries, well-formed and not (tests/dnsgen.py), and each cut at a random point."""
    rng = random.Random(seed)
    wire = random_query(rng, ident)
    check(wire)
    check(wire[: rng.randrange(len(wire) + 1)])


def test_the_fast_path_says_what_the_parser_path_says() -> None:
    """Where the fast path answers (REFUSED, NXDOMAIN, NODATA of the common query), the
    general path gives the very same bytes and cacheability."""
    rng = random.Random(5)
    answered = 0
    for i in range(6000):
        wire = random_query(rng, i)
        if i % 2:  # the common shape, more often than random_query makes it
            qtype = rng.choice([1, 28, 15, 255, 16, 6, 2, 251])
            wire = header(i, rng.choice([0, RD])) + random_name(rng) + struct.pack("!HH", qtype, 1)
            if i % 4 == 1:
                wire = wire[:11] + b"\x01" + wire[12:] + opt(rng.choice([0, 512, 4096]), do=i % 8 == 1)
        simple = wire_mod.scan_simple(wire)
        fast = None if simple is None else answer._respond_simple(wire, simple, CATALOG)
        if fast is not None:
            answered += 1
            for udp in (True, False):
                general = answer._respond(wire_mod.parse_query(wire), CATALOG, snapshot, NOW, udp)
                assert fast == general, wire.hex()
    assert answered > 1000


def test_dnslib_built_queries_for_every_type() -> None:
    for qtype in ("A", "AAAA", "MX", "TXT", "SOA", "NS", "ANY", "SRV", "HTTPS"):
        q = DNSRecord.question("hello.jit.test", qtype)
        q.add_ar(EDNS0(udp_len=1232))
        check(q.pack())


# ---- the reply cache -------------------------------------------------------------------


async def test_cache_keeps_known_names_only_and_ignores_padding() -> None:
    sup = FakeSupervisor()
    auth = Authority(CONFIG, sup)
    q = header(1, 0) + question("hello.jit.test", 1)
    first = auth.answer_now(q, udp=True)
    again = auth.answer_now(header(2, 0) + q[12:], udp=True)
    assert again.reply is not None and first.reply is not None
    assert again.reply[2:] == first.reply[2:] and again.reply[:2] == b"\x00\x02"
    assert sup.requests == ["hello", "hello"]
    assert sum(len(c) for c in auth._caches) == 1
    # Padding after the message, unknown names and malformed queries are answered, never kept.
    for i in range(3000):
        auth.answer_now(q + i.to_bytes(2, "big"), udp=True)
        auth.answer_now(header(3, 0) + question(f"r{i}.jit.test", 1), udp=True)
        auth.answer_now(header(4, 0, qd=2) + question(f"r{i}.jit.test", 1), udp=False)
    assert sum(len(c) for c in auth._caches) == 1
    assert auth.internal_errors == 0


async def test_cache_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authority, "CACHE_BYTES", 20_000)
    auth = Authority(CONFIG, FakeSupervisor())
    peak = 0
    for i in range(200):  # distinct keys through case changes, ~700-byte replies over TCP
        name = "".join(c.upper() if i >> k & 1 else c for k, c in enumerate("many.jit.test"))
        auth.answer_now(header(1, 0) + question(name, 1), udp=False)
        assert 0 < auth._cache_bytes <= 20_000
        peak = max(peak, len(auth._caches[False]))
    assert 20 <= peak <= 30


# ---- the answer-mode policy --------------------------------------------------------------


def test_policy_follows_the_mode_and_the_state() -> None:
    hello, six, slow = (CONFIG.service(n) for n in ("hello", "six", "slow"))
    booting = ServiceSnapshot(State.STARTING)
    assert answer_for(hello, ServiceSnapshot(), NOW) == ServiceAnswer(("127.77.0.1",), (), 1)
    assert answer_for(hello, booting, NOW) == ServiceAnswer(("127.77.0.1",), (), 1)
    # Ready without an address of its own: the front, with the full TTL.
    assert answer_for(hello, ServiceSnapshot(State.READY), NOW) == ServiceAnswer(("127.77.0.1",), (), 30)
    # wait: held while booting; SERVFAIL while backing off with nothing under way.
    assert answer_for(slow, booting, NOW).pending
    assert answer_for(slow, ServiceSnapshot(None, None, NOW + 1), NOW).servfail
    assert answer_for(slow, ServiceSnapshot(State.FAILED, None, NOW + 1), NOW).servfail
    assert answer_for(slow, ServiceSnapshot(State.FAILED, None, NOW), NOW).pending  # may retry
    ready = ServiceSnapshot(State.READY, "127.77.1.3")
    assert answer_for(slow, ready, NOW) == ServiceAnswer(("127.77.1.3",), (), 30)
    # An IPv4-only instance replaces the IPv4 front only: AAAA keeps the IPv6 front.
    assert answer_for(six, ready, NOW) == ServiceAnswer(("127.77.1.3",), ("fd00::2",), 30)
    v6_only = ServiceSnapshot(State.READY, "fd00::99")
    assert answer_for(six, v6_only, NOW) == ServiceAnswer(("127.77.0.2",), ("fd00::99",), 30)


def test_aaaa_after_the_hand_over_keeps_the_ipv6_front() -> None:
    state = {"six": ServiceSnapshot(State.READY, "127.77.1.6")}
    q = header(20, 0) + question("six.jit.test", 28)
    reply = respond(q, CATALOG, state.__getitem__, NOW, udp=True).reply
    v6 = bytes.fromhex("fd000000000000000000000000000002")
    assert reply == header(20, QR | AA, an=1) + question("six.jit.test", 28) + rr(ptr(12), 28, 30, v6)


def test_dns_does_not_import_the_supervisor() -> None:
    """The answer logic is pure: nothing under jitlaunch/dns/ imports lifecycle.supervisor."""
    import pathlib

    for path in (pathlib.Path(answer.__file__).parent).glob("*.py"):
        assert "supervisor import" not in path.read_text(), path
    import jitlaunch.lifecycle.answers as policy

    assert "import trio" not in pathlib.Path(policy.__file__).read_text()


def test_each_nameserver_gets_its_own_glue_when_given_as_a_table() -> None:
    """Two hosts, each one nameserver of the zone: `nameserver_addresses` as a table gives
    each name its own address (as a list it gives every name all of them)."""
    text = """
[dns]
zones = ["jit.test"]
nameservers = ["ns1.jit.test", "ns2.jit.test"]
nameserver_addresses = { "ns1.jit.test" = ["192.0.2.1"], "ns2.jit.test" = ["198.51.100.2", "2001:db8::2"] }
"""
    config = parse_config(text, "t.toml")
    catalog = Catalog(config.dns, config.services)

    def addresses(qname: str, qtype: str) -> list[str]:
        reply = respond(DNSRecord.question(qname, qtype).pack(), catalog, snapshot, NOW, udp=True)
        assert reply.reply is not None
        return sorted(str(rr.rdata) for rr in DNSRecord.parse(reply.reply).rr)

    assert addresses("ns1.jit.test", "A") == ["192.0.2.1"]
    assert addresses("ns1.jit.test", "AAAA") == []
    assert addresses("ns2.jit.test", "A") == ["198.51.100.2"]
    assert addresses("ns2.jit.test", "AAAA") == ["2001:db8::2"]
    ns = DNSRecord.parse(respond(DNSRecord.question("jit.test", "NS").pack(), catalog, snapshot,
                                 NOW, udp=True).reply or b"")
    glue = sorted((str(rr.rname), str(rr.rdata)) for rr in ns.ar if rr.rtype in (1, 28))
    assert glue == [("ns1.jit.test.", "192.0.2.1"), ("ns2.jit.test.", "198.51.100.2"),
                    ("ns2.jit.test.", "2001:db8::2")]


@pytest.mark.parametrize(("glue", "error"), [
    ('{ "ns3.jit.test" = ["192.0.2.1"] }', "dns.nameserver_addresses.ns3.jit.test: not one of "
     "dns.nameservers (ns1.jit.test)"),
    ('{ "ns1.jit.test" = [] }', "dns.nameserver_addresses.ns1.jit.test: expected at least one"),
    ('{ "ns1.jit.test" = ["x"] }', "dns.nameserver_addresses.ns1.jit.test"),
])
def test_a_glue_table_names_only_nameservers(glue: str, error: str) -> None:
    from jitlaunch.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_config(f'[dns]\nzones = ["jit.test"]\nnameservers = ["ns1.jit.test"]\n'
                     f"nameserver_addresses = {glue}\n", "t.toml")
