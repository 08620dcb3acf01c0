"""``proxy_protocol = "v2"``: the instance learns the client's address and port, and the front
it connected to, from the PROXY v2 header the proxy sends first. Read by HAProxy (a real
parser: ``bind ... accept-proxy``, which refuses a connection without a valid header) and by
a small server of the test's own, over IPv4 and IPv6, through a real daemon."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import trio

from .conftest import config_text, load, running, wait_until
from .helpers import HAPROXY_V2_INSTANCE

#: A process-backend instance that reads one PROXY v2 header and answers with what it says.
PARSER = """
import ipaddress, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen()
def read(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:  # a readiness or health probe: connects, sends nothing, closes
            raise EOFError
        data += chunk
    return data
while True:
    conn, _ = srv.accept()
    try:
        head = read(conn, 16)
    except EOFError:
        conn.close()
        continue
    assert head[:12] == b"\\r\\n\\r\\n\\x00\\r\\nQUIT\\n" and head[12] == 0x21, head
    fam, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = read(conn, length)
    size = {0x11: 4, 0x21: 16}[fam]
    src = ipaddress.ip_address(body[:size]); dst = ipaddress.ip_address(body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    rest = conn.recv(100)
    conn.sendall(f"{src} {sport} {dst} {dport} {rest.decode()}".encode())
    conn.close()
"""



def service(front: str, port: int, command: str) -> str:
    return f"""
[[service]]
name = "pp"
front = ["{front}"]
ports = [{port}]
answer = "proxy"
proxy_protocol = "v2"
boot_timeout = "10s"
[service.process]
command = {command}
"""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def exchange(front: str, port: int, request: bytes) -> tuple[bytes, tuple[str, int]]:
    """Send ``request`` through the front; the reply, and the client's own address."""
    stream = await trio.open_tcp_stream(front, port)
    async with stream:
        me = stream.socket.getsockname()[:2]
        await stream.send_all(request)
        data = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(4096):
                data += chunk
    return data, (str(me[0]), int(me[1]))


def _v6_loopback() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("family", ["v4", "v6"])
async def test_the_instance_reads_the_clients_address(
    tmp_path: Path, block: str, family: str
) -> None:
    if family == "v6" and not _v6_loopback():
        pytest.skip("needs an IPv6 loopback address (::1)")
    front = f"{block}.1" if family == "v4" else "::1"
    port = free_port(front)
    script = tmp_path / "parser.py"
    script.write_text(PARSER)
    command = f'"{sys.executable} {script} {{address}} {{port}}"'
    cfg = load(config_text(tmp_path / "state", service(front, port, command)))
    async with running(cfg) as d:
        reply, me = await exchange(front, port, b"hello")
        assert reply.decode().split() == [me[0], str(me[1]), front, str(port), "hello"]
        # A second connection: its own header, its own port.
        reply2, me2 = await exchange(front, port, b"again")
        assert reply2.decode().split() == [me2[0], str(me2[1]), front, str(port), "again"]
        assert d.proxy.closed == {} or all(k[1] != "error" for k in d.proxy.closed)


@pytest.mark.skipif(shutil.which("haproxy") is None,
                    reason="needs haproxy (scripts/setup installs it): the reference parser")
@pytest.mark.parametrize("family", ["v4", "v6"])
async def test_haproxy_accepts_the_header(tmp_path: Path, block: str, family: str) -> None:
    if family == "v6" and not _v6_loopback():
        pytest.skip("needs an IPv6 loopback address (::1)")
    front = f"{block}.1" if family == "v4" else "::1"
    port = free_port(front)
    script = tmp_path / "haproxy.py"
    script.write_text(HAPROXY_V2_INSTANCE)
    cfg_file = tmp_path / "haproxy.cfg"
    command = f'"{sys.executable} {script} {{address}} {{port}} {cfg_file}"'
    cfg = load(config_text(tmp_path / "state", service(front, port, command)))
    async with running(cfg) as d:
        reply, me = await exchange(
            front, port, b"GET / HTTP/1.1\r\nHost: pp\r\nConnection: close\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply
        assert body.decode().split() == [me[0], str(me[1]), front, str(port), "pp"]
        await wait_until(lambda: d.proxy.open == 0)


def test_check_warns_when_clients_would_be_handed_over(tmp_path: Path) -> None:
    from jitlaunch.checks import host_findings

    base = service("127.77.0.1", 80, '"x"')
    handoff = base.replace('answer = "proxy"', 'answer = "handoff"').replace(
        '[service.process]', '[service.process]\nsubnet = "127.77.9.0/24"')
    found = [f for f in host_findings(load(config_text(tmp_path, handoff)), ports=False,
                                      state_dir=False) if f.key == "proxy_protocol"]
    assert len(found) == 1 and not found[0].error and "handed its own address" in found[0].message
    # answer = "proxy", or no address of its own: nothing to say.
    for text in (base, base.replace('answer = "proxy"', 'answer = "handoff"')):
        assert not [f for f in host_findings(load(config_text(tmp_path, text)), ports=False,
                                             state_dir=False) if f.key == "proxy_protocol"]
