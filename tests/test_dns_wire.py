"""The wire-level parser: golden bytes, every prefix of a message (fed one byte at a time, as
h11's tests feed a reader), and generated input that never raises."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitlaunch.dns import build as b
from jitlaunch.dns import wire as w
from jitlaunch.dns.wire import FormError, parse_query, read_name


def header(ident: int, flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def opt(payload: int = 4096, ttl: int = 0, rdata: bytes = b"") -> bytes:
    return b"\0" + struct.pack("!HHIH", 41, payload, ttl, len(rdata)) + rdata


HELLO = b"\x05hello\x03jit\x04test\x00"
A_IN = struct.pack("!HH", 1, 1)


# ---- names -------------------------------------------------------------------------------


def test_plain_and_compressed_names() -> None:
    msg = header(1, 0) + HELLO + A_IN + b"\x03www\xc0\x12"  # www + pointer to "jit.test"
    assert read_name(msg, 12) == (HELLO, 12 + len(HELLO))
    pos = 12 + len(HELLO) + 4
    assert read_name(msg, pos) == (b"\x03www\x03jit\x04test\x00", pos + 6)


def test_labels_hold_any_byte() -> None:
    name = b"\x0bpy.jit.test\x02\xff\x00\x00"
    assert read_name(header(1, 0) + name, 12) == (name, 12 + len(name))


def test_longest_name_and_label() -> None:
    longest = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"
    assert len(longest) == 255
    assert read_name(header(1, 0) + longest, 12)[0] == longest
    with pytest.raises(FormError, match="255"):
        read_name(header(1, 0) + b"\x01c" + longest, 12)
    with pytest.raises(FormError, match="label type"):
        read_name(header(1, 0) + b"\x40" + b"a" * 64 + b"\x00", 12)


def test_name_over_255_through_pointers() -> None:
    part = (b"\x3f" + b"a" * 63) * 3 + b"\x00"  # 193 octets
    msg = header(1, 0) + part + b"\x3f" + b"b" * 63 + b"\xc0\x0c"
    with pytest.raises(FormError, match="255"):
        read_name(msg, 12 + len(part))


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (b"\xc0\x0c", "forwards or in a loop"),  # itself
        (b"\xc0\x0b", "header"),
        (b"\xc0\x00", "header"),
        (b"\x01a\xc0\x10", "forwards or in a loop"),  # after its own start
        (b"\x80", "label type"),
        (b"\x40", "label type"),
        (b"\x05abc", "past the end"),
        (b"\x01a", "past the end"),
        (b"\xc0", "past the end"),
        (b"", "past the end"),
    ],
)
def test_bad_names(tail: bytes, match: str) -> None:
    with pytest.raises(FormError, match=match):
        read_name(header(1, 0) + tail, 12)


def test_pointer_loop_between_two_names() -> None:
    # Name 1 at 12 is "a" + pointer to 16; name 2 at 16 is "b" + pointer to 12: each pointer
    # on its own points backwards or forwards, together they loop.
    msg = header(1, 0) + b"\x01a\xc0\x10" + b"\x01b\xc0\x0c"
    for start in (12, 16):
        with pytest.raises(FormError):
            read_name(msg, start)


# ---- queries ----------------------------------------------------------------------------


def test_a_plain_query() -> None:
    q = parse_query(header(0x1234, w.RD) + HELLO + A_IN)
    assert (q.ident, q.flags, q.error, q.qname, q.qtype, q.qclass) == (0x1234, w.RD, 0, HELLO, 1, 1)
    assert q.question == HELLO + A_IN and q.edns is None and q.canonical


def test_edns_fields() -> None:
    q = parse_query(header(1, 0, ar=1) + HELLO + A_IN + opt(1400, (3 << 24) | (0 << 16) | 0x8000))
    assert q.error == 0 and q.edns == w.Edns(1400, 3, 0, 0x8000, False) and q.edns.do
    assert q.canonical
    cookie = b"\x00\x0a\x00\x08" + b"12345678"
    q = parse_query(header(1, 0, ar=1) + HELLO + A_IN + opt(1400, 0, cookie))
    assert q.error == 0 and q.edns is not None and q.edns.has_options and not q.canonical


def test_trailing_bytes_are_ignored_but_not_canonical() -> None:
    q = parse_query(header(1, 0) + HELLO + A_IN + b"garbage")
    assert q.error == 0 and q.qname == HELLO and not q.canonical


@pytest.mark.parametrize(
    ("wire", "error", "has_edns"),
    [
        (header(1, 2 << 11) + HELLO + A_IN, w.NOTIMP, False),
        (header(1, 2 << 11, ar=1) + HELLO + A_IN + opt(), w.NOTIMP, True),
        (header(1, 15 << 11) + b"\x40", w.NOTIMP, False),
        (header(1, 0, qd=0), w.FORMERR, False),
        (header(1, 0, qd=2) + HELLO + A_IN + HELLO + A_IN, w.FORMERR, False),
        (header(1, 3) + HELLO + A_IN, w.FORMERR, False),  # an RCODE in a query
        (header(1, 0, an=1, ar=1) + HELLO + A_IN + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 0)
         + opt(), w.FORMERR, True),
        (header(1, 0, ns=1) + HELLO + A_IN + opt(), w.FORMERR, False),  # OPT in authority
        (header(1, 0, ar=1) + HELLO + A_IN + b"\xc0\x0c" + struct.pack("!HHIH", 41, 512, 0, 0),
         w.FORMERR, False),  # OPT not owned by the root
        (header(1, 0, ar=2) + HELLO + A_IN + opt() + opt(), w.FORMERR, True),
        (header(1, 0, ar=1) + HELLO + A_IN + opt(rdata=b"\x00\x0a\x00\x09" + b"x" * 8),
         w.FORMERR, False),  # an option running past the OPT's data
        (header(1, 0, ar=1) + HELLO + A_IN + opt(rdata=b"\x00\x0a"), w.FORMERR, False),
        (header(1, 0, ar=1) + HELLO + A_IN + b"\0" + struct.pack("!HHIH", 1, 1, 0, 0),
         w.FORMERR, False),  # a record other than OPT in the additional section
    ],
)
def test_malformed_queries(wire: bytes, error: int, has_edns: bool) -> None:
    q = parse_query(wire)
    assert q.error == error
    assert (q.edns is not None) == has_edns
    assert not q.canonical


def test_question_count_zero_with_an_opt_is_an_edns_probe() -> None:
    q = parse_query(header(1, w.RD, qd=0, ar=1) + opt(1232))
    assert q.error == 0 and q.question == b"" and q.edns is not None


PREFIXED = [
    header(7, w.RD) + HELLO + A_IN,
    header(8, 0, ar=1) + HELLO + struct.pack("!HH", 28, 1) + opt(4096, 0x8000),
    header(9, 0, ar=1) + HELLO + A_IN + opt(1232, 0, b"\x00\x0a\x00\x08" + b"abcdefgh"),
    header(10, 0, qd=0, ar=1) + opt(1232),
]


@pytest.mark.parametrize("message", PREFIXED)
def test_every_prefix_byte_by_byte(message: bytes) -> None:
    """Fed one byte more each time (from the header on), the parser says FORMERR until the
    message is complete, and never raises."""
    full = parse_query(message)
    assert full.error == 0
    for n in range(12, len(message)):
        assert parse_query(message[:n]).error == w.FORMERR, n


# ---- builders ----------------------------------------------------------------------------


def test_compressor() -> None:
    c = b.Compressor()
    c.note(b"\x05HeLLo\x03jit\x04test\x00", 12)
    assert c.write(b"\x03jit\x04test\x00", 40) == b"\xc0\x12"
    assert c.write(b"\x02ns\x03jit\x04test\x00", 40) == b"\x02ns\xc0\x12"
    assert c.write(b"\x02ns\x03jit\x04test\x00", 60) == b"\xc0\x28"  # the one just written
    assert c.write(b"\x03org\x00", 70) == b"\x03org\x00"
    assert c.write(b"\x00", 75) == b"\x00"


def test_header_only_servfail_cannot_fail() -> None:
    assert b.servfail_for(header(0xABCD, 0x7FFF)[:12]) == header(0xABCD, 0x8000 | 0x7900 | 2, qd=0)


# ---- generated input ---------------------------------------------------------------------

labels = st.binary(min_size=0, max_size=70)


@st.composite
def names(draw: st.DrawFn) -> bytes:
    out = b""
    for label in draw(st.lists(labels, max_size=6)):
        out += bytes([min(len(label), 0xFF) if draw(st.booleans()) else len(label) & 0x3F]) + label
    if draw(st.booleans()):
        out += struct.pack("!H", 0xC000 | draw(st.integers(0, 0x3FFF)))
    else:
        out += b"\0"
    return out


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 4), st.integers(0, 3), st.integers(0, 3),
       st.lists(names(), max_size=4), st.binary(max_size=40))
def test_generated_messages_never_raise(
    flags: int, qd: int, an: int, ar: int, parts: list[bytes], tail: bytes
) -> None:
    msg = header(1, flags, qd, an, 0, ar) + b"".join(p + A_IN for p in parts) + tail
    q = parse_query(msg)
    assert q.error in (0, w.FORMERR, w.NOTIMP)
    if q.error == 0:
        assert len(q.qname) <= 255 or q.question == b""


# ---- the fast path's reader ------------------------------------------------------------

OPT0 = opt(1400, 0x8000)


def test_scan_simple_reads_the_common_query() -> None:
    assert w.scan_simple(header(1, w.RD) + HELLO + A_IN) == (12 + len(HELLO) + 4, 1, -1, False)
    msg = header(1, 0, ar=1) + HELLO + struct.pack("!HH", 28, 1) + OPT0
    assert w.scan_simple(msg) == (12 + len(HELLO) + 4, 28, 1400, True)


@pytest.mark.parametrize(
    "message",
    [
        header(1, 0) + HELLO + struct.pack("!HH", 1, 3),  # class CH
        header(1, 0) + HELLO + A_IN + b"x",  # a byte after the message
        header(1, 0, ar=1) + HELLO + A_IN + opt(512, 1 << 16),  # version 1
        header(1, 0, ar=1) + HELLO + A_IN + opt(512, 0, b"\x00\x0a\x00\x00"),  # an option
        header(1, 0, ar=1) + HELLO + A_IN + b"\xc0\x0c" + OPT0[1:],  # owner not a zero octet
        header(1, 0, ar=1) + HELLO + A_IN + OPT0 + b"x",
        header(1, 0, ar=2) + HELLO + A_IN + OPT0 + OPT0,
        header(1, 0, qd=2) + HELLO + A_IN + HELLO + A_IN,
        header(1, 0, an=1) + HELLO + A_IN,
        header(1, 1 << 11) + HELLO + A_IN,  # opcode
        header(1, 1) + HELLO + A_IN,  # an RCODE
        header(1, 0) + b"\xc0\x0c" + A_IN,  # a pointer
        header(1, 0) + b"\x40" + b"a" * 64 + b"\x00" + A_IN,
        header(1, 0) + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + A_IN,  # 257 octets
    ],
)
def test_scan_simple_leaves_the_rest_to_the_parser(message: bytes) -> None:
    assert w.scan_simple(message) is None


@pytest.mark.parametrize("message", [header(7, w.RD) + HELLO + A_IN,
                                     header(8, 0, ar=1) + HELLO + A_IN + OPT0])
def test_scan_simple_every_prefix(message: bytes) -> None:
    assert w.scan_simple(message) is not None
    for n in range(len(message)):
        assert w.scan_simple(message[:n]) is None, n


# ---- templates ---------------------------------------------------------------------------


def test_negative_soa_template_golden_bytes() -> None:
    apex = b"\x03jit\x04test\x00"
    soa = b.SoaTemplate(apex, b"\x02ns" + apex, b"\x0ahostmaster" + apex, (1, 3600, 600, 86400, 30), 30)
    # For "hello.jit.test" (16 octets) the apex is at 12 + 6 = 18 (0x12).
    expected = (b"\xc0\x12" + struct.pack("!HHIH", 6, 1, 30, 38) + b"\x02ns\xc0\x12"
                + b"\x0ahostmaster\xc0\x12" + struct.pack("!IIIII", 1, 3600, 600, 86400, 30))
    assert soa.negative(len(HELLO)) == expected
    assert soa.negative(len(HELLO)) is soa.negative(len(HELLO))  # made once per length
    # An SOA whose names lie outside the zone: the second compresses against the first.
    other = b.SoaTemplate(apex, b"\x02ns\x03org\x00", b"\x02hm\x03org\x00", (1, 2, 3, 4, 5), 5)
    rec = other.negative(len(HELLO))
    mname_at = 12 + len(HELLO) + 4 + 12
    assert rec[12:] == b"\x02ns\x03org\x00" + b"\x02hm" + struct.pack("!H", 0xC000 | mname_at + 3) + (
        struct.pack("!IIIII", 1, 2, 3, 4, 5))
