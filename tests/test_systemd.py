"""sd_notify and socket activation outside systemd: a notify socket of the test's own, and
``systemd-socket-activate`` passing real sockets to a real child process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from jitlaunch.config import Config
from jitlaunch.errors import ListenError
from jitlaunch.lifecycle.supervisor import Supervisor
from jitlaunch.systemd import (
    Notifier,
    listen_fds,
    notify_address,
    serve_notify,
    sort_passed,
    status_line,
    watchdog_interval,
)

from .conftest import ROOT, parse_config


def _receiver(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"jltest-notify-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name.encode())
        return sock, "@" + name
    path = str(tmp_path / "notify")
    sock.bind(path)
    return sock, path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_of_fields(tmp_path: Path, abstract: bool) -> None:
    receiver, address = _receiver(tmp_path, abstract)
    with receiver:
        notifier = Notifier({"NOTIFY_SOCKET": address})
        assert notifier.enabled
        assert notifier.send(READY=1, STATUS="2 services\nsecond line")
        receiver.settimeout(5)
        assert receiver.recv(4096) == b"READY=1\nSTATUS=2 services second line"
        notifier.close()


def test_notify_without_systemd_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.send(READY=1)
    assert notify_address({"NOTIFY_SOCKET": "relative/path"}) is None


def test_notify_to_a_gone_socket_logs_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    for _ in range(5):
        assert not notifier.send(WATCHDOG=1)
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1
    notifier.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_listen_fds_for_another_pid_are_ignored_and_kept() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env, 42) == {}
    assert env["LISTEN_FDS"] == "2"


@pytest.mark.parametrize("env", [
    {"LISTEN_PID": "42", "LISTEN_FDS": "x"},
    {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dns"},
])
def test_listen_fds_malformed_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(ListenError, match="socket activation"):
        listen_fds(env, 42)
    assert not any(k.startswith("LISTEN_") for k in env)


_CHILD = """
import json, os, socket, sys
from jitlaunch.systemd import listen_fds, describe
passed = listen_fds(os.environ, os.getpid())
print(json.dumps({name: [describe(s) for s in socks] for name, socks in passed.items()}
                 | {"left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}), flush=True)
"""


def _wait_bound(port: int, kind: int, timeout: float = 10.0) -> None:
    """Poll until something has bound 127.0.0.1:port (our own bind then fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.01)
    raise AssertionError(f"nothing bound port {port} within {timeout} s")


@pytest.mark.parametrize("datagram", [False, True], ids=["stream", "datagram"])
def test_listen_fds_from_systemd_socket_activate(datagram: bool) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("needs systemd-socket-activate (apt-get install systemd)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [tool, *(["--datagram"] if datagram else []), "-l", f"127.0.0.1:{port}",
            "--fdname=dns", sys.executable, "-c", _CHILD]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        _wait_bound(port, socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM)
        # systemd-socket-activate starts the child on the first connection or datagram.
        if datagram:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", ("127.0.0.1", port))
        else:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    kind = "UDP" if datagram else "TCP"
    assert json.loads(out) == {"dns": [f"{kind} 127.0.0.1:{port}"], "left": []}


# ---- sorting passed sockets out against the config ---------------------------------------


def _passed_config(port: int, services: str = "") -> Config:
    return parse_config(f"""
[daemon]
state_dir = "/nonexistent"
[dns]
listen = ["127.0.0.1:{port}"]
zones = ["jit.test"]
{services}
""", "test.toml")


def _pair() -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to the same 127.0.0.1 port, as the socket unit makes."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket()
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen()
        return udp, tcp, port
    raise AssertionError("no free port pair")


def test_passed_dns_sockets_are_matched_to_dns_listen() -> None:
    udp, tcp, port = _pair()
    passed = sort_passed({"dns": [tcp, udp]}, _passed_config(port))
    assert passed.dns == [(udp, tcp)]
    assert passed.fronts == {}
    passed.close()
    assert udp.fileno() == -1 and tcp.fileno() == -1


def test_nothing_passed_means_bind_everything() -> None:
    passed = sort_passed({}, _passed_config(5353))
    assert passed.dns is None and passed.fronts == {}


@pytest.mark.parametrize("case", ["missing-tcp", "other-port", "unknown-name", "unix", "twice"])
def test_unexpected_or_missing_passed_sockets_are_clear_errors(case: str) -> None:
    udp, tcp, port = _pair()
    extra: list[socket.socket] = []
    if case == "missing-tcp":
        passed, config, match = {"dns": [udp]}, _passed_config(port), "has no TCP socket"
    elif case == "other-port":
        passed, config, match = {"dns": [udp, tcp]}, _passed_config(port + 1), "is not in dns.listen"
    elif case == "unknown-name":
        passed, config, match = {"dns": [udp], "web": [tcp]}, _passed_config(port), "named 'web'"
    elif case == "unix":
        extra = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)]
        passed, config, match = {"dns": [udp, tcp, *extra]}, _passed_config(port), "not a UDP or TCP"
    else:
        extra = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
        extra[0].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.close()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (udp, extra[0]):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
        passed, config, match = {"dns": [udp, extra[0], tcp]}, _passed_config(port), "passed twice"
    with pytest.raises(ListenError, match=match):
        sort_passed(passed, config)
    # Every passed socket is closed on an error.
    assert all(s.fileno() == -1 for socks in passed.values() for s in socks)
    for s in (udp, tcp, *extra):
        s.close()


def test_passed_fronts_by_service_name_or_proxy() -> None:
    services = """
[[service]]
name = "a"
front = ["127.0.0.1"]
ports = [{pa}]
[service.process]
command = "true"
[[service]]
name = "b"
front = ["127.0.0.1"]
ports = [{pb}]
[service.process]
command = "true"
"""
    a, b = socket.socket(), socket.socket()
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.listen()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    config = _passed_config(5353, services.format(pa=pa, pb=pb))
    passed = sort_passed({"a": [a], "proxy": [b]}, config)
    assert passed.dns is None
    assert passed.fronts == {("a", "127.0.0.1", pa): a, ("b", "127.0.0.1", pb): b}
    passed.close()
    # A front passed under another service's name is refused.
    c = socket.socket()
    c.bind(("127.0.0.1", 0))
    c.listen()
    pc = c.getsockname()[1]
    with pytest.raises(ListenError, match="not a front of service 'a'"):
        sort_passed({"a": [c]}, _passed_config(5353, services.format(pa=pa, pb=pc)))
    assert c.fileno() == -1


# ---- READY, STATUS and the watchdog, on virtual time ---------------------------------


async def _datagrams(sock: trio.socket.SocketType) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())  # type: ignore[attr-defined]
        except BlockingIOError:
            return out


async def test_serve_notify_ready_status_and_watchdog(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver, address = _receiver(tmp_path, abstract=False)
    receiver.setblocking(False)
    config = _passed_config(5353, """
[[service]]
name = "a"
front = ["127.0.0.1"]
ports = [8080]
[service.process]
command = "true"
""")
    supervisor = Supervisor(config, {})
    notifier = Notifier({"NOTIFY_SOCKET": address})
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_notify, notifier, supervisor, 4.0, stop)
        await trio.sleep(0.01)
        assert [m.split("\n") for m in await _datagrams(receiver)] == [
            ["READY=1", "STATUS=1 service; 0 running, 0 booting"], ["WATCHDOG=1"]]
        await trio.sleep(4.0)  # pings at 2 s and 4 s: every half of WATCHDOG_USEC
        assert await _datagrams(receiver) == ["WATCHDOG=1", "WATCHDOG=1"]
        rt = supervisor.services["a"]
        rt.last_error, rt.last_error_at = "a#1 failed to boot: exited with status 1", 1.0
        supervisor.generation += 1
        await trio.sleep(0.6)
        assert await _datagrams(receiver) == [
            "STATUS=1 service; 0 running, 0 booting; last failure: a#1 failed to boot: exited "
            "with status 1"]
        supervisor.generation += 1  # a change that does not change the line sends nothing
        await trio.sleep(0.6)
        assert await _datagrams(receiver) == []
        stop.set()
    notifier.close()
    receiver.close()


def test_status_line_counts_states() -> None:
    config = _passed_config(5353)
    assert status_line(Supervisor(config, {})) == "0 services; 0 running, 0 booting"


def test_the_production_example_matches_the_socket_unit() -> None:
    """conf/production.toml is valid, sets its glue, and its dns.listen names exactly the
    sockets systemd/jitlaunch.socket listens on (else the daemon would refuse to start)."""
    from .conftest import load_config

    config = load_config(ROOT / "conf" / "production.toml")
    assert config.dns.nameserver_addresses and config.daemon.control_group == "jitlaunch"
    unit = (ROOT / "systemd" / "jitlaunch.socket").read_text().splitlines()
    udp = [line.split("=", 1)[1] for line in unit if line.startswith("ListenDatagram=")]
    tcp = [line.split("=", 1)[1] for line in unit if line.startswith("ListenStream=")]
    listen = [str(e) for e in config.dns.listen]
    assert udp == tcp == listen
    assert "FileDescriptorName=dns" in unit


async def test_a_daemon_notifies_ready_status_stopping_and_extends_its_drain(
    tmp_path: Path, block: str
) -> None:
    """A real daemon (in-process) with a notify socket of the test's: READY=1 with the first
    STATUS= only once it serves, STATUS= after a boot, then STOPPING=1 and
    EXTEND_TIMEOUT_USEC= while a connection keeps the drain going."""
    from jitlaunch.daemon import Daemon

    from .conftest import DEMO, config_text

    receiver, address = _receiver(tmp_path, abstract=True)
    receiver.setblocking(False)
    config = parse_config(config_text(tmp_path / "state", f"""
[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080]
[service.process]
command = "{DEMO}"
subnet = "{block}.128/25"
"""), "test.toml")
    daemon = Daemon(config, notifier=Notifier({"NOTIFY_SOCKET": address}))
    got: list[str] = []

    async def until(line: str) -> None:
        with trio.fail_after(15):
            while line not in got:
                got.extend(await _datagrams(receiver))
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        await until("READY=1\nSTATUS=1 service; 0 running, 0 booting")
        stream = await trio.open_tcp_stream(f"{block}.1", 8080)  # boots py, holds the drain
        await until("STATUS=1 service; 1 running, 0 booting")
        daemon.stop()
        await until("STOPPING=1\nSTATUS=stopping: draining, then every instance")
        await until("EXTEND_TIMEOUT_USEC=20000000")
        await stream.aclose()  # the drain ends; the daemon stops
    assert got.index("READY=1\nSTATUS=1 service; 0 running, 0 booting") == 0
    daemon.notifier.close()
    receiver.close()


async def test_a_daemon_serves_on_a_passed_front(tmp_path: Path, block: str) -> None:
    """A front socket systemd bound (named after its service) is used as it is: the daemon
    binding it again would fail, as the address is taken by the passed socket."""
    from jitlaunch.daemon import Daemon

    from .conftest import DEMO, config_text, http_get

    front = socket.socket()
    front.bind((f"{block}.1", 8080))
    front.listen()
    config = parse_config(config_text(tmp_path / "state", f"""
[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080]
[service.process]
command = "{DEMO}"
"""), "test.toml")
    passed = sort_passed({"py": [front]}, config)
    assert passed.fronts == {("py", f"{block}.1", 8080): front}
    daemon = Daemon(config, passed=passed)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        assert b"Hello from py" in await http_get(f"{block}.1", 8080)
        daemon.stop()
    assert front.fileno() == -1  # closed with the proxy
