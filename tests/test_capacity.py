"""Capacity and admission with real processes, real DNS and the real proxy on loopback: the
host budget, eviction order, the admission queue, max_booting and wake limits."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.config import Config
from jitlaunch.errors import AdmissionRefused
from jitlaunch.lifecycle.state import State

from .conftest import (
    PYTHON,
    alive,
    answers,
    config_text,
    http_get,
    load,
    qemus,
    query_tcp,
    query_udp,
    running,
    wait_until,
)
from .helpers import get, host, pid, qemu_service, scrape, services
from .helpers import instance_state as state

# Sleeps, then serves like the demo: a boot that takes a while.
SLOW = """
import runpy, sys, time
time.sleep(float(sys.argv.pop(1)))
runpy.run_module("jitlaunch.demo_http", run_name="__main__")
"""


async def test_eviction_takes_the_least_recently_active_idle_instance(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, services(block, "a b c"), top=host(max_instances=2)))
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        for name in ("a", "b"):
            await query_udp(dns, f"{name}.jit.test")
            await sup.acquire(name)
        pid_a, pid_b = pid(sup, "a"), pid(sup, "b")
        await query_udp(dns, "a.jit.test")  # a is active again: b is the least recent
        # A connection to c's front wakes it: b is evicted (its process gone), a stays.
        reply = await http_get(f"{block}.3", 8080)
        assert b" 200 OK" in reply and b"Hello from c" in reply
        assert not alive(pid_b) and alive(pid_a)
        assert state(sup, "b") is None and state(sup, "a") is State.READY
        assert sup.services["b"].stops == {("evicted", "destroy"): 1}
        assert sup.admission["evicted"] == 1 and sup.admission["admitted"] == 3
        samples = await scrape(d)
        assert get(samples, "jitlaunch_admission_total", outcome="evicted") == 1
        assert get(samples, "jitlaunch_admission_total", outcome="admitted") == 3
        assert get(samples, "jitlaunch_host_budget", limit="max_instances") == 2
        assert get(samples, "jitlaunch_admission_queue") == 0
        assert get(samples, "jitlaunch_stops_total", service="b", reason="evicted", mode="destroy") == 1


async def test_pinned_and_connected_instances_are_never_evicted(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, services(block, "a b c", extra="a:pinned = true"),
                           top=host(max_instances=2, queue_timeout="20s")))
    async with running(cfg) as d:
        sup = d.supervisor
        await sup.acquire("a")  # pinned, and the least recently active
        await sup.acquire("b")
        pid_a, pid_b = pid(sup, "a"), pid(sup, "b")
        # An open connection to b (its request not finished): b is not idle.
        held = await trio.open_tcp_stream(f"{block}.2", 8080)
        await held.send_all(b"GET / HTTP/1.1\r\n")
        await wait_until(lambda: sup.services["b"].connections == 1)
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def wake_c() -> None:
                got.append(await sup.acquire("c"))

            nursery.start_soon(wake_c)
            await wait_until(lambda: "c" in sup.queue)
            await trio.sleep(0.3)  # long enough for a wrong eviction to have happened
            assert alive(pid_a) and alive(pid_b) and "c" in sup.queue and not got
            assert sup.admission["evicted"] == 0
            await held.aclose()  # b is idle now: it goes, and c starts
        assert state(sup, "c") is State.READY and not alive(pid_b) and alive(pid_a)
        assert sup.admission["evicted"] == 1 and sup.services["b"].stops[("evicted", "destroy")] == 1


async def test_the_queue_is_bounded_and_times_out(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(
        tmp_path, services(block, "a w c", extra="w:answer = \"wait\""),
        top=host(max_instances=1, max_queued=1, queue_timeout="1s"),
    ))
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        await sup.acquire("a")
        sup.connection_opened("a")  # as the proxy does: a is busy, nothing can be evicted
        try:
            async with trio.open_nursery() as nursery:
                replies: list[object] = []

                # Lookups over TCP: proven, so they may wait in the queue (README, "Capacity").
                async def ask_w() -> None:
                    replies.append((await query_tcp(dns, [("w.jit.test", "A")]))[0])
                    replies.append(time.monotonic())

                began = time.monotonic()
                nursery.start_soon(ask_w)
                await wait_until(lambda: "w" in sup.queue)
                # The queue (1) is full: c is refused, and its lookup still gets the front.
                rec = (await query_tcp(dns, [("c.jit.test", "A")]))[0]
                assert answers(rec) == [f"{block}.3"] and rec.rr[0].ttl == 1
                assert sup.admission["refused_full"] == 1 and state(sup, "c") is None
            # w waited a queue_timeout, then its held lookup got SERVFAIL; nothing started.
            rec, when = replies
            assert rec.header.rcode == RCODE.SERVFAIL  # type: ignore[attr-defined]
            assert 0.9 <= when - began < 5  # type: ignore[operator]
            assert sup.admission["refused_timeout"] == 1 and state(sup, "w") is None
            assert not len(sup.queue) and sup.services["w"].boots == 0
        finally:
            sup.connection_closed("a")


async def test_acquire_in_the_queue_is_refused_after_the_timeout(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, services(block, "a b"),
                           top=host(max_instances=1, queue_timeout="0.5s")))
    async with running(cfg) as d:
        sup = d.supervisor
        await sup.acquire("a")
        sup.connection_opened("a")
        try:
            began = trio.current_time()
            try:
                await sup.acquire("b")
            except AdmissionRefused as exc:
                assert "queue timeout of 0.5 s" in str(exc)
            else:
                raise AssertionError("b was started on a full host")
            assert 0.5 <= trio.current_time() - began < 3
        finally:
            sup.connection_closed("a")


async def test_max_booting_bounds_concurrent_boots_and_boot_time_starts_at_the_boot(
    tmp_path: Path, block: str
) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    slow = f"{PYTHON} {script} 0.5 --address {{address}} --port {{port}} --name {{name}}"
    cfg = load(config_text(
        tmp_path, services(block, "a b c", extra="boot_timeout = \"1.2s\"", command=slow),
        top=host(max_booting=1),
    ))
    async with running(cfg) as d:
        sup = d.supervisor
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sum(state(sup, n) is State.STARTING for n in "abc"))
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            began = trio.current_time()
            async with trio.open_nursery() as boots:
                for n in "abc":
                    boots.start_soon(sup.acquire, n)
            took = trio.current_time() - began
            nursery.cancel_scope.cancel()
        # One at a time: the last one waited for two boots and still had its 1.2 s to boot.
        assert peak == 1
        assert all(state(sup, n) is State.READY for n in "abc")
        assert sup.admission["queued"] == 2 and sum(rt.boot_failures for rt in sup.services.values()) == 0
        assert took >= 3 * 0.5 > 1.2


async def test_wake_limits_per_source_prefix(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(
        tmp_path, services(block, "a b c w", extra="w:answer = \"wait\""),
        top=host(wake="rate = 0.001\nburst = 2"),
    ))
    async with running(cfg) as d:
        sup = d.supervisor
        dns = ("127.0.0.1", d.dns_endpoints[0].port)
        # Lookups over TCP: proven, so they count on their source's prefix.
        for name in ("a", "b"):
            rec = (await query_tcp(dns, [(f"{name}.jit.test", "A")]))[0]
            assert answers(rec) == [f"{block}.{'ab'.index(name) + 1}"]
        await wait_until(lambda: state(sup, "a") is State.READY and state(sup, "b") is State.READY)
        # The source's prefix has used its burst: c is answered (its front) but not started,
        # a wait-mode service gets SERVFAIL at once, a connection to c's front is closed.
        rec = (await query_tcp(dns, [("c.jit.test", "A")]))[0]
        assert answers(rec) == [f"{block}.3"] and state(sup, "c") is None
        rec = (await query_tcp(dns, [("w.jit.test", "A")]))[0]
        assert rec.header.rcode == RCODE.SERVFAIL  # type: ignore[attr-defined]
        stream = await trio.open_tcp_stream(f"{block}.3", 8080)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""
        assert sup.admission["wake_limited"] == 3 and state(sup, "c") is None
        # Lookups for running services are never limited.
        for _ in range(20):
            await query_udp(dns, "a.jit.test")
        assert sup.admission["wake_limited"] == 3 and sup.wake.limited == 3
        # A UDP lookup is unproven: it takes from the bucket all unproven sources share
        # (test_proven.py), not from this prefix's, and there is room: c starts.
        await query_udp(dns, "c.jit.test")
        assert state(sup, "c") is not None and sup.wake.limited == 3
        # The daemon's own start (no source) is never limited.
        await sup.acquire("c")


async def test_the_global_buffer_cap_closes_what_would_pass_it(tmp_path: Path, block: str) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    slow = f"{PYTHON} {script} 1.0 --address {{address}} --port {{port}} --name {{name}}"
    cfg = load(config_text(tmp_path, services(block, "a b", command=slow),
                           top="[proxy]\nmax_buffer_total = 100000\n"))
    pad = b"a" * 40000
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + pad + b"\r\nConnection: close\r\n\r\n"
    async with running(cfg) as d:
        proxy = d.proxy
        streams = []
        try:
            for name in ("a", "b"):  # two services booting, 2 x 40 KB held: under the cap
                s = await trio.open_tcp_stream(f"{block}.{'ab'.index(name) + 1}", 8080)
                streams.append(s)
                await s.send_all(request)
            await wait_until(lambda: proxy.buffered == 2 * len(request))
            # A third connection's 40 KB would pass the cap of 100,000: it is closed.
            third = await trio.open_tcp_stream(f"{block}.1", 8080)
            async with third:
                await third.send_all(request)
                with trio.fail_after(5):
                    try:
                        assert await third.receive_some(100) == b""
                    except trio.BrokenResourceError:
                        pass  # a reset: closed with bytes unread
            assert proxy.closed[("a", "buffer_total")] == 1
            assert d.supervisor.services["a"].instance.state is State.STARTING  # type: ignore[union-attr]
            # The two held ones are served once their instances are ready.
            for s in streams:
                data = b""
                with trio.fail_after(15):
                    while chunk := await s.receive_some(65536):
                        data += chunk
                assert b" 200 OK" in data
            assert proxy.buffered == 0
        finally:
            for s in streams:
                await s.aclose()


@pytest.fixture
def qstate(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    leaked = qemus(tmp_path)
    for p in leaked:
        os.kill(p, signal.SIGKILL)
    assert not leaked, "QEMU processes leaked"


async def test_a_saved_state_survives_a_daemon_restart(qstate: Path, block: str) -> None:
    def cfg(memory: int) -> Config:
        return load(config_text(qstate, qemu_service(
            f"{block}.1", extra='stop = "save"\nidle_timeout = "1s"', qemu=f"memory = {memory}")))

    saved = qstate / "saved" / "uk.state"
    async with running(cfg(16)) as d:
        await d.supervisor.acquire("uk")
        await wait_until(lambda: state(d.supervisor, "uk") is State.SAVED and saved.exists())
    # The next daemon on the same state directory keeps it, and restores it on a request.
    async with running(cfg(16)) as d:
        assert saved.exists()
        inst = await d.supervisor.acquire("uk")
        assert inst.handle is not None and inst.handle.wake == "restore"
        assert b" 200 OK" in await http_get(f"{block}.1", 18080)
        await wait_until(lambda: state(d.supervisor, "uk") is State.SAVED and saved.exists())
    # With other QEMU settings it cannot be restored: deleted, and a fresh boot.
    async with running(cfg(32)) as d:
        inst = await d.supervisor.acquire("uk")
        assert inst.handle is not None and inst.handle.wake == "cold" and not saved.exists()
