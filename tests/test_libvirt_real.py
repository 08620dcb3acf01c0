"""The libvirt backend against a real libvirtd (qemu:///system) that the fixture starts, as
the README says: virtlogd, and libvirtd under scripts/subreaper (so that a destroyed QEMU is
reaped at once). A libvirtd already running is used and left running. Every test checks that
no domain of its daemon is left behind; domains of others are never touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.backends.base import free_port
from jitlaunch.backends.libvirt.backend import state_id
from jitlaunch.lifecycle.state import State

from .conftest import ROOT, config_text, http_get, load, query_udp, running, wait_until

libvirt = pytest.importorskip("libvirt")

URI = "qemu:///system"
KERNEL = ROOT / "images" / "build" / "hello.elf"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("libvirtd") is None,
    reason="needs root and libvirtd (scripts/setup installs it)")


def _connects() -> bool:
    try:
        libvirt.open(URI).close()
        return True
    except libvirt.libvirtError:
        return False


class Libvirtd:
    """The libvirtd the fixture started (None where one was already running)."""

    def __init__(self, conf: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: libvirtd also listens on TCP on loopback only, without authentication.
        self.tcp_port = free_port()
        self.conf = conf
        conf.write_text(f'listen_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\n'
                        f'listen_addr = "127.0.0.1"\ntcp_port = "{self.tcp_port}"\n')

    def start(self) -> None:
        deadline = time.monotonic() + 60  # the first start probes QEMU (~9 s)
        while True:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "subreaper"), "libvirtd", "--listen",
                 "-f", str(self.conf)],
                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            # A libvirtd still shutting down holds its pid file: the new one exits; again.
            while not _connects() and proc.poll() is None:
                assert time.monotonic() < deadline, "libvirtd did not answer within 60 s"
                time.sleep(0.05)
            if proc.poll() is None:
                return
            assert time.monotonic() < deadline, "libvirtd did not start within 60 s"

    def restart(self) -> None:
        """SIGTERM to libvirtd (its domains keep running) and a new one."""
        self.procs[-1].terminate()
        deadline = time.monotonic() + 20
        while _connects():
            assert time.monotonic() < deadline, "libvirtd did not stop"
            time.sleep(0.02)
        self.start()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirtd | None]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    ours: Libvirtd | None = None
    logd: subprocess.Popen[bytes] | None = None
    if not _connects():
        if not os.path.exists("/run/libvirt/virtlogd-sock"):
            logd = subprocess.Popen(["virtlogd"], start_new_session=True)
        ours = Libvirtd(tmp_path_factory.mktemp("libvirtd") / "libvirtd.conf")
        ours.start()
    if not KERNEL.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "images")], check=True, timeout=300)
    try:
        yield ours
    finally:
        if ours is not None:
            ours.stop()
        if logd is not None:
            logd.terminate()
            logd.wait(timeout=20)


def domains() -> set[str]:
    conn = libvirt.open(URI)
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


@pytest.fixture
def state(tmp_path: Path, libvirtd: Libvirtd | None) -> Iterator[Path]:
    yield tmp_path
    prefix = f"jl-{state_id(tmp_path)}-"
    leaked = {n for n in domains() if n.startswith(prefix)}
    conn = libvirt.open(URI)
    try:
        for name in leaked:
            conn.lookupByName(name).destroy()
    finally:
        conn.close()
    assert not leaked, "domains leaked"


def service(front: str, extra: str = "", lv: str = "", uri: str = URI) -> str:
    return f"""
[[service]]
name = "uk"
front = ["{front}"]
ports = [18080]
backend = "libvirt"
boot_timeout = "30s"
{extra}
[service.libvirt]
uri = "{uri}"
kernel = "{KERNEL}"
guest_ports = [80]
accel = "tcg"
grace = "2s"
{lv}
"""


def server(d) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    return d.dns_endpoints[0].host, d.dns_endpoints[0].port


async def test_lookup_boots_the_unikernel_through_libvirt(state: Path, block: str) -> None:
    cfg = load(config_text(state, service(f"{block}.1")))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        assert rec.header.rcode == RCODE.NOERROR and str(rec.rr[0].rdata) == f"{block}.1"
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200") and b"uk" in body
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.state is State.READY
        assert any(n.startswith(f"jl-{state_id(state)}-uk-") for n in domains())
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in domains())


async def test_conf_libvirt_toml_serves(state: Path, block: str) -> None:
    text = (ROOT / "conf" / "libvirt.toml").read_text()
    text = text.replace("127.0.0.1:5353", "127.0.0.1:0").replace("127.77.0.", f"{block}.")
    text = f'[daemon]\nstate_dir = "{state}"\n[metrics]\nlisten = ["127.0.0.1:0"]\n' + text
    cfg = load(text, str(ROOT / "conf" / "libvirt.toml"))
    async with running(cfg) as d:
        body = await http_get(f"{block}.1", 8080)
        assert body.startswith(b"HTTP/1.1 200") and b"hello" in body
        assert d.supervisor.services["hello"].instance is not None


async def test_libvirtd_restarted_mid_run(
    state: Path, block: str, libvirtd: Libvirtd | None,
) -> None:
    if libvirtd is None:
        pytest.skip("libvirtd was running before the tests: not ours to restart")
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(libvirtd.restart)
        assert name in domains()  # the domain outlived libvirtd's restart
        backend = d.backends["libvirt"]
        conn = backend.connection(URI)  # type: ignore[attr-defined]
        await wait_until(lambda: conn._conn is not None and conn._opened >= 2, timeout=10)
        # The running instance is kept and still serves; nothing was lost or leaked.
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        assert rt.instance is inst and inst.state is State.READY and rt.deaths == 0
        assert await inst.handle.probe(5) is None
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in domains())


async def test_a_remote_uri_boots_serves_and_survives_a_restart(
    state: Path, block: str, libvirtd: Libvirtd | None,
) -> None:
    if libvirtd is None:
        pytest.skip("libvirtd was running before the tests: not ours to restart with --listen")
    uri = f"qemu+tcp://127.0.0.1:{libvirtd.tcp_port}/system"
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "proxy"', uri=uri)))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        assert inst.handle.conn.uri == uri  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(libvirtd.restart)
        conn = d.backends["libvirt"].connection(uri)  # type: ignore[attr-defined]
        await wait_until(lambda: conn._conn is not None and conn._opened >= 2, timeout=15)
        assert rt.instance is inst and rt.deaths == 0
        assert await inst.handle.probe(5) is None
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in domains())


@pytest.mark.parametrize("mode", ["destroy", "shutdown", "pause", "save"])
async def test_idle_teardown_in_every_stop_mode(state: Path, block: str, mode: str) -> None:
    cfg = load(config_text(state, service(
        f"{block}.1", extra=f'idle_timeout = "500ms"\nstop = "{mode}"\nanswer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        await wait_until(lambda: inst.state in (State.STOPPED, State.SAVED), timeout=30)
        assert rt.idle_stops == 1
        if mode == "pause":
            assert inst.state is State.SAVED and name in domains()
        elif mode == "save":
            assert inst.state is State.SAVED and name not in domains()
            assert (state / "libvirt" / "uk.state").exists()
        else:
            assert name not in domains()
        again = await http_get(f"{block}.1", 18080)
        assert again.startswith(b"HTTP/1.1 200") and b"uk" in again
        now = rt.instance
        assert now is not None and now.handle is not None
        if mode in ("pause", "save"):
            assert now is inst and now.handle.wake == ("resume" if mode == "pause" else "restore")
            assert not (state / "libvirt" / "uk.state").exists()


async def test_warm_pool(state: Path, block: str) -> None:
    extra = 'answer = "proxy"\nmax_instances = 2'
    cfg = load(config_text(state, service(f"{block}.1", extra=extra, lv="pool = 1")))
    async with running(cfg) as d:
        pool = d.backends["libvirt"].pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1, timeout=30)
        member = pool[0]
        assert member.paused and member.name in domains()
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.handle is member and member.wake == "pool"
        await wait_until(lambda: len(pool) == 1 and pool[0] is not member, timeout=30)
        assert d.backends["libvirt"].status_lines()[0].startswith("uk: warm pool 1 of 1")
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in domains())
    assert not list((state / "logs").glob("uk.pool-*.log"))


async def test_a_domain_destroyed_with_virsh_is_noticed(state: Path, block: str) -> None:
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        subprocess.run(["virsh", "-c", URI, "destroy", name], check=True, timeout=30,
                       stdout=subprocess.DEVNULL)
        await wait_until(lambda: rt.instance is not inst, timeout=5)
        assert rt.deaths == 1
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        assert rt.instance is not inst


@pytest.mark.slow
def test_a_killed_daemon_restarted_cleans_its_own_domains_only(state: Path, block: str) -> None:
    conf = state / "c.toml"
    conf.write_text(config_text(state, service(f"{block}.1")))
    prefix = f"jl-{state_id(state)}-"
    # Someone else's domain, named much like ours.
    other = libvirt.open(URI)
    xml = (f"<domain type='qemu'><name>jl-someone-uk-1</name><memory unit='MiB'>16</memory>"
           f"<os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{KERNEL}</kernel>"
           "</os><devices><controller type='usb' model='none'/><memballoon model='none'/>"
           "</devices></domain>")
    foreign = other.createXML(xml, 0)
    errors = open(state / "daemon.err", "wb")
    try:
        cmd = [sys.executable, "-m", "jitlaunch.cli", "run", "--config", str(conf)]
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _boot_through(first, block, state / "daemon.err")
            deadline = time.monotonic() + 30
            while not any(n.startswith(prefix) for n in domains()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert any(n.startswith(prefix) for n in domains())  # the domain outlives the daemon
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            deadline = time.monotonic() + 30
            while any(n.startswith(prefix) for n in domains()):
                assert time.monotonic() < deadline, "the leftover domain was not destroyed"
                time.sleep(0.05)
            assert "jl-someone-uk-1" in domains()
        finally:
            second.terminate()
            second.wait(timeout=30)
    finally:
        foreign.destroy()
        other.close()
        errors.close()


def _boot_through(proc: subprocess.Popen[bytes], block: str, errors: Path) -> None:
    """Connect to the front until the instance answers (the daemon binds it at start)."""
    import socket

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the daemon exited: {errors.read_text()[-2000:]}"
        try:
            with socket.create_connection((f"{block}.1", 18080), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "no answer through the front"
        time.sleep(0.05)
