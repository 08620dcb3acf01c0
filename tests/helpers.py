"""Builders and fakes that several test modules share (one of each): service configs, the
metrics scrape, the fake backend of the lifecycle tests. Fixtures live in conftest.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from jitlaunch.backends.base import Backend, Handle
from jitlaunch.config import Endpoint, ServiceConfig
from jitlaunch.daemon import Daemon
from jitlaunch.errors import BootFailed
from jitlaunch.lifecycle.state import State
from jitlaunch.lifecycle.supervisor import Supervisor

from .conftest import (
    DEMO,
    KERNEL,
    parse_config,
)


def qemu_service(front: str, extra: str = "", qemu: str = "", accel: str = "tcg") -> str:
    return f"""
[[service]]
name = "uk"
front = ["{front}"]
ports = [18080]
backend = "qemu"
boot_timeout = "20s"
{extra}
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "{accel}"
{qemu}
"""


def dns_server(d) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    return d.dns_endpoints[0].host, d.dns_endpoints[0].port


Sample = tuple[str, frozenset[tuple[str, str]]]


async def fetch(ep: Endpoint, request: bytes) -> bytes:
    """Send ``request`` as it is and read the whole reply (the server closes)."""
    stream = await trio.open_tcp_stream(ep.host, ep.port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def scrape_text(d: Daemon) -> str:
    reply = await fetch(d.metrics_endpoints[0], b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


async def scrape(d: Daemon) -> dict[Sample, float]:
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(await scrape_text(d)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def services(block: str, names: str, extra: str = "", command: str = DEMO) -> str:
    """Process services on {block}.1, .2, ...; ``extra`` goes into each, or into one only
    when it starts with ``name:``."""
    only, _, keys = extra.partition(":") if ":" in extra.split("=")[0] else ("", "", extra)
    out = []
    for i, name in enumerate(names.split(), start=1):
        out.append(f"""
[[service]]
name = "{name}"
front = ["{block}.{i}"]
ports = [8080]
idle_timeout = 60
{keys if only in ("", name) else ""}
[service.process]
command = "{command}"
grace = "5s"
""")
    return "".join(out)


def host(**keys: object) -> str:
    lines = ["[host]"]
    wake = keys.pop("wake", None)
    for k, v in keys.items():
        lines.append(f"{k} = {v!r}".replace("'", '"'))
    if wake is not None:
        lines.append(f"[host.wake]\n{wake}")
    return "\n".join(lines) + "\n"


def pid(sup: Supervisor, name: str) -> int:
    inst = sup.services[name].instance
    assert inst is not None and inst.handle is not None and inst.handle.pid is not None
    return inst.handle.pid


def instance_state(sup: Supervisor, name: str) -> State | None:
    inst = sup.services[name].instance
    return inst.state if inst is not None else None


class FakeHandle(Handle):
    def __init__(self, boot_time: float, fail: str | None) -> None:
        self.boot_time = boot_time
        self.fail = fail
        self.gone = trio.Event()
        self.how = "exited with status 0"
        self.stopped_with: str | None = None

    def endpoint(self, port: int) -> tuple[str, int]:
        return "127.0.0.1", port

    async def wait_ready(self) -> None:
        await trio.sleep(self.boot_time)
        if self.fail == "error":
            raise BootFailed("the fake refused")
        if self.fail == "exit":
            self.how = "exited with status 3"
            self.gone.set()
            await trio.sleep_forever()

    async def wait_exited(self) -> str:
        await self.gone.wait()
        return self.how

    def die(self) -> None:
        self.how = "killed by SIGKILL"
        self.gone.set()

    async def stop(self, mode: str, grace: float) -> bool:
        self.stopped_with = mode
        self.gone.set()
        return False


class FakeBackend(Backend):
    name = "process"

    def __init__(self, boot_time: float = 0.5) -> None:
        self.boot_time = boot_time
        self.fail: str | None = None
        self.starts: list[float] = []
        self.handles: list[FakeHandle] = []

    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        self.starts.append(trio.current_time())
        h = FakeHandle(self.boot_time, self.fail)
        self.handles.append(h)
        return h


def make(tmp_path: Path, extra: str = "") -> tuple[Supervisor, FakeBackend]:
    cfg = parse_config(
        f"""
[daemon]
state_dir = "{tmp_path}"
[dns]
zones = ["jit.test"]
[[service]]
name = "hello"
front = ["127.77.0.1"]
ports = [80]
idle_timeout = 60
boot_timeout = 5
retry_backoff = 1
retry_backoff_max = 5
{extra}
[service.process]
command = "x"
""",
        "t.toml",
    )
    backend = FakeBackend()
    return Supervisor(cfg, {"process": backend}), backend


# In the namespace: wait until DNS hands the address over, then fetch from it every 0.25 s for
# the given seconds; print the fetches and the failures.
FETCH_LOOP = """
import socket, subprocess, sys, time
seconds = float(sys.argv[1])
deadline = time.monotonic() + 30
while True:
    out = subprocess.run(["dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
                          "hello.jit.test", "A"], capture_output=True, text=True).stdout.strip()
    if out.startswith("10.77.0."):
        break
    assert time.monotonic() < deadline, "not handed over: " + out
    time.sleep(0.05)
fetches, failures = 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((out, 80), 2) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            s.settimeout(2)
            if not s.recv(100).startswith(b"HTTP/1.1 200"):
                failures.append("bad reply")
    except OSError as exc:
        failures.append(str(exc))
    fetches += 1
    time.sleep(0.25)
print(fetches, len(failures), failures[:3], flush=True)
"""


#: HAProxy as an instance, the reference PROXY v2 parser (``accept-proxy`` refuses a
#: connection without a valid header): run as ``python - ADDRESS PORT CFG``, it answers each
#: HTTP request with the addresses it read and the Host header:
#: ``SRC SRC_PORT DST DST_PORT HOST``.
HAPROXY_V2_INSTANCE = """
import os, sys
host, port, cfg = sys.argv[1], sys.argv[2], sys.argv[3]
bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
fmt = "%[src] %[src_port] %[dst] %[dst_port] %[req.hdr(host)]"
with open(cfg, "w") as f:
    f.write(f'''global
  maxconn 64
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend fe
  bind {bind} accept-proxy
  http-request return status 200 content-type text/plain lf-string "{fmt}"
''')
os.execvp("haproxy", ["haproxy", "-db", "-f", cfg])
"""


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's TLS client for ``server_name`` (None: no SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS client finished a handshake with no server")
