"""``jitlaunch check`` looks at this host without starting anything: files, binaries, users,
/dev/kvm, bindable ports; errors (exit 2) and warnings (exit 0), and the daemon logs the same
findings once at start."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jitlaunch import checks
from jitlaunch.backends.childenv import DEFAULT_PATH
from jitlaunch.checks import Finding, host_findings

from .conftest import ROOT, fresh_block, parse_config

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _config(services: str, block: str, dns: str = "127.0.0.1:0", top: str = "") -> str:
    return f"""
[daemon]
state_dir = "/nonexistent-jl"
{top}
[metrics]
listen = []
[dns]
listen = ["{dns}"]
zones = ["jit.test"]
[defaults]
answer = "wait"
{services}
""".replace("BLOCK", block)


def _process(name: str, n: int, command: str, extra: str = "") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["BLOCK.{n}"]
ports = [18080]
[service.process]
command = "{command}"
{extra}
"""


def _found(text: str, *, ports: bool = True) -> list[tuple[bool, str | None, str | None, str]]:
    return [(f.error, f.service, f.key, f.message)
            for f in host_findings(parse_config(text, "c.toml"), ports=ports)]


def test_process_binaries(tmp_path: Path) -> None:
    block = fresh_block()
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    text = _config(
        _process("missing", 1, "/nonexistent/bin/x --port {port}", 'user = "root"')
        + _process("notexec", 2, f"{script}", 'user = "root"')
        + _process("nopath", 3, "no-such-program-jl {port}", 'user = "root"')
        + _process("python", 4, "{python} -m jitlaunch.demo_http", 'user = "root"')
        + _process("onpath", 5, "true", 'user = "root"')
        + _process("templated", 6, "/x/{name}", 'user = "root"')
        + _process("nodir", 7, "true", f'user = "root"\ndirectory = "{tmp_path}/none"'),
        block)
    assert [f for f in _found(text) if f[0]] == [
        (True, "missing", "process.command", "/nonexistent/bin/x does not exist"),
        (True, "notexec", "process.command", f"{script} is not an executable file"),
        (True, "nopath", "process.command",
         f"'no-such-program-jl' is not found in PATH ({DEFAULT_PATH})"),
        (True, "nodir", "process.directory", f"{tmp_path}/none is not a directory"),
    ]
    # The service's own PATH is the one its command is looked up in.
    text = _config(_process("own", 1, "run.sh", f'user = "root"\nenvironment = {{ PATH = "{tmp_path}" }}'),
                   block)
    assert [f for f in _found(text) if f[0]] == [
        (True, "own", "process.command", f"'run.sh' is not found in PATH ({tmp_path})")]
    script.chmod(0o755)
    assert [f for f in _found(text) if f[0]] == []


def test_users_and_groups() -> None:
    block = fresh_block()
    text = _config(
        _process("nouser", 1, "true", 'user = "no-such-user-jl"')
        + _process("nogroup", 2, "true", 'user = "root"\ngroup = "no-such-group-jl"'),
        block, top='control_group = "no-such-group-jl2"')
    assert _found(text)[:3] == [
        (True, None, "daemon.control_group",
         "group 'no-such-group-jl2' does not exist on this host (the daemon would stop at start)"),
        (True, "nouser", "process.user", "user 'no-such-user-jl' does not exist on this host"),
        (True, "nogroup", "process.group", "group 'no-such-group-jl' does not exist on this host"),
    ]


@root_only
def test_a_root_check_warns_about_services_without_a_user() -> None:
    block = fresh_block()
    text = _config(_process("implicit", 1, "true") + _process("explicit", 2, "true", 'user = "root"')
                   + _process("dropped", 3, "true", 'user = "daemon"'), block)
    assert _found(text) == [(
        False, "implicit", "process.user",
        'not set: under a root daemon its instances run as root (this check runs as root); set '
        'the user they should run as, or user = "root" to say so')]


@root_only
def test_what_the_user_may_not_do(tmp_path: Path) -> None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    block = fresh_block()
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "x").write_text("#!/bin/sh\n")
    (closed / "x").chmod(0o755)
    # pytest's tmp_path lies below /tmp/pytest-of-root (0700): nobody may not enter it.
    text = _config(
        _process("dir", 1, "/bin/true", f'user = "nobody"\ndirectory = "{closed}"')
        + _process("bin", 2, f"{closed}/x", 'user = "nobody"')
        + _process("ok", 3, "/bin/true", 'user = "nobody"\ndirectory = "/"'), block)
    found = _found(text)
    assert [(f[1], f[2]) for f in found] == [("dir", "process.directory"), ("bin", "process.command")]
    low = _config(_process("low", 1, "/bin/true", 'user = "nobody"\nsubnet = "127.77.1.0/24"'),
                  block).replace("18080", "80")
    if checks._unprivileged_port_start() > 80:
        (warning,) = [f for f in _found(low, ports=False) if f[2] == "process.user"]
        assert warning[0] is False and warning[3].startswith(
            "with a subnet, instances listen on the service's own ports, and as nobody (uid ")
        assert "port 80 needs CAP_NET_BIND_SERVICE" in warning[3]
    assert [f for f in _found(low.replace("subnet", "# subnet"), ports=False)
            if f[2] == "process.user"] == []
    assert all(f[0] and f[3].startswith("nobody (uid ") and " may not enter " in f[3] for f in found)


def _qemu(name: str, n: int, qemu: str) -> str:
    return f"""
[[service]]
name = "{name}"
backend = "qemu"
front = ["BLOCK.{n}"]
ports = [18080]
[service.qemu]
{qemu}
"""


def test_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = fresh_block()
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    text = _config(
        _qemu("nokernel", 1, f'kernel = "{tmp_path}/none.elf"')
        + _qemu("nobinary", 2, f'kernel = "{kernel}"\nbinary = "qemu-system-nothing-jl"')
        + _qemu("fine", 3, f'kernel = "{kernel}"\naccel = "kvm"')
        + _qemu("nouser", 4, f'kernel = "{kernel}"\nuser = "no-such-user-jl"'),
        block)
    found = _found(text)
    assert (True, "nouser", "qemu.user", "user 'no-such-user-jl' does not exist on this host") \
        in found
    assert found[:2] == [
        (True, "nokernel", "qemu.kernel", f"kernel image {tmp_path}/none.elf does not exist"),
        (True, "nobinary", "qemu.binary",
         "QEMU binary 'qemu-system-nothing-jl' is not found (or not executable) in PATH"),
    ]
    # /dev/kvm: the logic, with the device's answers faked (it opens on this machine).
    real_open = os.open

    def fake_open(path: str, *args: int) -> int:
        if path == "/dev/kvm":
            raise OSError(code, os.strerror(code))
        return real_open(path, *args)

    monkeypatch.setattr(checks.os, "open", fake_open)
    only_kvm = _config(_qemu("kvm", 1, f'kernel = "{kernel}"\naccel = "kvm"'), block)
    for code in (errno.ENOENT, errno.EACCES):
        (kvm,) = _found(only_kvm, ports=False)
        assert kvm[1:3] == ("kvm", "qemu.accel")
        assert kvm[3].startswith(f'accel = "kvm" but /dev/kvm cannot be opened: {os.strerror(code)}')
        assert kvm[0] == (code == errno.ENOENT or os.geteuid() == 0)
    # accel = "auto" falls back to TCG: nothing to say.
    assert _found(_config(_qemu("auto", 1, f'kernel = "{kernel}"'), block), ports=False) == []
    monkeypatch.undo()
    monkeypatch.setattr(checks, "_net_admin", lambda: False)
    bridge = _config(_qemu("br", 1, f'kernel = "{kernel}"\nnetwork = "bridge"'), block)
    assert _found(bridge, ports=False) == [(
        False, "br", "qemu.network", "bridge networking needs root or CAP_NET_ADMIN (to create "
        "jl0 and taps); this check runs without it")]
    # libvirt: a local libvirtd's bridge is ours to make; a remote host's is its own.
    libvirt = "".join(f"""
[[service]]
name = "lv{n}"
backend = "libvirt"
front = ["BLOCK.{n}"]
ports = [80]
[service.libvirt]
kernel = "{kernel}"
network = "bridge"
uri = "{uri}"
""" for n, uri in ((1, "qemu:///system"), (2, "qemu+ssh://kvm7/system")))
    assert _found(_config(libvirt, block), ports=False) == [(
        False, "lv1", "libvirt.network", "bridge networking needs root or CAP_NET_ADMIN (to "
        "create jl0 and forget its addresses' neighbour entries; libvirt makes the taps); this "
        "check runs without it")]
    # A remote host's console file is not ours to read (stream, its default, is fine).
    remote_file = libvirt.replace('uri = "qemu+ssh://kvm7/system"',
                                  'uri = "qemu+ssh://kvm7/system"\nconsole = "file"')
    assert _found(_config(remote_file, block), ports=False)[1:] == [(
        False, "lv2", "libvirt.console", 'console = "file" with a remote URI: the console file '
        "is written on the libvirt host, and READY is looked for in a file of this one; "
        'console = "stream" reads it through libvirt')]
    # A remote host's user networking forwards from its own loopback.
    remote_user = libvirt.replace('network = "bridge"\nuri = "qemu+ssh', 'uri = "qemu+ssh')
    assert _found(_config(remote_user, block), ports=False)[1:] == [(
        False, "lv2", "libvirt.network", 'network = "user" with a remote URI: QEMU forwards the '
        "ports from 127.0.0.1 of the libvirt host, which this one cannot reach; "
        'network = "bridge" gives each domain an address')]


@contextlib.contextmanager
def _dns_pair() -> Iterator[int]:
    """A port on 127.0.0.1 held over UDP and TCP (as a running DNS server holds it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            tcp.listen(1)
            yield port
            return
    raise AssertionError("no port free over both UDP and TCP")


def test_ports() -> None:
    block = fresh_block()
    with socket.socket() as taken, _dns_pair() as dns_port:
        taken.bind((f"{block}.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        text = _config(
            f"""
[[service]]
name = "busy"
front = ["BLOCK.1"]
ports = [{port}]
[service.process]
command = "true"
user = "root"
[[service]]
name = "elsewhere"
front = ["192.0.2.77"]
ports = [18080]
[service.process]
command = "true"
user = "root"
""", block, dns=f"127.0.0.1:{dns_port}")
        assert _found(text) == [
            (True, "elsewhere", "front",
             "cannot bind 192.0.2.77:18080 (TCP): no interface has this address"),
            (False, None, "dns.listen", f"cannot bind 127.0.0.1:{dns_port} (UDP): in use (by the "
             "running jitlaunch itself? else the daemon cannot start)"),
            (False, None, "dns.listen", f"cannot bind 127.0.0.1:{dns_port} (TCP): in use (by the "
             "running jitlaunch itself? else the daemon cannot start)"),
            (False, "busy", "front", f"cannot bind {block}.1:{port} (TCP): in use (by the "
             "running jitlaunch itself? else the daemon cannot start)"),
        ]
    # Nothing is left bound by the check itself.
    assert _found(text) == [_found(text)[0]]


def test_finding_text() -> None:
    assert Finding(True, "gone", "a", "process.command").text("c.toml") == (
        "c.toml: service 'a': process.command: gone")
    assert Finding(False, "x", key="dns.listen").text("c.toml") == "c.toml: dns.listen: x"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jitlaunch.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_jitlaunch_check_exit_status(tmp_path: Path) -> None:
    block = fresh_block()
    bad = tmp_path / "bad.toml"
    bad.write_text(_config(_process("gone", 1, "/nonexistent/bin/x", 'user = "root"'), block))
    res = _cli("check", str(bad))
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == (f"jitlaunch: error: {bad}: service 'gone': process.command: "
                          "/nonexistent/bin/x does not exist\n")
    # --config-only: the configuration alone (written for another host).
    only = _cli("check", "--config-only", str(bad))
    assert only.returncode == 0 and only.stdout.startswith(f"{bad}: OK\n") and only.stderr == ""
    assert "  gone: gone.jit.test -> " in only.stdout and ", user root\n" in only.stdout
    with socket.socket() as taken:
        taken.bind((f"{block}.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = tmp_path / "busy.toml"
        busy.write_text(_config(_process("busy", 1, "true", 'user = "root"'), block)
                        .replace("18080", str(port)))
        res = _cli("check", str(busy))
    assert res.returncode == 0 and res.stdout.startswith(f"{busy}: OK\n")
    assert res.stderr.startswith(f"jitlaunch: warning: {busy}: service 'busy': front: cannot bind ")


def test_the_daemon_logs_the_findings_at_start(tmp_path: Path) -> None:
    block = fresh_block()
    path = tmp_path / "c.toml"
    path.write_text(_config(_process("gone", 1, "/nonexistent/bin/x", 'user = "root"'), block)
                    .replace("/nonexistent-jl", str(tmp_path / "state")))
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jitlaunch.cli", "run", "--config", str(path)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "serving 1 service" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert (f"ERROR jitlaunch: check: {path}: service 'gone': process.command: /nonexistent/bin/x "
            "does not exist") in text
    assert text.count("check: ") == 1


def test_a_closed_stdout_ends_the_cli_quietly() -> None:
    """`jitlaunch check FILE | head -0`: status 141 as after SIGPIPE, no traceback."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "jitlaunch.cli", "check", "--config-only",
             str(ROOT / "conf" / "default.toml")], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
            timeout=60)
    finally:
        os.close(w)
    assert (res.returncode, res.stderr) == (141, b"")


async def test_check_while_the_daemon_runs_says_so_once(tmp_path: Path, block: str) -> None:
    """`jitlaunch check` of the config a daemon is running: one warning that the daemon holds
    its addresses, not one "in use" per socket."""
    from .conftest import DEMO, config_text, load, running

    text = config_text(tmp_path / "state", f"""
[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080, 8081]
[service.process]
command = "{DEMO}"
user = "root"
""").replace('listen = ["127.0.0.1:0"]\nzones', f'listen = ["{block}.53:5300"]\nzones')
    assert f"{block}.53:5300" in text
    config = load(text)
    async with running(config):
        found = host_findings(config)
    held = [f for f in found if "holds its addresses" in f.text(None)]
    assert len(held) == 1 and not held[0].error
    assert f"(pid {os.getpid()})" in held[0].text(None)
    assert not [f for f in found if "cannot bind" in f.text(None)]
    assert not [f for f in host_findings(config) if "holds its addresses" in f.text(None)]
