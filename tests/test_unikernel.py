"""The hello unikernel (images/): boot under QEMU microvm, HTTP, TCP robustness, UDP echo, tap.

Every test runs with KVM (skipped without a usable /dev/kvm) and with TCG.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitlaunch.backends.qemu import kvm_usable
from tests.qemu_guest import (
    LEAN_MACHINE,
    ROOT,
    Guest,
    HttpConn,
    ensure_image,
    free_port,
    get,
    hmp,
    qemu_argv,
    user_guest,
    user_guest_ports,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


@pytest.fixture(params=["kvm", "tcg"])
def accel(request: pytest.FixtureRequest) -> str:
    if request.param == "kvm" and not kvm_usable():
        pytest.skip("needs /dev/kvm")
    return str(request.param)


@pytest.fixture(scope="session", autouse=True)
def image() -> None:
    if shutil.which("qemu-system-x86_64") is not None:
        ensure_image()


@pytest.fixture
def guest(accel: str) -> Iterator[tuple[Guest, int, int]]:
    g, tport, uport = user_guest(accel, name="unit-test-7")
    try:
        g.wait_ready()
        yield g, tport, uport
    finally:
        g.close()


def test_ready_line_and_root_page(guest: tuple[Guest, int, int]) -> None:
    g, port, _ = guest
    assert g.wait_ready() == "READY 10.0.2.15:80"
    assert [line for line in g.console.splitlines() if line.startswith("READY")] == ["READY 10.0.2.15:80"]
    code, hdrs, body = get(port, "/")
    assert code == 200
    assert hdrs["content-type"].startswith("text/html")
    assert b"unit-test-7" in body and body.startswith(b"<!DOCTYPE html>")
    assert hdrs["connection"] == "close"
    code, _, body = get(port, "/health")
    assert (code, body) == (200, b"ok\n")
    code, _, _ = get(port, "/nope")
    assert code == 404


def test_command_line_config(accel: str) -> None:
    port = free_port()
    g = Guest(
        qemu_argv(accel, "ip=10.0.2.16/24 gw=10.0.2.2 port=8080 udp=9 name=cfg",
                  f"user,id=n0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{port}-10.0.2.16:8080")
    )  # fmt: skip
    try:
        assert g.wait_ready() == "READY 10.0.2.16:8080"
        code, _, body = get(port, "/")
        assert code == 200 and b"cfg" in body
    finally:
        g.close()


def test_bad_command_line_values_fall_back(accel: str) -> None:
    port = free_port()
    append = "ip=300.1.1.1/99 gw=x port=0 udp=-1 name=<b>evil</b> extra=ignored ip"
    g = Guest(qemu_argv(accel, append, f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"))
    try:
        assert g.wait_ready() == "READY 10.0.2.15:80"
        for msg in ("bad ip= value", "bad gw= value", "bad port= value", "bad udp= value"):
            assert msg in g.console
        code, _, body = get(port, "/")
        assert code == 200 and b"bevilb" in body and b"<b>evil" not in body
    finally:
        g.close()


def test_lean_machine_first_ioapic(accel: str) -> None:
    """ACPI off: the NIC interrupt is GSI 5+slot on the only IOAPIC, found via the command line."""
    port = free_port()
    g = Guest(
        qemu_argv(accel, "name=lean", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80", machine=LEAN_MACHINE)
    )
    try:
        assert g.wait_ready() == "READY 10.0.2.15:80"
        with HttpConn("127.0.0.1", port) as c:
            for _ in range(20):  # needs interrupts: the guest sleeps in hlt between requests
                c.request("/")
                code, _, body = c.response()
                assert code == 200 and b"lean" in body
    finally:
        g.close()


def test_modern_virtio_mmio(accel: str) -> None:
    """virtio-mmio version 2 (QEMU's force-legacy=false) works as well as the legacy default."""
    port = free_port()
    argv = qemu_argv(accel, "name=modern", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80")
    g = Guest([*argv, "-global", "virtio-mmio.force-legacy=false"])
    try:
        assert g.wait_ready() == "READY 10.0.2.15:80"
        with HttpConn("127.0.0.1", port) as c:
            for _ in range(10):
                c.request("/")
                code, _, body = c.response()
                assert code == 200 and b"modern" in body
    finally:
        g.close()


def test_survives_system_reset(accel: str, tmp_path: Path) -> None:
    """After a reset (QMP system_reset) the guest boots again and serves: the image is
    re-copied by QEMU and the driver does not trust stale ring indices."""
    port, qmp = free_port(), str(tmp_path / "qmp.sock")
    argv = qemu_argv(accel, "name=again", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80")
    g = Guest([*argv, "-qmp", f"unix:{qmp},server=on,wait=off"])
    try:
        g.wait_ready()
        assert get(port, "/health")[0] == 200
        g.wait_line("hello: ")  # the last line of the first boot: a reset mid-line would garble it
        hmp(qmp, "system_reset")
        g.wait_count("READY ", 2)
        code, _, body = get(port, "/")
        assert code == 200 and b"again" in body
    finally:
        g.close()


def test_200_sequential_requests(guest: tuple[Guest, int, int]) -> None:
    _, port, _ = guest
    for i in range(100):  # a fresh connection each time: handshake, FIN, TIME_WAIT reuse
        code, _, body = get(port, "/" if i % 2 else "/health")
        assert code == 200 and body
    with HttpConn("127.0.0.1", port) as c:  # and 100 on one keep-alive connection
        for _ in range(100):
            c.request("/")
            code, hdrs, body = c.response()
            assert code == 200 and b"unit-test-7" in body and hdrs["connection"] == "keep-alive"


def test_50_concurrent_keepalive_connections(accel: str, tmp_path: Path) -> None:
    # ten forwards: see user_guest_ports (slirp's per-forward listen backlog is 1)
    qmp = str(tmp_path / "qmp.sock")
    g, ports, _ = user_guest_ports(
        accel, 10, name="unit-test-7", extra=["-qmp", f"unix:{qmp},server=on,wait=off"]
    )
    try:
        g.wait_ready()
        errors = _concurrent_clients(ports)
        # on failure, slirp's socket table and the console say which side gave up
        assert not errors, "\n".join([*errors[:5], hmp(qmp, "info usernet"), g.diagnostics()])
    finally:
        g.close()
    assert "EXCEPTION" not in g.console


def _concurrent_clients(ports: list[int]) -> list[str]:
    """50 clients, all connected at once, then 5 keep-alive requests each; the failures."""
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    all_open = threading.Barrier(50, timeout=60)
    t0 = time.monotonic()

    def client(n: int) -> None:
        j, src, opened = -1, 0, 0.0
        try:
            # slirp shows the guest every connection as 10.0.2.2:<client's port>, and Linux may
            # give two connects to different forwards the same source port, which the guest
            # then sees as one connection: bind first, so that each client has a port of its own
            with HttpConn("127.0.0.1", ports[n % len(ports)], timeout=30, source=("127.0.0.1", 0)) as c:
                src, opened = c.sock.getsockname()[1], time.monotonic() - t0
                all_open.wait()  # all 50 connections are open at the same time
                for j in range(5):
                    path = ["/", "/health", "/x"][(n + j) % 3]
                    c.request(path)
                    code, _, body = c.response()
                    assert code == {"/": 200, "/health": 200, "/x": 404}[path], (path, code)
                    if path == "/":
                        assert b"unit-test-7" in body
                with lock:
                    done[0] += 1
        except Exception as e:
            with lock:
                errors.append(
                    f"client {n} (to port {ports[n % len(ports)]} from {src}, open at {opened:.3f} s)"
                    f" request {j} at {time.monotonic() - t0:.3f} s: {e!r}"
                )

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if not errors and done[0] != 50:
        errors.append(f"only {done[0]} of 50 clients finished")
    return errors


def test_pipelining_head_and_methods(guest: tuple[Guest, int, int]) -> None:
    _, port, _ = guest
    with HttpConn("127.0.0.1", port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n"
               b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /missing HTTP/1.1\r\nHost: a\r\n\r\n")  # fmt: skip
        assert c.response()[0] == 200
        assert c.response()[2] == b"ok\n"
        code, hdrs, _ = c.response(head=True)
        assert code == 200 and int(hdrs["content-length"]) > 100
        assert c.response()[0] == 404
        # a body is skipped by Content-Length, and the connection stays usable
        c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /health HTTP/1.1\r\n\r\n")
        code, hdrs, _ = c.response()
        assert code == 405 and hdrs["allow"] == "GET, HEAD"
        assert c.response()[2] == b"ok\n"
        c.request("/", headers="Connection: close\r\n")
        code, hdrs, _ = c.response()
        assert code == 200 and hdrs["connection"] == "close"
        assert c.at_eof()
    with HttpConn("127.0.0.1", port) as c:  # HTTP/1.0 closes by default
        c.send(b"GET /health HTTP/1.0\r\n\r\n")
        code, hdrs, _ = c.response()
        assert code == 200 and hdrs["connection"] == "close"
        assert c.at_eof()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n", 400),
        (b"hello there\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 5000, 431),
        (b"GET /" + b"b" * 5000, 431),
    ],
    ids=["binary", "words", "version", "header", "clen", "chunked", "big-header", "big-line"],
)
def test_bad_requests_answered_then_closed(
    guest: tuple[Guest, int, int], payload: bytes, status: int
) -> None:
    _, port, _ = guest
    with HttpConn("127.0.0.1", port) as c:
        try:
            c.send(payload)
        except OSError:
            pass  # the guest may answer and close before all of a big payload is sent
        code, hdrs, _ = c.response()
        assert code == status
        assert hdrs["connection"] == "close"
    code, _, body = get(port, "/")  # still serving
    assert code == 200 and b"unit-test-7" in body


@pytest.mark.slow
def test_half_open_and_abandoned_connections(guest: tuple[Guest, int, int]) -> None:
    g, port, _ = guest
    hanging = [HttpConn("127.0.0.1", port) for _ in range(10)]
    try:
        for i, c in enumerate(hanging):
            c.send(b"GET / HTTP/1.1\r\nHost: half" if i % 2 else b"GE")
        # a client that resets mid-request
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(b"GET / HTTP/1.1\r\n")
        s.close()
        for _ in range(20):
            code, _, body = get(port, "/")
            assert code == 200 and b"unit-test-7" in body
        # the hanging requests complete when their data finally arrives
        hanging[1].send(b"\r\n\r\n")
        assert hanging[1].response()[0] == 200
    finally:
        for c in hanging:
            c.close()
    assert "EXCEPTION" not in g.console and "PANIC" not in g.console


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_instance_sleeps(guest: tuple[Guest, int, int]) -> None:
    """With no connection left the guest stops its timer and halts: QEMU uses ~no CPU.
    Polls 1 s measurement windows until one is quiet (the request's TIME_WAIT ends after
    1 s), with a deadline."""
    g, port, _ = guest
    get(port, "/health")
    deadline = time.monotonic() + 10
    used = 1.0
    while used >= 0.03 and time.monotonic() < deadline:
        c0, t0 = _cpu_seconds(g.proc.pid), time.monotonic()
        end = t0 + 1.0
        while time.monotonic() < end:  # a measurement window, not a wait for an event
            time.sleep(end - time.monotonic())
        used = (_cpu_seconds(g.proc.pid) - c0) / (time.monotonic() - t0)
    assert used < 0.03, f"idle QEMU used {used:.1%} of a core"


def test_udp_echo(guest: tuple[Guest, int, int]) -> None:
    _, _, uport = guest
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        for size in (1, 100, 1400):
            payload = bytes(random.randrange(256) for _ in range(size))
            u.sendto(payload, ("127.0.0.1", uport))
            data, _ = u.recvfrom(2048)
            assert data == payload


# --- a real L2 network: bridge + tap in a namespace of our own ------------------------------


def _need_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces and tap)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if shutil.which("ping") is None:
        pytest.skip("needs ping (iputils-ping)")


def _ip(*args: str, ns: str | None = None) -> None:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)


CLIENT = r"""
import socket, sys, threading, time
host = sys.argv[1]
def fetch(path, close):
    s = socket.create_connection((host, 80), timeout=10)
    conn = b"Connection: close\r\n" if close else b""
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + conn + b"\r\n")
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
        if not close and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            cl = [x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")]
            n = int(cl[0].split(b":")[1])
            if len(body) >= n:
                break
    s.close()
    return data
out = fetch(b"/", True)
assert out.startswith(b"HTTP/1.1 200 OK"), out[:100]
assert b"tap-guest" in out
errs = []
def worker():
    try:
        for _ in range(3):
            assert fetch(b"/health", False).startswith(b"HTTP/1.1 200 OK")
    except Exception as e:
        errs.append(repr(e))
ts = [threading.Thread(target=worker) for _ in range(20)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errs, errs[:3]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"echo?", (host, 7))
assert u.recvfrom(100)[0] == b"echo?"
u.close()
# closed ports: RST for TCP, ICMP port unreachable for UDP
try:
    socket.create_connection((host, 81), timeout=5).close()
    raise AssertionError("port 81 accepted")
except ConnectionRefusedError:
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.connect((host, 9))
u.send(b"x")
try:
    u.recv(100)
    raise AssertionError("udp port 9 answered")
except ConnectionRefusedError:
    pass
u.close()
# a pipelined flood the client does not read for a while: the guest's send buffer fills,
# then its receive window closes; everything must still be answered, in order
s = socket.create_connection((host, 80), timeout=30)
n = 200
def writer():
    for _ in range(n):
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
w = threading.Thread(target=writer)
w.start()
w.join(timeout=1.0)  # the writer blocks once the guest's window is closed
data = b""
while data.count(b"HTTP/1.1 200 OK") < n:
    d = s.recv(65536)
    assert d, "closed early"
    data += d
w.join()
s.close()
# more connections than the guest has slots (128): the surplus SYNs are retried by the clients
ok = []
def holder():
    c = socket.create_connection((host, 80), timeout=30)
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    if c.recv(4096).startswith(b"HTTP/1.1 200"):
        ok.append(1)
    time.sleep(0.3)
    c.close()
ts = [threading.Thread(target=holder) for _ in range(140)]
[t.start() for t in ts]
[t.join() for t in ts]
assert len(ok) == 140, len(ok)
print("CLIENT OK")
"""


@pytest.mark.slow
def test_tap_on_bridge_in_netns(accel: str) -> None:
    _need_netns()
    ensure_image()
    ns = f"jltest-{random.randrange(16**8):08x}"
    guest: Guest | None = None
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", "br0", "type", "bridge", ns=ns)
        _ip("tuntap", "add", "dev", "tap0", "mode", "tap", ns=ns)
        _ip("link", "set", "tap0", "master", "br0", ns=ns)
        _ip("addr", "add", "10.77.0.1/24", "dev", "br0", ns=ns)
        _ip("link", "set", "tap0", "up", ns=ns)
        _ip("link", "set", "br0", "up", ns=ns)
        # the gateway (10.77.0.254) is nobody until off_link() below plays it
        argv = qemu_argv(accel, "ip=10.77.0.2/24 gw=10.77.0.254 name=tap-guest",
                         "tap,id=n0,ifname=tap0,script=no,downscript=no")  # fmt: skip
        guest = Guest(argv, prefix=["ip", "netns", "exec", ns])
        assert guest.wait_ready() == "READY 10.77.0.2:80"
        ping = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr + guest.diagnostics()
        client = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c", CLIENT, "10.77.0.2"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "CLIENT OK" in client.stdout, client.stdout + client.stderr + guest.diagnostics()
        raw = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c",
             f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
             "from tests.qemu_guest import tcp_conformance; tcp_conformance('tap0', '10.77.0.2')"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "RAW OK" in raw.stdout, raw.stdout + raw.stderr + guest.diagnostics()
        ol = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c",
             f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
             "from tests.qemu_guest import off_link; off_link('tap0', '10.77.0.2', '10.77.0.254')"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "OFFLINK OK" in ol.stdout, ol.stdout + ol.stderr + guest.diagnostics()
        fz = subprocess.run(
            ["ip", "netns", "exec", ns, "python3", "-c",
             f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
             "from tests.qemu_guest import fuzz; fuzz('tap0', '10.77.0.2', 2000)"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "FUZZ OK" in fz.stdout, fz.stdout + fz.stderr + guest.diagnostics()
        assert "EXCEPTION" not in guest.console and "PANIC" not in guest.console
        # the guest answered ARP itself and holds its address on the segment
        neigh = subprocess.run(["ip", "netns", "exec", ns, "ip", "neigh", "show", "10.77.0.2"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        assert "lladdr" in neigh.stdout
    finally:
        if guest is not None:
            guest.close()
        subprocess.run(["ip", "netns", "del", ns], timeout=10, check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
            if ns not in listed.stdout:
                break
