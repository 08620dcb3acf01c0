"""Shared frontends through a real daemon and real clients: ``curl --resolve`` to two process
services on one ``host`` frontend, ``openssl s_client`` and ``curl https`` through an ``sni``
frontend to two TLS services (certificates from ``openssl req``), each cold: the first
connection boots its instance and is served. Refusals: counted by reason, never a boot."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from jitlaunch.daemon import Daemon

from .conftest import DEMO, answers, config_text, fresh_block, load, query_udp, running, wait_until
from .helpers import HAPROXY_V2_INSTANCE, get, scrape

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def host_config(tmp_path: Path, addr: str, port: int) -> str:
    out = f"""
[[frontend]]
name = "web"
listen = ["{addr}:{port}"]
route = "host"
"""
    for name in ("alpha", "beta"):
        out += f"""
[[service]]
name = "{name}"
ports = [8080]
frontends = {{ web = 8080 }}
answer = "proxy"
[service.process]
command = "{DEMO}"
"""
    return config_text(tmp_path / "state", out)


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(["curl", "-sS", "--max-time", "20", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


def booted(d: Daemon, name: str) -> bool:
    return d.supervisor.service_status(name).boots > 0


async def test_host_frontend_routes_two_services_by_name(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    port = free_port(addr)
    async with running(load(host_config(tmp_path, addr, port))) as d:
        assert [str(e) for e in d.frontend_endpoints] == [f"{addr}:{port}"]
        # DNS answers a service on shared frontends only with the frontend's address.
        dns = d.dns_endpoints[0]
        reply = await query_udp((dns.host, dns.port), "alpha.jit.test")
        assert answers(reply) == [addr]
        assert not booted(d, "beta")
        for name in ("alpha", "beta"):
            res = await curl("--resolve", f"{name}.jit.test:{port}:{addr}",
                             f"http://{name}.jit.test:{port}/")
            assert res.returncode == 0, res.stderr
            assert f"Hello from {name}".encode() in res.stdout, res.stdout
        assert d.shared.routed == {("web", "alpha"): 1, ("web", "beta"): 1}
        assert d.shared.closed == {}
        samples = await scrape(d)
        assert get(samples, "jitlaunch_frontend_connections_routed_total",
                   frontend="web", service="beta") == 1


async def test_host_frontend_refuses_with_400_and_421(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    port = free_port(addr)
    async with running(load(host_config(tmp_path, addr, port))) as d:
        res = await curl("-i", "-H", "Host: nobody.jit.test", f"http://{addr}:{port}/")
        assert res.stdout.startswith(b"HTTP/1.1 421"), res
        res = await curl("-i", "--http1.0", "-H", "Host:", f"http://{addr}:{port}/")
        assert res.stdout.startswith(b"HTTP/1.1 400"), res
        stream = await trio.open_tcp_stream(addr, port)
        async with stream:
            await stream.send_all(b"\x16\x03\x01\x00\x05hello")
            got = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some(4096):
                    got += chunk
        assert got.startswith(b"HTTP/1.1 400")
        assert d.shared.closed == {("web", "unknown_name"): 1, ("web", "no_host"): 1,
                                   ("web", "not_http"): 1}
        assert d.shared.routed == {}
        assert not booted(d, "alpha") and not booted(d, "beta")
        samples = await scrape(d)
        for reason in ("unknown_name", "no_host", "not_http"):
            assert get(samples, "jitlaunch_frontend_connections_closed_total",
                       frontend="web", reason=reason) == 1


TLS_SERVER = """
import socket, ssl, sys, hashlib
host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen()
while True:
    conn, _ = srv.accept()
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError):
        conn.close(); continue
    try:
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = tls.recv(65536)
            if not chunk: break
            data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        if head.startswith(b"PUT"):
            n = int([line.split(b":")[1] for line in head.split(b"\\r\\n")
                     if line.lower().startswith(b"content-length")][0])
            while len(body) < n:
                body += tls.recv(65536)
            reply = hashlib.sha256(body).hexdigest().encode() + b"\\n" + bytes(range(256)) * 4096
        else:
            reply = sys.argv[5].encode()
        head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"
        tls.sendall(head % len(reply) + reply)
        tls.close()
    except (ssl.SSLError, OSError):
        conn.close()
"""


def make_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}.jit.test",
         "-addext", f"subjectAltName=DNS:{name}.jit.test"],
        check=True, capture_output=True)
    return cert, key


def sni_config(tmp_path: Path, addr: str, port: int) -> str:
    script = tmp_path / "tls_server.py"
    script.write_text(TLS_SERVER)
    out = f"""
[[frontend]]
name = "tls"
listen = ["{addr}:{port}"]
route = "sni"
"""
    for name in ("alpha", "beta"):
        cert, key = make_cert(tmp_path, name)
        out += f"""
[[service]]
name = "{name}"
ports = [443]
frontends = {{ tls = 443 }}
answer = "proxy"
[service.process]
command = "{sys.executable} {script} {{address}} {{port}} {cert} {key} hello-from-{name}"
"""
    return config_text(tmp_path / "state", out)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_sni_frontend_passes_tls_through(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    port = free_port(addr)
    async with running(load(sni_config(tmp_path, addr, port))) as d:
        for name in ("alpha", "beta"):
            proc = await trio.run_process(
                ["openssl", "s_client", "-connect", f"{addr}:{port}", "-servername",
                 f"{name}.jit.test"], stdin=b"", capture_stdout=True, capture_stderr=True,
                check=False)
            assert f"CN = {name}.jit.test".encode() in proc.stdout + proc.stderr, proc
        payload = bytes(range(256)) * 4096  # 1 MiB
        body = tmp_path / "payload"
        body.write_bytes(payload)
        for name in ("alpha", "beta"):
            cert = tmp_path / f"{name}.crt"
            res = await curl("--cacert", str(cert), "--resolve",
                             f"{name}.jit.test:{port}:{addr}",
                             f"https://{name}.jit.test:{port}/")
            assert res.returncode == 0 and res.stdout == f"hello-from-{name}".encode(), res
            res = await curl("--cacert", str(cert), "--resolve",
                             f"{name}.jit.test:{port}:{addr}", "-T", str(body),
                             f"https://{name}.jit.test:{port}/")
            assert res.returncode == 0, res.stderr
            digest, _, back = res.stdout.partition(b"\n")
            assert digest.decode() == hashlib.sha256(payload).hexdigest()
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        # No SNI and no default: closed, counted, nothing else booted.
        proc = await trio.run_process(
            ["openssl", "s_client", "-connect", f"{addr}:{port}", "-noservername"],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode != 0
        await wait_until(lambda: d.shared.closed[("tls", "no_sni")] == 1, what="no_sni counted")
        assert d.shared.routed == {("tls", "alpha"): 3, ("tls", "beta"): 3}




def v6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (scripts/setup)")
@pytest.mark.parametrize("family", ["v4", "v6"])
async def test_proxy_v2_through_a_host_frontend(tmp_path: Path, block: str, family: str) -> None:
    if family == "v6" and not v6_loopback():
        pytest.skip("needs an IPv6 loopback address (::1)")
    addr = f"{block}.1" if family == "v4" else "::1"
    with socket.socket(socket.AF_INET6 if family == "v6" else socket.AF_INET) as s:
        s.bind((addr, 0))
        port = s.getsockname()[1]
    script = tmp_path / "haproxy.py"
    script.write_text(HAPROXY_V2_INSTANCE)
    listen = f"[{addr}]:{port}" if family == "v6" else f"{addr}:{port}"
    cfg = load(config_text(tmp_path / "state", f"""
[[frontend]]
name = "web"
listen = ["{listen}"]
route = "host"

[[service]]
name = "pp"
ports = [80]
frontends = {{ web = 80 }}
answer = "proxy"
proxy_protocol = "v2"
[service.process]
command = "{sys.executable} {script} {{address}} {{port}} {tmp_path / 'haproxy.cfg'}"
"""))
    async with running(cfg) as d:
        stream = await trio.open_tcp_stream(addr, port)
        async with stream:
            me = stream.socket.getsockname()[:2]
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: pp.jit.test\r\nConnection: close\r\n\r\n")
            reply = b""
            with trio.fail_after(20):
                while chunk := await stream.receive_some(4096):
                    reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply
        assert body.decode().split() == [me[0], str(me[1]), addr, str(port), "pp.jit.test"]
        assert d.shared.routed == {("web", "pp"): 1}


#: An instance serving HTTP on {address}:8080 and HTTPS on {address}:8443, each request
#: answered with its name: the same program behind HAProxy and behind jitlaunch.
BOTH = """
import socket, ssl, sys, threading
host, cert, key, name = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
def answer(conn):
    try:
        data = b""
        while b"\\r\\n\\r\\n" not in data and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk: break
            data += chunk
        body = name.encode()
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"
                     % len(body) + body)
    except (ssl.SSLError, OSError):
        pass
    finally:
        conn.close()
def serve(port, tls):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port)); srv.listen(64)
    while True:
        conn, _ = srv.accept()
        if tls:
            try:
                conn = ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close(); continue
        threading.Thread(target=answer, args=(conn,), daemon=True).start()
threading.Thread(target=serve, args=(8443, True), daemon=True).start()
serve(8080, False)
"""

#: The same routing in HAProxy: HTTP mode by Host (port dropped, lower case), TCP mode by
#: req.ssl_sni.
HAPROXY_ROUTER = """global
  maxconn 256
defaults
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend web
  mode http
  bind {addr}:{web}
  http-request set-var(req.h) req.hdr(host),field(1,:),lower
  use_backend alpha_http if {{ var(req.h) -m str alpha.jit.test }}
  use_backend beta_http if {{ var(req.h) -m str beta.jit.test }}
frontend tls
  mode tcp
  bind {addr}:{tls}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend alpha_tls if {{ req.ssl_sni -i alpha.jit.test }}
  use_backend beta_tls if {{ req.ssl_sni -i beta.jit.test }}
backend alpha_http
  mode http
  server s {alpha}:8080
backend beta_http
  mode http
  server s {beta}:8080
backend alpha_tls
  mode tcp
  server s {alpha}:8443
backend beta_tls
  mode tcp
  server s {beta}:8443
"""

HTTP_CASES = [
    b"GET / HTTP/1.1\r\nHost: alpha.jit.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: BETA.jit.test:80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: nobody.jit.test\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"\x16\x03\x01\x00\x10garbage-garbage!",
    b"GET / HTTP/1.1\r\nHost: alpha.jit.test\r\nHost: beta.jit.test\r\n\r\n",
]
#: Deliberate differences, each with its reason (not in the cases above): a final dot
#: (``Host: alpha.jit.test.``) routes here (the same DNS name) and not in HAProxy's exact
#: match; refusals differ in status (421 for a name not routed here where HAProxy says 503
#: for no backend; 400 for HTTP/1.0 without Host where HAProxy says 503), never in outcome;
#: an absolute-form target whose authority is not the Host field (``GET http://alpha/`` with
#: ``Host: beta``) goes by its Host here (the instance of that name sees the same bytes, and
#: answers as its own server would) where HAProxy refuses it with a 400.
SNI_CASES = ["alpha.jit.test", "BETA.jit.test", "nobody.jit.test", None, "garbage"]


async def _outcome(addr: str, port: int, data: bytes) -> str:
    """Which instance answered (its name), or ``refused``."""
    try:
        stream = await trio.open_tcp_stream(addr, port)
    except OSError:
        return "refused"
    got = b""
    async with stream:
        try:
            await stream.send_all(data)
            with trio.fail_after(15):
                while chunk := await stream.receive_some(4096):
                    got += chunk
        except (trio.BrokenResourceError, OSError):
            pass
    head, _, body = got.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else "refused"


async def _tls_outcome(addr: str, port: int, name: str | None, cafile: Path) -> str:
    if name == "garbage":
        return await _outcome(addr, port, b"\x16\x03\x01\x00\x05hello" + b"x" * 100)
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    try:
        stream = await trio.open_tcp_stream(addr, port)
        tls = trio.SSLStream(stream, ctx, server_hostname=name)
        async with tls:
            with trio.fail_after(15):
                await tls.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while chunk := await tls.receive_some(4096):
                    got += chunk
    except (trio.BrokenResourceError, OSError):
        return "refused"
    head, _, body = got.partition(b"\r\n\r\n")
    return body.decode() if head.startswith(b"HTTP/1.1 200") else "refused"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (scripts/setup)")
async def test_same_routing_as_haproxy(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    backends = fresh_block()
    script = tmp_path / "both.py"
    script.write_text(BOTH)
    # One CA-less self-signed certificate for both names: the outcome is the name answering.
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
         str(key), "-out", str(cert), "-subj", "/CN=jit.test",
         "-addext", "subjectAltName=DNS:alpha.jit.test,DNS:beta.jit.test"],
        check=True, capture_output=True)
    ports = {k: free_port(addr) for k in ("web", "tls", "hweb", "htls")}
    services = ""
    for name in ("alpha", "beta"):
        services += f"""
[[service]]
name = "{name}"
ports = [8080, 8443]
frontends = {{ web = 8080, tls = 8443 }}
answer = "proxy"
[service.process]
command = "{sys.executable} {script} {{address}} {cert} {key} {name}"
subnet = "{fresh_block()}.0/24"
"""
    cfg = load(config_text(tmp_path / "state", f"""
[[frontend]]
name = "web"
listen = ["{addr}:{ports['web']}"]
route = "host"
[[frontend]]
name = "tls"
listen = ["{addr}:{ports['tls']}"]
route = "sni"
""" + services))
    (tmp_path / "haproxy.cfg").write_text(HAPROXY_ROUTER.format(
        addr=addr, web=ports["hweb"], tls=ports["htls"], alpha=f"{backends}.11",
        beta=f"{backends}.12"))
    procs = [await trio.lowlevel.open_process(
        [sys.executable, str(script), f"{backends}.{n}", str(cert), str(key), name])
        for n, name in ((11, "alpha"), (12, "beta"))]
    procs.append(await trio.lowlevel.open_process(
        ["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for n in (11, 12):
            await wait_until(lambda n=n: _listening(f"{backends}.{n}", 8443), what="backends")
        await wait_until(lambda: _listening(addr, ports["htls"]), what="haproxy")
        async with running(cfg):
            for case in HTTP_CASES:
                ours = await _outcome(addr, ports["web"], case)
                theirs = await _outcome(addr, ports["hweb"], case)
                assert ours == theirs, (case, ours, theirs)
            for name in SNI_CASES:
                ours = await _tls_outcome(addr, ports["tls"], name, cert)
                theirs = await _tls_outcome(addr, ports["htls"], name, cert)
                assert ours == theirs, (name, ours, theirs)
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_sni_without_a_name_goes_to_the_default(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    port = free_port(addr)
    text = sni_config(tmp_path, addr, port).replace('route = "sni"',
                                                    'route = "sni"\ndefault = "beta"')
    async with running(load(text)) as d:
        proc = await trio.run_process(
            ["openssl", "s_client", "-connect", f"{addr}:{port}", "-noservername"],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
        assert b"CN = beta.jit.test" in proc.stdout + proc.stderr, proc
        assert d.shared.routed == {("tls", "beta"): 1} and d.shared.closed == {}
