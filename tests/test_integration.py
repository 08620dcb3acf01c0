"""The daemon in-process on loopback, with real sockets and real child processes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.daemon import Daemon
from jitlaunch.lifecycle.state import State

from .conftest import (
    DEMO,
    PYTHON,
    alive,
    answers,
    children_of,
    config_text,
    http_get,
    load,
    query_tcp,
    query_udp,
    running,
    wait_until,
)


def service(name: str, front: str, command: str = DEMO, extra: str = "", process: str = "") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [18080]
{extra}
[service.process]
command = "{command}"
{process}
"""


def dns_server(daemon) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    ep = daemon.dns_endpoints[0]
    return ep.host, ep.port


async def test_udp_and_tcp_lookups_hand_over(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(
        "hello", f"{block}.1", process=f'subnet = "{block}.128/25"')))
    async with running(cfg) as d:
        server = dns_server(d)
        first = await query_udp(server, "hello.jit.test")
        assert first.header.rcode == RCODE.NOERROR
        assert answers(first) == [f"{block}.1"]
        assert first.rr[0].ttl == 1
        await d.supervisor.acquire("hello")
        tcp = await query_tcp(server, [("hello.jit.test", "A"), ("HeLLo.JIT.test", "A"),
                                       ("nope.jit.test", "A")])
        assert answers(tcp[0]) == [f"{block}.129"]
        assert tcp[0].rr[0].ttl == 30
        assert str(tcp[1].q.qname) == "HeLLo.JIT.test."
        assert answers(tcp[1]) == [f"{block}.129"]
        assert tcp[2].header.rcode == RCODE.NXDOMAIN
        body = await http_get(f"{block}.129", 18080)
        assert b"Hello from hello" in body


async def test_concurrent_lookups_share_one_boot(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1", extra='answer = "wait"')))
    async with running(cfg) as d:
        server = dns_server(d)
        results: list[object] = []

        async def one() -> None:
            results.append(await query_udp(server, "hello.jit.test"))

        async with trio.open_nursery() as n:
            for _ in range(50):
                n.start_soon(one)
        rt = d.supervisor.services["hello"]
        assert len(results) == 50
        assert all(r.header.rcode == RCODE.NOERROR for r in results)  # type: ignore[attr-defined]
        assert rt.boots == 1
        assert rt.instance is not None and rt.instance.state is State.READY
        # Exactly one demo process runs for the service.
        assert len(children_of(os.getpid())) == 1


async def test_connection_to_stopped_service_is_buffered_then_served(
    tmp_path: Path, block: str
) -> None:
    # The request is sent before the instance is even started: it must be buffered.
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1", extra='answer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["hello"]
        assert rt.instance is None
        stream = await trio.open_tcp_stream(f"{block}.1", 18080)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await stream.send_eof()  # half-close: the reply must still come back
            assert rt.instance is not None
            data = b""
            with trio.fail_after(15):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert b"Hello from hello" in data
        assert rt.boots == 1


async def test_idle_teardown_never_while_connection_open(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(
        "hello", f"{block}.1", extra='answer = "proxy"\nidle_timeout = "300ms"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["hello"]
        stream = await trio.open_tcp_stream(f"{block}.1", 18080)
        async with stream:
            # An open keep-alive connection with no traffic at all for well over the timeout.
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(15):
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            inst = rt.instance
            assert inst is not None and inst.state is State.READY
            pid = inst.handle.pid  # type: ignore[union-attr]
            deadline = trio.current_time() + 1.0
            while trio.current_time() < deadline:  # watched, not slept: it must stay up
                assert rt.instance is inst and inst.state is State.READY
                await trio.sleep(0.05)
            assert rt.idle_stops == 0
        # Closed: now it goes idle and is stopped, its process gone.
        await wait_until(lambda: rt.instance is None)
        assert rt.idle_stops == 1
        assert inst.state is State.STOPPED
        assert not alive(pid)


async def test_failed_boot_servfail_and_backoff(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service(
        "broken", f"{block}.1", command="false",
        extra='answer = "wait"\nretry_backoff = "400ms"\nretry_backoff_max = "2s"')))
    async with running(cfg) as d:
        server = dns_server(d)
        rt = d.supervisor.services["broken"]
        first = await query_udp(server, "broken.jit.test")
        assert first.header.rcode == RCODE.SERVFAIL
        assert rt.boots == 1 and rt.boot_failures == 1
        assert "exited with status 1 before it was ready" in (rt.last_error or "")
        # Within the backoff: SERVFAIL again, without a new boot.
        again = await query_udp(server, "broken.jit.test")
        assert again.header.rcode == RCODE.SERVFAIL
        assert rt.boots == 1
        # A connection to the front is closed, not left hanging.
        stream = await trio.open_tcp_stream(f"{block}.1", 18080)
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""
        # After the backoff the next lookup tries again, and the backoff doubles.
        await wait_until(lambda: trio.current_time() >= rt.retry_at)
        third = await query_udp(server, "broken.jit.test")
        assert third.header.rcode == RCODE.SERVFAIL
        assert rt.boots == 2 and rt.failures == 2
        assert rt.retry_at - trio.current_time() > 0.5  # 800 ms this time


async def test_instance_that_dies_is_noticed_and_replaced(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        server = dns_server(d)
        first = await d.supervisor.acquire("hello")
        pid = first.handle.pid  # type: ignore[union-attr]
        assert pid is not None
        os.kill(pid, 9)
        rt = d.supervisor.services["hello"]
        await wait_until(lambda: rt.instance is None)
        assert rt.deaths == 1
        await query_udp(server, "hello.jit.test")
        second = await d.supervisor.acquire("hello")
        assert second is not first and second.handle.pid != pid  # type: ignore[union-attr]


async def test_no_child_survives_the_daemon(tmp_path: Path, block: str) -> None:
    # The command leaves a grandchild behind; stopping the group must take it too.
    cmd = f"sh -c 'sleep 300 & exec {DEMO}'".replace('"', '\\"')
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1", command=cmd)))
    async with running(cfg) as d:
        await d.supervisor.acquire("hello")
        kids = children_of(os.getpid())
        assert len(kids) == 2
    assert not any(alive(k) for k in kids)
    assert children_of(os.getpid()) == []


async def test_no_child_survives_an_exception(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom"), flatten_subgroups=True):
        # (strict: the default only from trio 0.25 on; Debian 12 has 0.22)
        async with trio.open_nursery(strict_exception_groups=True) as nursery:
            daemon = Daemon(cfg)
            await nursery.start(daemon.serve)
            await daemon.supervisor.acquire("hello")
            kids = children_of(os.getpid())
            assert len(kids) == 1
            raise RuntimeError("boom")
    assert not any(alive(k) for k in kids)


async def test_sigterm_stops_every_instance(tmp_path: Path, block: str) -> None:
    conf = tmp_path / "jl.toml"
    text = config_text(tmp_path, service("hello", f"{block}.1", extra='answer = "wait"'))
    conf.write_text(text.replace("127.0.0.1:0", f"{block}.53:5353"))
    with open(tmp_path / "log", "wb") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile
        )
    try:
        async def resolved() -> bool:
            try:
                with trio.move_on_after(0.5):
                    rec = await query_udp((f"{block}.53", 5353), "hello.jit.test")
                    return rec.header.rcode == RCODE.NOERROR
            except OSError:
                return False
            return False

        with trio.fail_after(20):
            while not await resolved():
                await trio.sleep(0.05)
        kids = children_of(proc.pid)
        assert len(kids) == 1
        proc.send_signal(15)
        with trio.fail_after(20):
            code = await proc.wait()
        assert code == 0
        log = (tmp_path / "log").read_text()
        assert ("SIGTERM: draining open connections for up to 2 s (daemon.drain_timeout), "
                "then stopping every instance") in log
        assert not any(alive(k) for k in kids)
    finally:
        proc.kill()
        await proc.wait()


async def test_leftovers_of_a_killed_daemon_are_killed_at_the_next_start(
    tmp_path: Path, block: str
) -> None:
    """A daemon killed outright cannot stop its children (nor their own children); the next
    daemon on the same state directory finds them by their marker and kills them."""
    cmd = f"sh -c 'sleep 300 & exec {DEMO}'".replace('"', '\\"')
    conf = tmp_path / "jl.toml"
    text = config_text(tmp_path, service("hello", f"{block}.1", command=cmd, extra='answer = "wait"'))
    conf.write_text(text.replace("127.0.0.1:0", f"{block}.53:5353"))
    with open(tmp_path / "log", "wb") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile
        )
    try:
        with trio.fail_after(20):
            while True:
                with trio.move_on_after(0.5):
                    try:
                        if (await query_udp((f"{block}.53", 5353), "hello.jit.test")).rr:
                            break
                    except OSError:
                        pass
                await trio.sleep(0.05)
        orphans = children_of(proc.pid)
        assert len(orphans) == 2  # the instance and the sleep it left behind
        proc.kill()  # SIGKILL: the daemon stops nothing
        await proc.wait()
        assert all(alive(k) for k in orphans)
    finally:
        proc.kill()
        await proc.wait()
    # A daemon on another state directory leaves them alone; the owner's next start does not.
    other = load(config_text(tmp_path / "other", service("hello", f"{block}.2")))
    async with running(other):
        assert all(alive(k) for k in orphans)
    try:
        async with running(load(text)):
            await wait_until(lambda: not any(alive(k) for k in orphans))
    finally:
        for k in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, 9)
