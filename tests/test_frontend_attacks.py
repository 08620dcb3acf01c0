"""Attacks on shared frontends through a real daemon: a slowloris on each (a request head and
a ClientHello dribbled), 5,000 connections sending garbage, a flood of unknown names. Nothing
boots, every connection is closed and counted by reason within the bounds, the daemon's
descriptors come back to where they were, and it still serves."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from jitlaunch.daemon import Daemon

from .conftest import DEMO, config_text, load, running, wait_until
from .helpers import client_hello


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, addr: str, web: int, tls: int) -> str:
    return config_text(tmp_path / "state", f"""
[[frontend]]
name = "web"
listen = ["{addr}:{web}"]
route = "host"

[[frontend]]
name = "tls"
listen = ["{addr}:{tls}"]
route = "sni"

[[service]]
name = "alpha"
ports = [8080, 8443]
frontends = {{ web = 8080, tls = 8443 }}
answer = "proxy"
[service.process]
command = "{DEMO}"
""", top="[proxy]\nfirst_data_timeout = \"1s\"\nmax_connections = 4096\n"
         "max_connections_per_source = 4096\n")




def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def nothing_booted(d: Daemon) -> bool:
    return d.supervisor.service_status("alpha").boots == 0


async def dribble(addr: str, port: int, data: bytes, pause: float) -> bytes:
    """Send ``data`` a byte at a time, ``pause`` apart, while the front keeps the connection;
    what came back."""
    stream = await trio.open_tcp_stream(addr, port)
    got = b""
    async with stream:
        try:
            for i in range(len(data)):
                await stream.send_all(data[i:i + 1])
                await trio.sleep(pause)  # the attack's own pace, not a wait for a result
            with trio.fail_after(10):
                while chunk := await stream.receive_some(4096):
                    got += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    return got


async def test_slowloris_on_each_frontend(tmp_path: Path, block: str) -> None:
    addr = f"{block}.1"
    web, tls = free_port(addr), free_port(addr)
    async with running(load(config(tmp_path, addr, web, tls))) as d:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble, addr, web, b"GET / HTTP/1.1\r\nHost: alpha.jit.test\r\n"
                               b"X-Slow: " + b"a" * 200, 0.05)
            nursery.start_soon(dribble, addr, tls, client_hello("alpha.jit.test"), 0.05)
        # Each was cut at proxy.first_data_timeout (1 s), long before its last byte.
        assert trio.current_time() - start < 8
        assert d.shared.closed == {("web", "timeout"): 1, ("tls", "timeout"): 1}
        assert nothing_booted(d)


async def test_garbage_and_unknown_names_boot_nothing_and_leak_nothing(
    tmp_path: Path, block: str
) -> None:
    addr = f"{block}.1"
    web, tls = free_port(addr), free_port(addr)
    async with running(load(config(tmp_path, addr, web, tls))) as d:
        before = fds()
        garbage = [b"\x00" * 64, b"\xff\xfe garbage\r\n\r\n", b"GET\r\n\r\n", os.urandom(512),
                   b"\x16\x03\x01\x40\x00" + os.urandom(300)]
        limit = trio.CapacityLimiter(64)
        sent = 0

        async def one(port: int, data: bytes) -> None:
            nonlocal sent
            async with limit:
                try:
                    stream = await trio.open_tcp_stream(addr, port)
                    async with stream:
                        await stream.send_all(data)
                        with trio.move_on_after(5):
                            while await stream.receive_some(4096):
                                pass
                except OSError:
                    pass  # a reset after a refusal with our bytes unread
                sent += 1

        with trio.fail_after(120):  # 5,000 garbage connections, bounded in time
            async with trio.open_nursery() as nursery:
                for i in range(5000):
                    nursery.start_soon(one, (web, tls)[i % 2], garbage[i % len(garbage)])
                # A flood of unknown names, both ways.
                for i in range(500):
                    nursery.start_soon(one, web, b"GET / HTTP/1.1\r\nHost: n%d.jit.test\r\n\r\n"
                                       % i)
                    nursery.start_soon(one, tls, client_hello(f"n{i}.jit.test"))
        assert sent == 6000
        await wait_until(lambda: sum(d.shared.closed.values()) == 6000, what="all counted")
        closed = d.shared.closed
        assert closed[("web", "unknown_name")] == 500 and closed[("tls", "unknown_name")] == 500
        assert set(closed) <= {("web", "not_http"), ("tls", "not_tls"), ("web", "unknown_name"),
                               ("tls", "unknown_name"), ("web", "too_big"), ("tls", "too_big"),
                               ("web", "timeout"), ("tls", "timeout")}
        assert d.shared.routed == {} and nothing_booted(d)
        await wait_until(lambda: d.proxy.open == 0, what="every slot released")
        await wait_until(lambda: fds() <= before + 2, what="descriptors back")
        # The daemon lives and serves.
        stream = await trio.open_tcp_stream(addr, web)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: alpha.jit.test\r\n"
                                  b"Connection: close\r\n\r\n")
            got = b""
            with trio.fail_after(20):
                while chunk := await stream.receive_some(4096):
                    got += chunk
        assert b"Hello from alpha" in got


pytestmark = pytest.mark.slow
