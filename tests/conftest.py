"""Shared helpers: configs on fresh loopback addresses, an in-process daemon, DNS clients."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import random
import secrets
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from dnslib import DNSRecord

from jitlaunch import config as _config
from jitlaunch.backends import SETTINGS
from jitlaunch.config import Config
from jitlaunch.daemon import Daemon

from .libvirtd import PrivateLibvirtd, cgroup_dirs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Each test gets its own 127.x.y.0/24 block, so that tests never collide on front addresses.
_blocks = itertools.count(random.randrange(1, 200) * 256)


def fresh_block() -> str:
    n = next(_blocks) % (200 * 256)
    return f"127.{100 + n // 256 % 100}.{n % 256}"


DEMO = f"{PYTHON} -m jitlaunch.demo_http --address {{address}} --port {{port}} --name {{name}}"


#: Test daemons serve metrics on a free port (the default, 9464, would collide).
METRICS = 'listen = ["127.0.0.1:0"]'


def config_text(
    state_dir: Path, services: str, dns: str = "", top: str = "", metrics: str = METRICS
) -> str:
    return f"""
[daemon]
state_dir = "{state_dir}"
drain_timeout = "2s"
{top}
[metrics]
{metrics}

[dns]
listen = ["127.0.0.1:0"]
zones = ["jit.test"]
{dns}
{services}
"""


def parse_config(text: str, path: str = "<config>", base_dir: Path | None = None) -> Config:
    """:func:`jitlaunch.config.parse_config` with the real backends and this process's
    environment."""
    return _config.parse_config(
        text, path, base_dir, backends=SETTINGS, env=_config.process_env()
    )


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """:func:`jitlaunch.config.load_config` with the real backends."""
    return _config.load_config(path, backends=SETTINGS)


def load(text: str, path: str = "test.toml") -> Config:
    return parse_config(text, path)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Daemon]:
    """Run a daemon in-process for the duration of the block; stop it in order afterwards."""
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        try:
            yield daemon
        finally:
            daemon.stop()


async def query_udp(server: tuple[str, int], name: str, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.connect(server)
        await sock.send(q.pack())
        with trio.fail_after(15):
            data = await sock.recv(65535)
    return DNSRecord.parse(data)


async def query_tcp(server: tuple[str, int], names: list[tuple[str, str]]) -> list[DNSRecord]:
    """Several queries on one TCP connection, pipelined; replies in any order, by ID."""
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        ids = {}
        for name, qtype in names:
            q = DNSRecord.question(name, qtype)
            ids[q.header.id] = len(ids)
            wire = q.pack()
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
        out: list[DNSRecord | None] = [None] * len(names)
        buf = b""
        with trio.fail_after(15):
            while any(r is None for r in out):
                data = await stream.receive_some(65536)
                assert data, "server closed the connection early"
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
                    n = struct.unpack_from("!H", buf)[0]
                    rec = DNSRecord.parse(buf[2 : 2 + n])
                    buf = buf[2 + n :]
                    out[ids[rec.header.id]] = rec
    return [r for r in out if r is not None]


def answers(rec: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in rec.rr]


async def http_get(host: str, port: int, path: str = "/") -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with trio.fail_after(15):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def wait_until(predicate: Callable[[], bool], timeout: float = 15, what: str = "") -> None:
    """Poll ``predicate`` with a deadline (for real processes; never a bare sleep); past it,
    fail naming ``what`` (by default the predicate's source line)."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {timeout:g} s: {what or _source(predicate)}")


def _source(function: Callable[..., object]) -> str:
    try:
        return inspect.getsource(function).strip()
    except (OSError, TypeError):
        return repr(function)


def children_of(pid: int) -> list[int]:
    """All live descendants of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def block() -> str:
    return fresh_block()


#: An echo server as a script: ``python -c ECHO_SERVER ADDRESS PORT [GATE]``, one connection
#: at a time; with GATE it does not listen until that file exists (a boot that lasts until the
#: test says so).
ECHO_SERVER = """
import os, socket, sys, time
if len(sys.argv) > 3:
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""


# ---- nothing outlives its test --------------------------------------------------------------


def _processes_under(path: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment names ``path`` (a test's tmp_path:
    its daemons, their instances, QEMU with its state-dir files), with their command line."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or a zombie's
            continue
        if path.encode() in cmdline or path.encode() in environ:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used tmp_path: any process still running that belongs to it (a
    daemon or an instance left behind, e.g. when a test failed after SIGKILLing its daemon)
    is killed, and a test that passed fails for leaking it."""
    yield
    tmp_path = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp_path is None:
        return
    path = str(tmp_path) + "/"
    left = _processes_under(path)
    for pid, _ in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    report = getattr(request.node, "rep_call", None)
    if left and report is not None and report.passed:
        pytest.fail("left running after the test (now killed): "
                    + "; ".join(f"pid {pid}: {cmd[:160]}" for pid, cmd in left))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


# ---- QEMU instances and network namespaces, shared by the backend tests ----------------------

KERNEL = ROOT / "images" / "build" / "hello.elf"


@pytest.fixture(scope="session", autouse=True)
def image() -> None:
    if not KERNEL.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "images")], check=True, timeout=300)


def qemus(state_dir: Path) -> list[int]:
    """QEMU processes that belong to a daemon using ``state_dir``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"qemu-system" in cmd and str(state_dir).encode() in cmd and alive(int(entry)):
                out.append(int(entry))
    return out


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    leaked = qemus(tmp_path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, "QEMU processes leaked"


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to create a network namespace",
)


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A fresh network namespace with loopback up; yields the command prefix that runs a
    program inside it. Deleted afterwards (its taps and bridge go with it)."""
    ns = f"jltest-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        inside = ["ip", "netns", "exec", ns]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        yield inside
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def links(inside: list[str]) -> str:
    return subprocess.run([*inside, "ip", "-br", "link"], capture_output=True, text=True,
                          timeout=10).stdout


@pytest.fixture
def netns_libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], PrivateLibvirtd]]:
    """A fresh network namespace (loopback up) with a libvirtd of its own inside; yields the
    command prefix that runs a program in the namespace, and the libvirtd. Afterwards: every
    domain destroyed, libvirtd stopped, any process left in the namespace killed, the
    namespace deleted (its bridge and taps with it), and no cgroup directory left."""
    if shutil.which("ip") is None or shutil.which("dig") is None:
        pytest.skip("needs iproute2 (ip) and dig")
    cgroups = cgroup_dirs()
    ns = f"jltest-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    lvd: PrivateLibvirtd | None = None
    try:
        inside = ["ip", "netns", "exec", ns]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        lvd = PrivateLibvirtd(tmp_path_factory.mktemp("libvirtd-netns"), netns=ns)
        lvd.start()
        yield inside, lvd
    finally:
        if lvd is not None:
            lvd.stop()
        left = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=10).stdout.split()
        for pid in left:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)
    assert not left, f"processes left in the namespace: {left}"
    new = cgroup_dirs() - cgroups
    assert not new, f"libvirtd left cgroup directories on the host: {sorted(new)}"
