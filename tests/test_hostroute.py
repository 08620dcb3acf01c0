"""The Host header reader (proxy/hostroute.py).

Golden request heads fed whole, one byte at a time and in random splits: the verdict comes
exactly at the head's last byte, never before, and is the same however the bytes are split.
Malformed heads, TLS bytes, a dribbled head past the bound and random bytes are rejected (or
still MORE), never raised.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitlaunch.proxy import sni
from jitlaunch.proxy.hostroute import MAX_HEAD, MORE, HostReader, Verdict, host_name

HEAD = (b"GET /index.html?q=1 HTTP/1.1\r\n"
        b"User-Agent: curl/7.88.1\r\n"
        b"Host: Hello.Example.ORG:8080\r\n"
        b"Accept: */*\r\n"
        b"\r\n")
ROUTED = Verdict("routed", name="hello.example.org")


def rejected(reason: str) -> Verdict:
    return Verdict("rejected", reason=reason)


def feed_split(data: bytes, cuts: list[int]) -> tuple[HostReader, list[Verdict]]:
    reader = HostReader()
    verdicts = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > pos:
            verdicts.append(reader.feed(data[pos:cut]))
            pos = cut
    return reader, verdicts


def test_the_verdict_types_are_sni_ones() -> None:
    assert MORE is sni.MORE and Verdict is sni.Verdict


def test_a_request_is_routed_byte_by_byte_at_its_last_byte() -> None:
    reader = HostReader()
    verdicts = [reader.feed(HEAD[i:i + 1]) for i in range(len(HEAD))]
    assert verdicts[-1] == ROUTED
    assert all(v is MORE for v in verdicts[:-1])  # decided exactly at the empty line's end
    assert reader.buffered == HEAD


@given(st.lists(st.integers(0, len(HEAD)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_any_split_gives_the_same_verdict_at_the_same_byte(cuts: list[int]) -> None:
    reader, verdicts = feed_split(HEAD, cuts)
    assert verdicts[-1] == ROUTED
    assert all(v is MORE for v in verdicts[:-1])
    assert reader.buffered == HEAD


@pytest.mark.parametrize(("head", "verdict"), [
    (b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", Verdict("routed", name="example.org")),
    (b"GET / HTTP/1.1\r\nHost: Example.ORG:8080\r\n\r\n", Verdict("routed", name="example.org")),
    (b"GET / HTTP/1.1\r\nhOsT:   a-b.c9.example.  \r\n\r\n", Verdict("routed", name="a-b.c9.example")),
    (b"GET / HTTP/1.1\r\nHost: dot.example.:443\r\n\r\n", Verdict("routed", name="dot.example")),
    (b"GET / HTTP/1.1\r\nHost: bare:\r\n\r\n", Verdict("routed", name="bare")),
    (b"POST /x HTTP/1.1\r\nHost: p.example\r\nContent-Length: 3\r\n\r\nabc",
     Verdict("routed", name="p.example")),
    (b"GET http://other.example/ HTTP/1.1\r\nHost: h.example\r\n\r\n", Verdict("routed", name="h.example")),
    (b"GET / HTTP/1.0\r\nHost: old.example\r\n\r\n", Verdict("routed", name="old.example")),
    (b"GET / HTTP/1.1\nHost: lf.example\n\n", Verdict("routed", name="lf.example")),
    (b"GET / HTTP/1.0\r\n\r\n", rejected("no Host")),
    (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", rejected("no Host")),
    (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", rejected("no Host")),
    (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", rejected("not HTTP")),
    (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: bad_name.example\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: a..b.example\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: a.example:8o\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: a.example:80:80\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", rejected("bad name")),
    (b"GET / HTTP/1.1\r\nHost: " + b"a" * 64 + b".example\r\n\r\n", rejected("bad name")),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", rejected("not HTTP")),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", rejected("not HTTP")),
    (b"GET / HTTP/1.1\r\n folded: x\r\nHost: a.example\r\n\r\n", rejected("not HTTP")),
    (b"GET /\r\n\r\n", rejected("not HTTP")),
    (b"hello there\r\n\r\n", rejected("not HTTP")),
    (b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", rejected("not HTTP")),
])
def test_golden_heads(head: bytes, verdict: Verdict) -> None:
    assert HostReader().feed(head) == verdict
    reader = HostReader()
    verdicts = [reader.feed(head[i:i + 1]) for i in range(len(head))]
    assert verdict in verdicts  # the same verdict dribbled, and then kept
    assert verdicts[-1] == verdict and reader.buffered == head


def test_a_pipelined_second_request_is_ignored() -> None:
    second = b"GET / HTTP/1.1\r\nHost: second.example\r\n\r\n"
    reader = HostReader()
    assert reader.feed(HEAD + second) == ROUTED
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: third.example\r\n\r\n") == ROUTED  # kept
    assert reader.buffered.startswith(HEAD + second)
    # A bad second request does not spoil the first one either.
    assert HostReader().feed(HEAD + b"\x16\x03\x01garbage\r\n\r\n") == ROUTED


def test_an_empty_feed_is_not_end_of_file() -> None:
    reader = HostReader()
    assert reader.feed(b"") is MORE
    assert reader.feed(HEAD[:10]) is MORE
    assert reader.feed(b"") is MORE
    assert reader.feed(HEAD[10:]) == ROUTED


def test_tls_bytes_are_rejected_at_the_first_byte() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert HostReader().feed(hello[:1]) == rejected("not HTTP")
    assert HostReader().feed(hello) == rejected("not HTTP")


def test_a_head_over_the_bound_is_too_big_however_dribbled() -> None:
    filler = b"X-Filler: " + b"f" * 100 + b"\r\n"
    head = b"GET / HTTP/1.1\r\nHost: a.example\r\n" + filler * (MAX_HEAD // len(filler)) + b"\r\n"
    assert len(head) > MAX_HEAD
    for size in (1, 7, 1000, len(head)):
        reader = HostReader()
        verdict = MORE
        pos = 0
        while verdict is MORE and pos < len(head):
            verdict = reader.feed(head[pos:pos + size])
            pos += size
        assert verdict == rejected("too big"), size
        assert MAX_HEAD < len(reader.buffered) <= MAX_HEAD + size
        assert reader.feed(b"\r\n\r\n") == verdict  # a verdict is kept


def test_a_head_of_exactly_the_bound_is_routed() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: "
    head = start + b"p" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_HEAD
    reader = HostReader()
    verdicts = [reader.feed(head[i:i + 1]) for i in range(len(head))]
    assert verdicts[-1] == Verdict("routed", name="a.example")
    assert all(v is MORE for v in verdicts[:-1])
    one_more = start + b"p" * (MAX_HEAD - len(start) - 3) + b"\r\n\r\n"
    assert HostReader().feed(one_more) == rejected("too big")


def test_endless_bytes_without_a_line_end_are_too_big() -> None:
    reader = HostReader()
    verdict = MORE
    while verdict is MORE:
        verdict = reader.feed(b"GETTTTTTTT" * 50)
    assert verdict == rejected("too big") and len(reader.buffered) <= MAX_HEAD + 500


@pytest.mark.parametrize(("value", "name"), [
    (b"Example.ORG", "example.org"),
    (b"example.org:8080", "example.org"),
    (b"example.org.", "example.org"),
    (b"[::1]:8080", None),
    (b"[2001:db8::1]", None),
    (b"10.0.0.1", None),
    (b"10.0.0.1:53", None),
    (b"", None),
    (b":80", None),
    (b"\xff.example", None),
    (b"[::1", None),
])
def test_host_name(value: bytes, name: str | None) -> None:
    assert host_name(value) == name


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(data: bytes) -> None:
    verdict = HostReader().feed(data)
    assert verdict.kind in ("more", "rejected", "routed")


@given(st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: ", b"a.example", b":80", b"\r\n", b"\n", b"X: y\r\n", b" ",
    b"HTTP/1.0", b"[::1]", b"\x00", b"Host: b\r\n", b"\r\n\r\n",
]), max_size=20), st.lists(st.integers(0, 400), max_size=8))
@settings(max_examples=300, deadline=None)
def test_near_http_never_raises_and_any_split_agrees(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    whole = HostReader().feed(data)
    reader, verdicts = feed_split(data, [c for c in cuts if c < len(data)])
    assert (verdicts[-1] if verdicts else MORE) == whole
    assert reader.buffered == data
