"""DNS servers and the proxy over real loopback sockets: framing, bounds and error paths."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import trio
from dnslib import RCODE, DNSRecord

from .conftest import DEMO, PYTHON, config_text, load, running, wait_until


def service(front: str, extra: str = "", command: str = DEMO) -> str:
    return f"""
[[service]]
name = "hello"
front = ["{front}"]
ports = [18080]
answer = "proxy"
{extra}
[service.process]
command = "{command}"
"""


async def test_tcp_dns_one_byte_at_a_time_and_pipelined(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(f"{block}.1")))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        queries = [DNSRecord.question(n, "A") for n in ("nope.jit.test", "ns.jit.test", "x.org")]
        wire = b"".join(struct.pack("!H", len(q.pack())) + q.pack() for q in queries)
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(wire)):
                await stream.send_all(wire[i : i + 1])
            buf = b""
            replies = []
            with trio.fail_after(10):
                while len(replies) < 3:
                    buf += await stream.receive_some(4096)
                    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
                        n = struct.unpack_from("!H", buf)[0]
                        replies.append(DNSRecord.parse(buf[2 : 2 + n]))
                        buf = buf[2 + n :]
        assert [r.header.id for r in replies] == [q.header.id for q in queries]
        assert [r.header.rcode for r in replies] == [RCODE.NXDOMAIN, RCODE.NOERROR, RCODE.REFUSED]


async def test_idle_tcp_dns_connection_is_closed(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(f"{block}.1"), dns='tcp_idle_timeout = "300ms"'))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(10):
                assert await stream.receive_some(10) == b""
            assert trio.current_time() - start >= 0.29


async def test_too_many_tcp_dns_connections(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(f"{block}.1"), dns="max_tcp_connections = 2"))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        held = [await trio.open_tcp_stream(ep.host, ep.port) for _ in range(2)]
        q = DNSRecord.question("ns.jit.test", "A").pack()
        await held[1].send_all(struct.pack("!H", len(q)) + q)  # both are being served
        with trio.fail_after(10):
            assert await held[1].receive_some(4096)
        third = await trio.open_tcp_stream(ep.host, ep.port)
        async with third:
            with trio.fail_after(10):
                assert await third.receive_some(10) == b""
        for s in held:
            await s.aclose()


async def test_udp_garbage_formerr_and_short_packets_ignored(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(f"{block}.1")))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((ep.host, ep.port))
            await sock.send(b"\x12\x34\x01")  # too short: no reply at all
            await sock.send(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05hel")
            with trio.fail_after(10):
                reply = await sock.recv(512)
            # The first reply is the FORMERR for the second packet: the first got none.
            assert reply == b"\xab\xcd\x81\x01" + b"\x00" * 8
            ok = DNSRecord.question("ns.jit.test", "A")
            await sock.send(ok.pack())
            with trio.fail_after(10):
                assert DNSRecord.parse(await sock.recv(512)).header.id == ok.header.id


async def test_proxy_buffer_bound_closes_and_counts(tmp_path: Path, block: str) -> None:
    # The instance never gets ready (it sleeps), so the client's bytes pile up in the buffer.
    text = config_text(tmp_path, service(f"{block}.1", command="sleep 30"), top="")
    text = text.replace("[dns]", "[proxy]\nmax_buffer = 1000\n\n[dns]")
    cfg = load(text)
    async with running(cfg) as d:
        stream = await trio.open_tcp_stream(f"{block}.1", 18080)
        async with stream:
            await stream.send_all(b"x" * 1001)
            with trio.fail_after(10):
                while True:
                    try:
                        if await stream.receive_some(10) == b"":
                            break
                    except trio.BrokenResourceError:  # closed with unread data: RST
                        break
        assert d.proxy.closed[("hello", "buffer")] == 1


async def test_proxy_pending_bound_and_boot_timeout(tmp_path: Path, block: str) -> None:
    text = config_text(
        tmp_path, service(f"{block}.1", command="sleep 30", extra='boot_timeout = "1s"')
    )
    cfg = load(text.replace("[dns]", "[proxy]\nmax_pending = 2\n\n[dns]"))
    async with running(cfg) as d:
        streams = [await trio.open_tcp_stream(f"{block}.1", 18080) for _ in range(2)]
        await wait_until(lambda: d.proxy.pending["hello"] == 2)
        extra = await trio.open_tcp_stream(f"{block}.1", 18080)
        async with extra:
            with trio.fail_after(10):
                assert await extra.receive_some(10) == b""
        assert d.proxy.closed[("hello", "pending")] == 1
        # The two waiting ones are closed when the boot times out.
        for s in streams:
            with trio.fail_after(10):
                assert await s.receive_some(10) == b""
            await s.aclose()
        assert d.proxy.closed[("hello", "boot_failed")] == 2


ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.sendall(b"<eof>")
    c.close()
"""


async def test_proxy_half_close_and_bulk_both_ways(tmp_path: Path, block: str) -> None:
    """A client that sends, then half-closes, still gets everything back, and the instance
    sees the EOF (it answers '<eof>' after it)."""
    (tmp_path / "echo.py").write_text(ECHO_SERVER)
    cmd = f"{PYTHON} {tmp_path / 'echo.py'} {{address}} {{port}}"
    cfg = load(config_text(tmp_path, service(f"{block}.1", command=cmd)))
    async with running(cfg) as d:
        await d.supervisor.acquire("hello")  # while booting, 2 MiB would overflow the buffer
        payload = bytes(range(256)) * 8192  # 2 MiB, more than any socket buffer
        stream = await trio.open_tcp_stream(f"{block}.1", 18080)
        received = bytearray()
        async with stream:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async def receive() -> None:
                while data := await stream.receive_some(65536):
                    received.extend(data)

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    n.start_soon(send)
                    n.start_soon(receive)
        assert bytes(received) == payload + b"<eof>"
        rt = d.supervisor.services["hello"]
        await wait_until(lambda: rt.connections == 0)


def test_listen_conflict_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        conf = tmp_path / "c.toml"
        conf.write_text(config_text(tmp_path, "").replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        res = subprocess.run(
            [sys.executable, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
            capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 1
    assert (
        f"jitlaunch: error: cannot listen for DNS over UDP on 127.0.0.1:{port}: Address already "
        "in use (something else is listening there)" in res.stderr
    )
    assert "Traceback" not in res.stderr
