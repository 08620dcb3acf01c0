"""The ClientHello reader (proxy/sni.py) and the PROXY v2 header (proxy/proxyproto.py).

ClientHellos come from the standard library's own TLS client (ssl.MemoryBIO), fed one byte at
a time and in random splits; malformed ones are made from real ones by cutting and patching
their bytes. The reader must never raise, and must decide within its byte bound.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitlaunch.proxy.proxyproto import SIGNATURE, proxy_v2_header
from jitlaunch.proxy.sni import MAX_BYTES, MORE, NO_SNI, SniReader, Verdict

from .helpers import client_hello


def in_records(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake bytes re-framed into records of the given sizes (the rest last)."""
    body = hello[5:5 + struct.unpack("!H", hello[3:5])[0]]
    out, pos = b"", 0
    for size in [*sizes, len(body)]:
        chunk = body[pos:pos + size]
        if chunk:
            out += hello[:3] + struct.pack("!H", len(chunk)) + chunk
        pos += len(chunk)
    return out


def feed_split(data: bytes, cuts: list[int]) -> tuple[SniReader, Verdict]:
    reader = SniReader()
    verdict = MORE
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > pos:
            verdict = reader.feed(data[pos:cut])
            pos = cut
    return reader, verdict


HELLO = client_hello("Hello.Example.ORG", ["h2", "http/1.1"])


def test_a_real_client_hello_is_routed_byte_by_byte() -> None:
    reader = SniReader()
    verdicts = [reader.feed(HELLO[i:i + 1]) for i in range(len(HELLO))]
    assert verdicts[-1] == Verdict("routed", name="hello.example.org")
    assert all(v is MORE for v in verdicts[:-1])  # decided exactly at the last byte
    assert reader.buffered == HELLO


@pytest.mark.parametrize("alpn", [None, ["h2"], [f"proto-{i:03d}" for i in range(60)]])
def test_with_and_without_alpn(alpn: list[str] | None) -> None:
    hello = client_hello("a-b.c9.example", alpn)
    assert SniReader().feed(hello) == Verdict("routed", name="a-b.c9.example")


def test_a_client_hello_over_several_records_and_beyond_one_segment() -> None:
    big = client_hello("big.example", [f"protocol-name-{i:04d}" for i in range(150)])
    assert len(big) > 1500
    for sizes in ([1], [100, 100], [3, 700, 5], [len(big) // 2]):
        data = in_records(big, sizes)
        assert SniReader().feed(data) == Verdict("routed", name="big.example"), sizes
        reader = SniReader()
        verdicts = [reader.feed(data[i:i + 1]) for i in range(len(data))]
        assert verdicts[-1].name == "big.example" and verdicts[-2] is MORE


def test_no_sni_and_a_trailing_dot() -> None:
    assert SniReader().feed(client_hello(None)) == NO_SNI
    hello = client_hello("dot.example")
    patched = _patch_name(hello, b"dot.example", b"dot.exampl.")  # same length
    assert SniReader().feed(patched) == Verdict("routed", name="dot.exampl")


def _patch_name(hello: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and hello.count(old) == 1
    return hello.replace(old, new)


@given(st.lists(st.integers(0, len(HELLO)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_any_split_gives_the_same_verdict(cuts: list[int]) -> None:
    reader, verdict = feed_split(HELLO, cuts)
    assert verdict == Verdict("routed", name="hello.example.org")
    assert reader.buffered == HELLO


@pytest.mark.parametrize(("name", "reason"), [
    (b"bad_name.example", "bad name"),
    (b"-bad.example.org", "bad name"),
    (b"a..b.example.org", "bad name"),
    (b"sp ce.example.org", "bad name"),
])
def test_names_that_are_not_dns_names(name: bytes, reason: str) -> None:
    hello = client_hello("x" * len(name))
    verdict = SniReader().feed(_patch_name(hello, b"x" * len(name), name))
    assert verdict == Verdict("rejected", reason=reason)


def _sni_offset(hello: bytes) -> int:
    """Where the server_name extension starts (its type field)."""
    body = hello[9:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + struct.unpack_from("!H", body, pos)[0]
    pos += 1 + body[pos]
    end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
    pos += 2
    while pos < end:
        kind, length = struct.unpack_from("!HH", body, pos)
        if kind == 0:
            return 9 + pos
        pos += 4 + length
    raise AssertionError("no server_name")


def test_malformed_client_hellos_are_rejected_never_raised() -> None:
    at = _sni_offset(HELLO)
    cases = {
        "empty name": HELLO[:at + 7] + b"\x00\x00" + HELLO[at + 9:],  # name length 0
        "repeated extension": HELLO,  # built below
        "not TLS": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "SSLv2": b"\x80\x2e\x01\x03\x01",
    }
    # Two server_name extensions: the extension block grows by one copy of it.
    length = struct.unpack_from("!H", HELLO, at + 2)[0]
    ext = HELLO[at:at + 4 + length]
    doubled = _grow(HELLO, at, ext)
    cases["repeated extension"] = doubled
    for what, data in cases.items():
        verdict = SniReader().feed(data)
        assert verdict.kind == "rejected", (what, verdict)
    # Truncated: never a verdict other than MORE, and never an exception.
    for cut in range(len(HELLO)):
        assert SniReader().feed(HELLO[:cut]) is MORE
    # Lengths pointing past the end, at every length field we can find: rejected or MORE.
    rng = random.Random(7)
    for _ in range(2000):
        data = bytearray(HELLO)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        SniReader().feed(bytes(data))  # must not raise


def _grow(hello: bytes, at: int, extra: bytes) -> bytes:
    """``hello`` with ``extra`` inserted at ``at`` and every enclosing length fixed."""
    body = hello[5:]
    n = len(extra)
    rec_len = struct.unpack_from("!H", hello, 3)[0] + n
    hs_len = int.from_bytes(body[1:4], "big") + n
    data = bytearray(hello[:at] + extra + hello[at:])
    struct.pack_into("!H", data, 3, rec_len)
    data[6:9] = hs_len.to_bytes(3, "big")
    # the extensions block length sits just before the first extension
    inner = data[9:]
    pos = 2 + 32
    pos += 1 + inner[pos]
    pos += 2 + struct.unpack_from("!H", inner, pos)[0]
    pos += 1 + inner[pos]
    struct.pack_into("!H", data, 9 + pos, struct.unpack_from("!H", inner, pos)[0] + n)
    return bytes(data)


def test_several_names_in_server_name_are_rejected() -> None:
    at = _sni_offset(HELLO)
    ext_len, list_len = struct.unpack_from("!HH", HELLO, at + 2)
    entry = HELLO[at + 6:at + 6 + list_len]
    data = bytearray(_grow(HELLO, at + 6 + list_len, entry))
    struct.pack_into("!HH", data, at + 2, ext_len + len(entry), list_len + len(entry))
    assert SniReader().feed(bytes(data)) == Verdict("rejected", reason="several names in server_name")


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise_and_stay_within_the_bound(data: bytes) -> None:
    reader = SniReader()
    verdict = reader.feed(b"\x16\x03\x01" + data)
    assert verdict.kind in ("more", "rejected", "routed", "no_sni")


def test_the_byte_bound() -> None:
    # A record header promising a ClientHello larger than the bound: rejected once the
    # bound is reached, however the bytes are dribbled.
    reader = SniReader()
    header = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff"
    verdict = reader.feed(header)
    chunk = b"\x00" * 1000
    while verdict is MORE:
        verdict = reader.feed(chunk)
    assert verdict.kind == "rejected" and len(reader.buffered) <= MAX_BYTES + len(chunk)
    assert reader.feed(b"more") == verdict  # a verdict is kept


# ---- PROXY v2 -------------------------------------------------------------------------------


def parse_v2(data: bytes) -> tuple[str, int, str, int]:
    """An independent reading of a PROXY v2 header (TCP, IPv4 or IPv6)."""
    assert data[:12] == SIGNATURE
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    assert ver_cmd == 0x21 and len(data) == 16 + length
    size = {0x11: 4, 0x21: 16}[fam]
    src = ipaddress.ip_address(data[16:16 + size])
    dst = ipaddress.ip_address(data[16 + size:16 + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, 16 + 2 * size)
    return str(src), sport, str(dst), dport


def test_proxy_v2_golden_ipv4() -> None:
    header = proxy_v2_header(("192.0.2.10", 51234), ("198.51.100.1", 443))
    assert header == (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c"
                      + bytes([192, 0, 2, 10, 198, 51, 100, 1]) + b"\xc8\x22\x01\xbb")
    assert parse_v2(header) == ("192.0.2.10", 51234, "198.51.100.1", 443)


def test_proxy_v2_ipv6_and_errors() -> None:
    header = proxy_v2_header(("2001:db8::7", 1), ("2001:db8::1", 80))
    assert len(header) == 16 + 36 and header[13] == 0x21
    assert parse_v2(header) == ("2001:db8::7", 1, "2001:db8::1", 80)
    with pytest.raises(ValueError, match="different families"):
        proxy_v2_header(("192.0.2.1", 1), ("2001:db8::1", 2))
    with pytest.raises(ValueError, match="not an IP address"):
        proxy_v2_header(("example.org", 1), ("192.0.2.1", 2))
