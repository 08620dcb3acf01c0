"""Handed-over instances in use are neither idle nor evicted (issue 16 item 9, issue 17): the
daemon counts the traffic its backends see (lifecycle/activity.py, backends/traffic.py).

Real processes with addresses of their own on loopback, clients that talk to those addresses
directly as a client does once DNS handed them over, and the real daemon."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import trio

from jitlaunch.lifecycle import activity
from jitlaunch.lifecycle.activity import TrafficWatch
from jitlaunch.lifecycle.state import State

from .conftest import (
    KERNEL,
    PYTHON,
    ROOT,
    answers,
    config_text,
    http_get,
    load,
    needs_netns,
    query_udp,
    running,
    wait_until,
)
from .helpers import FETCH_LOOP, get, host, scrape, services

#: Between a client's fetches (the issue's reproduction).
EVERY = 0.25


def handoff(block: str, names: str, idle: str = "1s") -> str:
    """Process services with addresses of their own ({block}.{64 * i}/26), handed over."""
    out = services(block, names).replace("idle_timeout = 60", f'idle_timeout = "{idle}"')
    parts = out.split("[service.process]")
    for i in range(1, len(parts)):
        parts[i] = f'\nsubnet = "{block}.{64 * i}/26"' + parts[i]
    return "[service.process]".join(parts)


class Client:
    """Fetches ``/`` from ``address`` every EVERY seconds until stopped; counts failures."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.fetches = 0
        self.failures: list[str] = []
        self.last = -math.inf
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            while True:
                try:
                    reply = await http_get(self.address, 8080)
                    if b" 200 OK" not in reply:
                        self.failures.append(reply[:40].decode(errors="replace"))
                except OSError as exc:
                    self.failures.append(f"{exc}")
                self.fetches += 1
                self.last = trio.current_time()
                await trio.sleep(EVERY)


async def handed_over(d, name: str) -> str:  # type: ignore[no-untyped-def]
    """Look ``name`` up until DNS hands the instance's address over; return it."""
    dns = ("127.0.0.1", d.dns_endpoints[0].port)
    await d.supervisor.acquire(name)
    reply = await query_udp(dns, f"{name}.jit.test")
    (address,) = answers(reply)
    inst = d.supervisor.services[name].instance
    assert inst.handle.address == address  # the instance's own, not the front
    return address


async def test_an_instance_in_use_is_never_stopped_while_its_client_fetches(
    tmp_path: Path, block: str
) -> None:
    """A client fetching from the handed-over address every 0.25 s for three idle timeouts:
    no stop and no refused connection (before: stopped after 1 s, fetches refused). Once the
    client stops, the instance is stopped an idle_timeout after its last fetch, as before."""
    cfg = load(config_text(tmp_path, handoff(block, "a")))
    async with running(cfg) as d:
        rt = d.supervisor.services["a"]
        address = await handed_over(d, "a")
        inst = rt.instance
        client = Client(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            until = trio.current_time() + 3 * cfg.services[0].idle_timeout
            while trio.current_time() < until:  # watched, not slept: it must stay up
                assert rt.instance is inst and inst.state is State.READY, client.failures
                await trio.sleep(0.05)
            client.scope.cancel()
        assert not client.failures and client.fetches >= 8
        assert rt.idle_stops == 0 and rt.boots == 1
        samples = await scrape(d)
        assert get(samples, "jitlaunch_traffic_samples_total", service="a", result="moved") >= 2
        assert get(samples, "jitlaunch_traffic_samples_total", service="a", result="unknown") == 0
        await wait_until(lambda: rt.instance is None, timeout=10)
        stopped = trio.current_time()
        assert rt.idle_stops == 1
        # Idle for its idle_timeout after the last fetch (give or take a sample), not before.
        assert stopped - client.last >= cfg.services[0].idle_timeout - 0.05
        assert stopped - client.last < cfg.services[0].idle_timeout + 2 * activity.SAMPLE_INTERVAL


async def test_an_instance_in_use_is_not_evicted(tmp_path: Path, block: str) -> None:
    """Host budget of one instance: a is in use by a client at its own address; a start of b
    waits in the queue and a is not evicted. Once the client stops, a is evicted within the
    in-use window (a sample notices, and pumps the queue) and b starts."""
    cfg = load(config_text(tmp_path, handoff(block, "a b", idle="60s"),
                           top=host(max_instances=1, queue_timeout="30s")))
    async with running(cfg) as d:
        sup = d.supervisor
        address = await handed_over(d, "a")
        inst = sup.services["a"].instance
        client = Client(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            # In use for a while: samples a second apart have seen its traffic.
            await wait_until(lambda: client.fetches >= 2 / EVERY)
            got: list[object] = []

            async def wake_b() -> None:
                got.append(await sup.acquire("b"))

            nursery.start_soon(wake_b)
            await wait_until(lambda: "b" in sup.queue)
            until = trio.current_time() + 2 * activity.IN_USE_WINDOW
            while trio.current_time() < until:
                assert sup.services["a"].instance is inst and inst.state is State.READY
                assert "b" in sup.queue and not got
                await trio.sleep(0.05)
            assert sup.admission["evicted"] == 0 and not client.failures
            client.scope.cancel()
            stopped = trio.current_time()
            await wait_until(lambda: bool(got), timeout=activity.IN_USE_WINDOW + 10)
        assert trio.current_time() - stopped >= activity.IN_USE_WINDOW - 1
        assert sup.admission["evicted"] == 1
        assert sup.services["a"].stops[("evicted", "destroy")] == 1
        assert sup.services["b"].instance is not None
        assert sup.services["b"].instance.state is State.READY


async def test_an_instance_in_use_waits_out_the_queue(tmp_path: Path, block: str) -> None:
    """The same pressure with a short queue_timeout: b is refused, a never evicted."""
    cfg = load(config_text(tmp_path, handoff(block, "a b", idle="60s"),
                           top=host(max_instances=1, queue_timeout="2s")))
    async with running(cfg) as d:
        sup = d.supervisor
        address = await handed_over(d, "a")
        inst = sup.services["a"].instance
        client = Client(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await wait_until(lambda: client.fetches >= 2 / EVERY)
            assert sup.request("b") is not None and "b" in sup.queue
            await wait_until(lambda: "b" not in sup.queue, timeout=10)
            client.scope.cancel()
        assert sup.admission["refused_timeout"] == 1 and sup.admission["evicted"] == 0
        assert sup.services["a"].instance is inst and inst.state is State.READY
        assert not client.failures


async def test_the_health_probe_is_not_a_client(tmp_path: Path, block: str) -> None:
    """Probes every 0.2 s connect to the instance's address: it still goes idle on time."""
    text = handoff(block, "a").replace('idle_timeout = "1s"',
                                       'idle_timeout = "1s"\nhealth_interval = "200ms"')
    cfg = load(config_text(tmp_path, text))
    async with running(cfg) as d:
        rt = d.supervisor.services["a"]
        await handed_over(d, "a")
        ready = trio.current_time()
        await wait_until(lambda: rt.instance is None, timeout=10)
        assert rt.idle_stops == 1
        assert trio.current_time() - ready < cfg.services[0].idle_timeout + 2


async def test_a_counter_that_cannot_be_read_is_unknown_not_busy(
    tmp_path: Path, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's table cannot be read: logged once, and the instance is judged on lookups
    and proxied traffic alone, as before (stopped after idle_timeout, client or not), never
    kept for ever."""
    cfg = load(config_text(tmp_path, handoff(block, "a")))
    async with running(cfg) as d:
        table = d.backends["process"].sockets

        def unreadable(path: str) -> dict[str, list[tuple[str, str, int]]]:
            raise PermissionError(13, "Permission denied", path)

        table._read = unreadable
        rt = d.supervisor.services["a"]
        address = await handed_over(d, "a")
        client = Client(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await wait_until(lambda: rt.instance is None, timeout=10)
            client.scope.cancel()
        assert rt.idle_stops == 1
        samples = await scrape(d)
        assert get(samples, "jitlaunch_traffic_samples_total", service="a", result="unknown") >= 1
        assert get(samples, "jitlaunch_traffic_samples_total", service="a", result="moved") == 0
        lines = [r.getMessage() for r in caplog.records if "cannot read its traffic" in r.message]
        assert len(lines) == 1 and "Permission denied" in lines[0], lines


# ---- the watch itself, on given times ------------------------------------------------------


def test_watch_baseline_noise_reset_and_window() -> None:
    w = TrafficWatch(noise=1)
    assert not w.note(10, 0.0)  # the first sample is a baseline
    assert not w.in_use(0.0) and not w.judged(0.0)
    assert not w.note(11, 1.0)  # within the noise
    assert w.judged(1.0) and not w.judged(1.5)
    assert not w.note(12, 2.0)  # noise does not add up
    assert w.note(14, 3.0)  # moved: activity at 3.0
    assert w.in_use(3.0 + activity.IN_USE_WINDOW - 0.01)
    assert not w.in_use(3.0 + activity.IN_USE_WINDOW)
    assert not w.note(2, 4.0)  # a reset: a new baseline
    assert w.compared_at == 3.0
    assert w.note(5, 5.0)
    assert w.next_sample == 5.0 + activity.SAMPLE_INTERVAL and not w.due(5.5) and w.due(6.0)


def test_watch_allows_for_probes_over_two_samples() -> None:
    w = TrafficWatch(noise=0, per_probe=2)
    assert not w.note(0, 0.0)
    w.probe_started()
    w.probe_started()
    assert not w.note(3, 1.0)  # two probes: up to 4
    assert not w.note(7, 2.0)  # their last packets came late: still allowed for
    assert w.note(8, 3.0)  # no probe since: a client
    w.probe_started()
    assert w.note(11, 4.0)  # more than one probe's worth


def test_watch_unknown_is_neither_busy_nor_a_baseline() -> None:
    w = TrafficWatch()
    w.note(1, 0.0)
    w.failed(1.0)
    assert w.failing and w.judged(5.0) and not w.in_use(1.0)
    assert w.next_sample == 1.0 + activity.SAMPLE_INTERVAL
    assert not w.note(9, 2.0)  # after a failure: a baseline, not activity
    assert not w.failing and not w.judged(2.0)
    assert w.active and not w.note(None, 3.0) and not w.active  # no counter: sampling ends
    assert w.judged(9.0)


# ---- bridge networking: a unikernel on a tap, in a network namespace of the test's own -----


@pytest.mark.slow
@needs_netns
async def test_bridge_instance_in_use_stays_up_then_goes_idle(
    state: Path, netns: list[str],
) -> None:
    """conf/bridge.toml with idle_timeout 2 s and a health probe every second: a client in the
    namespace fetches from the handed-over address for 8 s, and the instance is not stopped
    (its tap's counters are its activity; the probes' own packets are not); once the client
    stops, it is stopped for idleness within a few seconds."""
    text = (ROOT / "conf" / "bridge.toml").read_text().replace("pool = 1", "")
    text = text.replace('idle_timeout = "5m"', 'idle_timeout = "2s"\nhealth_interval = "1s"')
    assert 'idle_timeout = "2s"' in text
    text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
    conf = state / "bridge.toml"
    conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
    daemon_log = state / "daemon.log"
    proc = None
    try:
        with open(daemon_log, "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*netns, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile)
        await wait_until(lambda: b"serving" in daemon_log.read_bytes(), timeout=30)
        woke = await trio.run_process(
            [*netns, PYTHON, "-m", "jitlaunch.cli", "probe", "hello.jit.test", "--server",
             "127.0.0.1:5300", "--port", "80"], capture_stdout=True, capture_stderr=True,
            check=False)
        assert woke.returncode == 0, woke.stderr.decode() + daemon_log.read_text()
        res = await trio.run_process([*netns, PYTHON, "-c", FETCH_LOOP, "8"],
                                     capture_stdout=True, capture_stderr=True, check=False)
        ended = trio.current_time()
        assert res.returncode == 0, res.stderr.decode()
        fetches, failed, _ = res.stdout.decode().split(" ", 2)
        log = daemon_log.read_text()
        assert int(fetches) >= 8 and failed == "0", res.stdout.decode() + log
        assert "idle for" not in log and log.count("ready in") == 1, log
        await wait_until(lambda: b"hello#1 idle for 2 s" in daemon_log.read_bytes(), timeout=15)
        # 2 s after the last fetch, give or take a sample, the probe allowance, and load.
        assert trio.current_time() - ended < 2 + 6
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

