"""The control socket: the protocol's parser (pure), and a real daemon's socket: bad requests
get error replies and never end it, status/start/stop, the file mode and peer credentials,
and the ``jitlaunch status|start|stop`` commands."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from jitlaunch.control import MAX_REQUEST
from jitlaunch.controlproto import (
    BadRequest,
    ControlError,
    Request,
    call,
    format_status,
    parse_request,
)

from .conftest import DEMO, ROOT, config_text, load, running

SERVICES = {"py", "web"}


@pytest.mark.parametrize(("line", "why"), [
    (b"", "not a JSON document"),
    (b"status", "not a JSON document"),
    (b"\xff\xfe", "not a JSON document"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"command": "status"}', "missing \"version\""),
    (b'{"version": 2, "command": "status"}', "unsupported version 2"),
    (b'{"version": true, "command": "status"}', "unsupported version True"),
    (b'{"version": "1", "command": "status"}', "unsupported version '1'"),
    (b'{"version": 1, "command": "reboot"}', "unknown command 'reboot'"),
    (b'{"version": 1}', "unknown command None"),
    (b'{"version": 1, "command": "status", "x": 1}', "unknown field 'x'"),
    (b'{"version": 1, "command": "status", "service": "py"}', "status takes no service"),
    (b'{"version": 1, "command": "start"}', "start needs \"service\""),
    (b'{"version": 1, "command": "stop", "service": 7}', "stop needs \"service\""),
    (b'{"version": 1, "command": "start", "service": "nope"}', "unknown service 'nope'"),
    (b"[" * 100000, "not a JSON document"),
])
def test_bad_requests_say_why(line: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why.replace("(", r"\(")):
        parse_request(line, SERVICES)


def test_good_requests() -> None:
    assert parse_request(b'{"version": 1, "command": "status"}', SERVICES) == Request("status")
    assert parse_request(b'{"command": "stop", "service": "web", "version": 1}', SERVICES) == \
        Request("stop", "web")


@given(st.binary(max_size=200))
def test_random_bytes_are_a_bad_request_or_a_request(line: bytes) -> None:
    try:
        parse_request(line, SERVICES)
    except BadRequest:
        pass


# ---- a real daemon's control socket ------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A unix socket path must fit in 107 bytes: pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="jlctl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _config(state_dir: Path, block: str, top: str = "") -> str:
    return config_text(state_dir, f"""
[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080]
idle_timeout = "5m"
[service.process]
command = "{DEMO}"
subnet = "{block}.128/25"
""", top=top)


async def _exchange(path: Path, payload: bytes) -> list[dict[str, object]]:
    """Send raw bytes, read replies until the daemon closes or goes quiet."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.connect(os.fspath(path))
        await sock.send(payload)
        sock.shutdown(trio.socket.SHUT_WR)
        data = b""
        with trio.fail_after(15):
            while chunk := await sock.recv(65536):
                data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def test_bad_requests_on_the_socket_never_end_the_daemon(short_dir: Path, block: str) -> None:
    async with running(load(_config(short_dir, block))) as daemon:
        path = short_dir / "control.sock"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        replies = await _exchange(path, b"garbage\n{}\n[]\n" + b'{"version": 1, "command": "start", '
                                  b'"service": "nope"}\n{"version": 1, "command": "status"}\n')
        assert [r["ok"] for r in replies] == [False, False, False, False, True]
        assert {r.get("kind") for r in replies[:4]} == {"bad-request"}
        assert all(r["version"] == 1 for r in replies)
        # A line longer than the limit: one error, then the connection is closed.
        replies = await _exchange(path, b"x" * (MAX_REQUEST * 2))
        assert replies == [{"version": 1, "ok": False, "kind": "bad-request",
                            "error": f"request longer than {MAX_REQUEST} bytes"}]
        # A client that connects and leaves at once.
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(os.fspath(path))
        sock.close()
        replies = await _exchange(path, b'{"version": 1, "command": "status"}\n')
        assert replies[0]["ok"] is True
        assert daemon.control is not None
        assert daemon.control.counts.get("internal_error", 0) == 0
    assert not path.exists()


async def test_status_start_stop(short_dir: Path, block: str) -> None:
    async with running(load(_config(short_dir, block))):
        path = short_dir / "control.sock"

        def ask(**request: str) -> dict[str, object]:
            return call(path, request)

        status = await trio.to_thread.run_sync(lambda: ask(command="status"))
        (py,) = status["services"]  # type: ignore[misc]
        assert py["name"] == "py" and py["instance"] is None and py["backend"] == "process"
        started = await trio.to_thread.run_sync(lambda: ask(command="start", service="py"))
        assert started["ok"] is True
        inst = started["instance"]
        assert isinstance(inst, dict)
        assert inst["state"] == "ready" and inst["label"] == "py#1"
        assert inst["address"] == f"{block}.129" and isinstance(inst["pid"], int)
        status = await trio.to_thread.run_sync(lambda: ask(command="status"))
        table = format_status(status)
        assert "py" in table and "ready" in table and f"{block}.129" in table
        pid = inst["pid"]
        stopped = await trio.to_thread.run_sync(lambda: ask(command="stop", service="py"))
        assert stopped == {"version": 1, "ok": True, "stopped": "py#1", "state": "stopped"}
        assert _gone(pid)
        again = await trio.to_thread.run_sync(lambda: ask(command="stop", service="py"))
        assert again == {"version": 1, "ok": True, "stopped": None}


def _gone(pid: object) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """Ask for status as uid/gid 65534 with no other groups (the system Python: the .venv's
    may live where that user cannot read)."""
    client = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
              "s.sendall(b'{\"version\": 1, \"command\": \"status\"}\\n'); "
              "print(s.makefile().readline(), end='')")
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
         client, os.fspath(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists()
                    or shutil.which("setpriv") is None, reason="needs root, setpriv, /usr/bin/python3")
async def test_peers_outside_the_group_are_refused(short_dir: Path, block: str) -> None:
    os.chmod(short_dir, 0o755)
    async with running(load(_config(short_dir, block))):
        path = short_dir / "control.sock"
        # The file mode keeps others out first ...
        denied = await trio.to_thread.run_sync(_as_nobody, path)
        assert "PermissionError" in denied.stderr
        # ... and with the mode opened up, the peer credentials still do.
        os.chmod(path, 0o666)
        refused = await trio.to_thread.run_sync(_as_nobody, path)
        assert json.loads(refused.stdout) == {
            "version": 1, "ok": False, "kind": "refused",
            "error": "permission denied: uid 65534 is not root"}


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists()
                    or shutil.which("setpriv") is None, reason="needs root, setpriv, /usr/bin/python3")
async def test_members_of_the_control_group_are_served(short_dir: Path, block: str) -> None:
    import grp

    group = grp.getgrgid(65534).gr_name
    os.chmod(short_dir, 0o755)
    async with running(load(_config(short_dir, block, top=f'control_group = "{group}"'))):
        path = short_dir / "control.sock"
        assert os.stat(path).st_gid == 65534
        served = await trio.to_thread.run_sync(_as_nobody, path)
        assert json.loads(served.stdout)["ok"] is True


def test_cli_commands(short_dir: Path, block: str) -> None:
    config = short_dir / "jitlaunch.toml"
    config.write_text(_config(short_dir, block))
    jl = [sys.executable, "-m", "jitlaunch.cli"]
    daemon = subprocess.Popen([*jl, "run", "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*jl, *args, "--config", str(config)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)

        for _ in range(300):  # poll with a deadline (about 30 s) for the socket
            if (short_dir / "control.sock").exists():
                break
            try:
                daemon.wait(0.1)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(daemon.stderr.read().decode() if daemon.stderr else "")
        started = cli("start", "py")
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"py#1 ready at {block}.129"
        status = cli("status")
        assert status.returncode == 0
        assert status.stdout.splitlines()[0].split()[:3] == ["SERVICE", "BACKEND", "STATE"]
        assert status.stdout.splitlines()[1].split()[:3] == ["py", "process", "ready"]
        assert json.loads(cli("status", "--json").stdout)["services"][0]["name"] == "py"
        unknown = cli("stop", "nope")
        assert unknown.returncode == 2
        assert unknown.stderr.startswith("jitlaunch: error: unknown service 'nope'")
        stopped = cli("stop", "py")
        assert (stopped.returncode, stopped.stdout.strip()) == (0, "py#1 stopped")
    finally:
        daemon.terminate()
        daemon.wait(30)
        if daemon.stderr is not None:
            daemon.stderr.close()
    gone = subprocess.run([*jl, "status", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1
    assert "is the daemon running?" in gone.stderr


def test_call_to_nothing_is_a_clear_error(short_dir: Path) -> None:
    with pytest.raises(ControlError, match="is the daemon running"):
        call(short_dir / "control.sock", {"command": "status"})


def test_the_client_finds_the_socket_without_needing_the_config(short_dir: Path,
                                                               block: str) -> None:
    """The config's own socket when it exists; else $RUNTIME_DIRECTORY's, else the system
    daemon's; a config with an error is not needed when one of those exists."""
    from jitlaunch.controlproto import client_socket
    from jitlaunch.errors import ConfigError

    state, runtime, system = short_dir / "state", short_dir / "run", short_dir / "sys.sock"
    state.mkdir()
    runtime.mkdir()
    good = short_dir / "good.toml"
    good.write_text(_config(state, block))
    broken = short_dir / "broken.toml"
    broken.write_text("[dns\n")
    env = {"RUNTIME_DIRECTORY": str(runtime)}
    with pytest.raises(ConfigError):
        client_socket(str(broken), {}, system)
    assert client_socket(str(good), {}, system) == state / "control.sock"  # (connect says)
    system.touch()
    assert client_socket(str(broken), {}, system) == system
    assert client_socket(str(good), {}, system) == system
    (runtime / "control.sock").touch()
    assert client_socket(str(broken), env, system) == runtime / "control.sock"
    assert client_socket(None, env, system) == runtime / "control.sock"
    (state / "control.sock").touch()
    assert client_socket(str(good), env, system) == state / "control.sock"


def test_reload_of_a_broken_file_is_the_daemons_to_reject(short_dir: Path, block: str) -> None:
    """`jitlaunch reload -c FILE` after FILE broke: the client finds the daemon through
    $RUNTIME_DIRECTORY without reading FILE, and the daemon rejects it: exit status 1."""
    config = short_dir / "jitlaunch.toml"
    config.write_text(_config(short_dir, block))
    jl = [sys.executable, "-m", "jitlaunch.cli"]
    daemon = subprocess.Popen([*jl, "run", "--config", str(config)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # poll with a deadline (about 30 s) for the socket
            if (short_dir / "control.sock").exists():
                break
            with pytest.raises(subprocess.TimeoutExpired):
                daemon.wait(0.1)
        config.write_text("[dns\n")
        env = {**os.environ, "RUNTIME_DIRECTORY": str(short_dir)}
        out = subprocess.run([*jl, "reload", "-c", str(config)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "not valid TOML" in out.stderr
    finally:
        daemon.terminate()
        daemon.wait(30)
