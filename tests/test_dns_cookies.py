"""DNS cookies: SipHash-2-4 against the reference vectors, RFC 9018 server cookies against the
RFC's own examples (Appendix A, as NSD's tests use them), the COOKIE option at the wire level
(golden bytes, malformed lengths), the fast path's split against the parser's path, and the
authority's proven flag."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from jitlaunch.dns import build as b
from jitlaunch.dns import cookies as cookies_mod
from jitlaunch.dns import wire as w
from jitlaunch.dns.answer import QueryCookie
from jitlaunch.dns.authority import Authority
from jitlaunch.dns.cookies import ServerCookies, address_bytes
from jitlaunch.dns.siphash import SipHash24, siphash24

from .dnsgen import random_name, random_query
from .dnstest import AA, CONFIG, QR, RD, TC, FakeSupervisor, header, opt, ptr, question, rr, run

# SipHash-2-4 of the bytes 00, 01, ..., n-1 under the key 00 01 ... 0f, for n = 0 to 63: the
# reference implementation's vectors.h (vectors_sip64), as hex.
SIP64 = """
310e0edd47db6f72 fd67dc93c539f874 5a4fa9d909806c0d 2d7efbd796666785 b7877127e09427cf
8da699cd64557618 cee3fe586e46c9cb 37d1018bf50002ab 6224939a79f5f593 b0e4a90bdf82009e
f3b9dd94c5bb5d7a a7ad6b22462fb3f4 fbe50e86bc8f1e75 903d84c02756ea14 eef27a8e90ca23f7
e545be4961ca29a1 db9bc2577fcc2a3f 9447be2cf5e99a69 9cd38d96f0b3c14b bd6179a71dc96dbb
98eea21af25cd6be c7673b2eb0cbf2d0 883ea3e395675393 c8ce5ccd8c030ca8 94af49f6c650adb8
eab8858ade92e1bc f315bb5bb835d817 adcf6b0763612e2f a5c91da7acaa4dde 716595876650a2a6
28ef495c53a387ad 42c341d8fa92d832 ce7cf2722f512771 e37859f94623f3a7 381205bb1ab0e012
ae97a10fd434e015 b4a31508beff4d31 81396229f0907902 4d0cf49ee5d4dcca 5c73336a76d8bf9a
d0a704536ba93e0e 925958fcd6420cad a915c29bc8067318 952b79f3bc0aa6d4 f21df2e41d4535f9
87577519048f53a9 10a56cf5dfcd9adb eb75095ccd986cd0 51a9cb9ecba312e6 96afadfc2ce666c7
72fe52975a4364ee 5a1645b276d592a1 b274cb8ebf87870a 6f9bb4203de7b381 eaecb2a30b22a87f
9924a43cc13157 24 bd838d3aafbf8db7 0b1a2a3265d51aea 135079a3231ce660 932b2846e4d70666
e1915f5cb1eca46c f325965ca16d629f 575ff28e60381be5 724506eb4c328a95
""".replace("57 24", "5724").split()


def test_siphash_reference_vectors() -> None:
    assert len(SIP64) == 64
    key = bytes(range(16))
    h = SipHash24(key)
    for n, expected in enumerate(SIP64):
        assert h.digest(bytes(range(n))).hex() == expected, n
        assert siphash24(key, bytes(range(n))).hex() == expected
    with pytest.raises(ValueError):
        SipHash24(b"short")
    assert "00" not in repr(h)  # the key is never shown


# ---- RFC 9018 server cookies ------------------------------------------------------------

SECRET = bytes.fromhex("e5e973e5a6b2a43f48e7dc849e37bfcf")
A1_TIME = 1559731985  # 2019-06-05 10:53:05 UTC
V4 = socket.inet_aton("198.51.100.100")


def test_rfc9018_a1_learning_a_new_server_cookie() -> None:
    cookies = ServerCookies(SECRET)
    client = bytes.fromhex("2464c4abcf10c957")
    assert cookies.make(client, V4, A1_TIME).hex() == "010000005cf79f111f8130c3eee29480"
    option, status = cookies.answer(client, V4, A1_TIME)
    assert status == "none"
    assert option == struct.pack("!HH", 10, 24) + client + bytes.fromhex(
        "010000005cf79f111f8130c3eee29480")


def test_rfc9018_a2_a_cookie_older_than_half_an_hour_is_renewed() -> None:
    cookies = ServerCookies(SECRET)
    sent = bytes.fromhex("2464c4abcf10c957010000005cf79f111f8130c3eee29480")
    now = A1_TIME + 40 * 60  # 11:33:05
    option, status = cookies.answer(sent, V4, now)
    assert status == "valid"
    assert option[4:].hex() == "2464c4abcf10c957010000005cf7a871d4a564a1442aca77"
    # Younger than half an hour, the same cookie comes back.
    option, status = cookies.answer(sent, V4, A1_TIME + 1799)
    assert status == "valid" and option[4:] == sent
    # At half an hour, a fresh one.
    option, status = cookies.answer(sent, V4, A1_TIME + 1800)
    assert status == "valid" and option[4:] != sent and option[16:20] == struct.pack(
        "!I", A1_TIME + 1800)


def test_rfc9018_a3_another_servers_cookie_gets_a_fresh_one() -> None:
    cookies = ServerCookies(SECRET)
    sent = bytes.fromhex("fc93fc62807ddb8601abcdef5cf78f71a314227b6679ebf5")
    option, status = cookies.answer(sent, socket.inet_aton("203.0.113.203"), 1559734700)
    assert status == "invalid"
    assert option[4:].hex() == "fc93fc62807ddb86010000005cf7a9acf73a7810aca2381e"


def test_rfc9018_a4_ipv6() -> None:
    v6 = address_bytes("2001:db8:220:1:59de:d0f4:8769:82b8")
    assert v6 is not None and len(v6) == 16
    sent = bytes.fromhex("22681ab97d52c298010000005cf7c57926556bd0934c72f8")
    old = ServerCookies(bytes.fromhex("dd3bdf9344b678b185a6f5cb60fca715"))
    assert old.answer(sent, v6, 0x5CF7C609)[1] == "valid"
    new = ServerCookies(bytes.fromhex("445536bcd2513298075a5d379663c962"))
    assert new.make(sent[:8], v6, 0x5CF7C609).hex() == "010000005cf7c609a6bb79d16625507a"
    assert new.answer(sent, v6, 0x5CF7C609)[1] == "invalid"  # one secret only: no roll-over


def test_server_cookie_validity_window() -> None:
    cookies = ServerCookies(SECRET)
    client = bytes.fromhex("2464c4abcf10c957")
    made = client + cookies.make(client, V4, A1_TIME)
    for age, status in ((0, "valid"), (3600, "valid"), (3601, "invalid"), (-300, "valid"),
                        (-301, "invalid")):
        assert cookies.answer(made, V4, A1_TIME + age)[1] == status, age
    # Serial number arithmetic: a stamp just before the 32-bit wrap is valid just after it.
    stamp = 0xFFFFFFF0
    made = client + cookies.make(client, V4, stamp)
    assert cookies.answer(made, V4, (stamp + 100) & 0xFFFFFFFF)[1] == "valid"
    # Another address, another client cookie, a flipped bit, another version or length.
    assert cookies.answer(made, socket.inet_aton("198.51.100.101"), stamp)[1] == "invalid"
    assert cookies.answer(b"x" + made[1:], V4, stamp)[1] == "invalid"
    assert cookies.answer(made[:-1] + bytes([made[-1] ^ 1]), V4, stamp)[1] == "invalid"
    assert cookies.answer(made[:8] + b"\x02" + made[9:], V4, stamp)[1] == "invalid"
    assert cookies.answer(made + b"\0", V4, stamp)[1] == "invalid"
    # A secret of its own per instance: another server's cookie is not valid here.
    assert ServerCookies().answer(made, V4, stamp)[1] == "invalid"


def test_address_bytes() -> None:
    assert address_bytes("192.0.2.1") == bytes([192, 0, 2, 1])
    assert address_bytes("fe80::1%eth0") == socket.inet_pton(socket.AF_INET6, "fe80::1")
    for bad in (None, "", "nonsense", "1.2.3", "::g"):
        assert address_bytes(bad) is None


# ---- the COOKIE option on the wire ----------------------------------------------------------

CLIENT = bytes.fromhex("0123456789abcdef")


def opt_with(*options: tuple[int, bytes], payload: int = 1232) -> bytes:
    rdata = b"".join(struct.pack("!HH", code, len(data)) + data for code, data in options)
    return b"\x00" + struct.pack("!HHIH", 41, payload, 0, len(rdata)) + rdata


def cookie_query(ident: int, cookie: bytes, qname: str = "hello.jit.test", qtype: int = 1,
                 flags: int = RD) -> bytes:
    return header(ident, flags, ar=1) + question(qname, qtype) + opt_with((10, cookie))


def test_parse_query_reads_the_cookie_and_rejects_malformed_lengths() -> None:
    for length in (8, 16, 24, 40):
        data = bytes(range(length))
        q = w.parse_query(cookie_query(1, data))
        assert q.error == 0 and q.cookie == data and q.edns is not None and not q.canonical
        # Among other options, and the last of two (as NSD takes it).
        wire = header(1, 0, ar=1) + question("hello.jit.test", 1) + opt_with(
            (12, bytes(4)), (10, b"\xff" * 8), (3, b""), (10, data))
        assert w.parse_query(wire).cookie == data
    for length in (0, 1, 7, 9, 15, 41, 64):
        q = w.parse_query(cookie_query(1, bytes(length)))
        assert q.error == w.FORMERR and q.edns is None and q.cookie is None, length
    # A cookie in an OPT of another version is not read (nor are any of its options).
    wire = header(1, 0, ar=1) + question("hello.jit.test", 1) + b"\x00" + struct.pack(
        "!HHIH", 41, 1232, 1 << 16, 5) + b"\x00\x0a\x00\x01x"
    q = w.parse_query(wire)
    assert q.error == 0 and q.edns is not None and q.edns.version == 1 and q.cookie is None


def test_malformed_cookie_is_formerr_without_an_opt() -> None:
    """RFC 7873 5.2.2; NSD answers the header only (the OPT was not read)."""
    for length in (0, 7, 9, 15, 41):
        reply = run(cookie_query(7, bytes(length)))
        assert reply.reply == header(7, QR | RD | w.FORMERR, qd=0), length
        assert reply.cookie is None


def test_the_answer_logic_hands_the_cookie_on() -> None:
    """respond() answers as without the option and says which cookie the query carried."""
    reply = run(cookie_query(8, CLIENT))
    assert reply.cookie == QueryCookie(CLIENT, 1232)
    assert reply.reply == (header(8, QR | AA | RD, an=1, ar=1) + question("hello.jit.test", 1)
                           + rr(ptr(12), 1, 30, bytes([127, 77, 1, 5])) + opt(1232))
    probe = header(9, 0, qd=0, ar=1) + opt_with((10, CLIENT), payload=600)
    assert run(probe).cookie == QueryCookie(CLIENT, 600)
    assert run(probe).reply == header(9, QR, qd=0, ar=1) + opt(1232)


def test_split_cookie_golden() -> None:
    wire = cookie_query(3, CLIENT + bytes(16))
    stripped, option, payload = w.split_cookie(wire) or (b"", b"", 0)
    assert stripped == header(3, RD, ar=1) + question("hello.jit.test", 1) + opt(1232)
    assert option == CLIENT + bytes(16) and payload == 1232
    for other in (
        cookie_query(3, bytes(9)),  # malformed: the parser's FORMERR
        header(3, RD, ar=1) + question("hello.jit.test", 1) + opt_with((10, CLIENT), (12, b"")),
        wire + b"\0",  # a byte after the OPT
        wire[:11] + b"\x02" + wire[12:],  # two additional records
        header(3, RD, ar=1) + b"\xc0\x0c" + wire[12 + 16 :],  # a compressed name
        wire[:-30] + b"\x00\x01" + wire[-28:],  # a version other than 0 (TTL's second byte)
    ):
        assert w.split_cookie(other) is None, other.hex()


def test_add_option_golden() -> None:
    option = struct.pack("!HH", 10, 24) + CLIENT + bytes(16)
    reply = header(1, QR | AA, an=1, ar=1) + question("hello.jit.test", 1) + rr(
        ptr(12), 1, 30, bytes(4)) + opt(1232)
    added = b.add_option(reply, option, 1232)
    assert added == reply[:-2] + struct.pack("!H", 28) + option
    assert b.add_option(reply, option, len(reply) + 28) == added
    # Past the bound: header, question and the OPT with the option, TC set.
    assert b.add_option(reply, option, len(reply) + 27) == header(
        1, QR | AA | TC, ar=1) + question("hello.jit.test", 1) + opt(1232)[:-2] + struct.pack(
        "!H", 28) + option
    # No OPT at the end (a header-only reply, or none at all): unchanged.
    for plain in (header(1, QR | w.FORMERR, qd=0), reply[:-11]):
        assert b.add_option(plain, option, 1232) == plain
    probe = header(9, QR, qd=0, ar=1) + opt(1232)
    assert b.add_option(probe, option, 40) == header(9, QR | TC, qd=0, ar=1) + opt(1232)[
        :-2] + struct.pack("!H", 28) + option


def answer_with_cookie(auth: Authority, wire: bytes, udp: bool, source: str) -> bytes | None:
    return auth.answer_now(wire, udp=udp, source=source).reply


async def test_the_split_path_says_what_the_parser_path_says() -> None:
    """A query with a cookie answered the fast way (the option split off, the reply cache,
    the option added back) gets the very bytes the parser's path gives it: the same query
    through respond() with the server's option added to the reply."""
    rng = random.Random(9)
    checked = 0
    for i in range(3000):
        auth = Authority(CONFIG, FakeSupervisor())
        auth.clock = lambda: 1559731985.5
        cookie = rng.choice([CLIENT, CLIENT + bytes(16), rng.randbytes(8), rng.randbytes(24),
                             rng.randbytes(rng.choice([16, 20, 32, 40]))])
        base = random_query(rng, i) if i % 3 == 0 else header(i, rng.choice([0, RD])) + (
            random_name(rng) + struct.pack("!HH", rng.choice([1, 28, 255, 6, 2, 16, 252]),
                                           rng.choice([1, 1, 1, 255, 3])))
        if base[2] & 0x80 or len(base) < 12:
            continue
        wire = base[:10] + b"\0\x01" + base[12:] + opt_with((10, cookie), payload=rng.choice(
            [0, 512, 600, 1232, 4096]))
        wire = wire[:4] + struct.pack("!H", 1) + wire[6:] if i % 3 else wire
        split = w.split_cookie(wire)
        if split is None:
            continue
        checked += 1
        for udp in (True, False):
            source = rng.choice(["192.0.2.1", "2001:db8::1"])
            # The parser's path: no split (respond sees the whole query).
            general = run(wire, udp=udp)
            expected = general.reply
            if expected is not None and general.cookie is not None:
                option, _ = auth.cookies.answer(general.cookie.option, address_bytes(source) or b"",
                                                1559731985)
                limit = min(max(512, general.cookie.payload), 1232) if udp else 65535
                expected = b.add_option(expected, option, limit)
            for _ in range(2):  # the second time from the cache, when cacheable
                if general.pending:
                    break
                assert answer_with_cookie(auth, wire, udp, source) == expected, wire.hex()
    assert checked > 1500


async def test_proven_over_tcp_or_with_a_valid_server_cookie() -> None:
    sup = FakeSupervisor()
    auth = Authority(CONFIG, sup)
    now = 1559731985
    auth.clock = lambda: now + 0.25
    plain = header(1, RD) + question("hello.jit.test", 1)
    auth.answer_now(plain, udp=True, source="192.0.2.1")
    auth.answer_now(plain, udp=False, source="192.0.2.1")
    first = auth.answer_now(cookie_query(2, CLIENT), udp=True, source="192.0.2.1").reply
    assert first is not None
    cookie = first[-24:]
    assert cookie[:8] == CLIENT and cookie[8:12] == b"\x01\0\0\0"
    assert cookie[12:16] == struct.pack("!I", now)
    # Valid, from the cache and not; from another address not.
    auth.answer_now(cookie_query(3, cookie), udp=True, source="192.0.2.1")
    auth.answer_now(cookie_query(3, cookie), udp=True, source="192.0.2.1")
    auth.answer_now(cookie_query(4, cookie, "six.jit.test"), udp=True, source="192.0.2.1")
    auth.answer_now(cookie_query(5, cookie), udp=True, source="192.0.2.2")
    # Among other options (the parser's path).
    other = header(6, RD, ar=1) + question("hello.jit.test", 1) + opt_with((12, b""), (10, cookie))
    auth.answer_now(other, udp=True, source="192.0.2.1")
    assert sup.proven == [False, True, False, True, True, True, False, True]
    assert auth.cookies_seen == {"none": 1, "valid": 4, "invalid": 1}, auth.cookies_seen
    assert sum(len(c) for c in auth._caches) == 4  # cached without the option


def test_valid_cookies_are_remembered_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cookie made or found valid is known afterwards (no SipHash: it costs more than a
    cached answer); the age is still checked; the set of known cookies is bounded."""
    monkeypatch.setattr(cookies_mod, "KNOWN", 8)
    cookies = ServerCookies(SECRET)
    hashes = 0
    real = cookies._hash

    class Counting:
        def digest(self, data: bytes) -> bytes:
            nonlocal hashes
            hashes += 1
            return real.digest(data)

    monkeypatch.setattr(cookies, "_hash", Counting())
    client = bytes.fromhex("2464c4abcf10c957")
    sent = client + cookies.make(client, V4, A1_TIME)
    assert hashes == 1
    for t in (A1_TIME, A1_TIME + 100, A1_TIME + 3600):
        assert cookies.answer(sent, V4, t)[1] == "valid"
    assert hashes == 2  # the fresh one made at A1_TIME + 3600 (older than half an hour)
    assert cookies.answer(sent, V4, A1_TIME + 3601)[1] == "invalid" and hashes == 3
    # Not known for another address: checked, and invalid.
    assert cookies.answer(sent, bytes(4), A1_TIME)[1] == "invalid" and hashes == 5
    for i in range(20):
        cookies.make(bytes([i]) * 8, V4, A1_TIME)
    assert len(cookies._known) <= 8
