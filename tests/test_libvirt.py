"""The libvirt backend against libvirt's test driver (``test:///default``, in this process):
the domain XML, start, every stop mode, lifecycle events, error translation and leftover
recognition. The real libvirtd tests are in test_libvirt_real.py."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from jitlaunch.backends.libvirt.backend import LibvirtBackend
from jitlaunch.backends.libvirt.handle import LibvirtHandle
from jitlaunch.backends.libvirt.settings import is_local
from jitlaunch.backends.libvirt.xml import QEMU_NS, domain_xml, user_net_args
from jitlaunch.backends.owner import state_id
from jitlaunch.config import Config, ServiceConfig
from jitlaunch.errors import BootFailed, ConfigError

from .conftest import parse_config

libvirt = pytest.importorskip("libvirt")

TEST_URI = "test:///default"


def config(tmp_path: Path, uri: str = TEST_URI, extra: str = "") -> Config:
    text = f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
[dns]
zones = ["jit.test"]
[[service]]
name = "hello"
backend = "libvirt"
front = ["127.77.0.1"]
ports = [80]
[service.libvirt]
uri = "{uri}"
kernel = "k.elf"
cmdline = "name={{name}} x<y&z"
{extra}
"""
    return parse_config(text, str(tmp_path / "c.toml"))


def test_domain_xml_for_the_bundled_unikernel(tmp_path: Path) -> None:
    svc = config(tmp_path).services[0]
    text = domain_xml(svc.settings, name="jl-1-hello", domain_type="kvm",
                      cmdline="name=hello x<y&z", console=tmp_path / "c'on.log",
                      mac="02:00:00:00:00:01",
                      qemu_args=user_net_args({80: 41000}, {80: 8080}, "02:00:00:00:00:01"))
    root = ET.fromstring(text)
    assert root.get("type") == "kvm" and root.findtext("name") == "jl-1-hello"
    assert root.find("os/type").get("machine") == "microvm"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == str(tmp_path / "k.elf")
    assert root.findtext("os/cmdline") == "name=hello x<y&z"
    assert root.find("devices/controller").attrib == {"type": "usb", "model": "none"}  # type: ignore[union-attr]
    assert root.find("devices/memballoon").attrib == {"model": "none"}  # type: ignore[union-attr]
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "c'on.log")  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args == ["-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:41000-:8080",
                    "-device", "virtio-net-device,netdev=n0,mac=02:00:00:00:00:01"]


def test_domain_xml_template(tmp_path: Path) -> None:
    (tmp_path / "t.xml").write_text(
        "<domain type='${domain_type}'><name>${name}</name><os><cmdline>${cmdline}</cmdline>"
        "</os><memory unit='MiB'>${memory}</memory></domain>")
    svc = config(tmp_path, extra='template = "t.xml"').services[0]
    root = ET.fromstring(domain_xml(svc.settings, name="n", domain_type="qemu", cmdline="a<b",
                                    console=tmp_path, mac="m", qemu_args=[]))
    assert (root.get("type"), root.findtext("name"), root.findtext("os/cmdline"),
            root.findtext("memory")) == ("qemu", "n", "a<b", "16")
    (tmp_path / "t.xml").write_text("<domain>${nmae}</domain>")
    with pytest.raises(ConfigError, match=r"libvirt.template: bad placeholder 'nmae'"):
        config(tmp_path, extra='template = "t.xml"')
    with pytest.raises(ConfigError, match=r"libvirt.uri: expected a libvirt URI"):
        config(tmp_path, uri="not a uri")


def test_domain_xml_with_bridge_networking(tmp_path: Path) -> None:
    """libvirt's own bridge interface: our MAC, our bridge, virtio on virtio-mmio (microvm
    has no PCI bus); no QEMU arguments of ours."""
    svc = config(tmp_path, extra='network = "bridge"\nbridge = "br-x"').services[0]
    text = domain_xml(svc.settings, name="n", domain_type="qemu", cmdline="ip=10.77.0.2/24",
                      console=tmp_path / "c.log", mac="02:00:00:00:00:07",
                      qemu_args=user_net_args({80: 41000}, {80: 80}, "02:00:00:00:00:07"),
                      bridge="br-x")
    root = ET.fromstring(text)
    (nic,) = root.findall("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("mac").get("address") == "02:00:00:00:00:07"  # type: ignore[union-attr]
    assert nic.find("source").get("bridge") == "br-x"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    assert nic.find("address").get("type") == "virtio-mmio"  # type: ignore[union-attr]
    assert root.find(f"{{{QEMU_NS}}}commandline") is None
    # user networking: no interface of libvirt's, the NIC is in <qemu:commandline>
    plain = ET.fromstring(domain_xml(svc.settings, name="n", domain_type="qemu", cmdline="",
                                     console=tmp_path, mac="m", qemu_args=["-x"]))
    assert plain.find("devices/interface") is None
    assert [a.get("value") for a in plain.iter(f"{{{QEMU_NS}}}arg")] == ["-x"]


def test_bridge_settings(tmp_path: Path) -> None:
    plain = config(tmp_path).services[0].settings
    assert (plain.network, plain.bridge, str(plain.subnet)) == ("user", "jl0", "10.77.0.0/24")
    lv = config(tmp_path, extra='network = "bridge"\nbridge = "br1"\nsubnet = "10.9.8.0/28"'
                ).services[0].settings
    assert (lv.network, lv.bridge, str(lv.subnet)) == ("bridge", "br1", "10.9.8.0/28")
    with pytest.raises(ConfigError, match=r"libvirt.network: .*user.*bridge"):
        config(tmp_path, extra='network = "tap"')
    with pytest.raises(ConfigError, match=r"libvirt.subnet: expected a network with room"):
        config(tmp_path, extra='subnet = "10.0.0.0/31"')
    with pytest.raises(ConfigError, match=r"libvirt.bridge: expected an interface name"):
        config(tmp_path, extra='bridge = "a-very-long-bridge-name"')
    assert lv.local
    local = ["qemu:///system", "qemu:///system?socket=/tmp/s", "test:///default",
             "qemu+tcp://127.0.0.1:16509/system", "qemu+ssh://localhost/system",
             "qemu+tcp://[::1]/system"]
    assert all(is_local(u) for u in local)
    assert not any(is_local(u) for u in ("qemu+ssh://kvm7/system", "qemu+tls://10.1.2.3/system"))


def test_the_global_libvirt_table_gives_the_uri(tmp_path: Path) -> None:
    """``[libvirt] uri`` is every libvirt service's connection unless the service names its
    own; without either it is qemu:///system. Errors in the table name it, not a service."""
    def services(top: str) -> str:
        return f"""
[dns]
zones = ["jit.test"]
{top}
[[service]]
name = "a"
backend = "libvirt"
front = ["127.77.0.1"]
ports = [80]
[service.libvirt]
kernel = "k.elf"
[[service]]
name = "b"
backend = "libvirt"
front = ["127.77.0.2"]
ports = [80]
[service.libvirt]
kernel = "k.elf"
uri = "qemu+ssh://kvm7/system"
"""

    def uris(top: str) -> tuple[str, str]:
        cfg = parse_config(services(top), str(tmp_path / "c.toml"))
        return cfg.service("a").settings.uri, cfg.service("b").settings.uri

    assert uris("") == ("qemu:///system", "qemu+ssh://kvm7/system")
    assert uris('[libvirt]\nuri = "qemu:///session"') == ("qemu:///session", "qemu+ssh://kvm7/system")
    assert uris("[libvirt]") == ("qemu:///system", "qemu+ssh://kvm7/system")
    with pytest.raises(ConfigError) as info:
        uris('[libvirt]\nuri = "session"')
    assert str(info.value).endswith("c.toml: libvirt.uri: expected a libvirt URI such as "
                                    "qemu:///system, got 'session'")
    with pytest.raises(ConfigError, match=r"c.toml: libvirt.kernel: unknown key"):
        uris('[libvirt]\nkernel = "k.elf"')
    with pytest.raises(ConfigError, match=r"c.toml: qemu: the qemu backend has no global table; "
                       r"its settings go in each service's \[service.qemu\]"):
        uris('[qemu]\nkernel = "k.elf"')


def domain_names(uri: str = TEST_URI) -> set[str]:
    conn = libvirt.open(uri)
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[tuple[LibvirtBackend, ServiceConfig]]:
    cfg = config(tmp_path)
    b = LibvirtBackend(cfg.daemon.state_dir, list(cfg.services))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        try:
            yield b, cfg.services[0]
        finally:
            with trio.CancelScope(shield=True):
                for h in list(b.domains.values()):
                    await h.destroy()
                await b.aclose()
            nursery.cancel_scope.cancel()
    assert not {n for n in domain_names() if n.startswith(b.prefix)}


async def started(b: LibvirtBackend, svc: ServiceConfig, saved: LibvirtHandle | None = None
                  ) -> LibvirtHandle:
    handle = await b.start(svc, 1, saved)
    assert isinstance(handle, LibvirtHandle)
    return handle


async def test_start_reads_ready_from_the_console_and_destroy(
    backend: tuple[LibvirtBackend, ServiceConfig],
) -> None:
    b, svc = backend
    handle = await started(b, svc)
    assert handle.name.startswith(b.prefix) and handle.name in domain_names()
    assert handle.alive() and handle.wake == "cold"
    assert handle.endpoint(80)[0] == "127.0.0.1"
    # The test driver runs no guest: write its console as the unikernel would, in pieces.
    with trio.move_on_after(0.05) as scope:
        await handle.wait_ready()
    assert scope.cancelled_caught
    with open(handle.console_path, "ab") as f:
        f.write(b"booting\nREA")
        f.flush()
        with trio.move_on_after(0.05) as scope:
            await handle.wait_ready()
        assert scope.cancelled_caught
        f.write(b"DY 10.0.2.15:80\n")
    with trio.fail_after(2):
        await handle.wait_ready()
    assert await handle.probe(2) is None
    assert await handle.stop("destroy", 1) is False
    assert not handle.alive() and handle.name not in domain_names()
    assert handle.name not in b.domains and not b.host_ports.held


async def test_pause_and_resume(backend: tuple[LibvirtBackend, ServiceConfig]) -> None:
    b, svc = backend
    handle = await started(b, svc)
    assert await handle.stop("pause", 1) is True
    assert await handle.probe(2) == "the domain is paused"
    dom = handle._dom
    assert dom is not None and dom[0] is handle.conn._conn  # looked up once, then kept
    again = await started(b, svc, handle)
    assert again is handle and handle.wake == "resume" and await handle.probe(2) is None
    assert handle._dom is dom
    assert handle.resumed is not None and handle.resumed[0] >= handle.resumed[1] > 0


async def test_save_and_restore(backend: tuple[LibvirtBackend, ServiceConfig]) -> None:
    b, svc = backend
    handle = await started(b, svc)
    name = handle.name
    assert await handle.stop("save", 1) is True
    path = b.saved_path("hello")
    assert path.exists() and name not in domain_names() and not handle.alive()
    again = await started(b, svc, handle)
    assert again is handle and handle.wake == "restore" and handle.alive()
    assert handle._dom is None  # the restored domain is looked up afresh
    assert name in domain_names() and not path.exists()
    with trio.fail_after(1):
        await handle.wait_ready()  # it was ready when it was saved


async def test_shutdown(backend: tuple[LibvirtBackend, ServiceConfig]) -> None:
    b, svc = backend
    handle = await started(b, svc)
    assert await handle.stop("shutdown", 2) is False
    assert handle.name not in domain_names()


async def test_a_domain_destroyed_from_outside_is_noticed(
    backend: tuple[LibvirtBackend, ServiceConfig],
) -> None:
    b, svc = backend
    handle = await started(b, svc)
    other = libvirt.open(TEST_URI)
    try:
        other.lookupByName(handle.name).destroy()
    finally:
        other.close()
    with trio.fail_after(2):
        how = await handle.wait_exited()
    assert how.startswith("the domain destroyed") and not handle.alive()


async def test_leftovers_of_ours_are_destroyed_and_nobody_elses(
    backend: tuple[LibvirtBackend, ServiceConfig], tmp_path: Path,
) -> None:
    b, svc = backend
    mine = await started(b, svc)
    conn = libvirt.open(TEST_URI)
    try:
        xml = conn.lookupByName(mine.name).XMLDesc()
        # Not ours: another state directory's (one whose path starts like ours too), and
        # a name that merely starts with our identity.
        others = ("someone-else", f"jl-{'0' * 8}-hello-1-1",
                  f"jl-{state_id(Path(f'{tmp_path}/state:b'))}-hello-1-1",
                  f"{b.prefix[:-1]}0-hello-1-1")
        for name in (f"{b.prefix}hello-1-99", *others):
            conn.createXML(xml.replace(mine.name, name).replace(
                "<uuid>", "<!--").replace("</uuid>", "-->"), 0)
        assert await b.clean_leftovers(b.connection(TEST_URI)) == [f"{b.prefix}hello-1-99"]
        names = domain_names()
        assert mine.name in names  # a live instance of ours is not a leftover
        assert set(others) <= names
        for name in others:
            conn.lookupByName(name).destroy()
    finally:
        conn.close()
    assert state_id(tmp_path / "state") == b.prefix[3:-1]


async def test_libvirt_errors_become_boot_failures(tmp_path: Path) -> None:
    cfg = config(tmp_path, uri="qemu+tcp://127.0.0.1:1/system")
    b = LibvirtBackend(cfg.daemon.state_dir, list(cfg.services))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)  # a libvirtd that is not there is logged, not raised
        with pytest.raises(BootFailed, match=r"^creating domain jl-\w+-hello-\d+-1: cannot "
                           r"connect to libvirt at qemu\+tcp://127.0.0.1:1/system: .*"):
            await b.start(cfg.services[0], 1, None)
        nursery.cancel_scope.cancel()
    assert not b.domains and not b.host_ports.held


# ---- the console read through libvirt (console = "stream") ---------------------------------


def test_console_setting_defaults_to_a_stream_for_a_remote_host(tmp_path: Path) -> None:
    assert config(tmp_path).services[0].settings.console == "file"
    for uri in ("qemu+ssh://kvm7/system", "qemu+tls://10.1.2.3/system"):
        assert config(tmp_path, uri=uri).services[0].settings.console == "stream"
    assert config(tmp_path, extra='console = "stream"').services[0].settings.console == "stream"
    remote_file = config(tmp_path, uri="qemu+ssh://kvm7/system", extra='console = "file"')
    assert remote_file.services[0].settings.console == "file"
    with pytest.raises(ConfigError, match=r"libvirt.console: .*file.*stream"):
        config(tmp_path, extra='console = "pty"')


def test_domain_xml_with_a_pty_console(tmp_path: Path) -> None:
    """A pty serial with its console (what virDomainOpenConsole reads), no file on the
    libvirt host; libvirt's test driver accepts the domain."""
    svc = config(tmp_path, extra='console = "stream"').services[0]
    text = domain_xml(svc.settings, name="jl-pty-test", domain_type="qemu", cmdline="",
                      console=tmp_path / "c.log", mac="m", qemu_args=[], pty=True)
    root = ET.fromstring(text)
    (serial,) = root.findall("devices/serial")
    assert serial.get("type") == "pty" and serial.find("source") is None
    assert root.find("devices/console").get("type") == "pty"  # type: ignore[union-attr]
    assert root.find("devices/console/target").attrib == {"type": "serial", "port": "0"}  # type: ignore[union-attr]
    assert "c.log" not in text
    conn = libvirt.open(TEST_URI)
    try:
        dom = conn.createXML(text, 0)
        try:
            desc = ET.fromstring(dom.XMLDesc())
            assert [s.get("type") for s in desc.findall("devices/serial")] == ["pty"]
            assert [c.get("type") for c in desc.findall("devices/console")] == ["pty"]
        finally:
            dom.destroy()
    finally:
        conn.close()


class FakeStream:
    """A non-blocking virStream's reading side: ``recv`` returns what was queued, -2 when
    nothing is, b"" at the end."""

    def __init__(self) -> None:
        self.queue: list[bytes | int] = []
        self.aborted = 0

    def recv(self, n: int) -> bytes | int:
        return self.queue.pop(0) if self.queue else -2

    def eventRemoveCallback(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted += 1


async def test_console_stream_feeds_trio_and_appends_to_a_capped_log(tmp_path: Path) -> None:
    """Bytes go to trio in order and to the log with O_APPEND, so the instance-log cap's
    copy-truncate leaves the writer at the start of the emptied file; the end is reported
    once, and close() after it does nothing more."""
    from jitlaunch.backends.libvirt.stream import ConsoleStream
    from jitlaunch.logcap import rotate_if_large

    got: list[bytes] = []
    ends: list[str] = []
    log_path = tmp_path / "uk.log"
    stream = ConsoleStream("d", log_path, trio.lowlevel.current_trio_token(), got.append,
                           ends.append)
    fake = FakeStream()

    class Conn:
        def newStream(self, flags: int) -> FakeStream:
            return fake

    class Dom:
        def openConsole(self, dev: None, st: FakeStream, flags: int) -> None:
            assert st is fake

    callbacks: list[object] = []
    fake.eventAddCallback = lambda ev, cb, op: callbacks.append(cb)  # type: ignore[attr-defined]
    stream.open(libvirt, Conn(), Dom())
    assert callbacks == [stream._readable]
    fake.queue += [b"booting\n", b"x" * 100]
    stream._readable(fake, 1, libvirt)
    assert log_path.read_bytes() == b"booting\n" + b"x" * 100
    assert rotate_if_large(log_path, 50)
    fake.queue += [b"READY 10.0.2.15:80\n", b""]
    stream._readable(fake, 1, libvirt)
    await trio.testing.wait_all_tasks_blocked()
    assert log_path.read_bytes() == b"READY 10.0.2.15:80\n"  # at the start of the emptied file
    assert (tmp_path / "uk.log.1").read_bytes() == b"booting\n" + b"x" * 100
    assert got == [b"booting\n", b"x" * 100, b"READY 10.0.2.15:80\n"]
    assert ends == ["the console closed"] and stream.received == 127 and fake.aborted == 1
    stream.close()
    stream._readable(fake, 1, libvirt)  # a late event of the closed stream: ignored
    await trio.testing.wait_all_tasks_blocked()
    assert ends == ["the console closed"] and fake.aborted == 1 and len(callbacks) == 1


async def test_stream_console_needs_a_driver_that_opens_consoles(tmp_path: Path) -> None:
    """The test driver creates no domain paused (nor opens consoles): a clear boot failure
    quoting libvirt, nothing left behind."""
    cfg = config(tmp_path, extra='console = "stream"')
    b = LibvirtBackend(cfg.daemon.state_dir, list(cfg.services))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        with pytest.raises(BootFailed, match=r"creating domain jl-.*: unsupported flags"):
            await b.start(cfg.services[0], 1, None)
        assert not b.domains and not b.host_ports.held
        await b.aclose()
        nursery.cancel_scope.cancel()
    assert not {n for n in domain_names() if n.startswith(b.prefix)}


async def test_a_console_stream_closed_while_it_opens_stays_closed(tmp_path: Path) -> None:
    """close() (a destroy, or a newer open_console) may come while open() still runs in its
    worker thread: the stream it then opens is aborted at once, its log closed, no callback
    left reading the console."""
    from jitlaunch.backends.libvirt.stream import ConsoleStream

    ends: list[str] = []
    stream = ConsoleStream("d", tmp_path / "uk.log", trio.lowlevel.current_trio_token(),
                           lambda data: None, ends.append)
    fake = FakeStream()
    callbacks: list[object] = []
    fake.eventAddCallback = lambda ev, cb, op: callbacks.append(cb)  # type: ignore[attr-defined]

    class Conn:
        def newStream(self, flags: int) -> FakeStream:
            return fake

    class Dom:
        def openConsole(self, dev: None, st: FakeStream, flags: int) -> None:
            stream.close()  # as close_console does from another thread meanwhile

    fds = len(os.listdir("/proc/self/fd"))
    stream.open(libvirt, Conn(), Dom())
    assert callbacks == [] and fake.aborted == 1 and stream._stream is None
    assert len(os.listdir("/proc/self/fd")) == fds
    await trio.testing.wait_all_tasks_blocked()
    assert ends == ["closed by jitlaunch"]
    stream.open(libvirt, Conn(), Dom())  # closed before it opens: not even opened
    assert callbacks == [] and fake.aborted == 1
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_a_resync_during_a_create_leaves_the_new_domain_alone(
    backend: tuple[LibvirtBackend, ServiceConfig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnect's resync lists libvirt's domains while a start waits for its createXML
    (as a request that came during libvirtd's restart does): the domain is not in the list
    yet, and must not be taken for one that vanished (it was, and then leaked: destroy()
    skips a domain that is gone)."""
    import threading

    from jitlaunch.backends.libvirt import backend as backend_module

    b, svc = backend
    go = threading.Event()
    create_xml = backend_module._create_xml

    def slow_create_xml(xml: str, flags: int) -> object:
        create = create_xml(xml, flags)

        def call(c: object) -> object:
            go.wait(10)
            return create(c)
        return call

    monkeypatch.setattr(backend_module, "_create_xml", slow_create_xml)
    handles: list[LibvirtHandle] = []

    async def start() -> None:
        handles.append(await started(b, svc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        with trio.fail_after(5):
            while not b.domains:
                await trio.sleep(0.001)
        await b._resync(TEST_URI)
        go.set()
    (handle,) = handles
    assert handle.alive() and handle.name in domain_names()
