"""What a client on the internet can send the DNS servers: none of it may end the daemon.

Each test runs a real daemon in-process on loopback, sends one kind of bad input over UDP or
TCP, then checks that the daemon is still serving: the next query gets its right answer. An
exception escaping to the daemon's nursery would end ``running`` and fail the test on its own.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from dnslib import RCODE, DNSRecord

from jitlaunch.config import Endpoint
from jitlaunch.daemon import Daemon

from .conftest import DEMO, config_text, load, query_tcp, query_udp, running

SERVICE = f"""
[[service]]
name = "hello"
front = ["FRONT"]
ports = [18080]
answer = "proxy"
[service.process]
command = "{DEMO}"
"""


def daemon_config(tmp_path: Path, block: str, dns: str = "") -> str:
    return config_text(tmp_path, SERVICE.replace("FRONT", f"{block}.1"), dns=dns)


def header(ident: int = 0x4242, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


# Names that no DNS library will build for us, written out on the wire.
LONG_LABEL = bytes([64]) + b"a" * 64 + b"\x03jit\x04test\x00"
LONG_NAME = b"".join(bytes([63]) + b"b" * 63 for _ in range(4)) + b"\x03jit\x04test\x00"  # 265
BAD_QUERIES = {
    "label_64": header() + LONG_LABEL + struct.pack("!HH", 1, 1),
    "name_265": header() + LONG_NAME + struct.pack("!HH", 1, 1),
    "pointer_loop": header() + b"\xc0\x0c" + struct.pack("!HH", 1, 1),
    "pointer_forward": header() + b"\xc0\x20" + struct.pack("!HH", 1, 1) + b"\x00" * 20,
    "pointer_header": header() + b"\x01x\xc0\x02" + struct.pack("!HH", 1, 1),
    "label_64_edns": header(ar=1) + LONG_LABEL + struct.pack("!HH", 1, 1)
    + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00",
    "truncated_question": header() + b"\x05hello\x03ji",
    "counts_lie": header(qd=0xFFFF, an=0xFFFF, ns=0xFFFF, ar=0xFFFF) + b"\x00\x00\x01\x00\x01",
    "header_only": header(qd=0),
    "response": header(flags=0x8180),
    "empty": b"",
    "short": b"\x42",
    "opcode_15": header(flags=0x7900) + b"\x00\x00\x01\x00\x01",
}


async def assert_serving(d: Daemon) -> None:
    """The daemon answers the next query right, over UDP and TCP."""
    ep = d.dns_endpoints[0]
    rec = await query_udp((ep.host, ep.port), "ns.jit.test", "A")
    assert rec.header.rcode == RCODE.NOERROR and [str(r.rdata) for r in rec.rr] == ["127.0.0.1"]
    (rec,) = await query_tcp((ep.host, ep.port), [("nope.jit.test", "A")])
    assert rec.header.rcode == RCODE.NXDOMAIN and rec.header.aa == 1


def assert_no_internal_error(d: Daemon) -> None:
    """Bad input is the client's fault: it must never take the internal-error path."""
    assert d.dns.counts["internal_error"] == 0, d.dns.counts


def check_bad_reply(data: bytes) -> None:
    """A reply to a bad query, if there is one, is a short error with no records."""
    assert data[2] & 0x80, "a reply has QR set"
    assert data[3] & 0x0F in (RCODE.FORMERR, RCODE.NOTIMP, RCODE.REFUSED, RCODE.SERVFAIL)
    assert data[6:10] == b"\x00\x00\x00\x00", "no answer or authority records"


@pytest.mark.parametrize("kind", sorted(BAD_QUERIES))
async def test_bad_query_over_udp(tmp_path: Path, block: str, kind: str) -> None:
    async with running(load(daemon_config(tmp_path, block))) as d:
        ep = d.dns_endpoints[0]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((ep.host, ep.port))
            await sock.send(BAD_QUERIES[kind])
            # A good query after the bad one: every reply before its own is the bad one's.
            good = DNSRecord.question("ns.jit.test", "A")
            await sock.send(good.pack())
            with trio.fail_after(10):
                while (data := await sock.recv(65535))[:2] != good.pack()[:2]:
                    assert data[:2] == b"\x42\x42"
                    check_bad_reply(data)
            assert DNSRecord.parse(data).rr
        await assert_serving(d)
        assert_no_internal_error(d)


@pytest.mark.parametrize("kind", sorted(BAD_QUERIES))
async def test_bad_query_over_tcp(tmp_path: Path, block: str, kind: str) -> None:
    async with running(load(daemon_config(tmp_path, block))) as d:
        ep = d.dns_endpoints[0]
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            good = DNSRecord.question("ns.jit.test", "A")
            await stream.send_all(frame(BAD_QUERIES[kind]) + frame(good.pack()))
            buf = b""
            replies: list[bytes] = []
            with trio.fail_after(10):
                while not any(r[:2] == good.pack()[:2] for r in replies):
                    data = await stream.receive_some(65536)
                    assert data, "the connection was closed before the good query's reply"
                    buf += data
                    while len(buf) >= 2 and len(buf) >= 2 + (n := struct.unpack_from("!H", buf)[0]):
                        replies.append(buf[2 : 2 + n])
                        buf = buf[2 + n :]
            for r in replies[:-1]:
                check_bad_reply(r)
        await assert_serving(d)
        assert_no_internal_error(d)


def raw_tcp(ep: Endpoint) -> socket.socket:
    s = socket.create_connection((ep.host, ep.port), timeout=10)
    return s


def reset(s: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


QUERY = frame(DNSRecord.question("nope.jit.test", "A").pack())


def connect_and_reset(ep: Endpoint) -> None:
    reset(raw_tcp(ep))


def query_and_reset(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(QUERY * 20)
    reset(s)


def query_and_close(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(QUERY * 20)
    s.close()


def half_a_query_and_reset(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(QUERY[:7])
    reset(s)


def zero_length_then_query(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(b"\x00\x00" + QUERY + b"\x00\x01\x00")
    reset(s)


def huge_length_short_data(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(b"\xff\xff" + b"\x00" * 100)
    s.close()


def random_bytes(ep: Endpoint) -> None:
    s = raw_tcp(ep)
    s.sendall(bytes(range(256)) * 40)
    reset(s)


ABUSES: dict[str, Callable[[Endpoint], None]] = {
    f.__name__: f for f in (
        connect_and_reset, query_and_reset, query_and_close, half_a_query_and_reset,
        zero_length_then_query, huge_length_short_data, random_bytes,
    )
}


@pytest.mark.parametrize("abuse", sorted(ABUSES))
async def test_tcp_abuse(tmp_path: Path, block: str, abuse: str) -> None:
    async with running(load(daemon_config(tmp_path, block))) as d:
        ep = d.dns_endpoints[0]
        for _ in range(5):
            await trio.to_thread.run_sync(ABUSES[abuse], ep)
        await assert_serving(d)
        # Let the server finish with the abused connections, then ask again.
        with trio.fail_after(10):
            while d.dns.tcp_connections:
                await trio.sleep(0.01)
        await assert_serving(d)
        assert_no_internal_error(d)


async def test_pipelining_without_reading(tmp_path: Path, block: str) -> None:
    """A client sends thousands of queries and never reads: the server's writes block, it
    closes that connection once a reply waits longer than tcp_message_timeout, and the rest
    of the daemon is unaffected meanwhile."""
    cfg = load(daemon_config(tmp_path, block, dns='tcp_message_timeout = "500ms"'))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        s = raw_tcp(ep)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        sent = 0
        try:
            with trio.fail_after(20):
                while True:
                    try:
                        sent += s.send(QUERY * 100)
                    except BlockingIOError:
                        break  # the server stopped reading: its replies are stuck
                    except OSError:
                        break  # already closed by the server
                    await trio.lowlevel.checkpoint()
            await assert_serving(d)
            with trio.fail_after(10):
                while d.dns.tcp_connections:
                    await trio.sleep(0.01)
        finally:
            s.close()
        assert sent > 0
        assert d.dns.counts["tcp_slow_reader"] == 1
        await assert_serving(d)
        assert_no_internal_error(d)



# ---- TCP bounds ---------------------------------------------------------------------------


async def test_a_query_must_arrive_whole_in_time(tmp_path: Path, block: str) -> None:
    """A byte every 100 ms keeps a connection busy but never idle: the message bound ends
    it about tcp_message_timeout after the query's first byte."""
    dns = 'tcp_message_timeout = "500ms"\ntcp_idle_timeout = "10s"'
    async with running(load(daemon_config(tmp_path, block, dns))) as d:
        ep = d.dns_endpoints[0]
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(10):
                for byte in QUERY:
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    await trio.sleep(0.1)  # a slow sender, not a wait for a condition
                with trio.fail_after(10):
                    try:
                        assert await stream.receive_some(100) == b""
                    except trio.BrokenResourceError:
                        pass
            assert 0.45 <= trio.current_time() - start < 0.5 + 0.1 * len(QUERY) / 2
        assert d.dns.counts["tcp_slow_query"] == 1
        await assert_serving(d)
        assert_no_internal_error(d)


async def test_connections_per_source_are_limited(tmp_path: Path, block: str) -> None:
    cfg = load(daemon_config(tmp_path, block, "max_tcp_connections_per_source = 2"))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        held = [await trio.open_tcp_stream(ep.host, ep.port) for _ in range(2)]
        try:
            with trio.fail_after(10):
                while d.dns.tcp_connections < 2:
                    await trio.sleep(0.01)
            third = await trio.open_tcp_stream(ep.host, ep.port)
            async with third:
                with trio.fail_after(10):
                    assert await third.receive_some(10) == b""
            assert d.dns.counts["tcp_refused_source"] == 1
            # Another source address is served meanwhile.
            other = trio.socket.socket()
            with other:
                await other.bind((f"{block}.9", 0))
                await other.connect((ep.host, ep.port))
                await other.send(QUERY)
                with trio.fail_after(10):
                    data = await other.recv(4096)
                assert DNSRecord.parse(data[2:]).header.rcode == RCODE.NXDOMAIN
        finally:
            for s in held:
                await s.aclose()
        assert_no_internal_error(d)


WAIT_SERVICE = """
[[service]]
name = "slow"
front = ["FRONT"]
ports = [18081]
answer = "wait"
boot_timeout = "60s"
[service.process]
command = "sleep 60"
"""


def frames_for(name: str, count: int, start_id: int = 1) -> bytes:
    out = b""
    for i in range(count):
        q = DNSRecord.question(name, "A")
        q.header.id = start_id + i
        out += frame(q.pack())
    return out


async def test_held_answers_are_bounded(tmp_path: Path, block: str) -> None:
    """A `wait` service that never gets ready: one TCP connection holds at most
    max_held_per_connection answers and stops reading past it; all connections and UDP
    together hold at most max_held; a UDP query past that is dropped."""
    services = SERVICE.replace("FRONT", f"{block}.1") + WAIT_SERVICE.replace("FRONT", f"{block}.2")
    cfg = load(config_text(tmp_path, services, "max_held = 3\nmax_held_per_connection = 2"))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        a = await trio.open_tcp_stream(ep.host, ep.port)
        b = await trio.open_tcp_stream(ep.host, ep.port)
        async with a, b:
            # Thousands of held queries pipelined on one connection, then one it could answer.
            await a.send_all(frames_for("slow.jit.test", 2000) + QUERY)
            with trio.fail_after(10):
                while d.dns.held < 2:
                    await trio.sleep(0.01)
            await b.send_all(frames_for("slow.jit.test", 5))
            with trio.fail_after(10):
                while d.dns.held < 3:
                    await trio.sleep(0.01)
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            with sock:
                await sock.connect((ep.host, ep.port))
                await sock.send(DNSRecord.question("slow.jit.test", "A").pack())
                with trio.fail_after(10):
                    while d.dns.counts["held_dropped"] < 1:
                        await trio.sleep(0.01)
            assert d.dns.held == 3
            # Connection a is not read past its bound: the NXDOMAIN query behind it waits.
            with trio.move_on_after(0.3):
                await a.receive_some(100)
                raise AssertionError("a connection past its held bound was answered")
        await assert_serving(d)
        assert_no_internal_error(d)


# ---- our own failures ---------------------------------------------------------------------


async def test_an_internal_error_costs_one_query(
    tmp_path: Path, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the answer code may raise (here: made to raise on purpose, for immediate and
    for held answers) costs that datagram or that connection, is counted and logged with a
    traceback at most once per interval, and the daemon goes on serving."""
    services = SERVICE.replace("FRONT", f"{block}.1") + WAIT_SERVICE.replace("FRONT", f"{block}.2")
    async with running(load(config_text(tmp_path, services))) as d:
        ep = d.dns_endpoints[0]
        authority = d.dns.authority
        real_now = authority.answer_now

        def answer_now(wire: bytes, udp: bool, source: str | None = None) -> object:
            if b"\x04boom" in wire:
                raise RuntimeError("boom")
            return real_now(wire, udp, source)

        async def answer_held(wire: bytes, udp: bool, service: str) -> bytes | None:
            raise RuntimeError("held boom")

        authority.answer_now = answer_now  # type: ignore[method-assign,assignment]
        authority.answer_held = answer_held  # type: ignore[method-assign]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((ep.host, ep.port))
            for _ in range(3):
                await sock.send(DNSRecord.question("boom.jit.test", "A").pack())
            await sock.send(DNSRecord.question("slow.jit.test", "A").pack())
        with trio.fail_after(10):
            while d.dns.counts["internal_error"] < 4:
                await trio.sleep(0.01)
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            await stream.send_all(frames_for("boom.jit.test", 1) + QUERY)
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b""  # closed, the NXDOMAIN not sent
        assert d.dns.counts["internal_error"] == 5
        await assert_serving(d)
    tracebacks = [r for r in caplog.records if r.exc_info and "internal error" in r.getMessage()]
    assert len(tracebacks) == 1


async def test_a_whole_64k_message_in_pieces_then_a_query(tmp_path: Path, block: str) -> None:
    """The largest message TCP can frame, sent in uneven pieces, is read whole (and answered
    FORMERR: a query with 65,000 bytes of trailing records that are not there), and the query
    behind it on the same connection is answered."""
    async with running(load(daemon_config(tmp_path, block))) as d:
        ep = d.dns_endpoints[0]
        big = header(ident=0x4242, qd=1, ar=5) + b"\x00\x00\x01\x00\x01" + b"\xff" * (65535 - 17)
        wire = frame(big) + QUERY
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            for i in range(0, len(wire), 7919):
                await stream.send_all(wire[i : i + 7919])
            buf = b""
            replies: list[bytes] = []
            with trio.fail_after(10):
                while len(replies) < 2:
                    data = await stream.receive_some(65536)
                    assert data
                    buf += data
                    while len(buf) >= 2 and len(buf) >= 2 + (n := struct.unpack_from("!H", buf)[0]):
                        replies.append(buf[2 : 2 + n])
                        buf = buf[2 + n :]
        assert replies[0][:2] == b"\x42\x42"
        check_bad_reply(replies[0])
        assert DNSRecord.parse(replies[1]).header.rcode == RCODE.NXDOMAIN
        assert_no_internal_error(d)


async def test_over_ipv6(tmp_path: Path, block: str) -> None:
    """The bounds hold on an IPv6 listener too: per-source TCP limit from ::1."""
    text = daemon_config(tmp_path, block, "max_tcp_connections_per_source = 1")
    cfg = load(text.replace('listen = ["127.0.0.1:0"]', 'listen = ["[::1]:0"]'))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        assert ep.host == "::1"
        first = await trio.open_tcp_stream("::1", ep.port)
        async with first:
            await first.send_all(QUERY)
            with trio.fail_after(10):
                assert await first.receive_some(4096)
            second = await trio.open_tcp_stream("::1", ep.port)
            async with second:
                with trio.fail_after(10):
                    assert await second.receive_some(10) == b""
        assert d.dns.counts["tcp_refused_source"] == 1
        await trio.to_thread.run_sync(connect_and_reset, ep)
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect(("::1", ep.port))
            await sock.send(BAD_QUERIES["label_64"])
            await sock.send(QUERY[2:])
            with trio.fail_after(10):
                replies = [await sock.recv(4096) for _ in range(2)]
        check_bad_reply(replies[0])
        assert DNSRecord.parse(replies[1]).header.rcode == RCODE.NXDOMAIN
        assert_no_internal_error(d)


async def test_slow_senders_cannot_hold_every_slot(tmp_path: Path, block: str) -> None:
    """The issue's attack, scaled down: every TCP slot taken by a connection that sends a
    byte every 100 ms (far inside the idle timeout). Each is closed tcp_message_timeout after
    its query's first byte, and then a new client is served."""
    dns = ('max_tcp_connections = 3\nmax_tcp_connections_per_source = 3\n'
           'tcp_message_timeout = "300ms"\ntcp_idle_timeout = "10s"')
    async with running(load(daemon_config(tmp_path, block, dns))) as d:
        ep = d.dns_endpoints[0]
        streams = [await trio.open_tcp_stream(ep.host, ep.port) for _ in range(3)]
        closed = 0

        async def dribble(stream: trio.SocketStream) -> None:
            nonlocal closed
            try:
                for byte in QUERY:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.1)  # a slow sender, not a wait for a condition
                raise AssertionError("a slow sender was allowed to finish its query")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed += 1

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(dribble, s)
                while d.dns.counts["tcp_slow_query"] < 3:
                    await trio.sleep(0.01)
                # The server closed them all; our writes notice on their next byte.
        assert closed == 3 and d.dns.counts["tcp_slow_query"] == 3
        for s in streams:
            await s.aclose()
        await assert_serving(d)
        assert_no_internal_error(d)
