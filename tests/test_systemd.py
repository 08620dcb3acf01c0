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

from jitlaunch.errors import ListenError
from jitlaunch.systemd import Notifier, listen_fds, notify_address, watchdog_interval

from .conftest import ROOT


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
