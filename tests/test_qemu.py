"""The qemu backend with the bundled unikernel: real QEMU processes, real DNS and TCP."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.backends.qemu import kvm_usable
from jitlaunch.lifecycle.state import State

from .conftest import KERNEL, ROOT, alive, config_text, http_get, load, qemus, query_udp, running, wait_until
from .helpers import dns_server as server
from .helpers import qemu_service as service


async def test_default_config_boots_the_unikernel_on_lookup(state: Path, block: str) -> None:
    text = (ROOT / "conf" / "default.toml").read_text()
    text = text.replace("127.0.0.1:5300", "127.0.0.1:0").replace("127.77.0.", f"{block}.")
    text = text.replace("[daemon]", f'[daemon]\nstate_dir = "{state}"')
    cfg = load(text, str(ROOT / "conf" / "default.toml"))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "hello.jit.test")
        assert rec.header.rcode == RCODE.NOERROR
        addr = str(rec.rr[0].rdata)
        assert addr == f"{block}.1"
        body = await http_get(addr, 8080)
        assert body.startswith(b"HTTP/1.1 200") and b"hello" in body
        inst = d.supervisor.services["hello"].instance
        assert inst is not None and inst.state is State.READY and inst.service.backend == "qemu"


@pytest.mark.parametrize("mode", ["destroy", "shutdown", "pause", "save"])
async def test_idle_teardown_in_every_stop_mode(state: Path, block: str, mode: str) -> None:
    cfg = load(config_text(state, service(
        f"{block}.1", extra=f'idle_timeout = "500ms"\nstop = "{mode}"\nanswer = "proxy"',
        qemu='grace = "1s"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        first = await http_get(f"{block}.1", 18080)
        assert first.startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and inst.handle is not None
        pid = inst.handle.pid
        assert pid is not None
        await wait_until(lambda: inst.state in (State.STOPPED, State.SAVED), timeout=20)
        assert rt.idle_stops == 1
        if mode == "pause":
            assert inst.state is State.SAVED and alive(pid)  # paused, still there
        else:
            await wait_until(lambda: not alive(pid))
        if mode == "save":
            assert inst.state is State.SAVED
            assert (state / "saved" / "uk.state").exists()
        # The next request is served by the resumed, restored or new instance.
        again = await http_get(f"{block}.1", 18080)
        assert again.startswith(b"HTTP/1.1 200") and b"uk" in again
        now = rt.instance
        assert now is not None and now.handle is not None
        if mode == "pause":
            assert now is inst and now.handle.pid == pid
        if mode == "save":
            assert now is inst and now.handle.pid != pid
            assert not (state / "saved" / "uk.state").exists()
            log = (state / "logs" / "uk.log").read_text(errors="replace")
            assert "-incoming" in log


async def served_by(d, block: str, pid: int) -> None:  # type: ignore[no-untyped-def]
    """A request through the front is answered, by the instance with QEMU pid ``pid``."""
    body = await http_get(f"{block}.1", 18080)
    assert body.startswith(b"HTTP/1.1 200")
    inst = d.supervisor.services["uk"].instance
    assert inst is not None and inst.handle is not None and inst.handle.pid == pid


async def test_warm_pool_hit(state: Path, block: str) -> None:
    cfg = load(config_text(state, service(
        f"{block}.1", extra="max_instances = 2", qemu="pool = 1")))
    async with running(cfg) as d:
        backend = d.backends["qemu"]
        pool = backend.pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1)
        pooled_pid = pool[0].pid
        await served_by(d, block, pooled_pid)
        await wait_until(lambda: len(pool) == 1 and pool[0].pid != pooled_pid)  # refilled
        assert len(qemus(state)) == 2


async def test_pool_fill_is_retried_after_a_failure(state: Path, block: str) -> None:
    """A pool member that fails to boot is tried again after the backoff, not only when a
    lookup takes one (nothing would ever take from an empty pool)."""
    kernel = state / "k.elf"
    kernel.write_bytes(b"not a kernel" * 100)  # QEMU: "invalid kernel header", exits at once
    text = service(f"{block}.1", extra='max_instances = 2\nretry_backoff = "200ms"', qemu="pool = 1")
    cfg = load(config_text(state, text.replace(str(KERNEL), str(kernel))))
    async with running(cfg) as d:
        logs = [state / "logs" / "uk.pool.log", state / "logs" / "uk.pool.log.1"]
        await wait_until(lambda: any(p.exists() and b"invalid kernel header" in p.read_bytes()
                                     for p in logs))
        pool = d.backends["qemu"].pools["uk"]  # type: ignore[attr-defined]
        assert not pool
        kernel.write_bytes(KERNEL.read_bytes())
        await wait_until(lambda: len(pool) == 1)
        pooled_pid = pool[0].pid
        await served_by(d, block, pooled_pid)


async def test_concurrent_lookups_boot_one_vm(state: Path, block: str) -> None:
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "wait"')))
    async with running(cfg) as d:
        results = []

        async def one() -> None:
            results.append(await query_udp(server(d), "uk.jit.test"))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        assert all(r.header.rcode == RCODE.NOERROR for r in results) and len(results) == 20
        assert d.supervisor.services["uk"].boots == 1
        assert len(qemus(state)) == 1


async def test_killed_qemu_is_noticed_and_replaced(state: Path, block: str) -> None:
    cfg = load(config_text(state, service(f"{block}.1")))
    async with running(cfg) as d:
        first = await d.supervisor.acquire("uk")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        os.kill(pid, signal.SIGKILL)
        rt = d.supervisor.services["uk"]
        await wait_until(lambda: rt.instance is None)
        assert rt.deaths == 1
        assert not list((state / "run").glob("*"))  # socket and pid file removed
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200")
        assert rt.instance is not None and rt.instance.handle.pid != pid  # type: ignore[union-attr]


async def test_leftovers_of_a_killed_daemon_are_removed(state: Path, block: str) -> None:
    from .conftest import PYTHON

    conf = state / "c.toml"
    conf.write_text(config_text(state, service(f"{block}.1", extra='answer = "wait"')).replace(
        "127.0.0.1:0", f"{block}.53:5353"))
    with open(state / "first.log", "wb") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile)
    try:
        with trio.fail_after(30):
            while True:
                try:
                    with trio.move_on_after(1):
                        if (await query_udp((f"{block}.53", 5353), "uk.jit.test")).rr:
                            break
                except OSError:
                    pass
                await trio.sleep(0.05)
        orphans = qemus(state)
        assert len(orphans) == 1
        proc.kill()  # SIGKILL: no cleanup at all
        await proc.wait()
        assert alive(orphans[0]) and list((state / "run").glob("*.pid"))
    finally:
        proc.kill()
        await proc.wait()
    # The next daemon, on the same state directory, removes what the first one left.
    cfg = load(config_text(state, service(f"{block}.1")))
    async with running(cfg):
        await wait_until(lambda: not alive(orphans[0]))
        assert not list((state / "run").glob("*"))
    log = (state / "logs").exists()
    assert log


@pytest.mark.skipif(not kvm_usable(), reason="needs /dev/kvm")
async def test_kvm_boot_or_clear_emulation_failure(state: Path, block: str) -> None:
    """With KVM the unikernel boots; if /dev/kvm cannot run it, the failure says so."""
    cfg = load(config_text(state, service(f"{block}.1", accel="kvm", extra='answer = "wait"')))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        rt = d.supervisor.services["uk"]
        if rec.header.rcode == RCODE.NOERROR:
            inst = rt.instance
            assert inst is not None and inst.handle is not None
            assert inst.handle.describe().endswith("kvm")
        else:
            assert rec.header.rcode == RCODE.SERVFAIL
            assert "KVM emulation failure" in (rt.last_error or "")


async def test_auto_accel_falls_back_after_an_emulation_failure(state: Path, block: str) -> None:
    """`accel = "auto"` always ends up serving: with KVM, or TCG after a KVM failure."""
    cfg = load(config_text(state, service(
        f"{block}.1", accel="auto", extra='retry_backoff = "100ms"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        with trio.fail_after(40):
            while True:
                try:
                    body = await http_get(f"{block}.1", 18080)
                    if body.startswith(b"HTTP/1.1 200"):
                        break
                except (OSError, trio.BrokenResourceError):
                    pass
                await trio.sleep(0.1)
        assert rt.instance is not None and rt.instance.handle is not None
        accel = rt.instance.handle.describe().split()[-1]
        assert accel == ("kvm" if kvm_usable() and rt.boot_failures == 0 else "tcg")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to create a network namespace",
)
async def test_bridge_mode_hands_over_inside_a_namespace(state: Path) -> None:
    """Daemon and client inside a namespace of the test's own: the answer hands the
    instance's bridge address over, and the client reaches the unikernel directly."""
    from .conftest import PYTHON

    ns = f"jltest-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    inside = ["ip", "netns", "exec", ns]
    proc = None
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        text = (ROOT / "conf" / "bridge.toml").read_text().replace("pool = 1", "")
        text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
        conf = state / "bridge.toml"
        conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
        with open(state / "daemon.log", "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*inside, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile,
            )

        async def ask() -> str:
            res = await trio.run_process(
                [*inside, "dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
                 "hello.jit.test", "A"], capture_stdout=True, check=False)
            lines = [ln for ln in res.stdout.decode().splitlines() if not ln.startswith(";")]
            return "\n".join(lines).strip()  # empty while the daemon is not up yet

        async def probe() -> str:
            res = await trio.run_process(
                [*inside, PYTHON, "-m", "jitlaunch.cli", "probe", "hello.jit.test", "--server",
                 "127.0.0.1:5300", "--port", "80"], capture_stdout=True, capture_stderr=True,
                check=False)
            assert res.returncode == 0, res.stderr.decode()
            return res.stdout.decode()

        with trio.fail_after(30):
            while not (first := await ask()):
                await trio.sleep(0.05)
        assert first == "127.77.0.1"  # booting: the front address
        with trio.fail_after(30):
            while (addr := await ask()) == "127.77.0.1":
                await trio.sleep(0.05)
        assert addr == "10.77.0.2"  # ready: handed over
        out = await probe()
        assert "hello.jit.test -> 10.77.0.2 (ttl 30)" in out and "HTTP/1.1 200 OK" in out
        ping = await trio.run_process([*inside, "ping", "-c", "1", "-W", "2", addr], check=False,
                                      capture_stdout=True)
        assert ping.returncode == 0
        taps = subprocess.run([*inside, "ip", "-br", "link"], capture_output=True, text=True).stdout
        assert "jlt" in taps and "jl0" in taps
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        taps = subprocess.run([*inside, "ip", "-br", "link"], capture_output=True, text=True).stdout
        assert "jlt" not in taps  # the instance's tap went with it
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize("mode", ["pause", "save"])
async def test_a_requested_stop_then_a_wake_serves(state: Path, block: str, mode: str) -> None:
    """`jitlaunch stop` of a pause or save service, then the next requests: each is served
    by the resumed (restored) instance, which stays up (a stop request of its earlier run
    made every later run stop at once), and a second requested stop waits for its release."""
    cfg = load(config_text(state, service(
        f"{block}.1", extra=f'idle_timeout = "5m"\nstop = "{mode}"\nanswer = "proxy"',
        qemu='grace = "1s"')))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["uk"]
        for round_ in range(3):
            body = await http_get(f"{block}.1", 18080)
            assert body.startswith(b"HTTP/1.1 200"), (round_, body)
            inst = rt.instance
            assert inst is not None and inst.state is State.READY, (round_, inst)
            assert rt.stops[("requested", mode)] == round_
            stopping = sup.stop("uk")
            assert stopping is inst
            with trio.fail_after(20):
                await stopping.run.released.wait()
            assert inst.state is State.SAVED, (round_, inst)
            # jitlaunch status says which: a paused QEMU is still there, a saved one is not.
            assert inst.shown_state == ("paused" if mode == "pause" else "saved")
            assert rt.stops[("requested", mode)] == round_ + 1
        assert rt.boots == 3 and rt.readies == 3


async def test_a_corrupt_saved_state_is_deleted_and_the_request_boots_afresh(
    state: Path, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated saved state: the wake that would restore it is served by a fresh boot, the
    state is deleted (logged with QEMU's words), and no boot fails or backs off."""
    cfg = load(config_text(state, service(
        f"{block}.1", extra='idle_timeout = "5m"\nstop = "save"\nanswer = "proxy"',
        qemu='grace = "1s"')))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = sup.stop("uk")
        assert inst is not None
        with trio.fail_after(20):
            await inst.run.released.wait()
        saved = state / "saved" / "uk.state"
        data = saved.read_bytes()
        assert len(data) > 4096
        saved.write_bytes(data[: len(data) // 3])
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200") and b"uk" in body
        assert not saved.exists() and not saved.with_suffix(".image").exists()
        assert rt.boot_failures == 0 and rt.failures == 0
        now = rt.instance
        assert now is not None and now.state is State.READY
        assert any("restoring the saved state" in r.getMessage() and "failed" in r.getMessage()
                   for r in caplog.records)
