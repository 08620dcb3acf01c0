"""The proxy under faults and load, over real loopback sockets with real instances: running
out of file descriptors, connection caps, timers, dead instances and full listen backlogs."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from jitlaunch.proxy.relay import Relay

from .conftest import DEMO, PYTHON, config_text, http_get, load, running, wait_until


def service(front: str, extra: str = "", command: str = DEMO, port: int = 18080) -> str:
    return f"""
[[service]]
name = "hello"
front = ["{front}"]
ports = [{port}]
answer = "proxy"
{extra}
[service.process]
command = "{command}"
"""


def with_proxy(text: str, proxy: str) -> str:
    return text.replace("[dns]", f"[proxy]\n{proxy}\n\n[dns]")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(host: str, port: int, timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def poll(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def serves(host: str, port: int) -> bool:
    try:
        return get(host, port, 5).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextlib.contextmanager
def daemon_process(tmp_path: Path, text: str) -> Iterator[subprocess.Popen[bytes]]:
    conf = tmp_path / "jitlaunch.toml"
    conf.write_text(text)
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_running_out_of_fds_does_not_end_the_daemon(tmp_path: Path, block: str) -> None:
    """With its open file limit lowered under it (and no cap to protect it), a daemon that
    runs out of descriptors refuses what it cannot take, lives, and serves once they close."""
    front = f"{block}.1"
    text = with_proxy(
        config_text(tmp_path, service(front)),
        "max_connections = 100000\nmax_connections_per_source = 100000",
    )
    with daemon_process(tmp_path, text) as proc:
        poll(lambda: serves(front, 18080), 30, "the daemon to serve")
        limit = fd_count(proc.pid) + 40
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        clients: list[socket.socket] = []
        try:
            for _ in range(80):  # twice what fits: idle connections, then half a request
                s = socket.create_connection((front, 18080), timeout=10)
                s.sendall(b"GET / HTTP/1.1\r\n")
                clients.append(s)
            poll(lambda: fd_count(proc.pid) >= limit - 1, 20, "the daemon to run out of fds")
            assert proc.poll() is None
        finally:
            for s in clients:
                s.close()
        poll(lambda: serves(front, 18080), 30, "the daemon to serve again")
        assert proc.poll() is None
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log, log
    assert "Too many open files" in log


async def test_caps_refuse_cleanly_and_count(tmp_path: Path, block: str) -> None:
    front = f"{block}.1"
    text = with_proxy(
        config_text(tmp_path, service(front)), "max_connections = 5\nmax_connections_per_source = 3"
    )
    async with running(load(text)) as d:
        assert (await http_get(front, 18080)).startswith(b"HTTP/1.1 200")
        held = [await trio.open_tcp_stream(front, 18080) for _ in range(3)]
        await wait_until(lambda: d.proxy.open == 3)
        over = await trio.open_tcp_stream(front, 18080)
        with trio.fail_after(10):
            assert await over.receive_some(10) == b""
        await over.aclose()
        assert d.proxy.closed[("hello", "max_per_source")] == 1
        for _ in range(2):
            held.append(await trio.open_tcp_stream(front, 18080, local_address=f"{block}.200"))
        await wait_until(lambda: d.proxy.open == 5)
        over = await trio.open_tcp_stream(front, 18080, local_address=f"{block}.201")
        with trio.fail_after(10):
            assert await over.receive_some(10) == b""
        await over.aclose()
        assert d.proxy.closed[("hello", "max_connections")] == 1
        await held.pop(0).aclose()
        await wait_until(lambda: d.proxy.open == 4)
        assert (await http_get(front, 18080)).startswith(b"HTTP/1.1 200")
        for s in held:
            await s.aclose()
        await wait_until(lambda: d.proxy.open == 0)
        assert d.proxy.by_source == {}


HOLDER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
conns = []
while True:
    c, _ = s.accept()
    conns.append(c)  # reads nothing, answers nothing, never closes
"""


async def test_silent_and_half_closed_connections_are_closed(tmp_path: Path, block: str) -> None:
    (tmp_path / "holder.py").write_text(HOLDER)
    front = f"{block}.1"
    cmd = f"{PYTHON} {tmp_path / 'holder.py'} {{address}} {{port}}"
    text = with_proxy(
        config_text(tmp_path, service(front, command=cmd)),
        'first_data_timeout = "300ms"\nhalf_close_timeout = "300ms"\nanswer_timeout = "1h"',
    )
    async with running(load(text)) as d:
        await d.supervisor.acquire("hello")
        silent = await trio.open_tcp_stream(front, 18080)
        half = await trio.open_tcp_stream(front, 18080)
        await half.send_all(b"request")
        await half.send_eof()
        start = trio.current_time()
        with trio.fail_after(10):
            assert await silent.receive_some(10) == b""
            assert await half.receive_some(10) == b""
        assert trio.current_time() - start >= 0.3
        await silent.aclose()
        await half.aclose()
        await wait_until(lambda: d.proxy.open == 0)
        assert d.proxy.closed[("hello", "first_data")] == 1
        assert d.proxy.closed[("hello", "half_close")] == 1


async def test_first_get_after_a_sigkill_is_served(tmp_path: Path, block: str) -> None:
    """An instance killed right before a connect is still READY for a few milliseconds; the
    connection is held for the next instance instead of being reset."""
    front = f"{block}.1"
    async with running(load(config_text(tmp_path, service(front)))) as d:
        rt = d.supervisor.services["hello"]
        for _ in range(3):
            inst = await d.supervisor.acquire("hello")
            assert inst.handle is not None
            os.kill(inst.handle.pid, signal.SIGKILL)  # type: ignore[attr-defined]
            reply = await http_get(front, 18080)
            assert reply.startswith(b"HTTP/1.1 200"), reply
            assert rt.instance is not None and rt.instance is not inst
        assert not d.proxy.closed


BACKLOG_SERVER = """
import socket, sys, threading, time

def serve(c):
    c.settimeout(5)
    data = b""
    try:
        while not data.endswith(b"\\n"):
            chunk = c.recv(100)
            if not chunk:
                break
            data += chunk
        c.sendall(b"ok " + data)
    except OSError:
        pass
    c.close()

time.sleep(0.3)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.mark.slow
async def test_held_connections_all_served_by_an_instance_with_a_tiny_backlog(
    tmp_path: Path, block: str
) -> None:
    (tmp_path / "backlog.py").write_text(BACKLOG_SERVER)
    front = f"{block}.1"
    cmd = f"{PYTHON} {tmp_path / 'backlog.py'} {{address}} {{port}}"
    text = config_text(tmp_path, service(front, command=cmd, extra='boot_timeout = "20s"'))
    count = 256
    replies: dict[int, bytes] = {}
    async with running(load(text)) as d:

        async def client(i: int) -> None:
            stream = await trio.open_tcp_stream(front, 18080)
            async with stream:
                await stream.send_all(f"{i}\n".encode())
                data = b""
                with contextlib.suppress(trio.BrokenResourceError):
                    while chunk := await stream.receive_some(100):
                        data += chunk
                replies[i] = data

        with trio.move_on_after(60):
            async with trio.open_nursery() as n:
                for i in range(count):
                    n.start_soon(client, i)
        bad = {i: r for i, r in replies.items() if r != f"ok {i}\n".encode()}
        assert (len(replies), bad) == (count, {}), (d.proxy.ended, d.proxy.closed, d.proxy.retries)
        assert not d.proxy.closed


async def test_slowloris_cannot_hold_a_ready_service_up(tmp_path: Path, block: str) -> None:
    """Connections trickling a byte every 100 ms into a request the instance never sees end
    are closed at answer_timeout, and the service then idles out."""
    front = f"{block}.1"
    text = with_proxy(
        config_text(tmp_path, service(front, extra='idle_timeout = "1s"')),
        'answer_timeout = "500ms"',
    )
    async with running(load(text)) as d:
        rt = d.supervisor.services["hello"]
        await d.supervisor.acquire("hello")
        ended: list[float] = []

        async def slowloris() -> None:
            stream = await trio.open_tcp_stream(front, 18080)
            async with stream:
                start = trio.current_time()
                with contextlib.suppress(trio.BrokenResourceError):
                    while True:
                        await stream.send_all(b"G")
                        with trio.move_on_after(0.1):
                            if await stream.receive_some(10) == b"":
                                break
                ended.append(trio.current_time() - start)

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(slowloris)
        assert len(ended) == 20 and min(ended) >= 0.5
        assert d.proxy.closed[("hello", "first_answer")] == 20
        await wait_until(lambda: rt.idle_stops == 1, 20)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (RuntimeError("a bug"), "error"),
        (ExceptionGroup("from a nursery", [OSError(errno.EMFILE, "Too many open files")]), "fds"),
    ],
)
async def test_a_failing_connection_ends_only_itself(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch, failure: Exception, reason: str
) -> None:
    real = Relay.run
    calls = 0

    async def fails_once(self: Relay) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise failure
        return await real(self)

    monkeypatch.setattr(Relay, "run", fails_once)
    front = f"{block}.1"
    async with running(load(config_text(tmp_path, service(front)))) as d:
        assert await http_get(front, 18080) == b""
        assert d.proxy.closed[("hello", reason)] == 1
        assert (await http_get(front, 18080)).startswith(b"HTTP/1.1 200")
