"""The libvirt backend against a real libvirtd of the tests' own (tests/libvirtd.py: its own
configuration, state and socket in a mount namespace, under scripts/subreaper, so that a
destroyed QEMU is reaped at once), reached as ``qemu:///system?socket=...`` and, for the
remote-URI tests, on TCP on loopback. A libvirtd of the host's is neither used nor touched.
Every test checks that no domain of its daemon is left behind; the module checks that libvirt
left no cgroup directory on the host. Bridge networking runs in a network namespace of the
test's own with a libvirtd inside it."""

from __future__ import annotations

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
from jitlaunch.backends.libvirt.handle import LibvirtHandle
from jitlaunch.backends.owner import state_id
from jitlaunch.lifecycle.state import State

from .conftest import PYTHON, ROOT, config_text, http_get, load, query_udp, running, wait_until
from .libvirtd import BRIDGE_SERVICE, PrivateLibvirtd, cgroup_dirs, needs_libvirtd

pytestmark = needs_libvirtd

libvirt = pytest.importorskip("libvirt")

KERNEL = ROOT / "images" / "build" / "hello.elf"


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateLibvirtd]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    if not KERNEL.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "images")], check=True, timeout=300)
    cgroups = cgroup_dirs()
    ours = PrivateLibvirtd(tmp_path_factory.mktemp("libvirtd"), tcp_port=free_port())
    try:
        ours.start()
        yield ours
    finally:
        ours.stop()
    new = cgroup_dirs() - cgroups
    assert not new, f"libvirtd left cgroup directories on the host: {sorted(new)}"


@pytest.fixture
def state(tmp_path: Path, libvirtd: PrivateLibvirtd) -> Iterator[Path]:
    yield tmp_path
    prefix = f"jl-{state_id(tmp_path)}-"
    leaked = {n for n in libvirtd.domains() if n.startswith(prefix)}
    conn = libvirt.open(libvirtd.uri)
    try:
        for name in leaked:
            conn.lookupByName(name).destroy()
    finally:
        conn.close()
    assert not leaked, "domains leaked"


def service(front: str, uri: str, extra: str = "", lv: str = "") -> str:
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


async def test_lookup_boots_the_unikernel_through_libvirt(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    cfg = load(config_text(state, service(f"{block}.1", libvirtd.uri)))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        assert rec.header.rcode == RCODE.NOERROR and str(rec.rr[0].rdata) == f"{block}.1"
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200") and b"uk" in body
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.state is State.READY
        assert any(n.startswith(f"jl-{state_id(state)}-uk-") for n in libvirtd.domains())
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


async def test_conf_libvirt_toml_serves(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    text = (ROOT / "conf" / "libvirt.toml").read_text()
    text = text.replace("127.0.0.1:5300", "127.0.0.1:0").replace("127.77.0.", f"{block}.")
    assert 'uri = "qemu:///system"' in text
    text = text.replace('uri = "qemu:///system"', f'uri = "{libvirtd.uri}"')
    text = f'[daemon]\nstate_dir = "{state}"\n[metrics]\nlisten = ["127.0.0.1:0"]\n' + text
    cfg = load(text, str(ROOT / "conf" / "libvirt.toml"))
    async with running(cfg) as d:
        body = await http_get(f"{block}.1", 8080)
        assert body.startswith(b"HTTP/1.1 200") and b"hello" in body
        assert d.supervisor.services["hello"].instance is not None


async def test_libvirtd_restarted_mid_run(
    state: Path, block: str, libvirtd: PrivateLibvirtd,
) -> None:
    cfg = load(config_text(state, service(f"{block}.1", libvirtd.uri, extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(libvirtd.restart)
        assert name in libvirtd.domains()  # the domain outlived libvirtd's restart
        backend = d.backends["libvirt"]
        conn = backend.connection(libvirtd.uri)  # type: ignore[attr-defined]
        await wait_until(lambda: conn._conn is not None and conn._opened >= 2, timeout=10)
        # The running instance is kept and still serves; nothing was lost or leaked.
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        assert rt.instance is inst and inst.state is State.READY and rt.deaths == 0
        assert await inst.handle.probe(5) is None
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


async def test_a_remote_uri_boots_serves_and_survives_a_restart(
    state: Path, block: str, libvirtd: PrivateLibvirtd,
) -> None:
    uri = f"qemu+tcp://127.0.0.1:{libvirtd.tcp_port}/system"
    cfg = load(config_text(state, service(f"{block}.1", uri, extra='answer = "proxy"')))
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
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


@pytest.mark.parametrize("mode", ["destroy", "shutdown", "pause", "save"])
async def test_idle_teardown_in_every_stop_mode(
    state: Path, block: str, libvirtd: PrivateLibvirtd, mode: str
) -> None:
    cfg = load(config_text(state, service(
        f"{block}.1", libvirtd.uri, extra=f'idle_timeout = "500ms"\nstop = "{mode}"\nanswer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        await wait_until(lambda: inst.state in (State.STOPPED, State.SAVED), timeout=30)
        assert rt.idle_stops == 1
        if mode == "pause":
            assert inst.state is State.SAVED and name in libvirtd.domains()
        elif mode == "save":
            assert inst.state is State.SAVED and name not in libvirtd.domains()
            assert (state / "libvirt" / "uk.state").exists()
        else:
            assert name not in libvirtd.domains()
        again = await http_get(f"{block}.1", 18080)
        assert again.startswith(b"HTTP/1.1 200") and b"uk" in again
        now = rt.instance
        assert now is not None and now.handle is not None
        if mode in ("pause", "save"):
            assert now is inst and now.handle.wake == ("resume" if mode == "pause" else "restore")
            assert not (state / "libvirt" / "uk.state").exists()


async def test_warm_pool(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    extra = 'answer = "proxy"\nmax_instances = 2'
    cfg = load(config_text(state, service(f"{block}.1", libvirtd.uri, extra=extra, lv="pool = 1")))
    async with running(cfg) as d:
        pool = d.backends["libvirt"].pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1, timeout=30)
        member = pool[0]
        assert member.paused and member.name in libvirtd.domains()
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.handle is member and member.wake == "pool"
        await wait_until(lambda: len(pool) == 1 and pool[0] is not member, timeout=30)
        assert d.backends["libvirt"].status_lines()[0].startswith("uk: warm pool 1 of 1")
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())
    assert not list((state / "logs").glob("uk.pool-*.log"))


async def test_a_domain_destroyed_with_virsh_is_noticed(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    cfg = load(config_text(state, service(f"{block}.1", libvirtd.uri, extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        name = inst.handle.name  # type: ignore[attr-defined]
        subprocess.run(["virsh", "-c", libvirtd.uri, "destroy", name], check=True, timeout=30,
                       stdout=subprocess.DEVNULL)
        await wait_until(lambda: rt.instance is not inst, timeout=5)
        assert rt.deaths == 1
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        assert rt.instance is not inst


@pytest.mark.slow
def test_a_killed_daemon_restarted_cleans_its_own_domains_only(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    conf = state / "c.toml"
    conf.write_text(config_text(state, service(f"{block}.1", libvirtd.uri)))
    prefix = f"jl-{state_id(state)}-"
    # Someone else's domain, named much like ours.
    other = libvirt.open(libvirtd.uri)
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
            while not any(n.startswith(prefix) for n in libvirtd.domains()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert any(n.startswith(prefix) for n in libvirtd.domains())  # the domain outlives the daemon
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            deadline = time.monotonic() + 30
            while any(n.startswith(prefix) for n in libvirtd.domains()):
                assert time.monotonic() < deadline, "the leftover domain was not destroyed"
                time.sleep(0.05)
            assert "jl-someone-uk-1" in libvirtd.domains()
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


# ---- bridge networking, in a network namespace of the test's own ---------------------------


async def test_bridge_networking_hands_over_the_domains_address(
    tmp_path: Path, netns_libvirtd: tuple[list[str], PrivateLibvirtd]
) -> None:
    """Daemon, libvirtd and client in a namespace of the test's own: libvirt makes the
    domain's tap on our bridge, the answer hands the domain's address over, the client
    reaches the unikernel there; the idle stop removes the tap and frees the address (the
    next boot gets it again)."""
    inside, lvd = netns_libvirtd
    conf = tmp_path / "bridge.toml"
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                    + BRIDGE_SERVICE.format(uri=lvd.uri, kernel=KERNEL))
    daemon_log = tmp_path / "daemon.log"
    proc = None

    def links() -> str:
        return subprocess.run([*inside, "ip", "-br", "link"], capture_output=True, text=True,
                              timeout=10).stdout

    async def ask() -> str:
        res = await trio.run_process(
            [*inside, "dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
             "hello.jit.test", "A"], capture_stdout=True, check=False)
        lines = [ln for ln in res.stdout.decode().splitlines() if not ln.startswith(";")]
        return "\n".join(lines).strip()  # empty while the daemon is not up yet

    async def handed_over() -> str:
        with trio.fail_after(30):
            while not (addr := await ask()).startswith("10.77.0."):
                await trio.sleep(0.05)
        return addr

    async def get(addr: str) -> str:
        res = await trio.run_process(
            [*inside, PYTHON, "-c", f"import socket; s = socket.create_connection(('{addr}', 80), 5);"
             "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.settimeout(5);"
             "print(s.recv(1000).decode(errors='replace'))"],
            capture_stdout=True, capture_stderr=True, check=False)
        return (res.stdout + res.stderr).decode()

    try:
        with open(daemon_log, "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*inside, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile, cwd=ROOT)
        for _ in range(2):
            addr = await handed_over()
            assert addr == "10.77.0.2", daemon_log.read_text()  # the first address, each time
            page = await get(addr)
            assert page.startswith("HTTP/1.1 200") and "hello" in page, page
            assert len(lvd.domains()) == 1
            tap = [ln for ln in links().splitlines() if ln.startswith("vnet")]
            assert len(tap) == 1, links()
            master = subprocess.run([*inside, "ip", "-o", "link", "show", tap[0].split()[0]],
                                    capture_output=True, text=True, timeout=10).stdout
            assert "master jl0" in master
            # no queries, no connections through the front: idle after 1 s
            await wait_until(lambda: not lvd.domains(), timeout=20)
            await wait_until(lambda: "vnet" not in links(), timeout=5)
        log = daemon_log.read_text()
        assert log.count("hello#1 ready in") == 1 and "hello#2 ready in" in log, log
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert not lvd.domains()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the console read through libvirt (console = "stream"), as for a remote host -----------


def _uri(libvirtd: PrivateLibvirtd, kind: str) -> str:
    return libvirtd.uri if kind == "socket" else f"qemu+tcp://127.0.0.1:{libvirtd.tcp_port}/system"


def _streamed(inst) -> LibvirtHandle:  # type: ignore[no-untyped-def]
    """The instance's handle, whose console stream is open and has carried bytes."""
    handle = inst.handle
    assert isinstance(handle, LibvirtHandle) and handle.streamed
    assert handle.stream is not None and handle.stream.ended is None
    return handle


@pytest.mark.parametrize("kind", ["socket", "tcp"])
async def test_stream_console_boots_and_serves(
    state: Path, block: str, libvirtd: PrivateLibvirtd, kind: str
) -> None:
    uri = _uri(libvirtd, kind)
    cfg = load(config_text(state, service(f"{block}.1", uri, lv='console = "stream"')))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        assert rec.header.rcode == RCODE.NOERROR and str(rec.rr[0].rdata) == f"{block}.1"
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200") and b"uk" in body
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.state is State.READY
        handle = _streamed(inst)
        assert handle.stream is not None and handle.stream.received > 0
        # The serial is a pty (nothing written on the libvirt host's disk), READY came
        # through the stream, and the console text is in the local log.
        xml = await handle.conn.call("xml", lambda c: handle._domain(c).XMLDesc())
        assert "<serial type='pty'>" in xml and "type='file'" not in xml
        assert b"READY " in (state / "logs" / "uk.log").read_bytes()
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


@pytest.mark.parametrize("kind", ["socket", "tcp"])
@pytest.mark.parametrize("mode", ["destroy", "shutdown", "pause", "save"])
async def test_stream_console_in_every_stop_mode(
    state: Path, block: str, libvirtd: PrivateLibvirtd, mode: str, kind: str
) -> None:
    uri = _uri(libvirtd, kind)
    cfg = load(config_text(state, service(
        f"{block}.1", uri, lv='console = "stream"',
        extra=f'idle_timeout = "500ms"\nstop = "{mode}"\nanswer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None
        first = _streamed(inst).stream
        await wait_until(lambda: inst.state in (State.STOPPED, State.SAVED), timeout=30)
        assert first is not None
        if mode == "pause":  # the console stays open across suspend and resume
            assert first.ended is None
        else:
            await wait_until(lambda: first.ended is not None, timeout=10)
        again = await http_get(f"{block}.1", 18080)
        assert again.startswith(b"HTTP/1.1 200") and b"uk" in again
        now = rt.instance
        assert now is not None
        handle = _streamed(now)
        if mode == "pause":
            assert now is inst and handle.stream is first
        elif mode == "save":  # restored, with its new pty's console opened again
            assert now is inst and handle.wake == "restore" and handle.stream is not first
            # The new console is the restored domain's (the guest prints nothing more after
            # its boot, so no bytes are expected): it is still open after another request.
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            assert handle.stream is not None and handle.stream.ended is None
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


@pytest.mark.parametrize("kind", ["socket", "tcp"])
async def test_stream_console_survives_a_libvirtd_restart(
    state: Path, block: str, libvirtd: PrivateLibvirtd, kind: str
) -> None:
    uri = _uri(libvirtd, kind)
    cfg = load(config_text(state, service(f"{block}.1", uri, lv='console = "stream"',
                                          extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None
        first = _streamed(inst).stream
        await trio.to_thread.run_sync(libvirtd.restart)
        conn = d.backends["libvirt"].connection(uri)  # type: ignore[attr-defined]
        await wait_until(lambda: conn._conn is not None and conn._opened >= 2, timeout=15)
        # The console is opened again on the new connection; the instance is kept.
        await wait_until(lambda: inst.handle.stream is not first  # type: ignore[union-attr]
                         and inst.handle.stream is not None, timeout=10)  # type: ignore[union-attr]
        assert first is not None and first.ended is not None
        assert rt.instance is inst and rt.deaths == 0
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        _streamed(inst)
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


async def test_stream_console_warm_pool(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    extra = 'answer = "proxy"\nmax_instances = 2'
    cfg = load(config_text(state, service(f"{block}.1", _uri(libvirtd, "tcp"), extra=extra,
                                          lv='pool = 1\nconsole = "stream"')))
    async with running(cfg) as d:
        pool = d.backends["libvirt"].pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1, timeout=30)
        member = pool[0]
        assert member.paused and member.stream is not None and member.stream.ended is None
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.handle is member and member.wake == "pool"
        assert _streamed(inst).stream is not None
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())
    assert not list((state / "logs").glob("uk.pool-*.log"))


async def test_a_console_that_cannot_be_opened_is_a_boot_failure(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    """A template whose serial is a file has no console libvirt can relay: the boot fails
    with libvirt's message, and the domain (created paused) is destroyed at once."""
    from jitlaunch.backends.libvirt.backend import LibvirtBackend
    from jitlaunch.errors import BootFailed

    (state / "t.xml").write_text(
        "<domain type='${domain_type}'><name>${name}</name><memory unit='MiB'>${memory}"
        "</memory><os><type arch='x86_64' machine='microvm'>hvm</type><kernel>${kernel}"
        "</kernel></os><devices><controller type='usb' model='none'/><memballoon model='none'/>"
        "<serial type='file'><source path='${console}'/></serial></devices></domain>")
    cfg = load(config_text(state, service(
        f"{block}.1", libvirtd.uri, lv=f'console = "stream"\ntemplate = "{state / "t.xml"}"')))
    b = LibvirtBackend(cfg.daemon.state_dir, list(cfg.services))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        with pytest.raises(BootFailed, match=r"^opening the console of jl-\S+-uk-\S+: .*not using a PTY"):
            await b.start(cfg.services[0], 1, None)
        assert not b.domains and not b.host_ports.held
        await b.aclose()
        nursery.cancel_scope.cancel()
    assert not any(n.startswith(f"jl-{state_id(state)}-") for n in libvirtd.domains())


async def test_stream_console_log_is_capped(
    state: Path, block: str, libvirtd: PrivateLibvirtd
) -> None:
    """The console the daemon writes from the stream is rotated like any instance log: with a
    cap below the boot's output, READY is seen and the log is copy-truncated to uk.log.1.
    (That the writer then carries on at the start of the emptied file is the unit test's,
    test_libvirt.py: this guest prints nothing after its boot.)"""
    cfg = load(config_text(state, service(f"{block}.1", _uri(libvirtd, "tcp"),
                                          lv='console = "stream"', extra='answer = "proxy"'),
                           top="instance_log_max = 16"))
    async with running(cfg) as d:
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = d.supervisor.services["uk"].instance
        assert inst is not None
        handle = _streamed(inst)
        await wait_until(lambda: (state / "logs" / "uk.log.1").exists(), timeout=10)
        older = (state / "logs" / "uk.log.1").read_bytes()
        # READY and the guest's next line (hello: ...) come together, but a second rotation
        # may keep only the later one.
        assert b"READY " in older or b"hello: name=uk" in older
        assert handle.stream is not None and handle.stream.ended is None
