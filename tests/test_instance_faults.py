"""Instances under faults: dead, hung and unreachable instances are noticed, released and
replaced; nothing an instance does ends the daemon. Real processes and real QEMU."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from jitlaunch.backends.base import process_state
from jitlaunch.lifecycle.state import State

from .conftest import DEMO, PYTHON, alive, config_text, http_get, load, running, wait_until
from .test_qemu import image, qemus  # noqa: F401 - image builds the kernel once
from .test_qemu import service as qemu_service

# A listener that stops listening on SIGUSR1 and stays alive: unreachable, but not dead.
DEAF = """
import signal, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
signal.signal(signal.SIGUSR1, lambda *_: s.close())
while True:
    signal.pause()
"""


def service(name: str, front: str, command: str = DEMO, extra: str = "") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [8080]
idle_timeout = 60
{extra}
[service.process]
command = "{command}"
grace = "5s"
"""


def deaf_command(tmp_path: Path) -> str:
    script = tmp_path / "deaf.py"
    script.write_text(DEAF)
    return f"{PYTHON} {script} {{address}} {{port}}"


def wait_reapable(pid: int) -> None:
    """Block (without letting trio run) until our child ``pid`` has exited and waits to be
    reaped (every thread gone): the supervisor must not notice the death through its own
    wait before the test looks. WNOWAIT leaves it for the supervisor to reap."""
    deadline = time.monotonic() + 5
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, f"pid {pid} did not die"
        time.sleep(0.001)


def wait_refused(host: str, port: int) -> None:
    """Block (without letting trio run) until a connect to ``host:port`` is refused."""
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, f"{host}:{port} still accepts"
        try:
            socket.create_connection((host, port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.001)


# ---- the death window -------------------------------------------------------------------------


async def test_a_dead_ready_instance_is_never_handed_out(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        os.kill(pid, signal.SIGKILL)
        wait_reapable(pid)
        # Still READY for the supervisor's own watch (it has not run yet), but dead.
        assert first.state is State.READY and not first.handle.alive()
        got = sup.request("hello")
        assert got is first and first.state is State.STOPPING
        second = await sup.acquire("hello")
        assert second is not first and second.state is State.READY
        assert second.handle is not None and second.handle.pid != pid
        rt = sup.services["hello"]
        assert rt.deaths == 1 and first.cause == "its process is gone"
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")


async def test_report_unreachable_releases_a_just_killed_instance(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        host, port = first.handle.endpoint(8080)
        os.kill(first.handle.pid, signal.SIGKILL)
        # What the proxy sees: a refused connect, before the supervisor has noticed anything.
        wait_refused(host, port)
        assert first.state is State.READY
        await sup.report_unreachable(first, "connect refused")
        # Released before it returned: the next acquire starts a new instance.
        assert first.state is State.STOPPED and first.handle is None
        second = await sup.acquire("hello")
        assert second is not first and sup.services["hello"].deaths == 1


async def test_report_unreachable_keeps_a_healthy_instance(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("hello")
        await sup.report_unreachable(first, "reset before any byte")
        assert first.state is State.READY
        assert await sup.acquire("hello") is first
        rt = sup.services["hello"]
        assert rt.unreachable_reports == 1 and rt.deaths == 0 and rt.hung == 0


async def test_report_unreachable_releases_a_deaf_instance(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("deaf", f"{block}.1", deaf_command(tmp_path))))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("deaf")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        os.kill(pid, signal.SIGUSR1)  # it closes its listener and lives on
        await wait_until(lambda: process_state(pid) == "S")
        await sup.report_unreachable(first, "connect refused")
        assert first.state is State.STOPPED and not alive(pid)
        assert sup.services["deaf"].hung == 1
        assert first.cause is not None and "connection refused" in first.cause.lower()
        second = await sup.acquire("deaf")
        assert second is not first


async def test_report_unreachable_releases_a_stopped_process(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: process_state(pid) == "T")
            with trio.fail_after(5):  # killed at once, not after the 5 s grace
                await sup.report_unreachable(first, "no first byte")
            assert first.state is State.STOPPED and not alive(pid)
            assert sup.services["hello"].hung == 1
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---- health after READY: process backend ------------------------------------------------------


async def test_health_probes_replace_a_deaf_process(tmp_path: Path, block: str) -> None:
    extra = 'health_interval = "100ms"\nhealth_timeout = "500ms"\nhealth_failures = 2'
    cfg = load(config_text(tmp_path, service("deaf", f"{block}.1", deaf_command(tmp_path), extra)))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["deaf"]
        first = await sup.acquire("deaf")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        # Healthy probes keep it: a few intervals go by, nothing happens.
        with trio.move_on_after(0.5):
            await wait_until(lambda: first.state is not State.READY)
        assert first.state is State.READY
        os.kill(pid, signal.SIGUSR1)
        await wait_until(lambda: first.state is State.STOPPED, timeout=10)
        assert rt.hung == 1 and not alive(pid)
        assert first.cause is not None and "2 health probes failed in a row" in first.cause
        second = await sup.acquire("deaf")
        assert second is not first


async def test_health_probes_replace_a_sigstopped_process(tmp_path: Path, block: str) -> None:
    extra = 'health_interval = "100ms"\nhealth_timeout = "500ms"\nhealth_failures = 2'
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1", extra=extra)))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: first.state is State.STOPPED, timeout=10)
            assert sup.services["hello"].hung == 1 and not alive(pid)
            assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---- health after READY: QEMU -----------------------------------------------------------------


@pytest.fixture
def qstate(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    leaked = qemus(tmp_path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, "QEMU processes leaked"


def qemu_config(state: Path, front: str, extra: str = "", qemu: str = "") -> str:
    # A second QMP monitor the test owns (the daemon's is busy with the daemon).
    monitor = state / "test.qmp"
    qemu = f'extra_args = ["-qmp", "unix:{monitor},server=on,wait=off"]\n{qemu}'
    return config_text(state, qemu_service(front, extra=extra, qemu=qemu))


async def qmp_command(state: Path, command: str) -> None:
    from .qemu_guest import hmp

    await trio.to_thread.run_sync(hmp, str(state / "test.qmp"), command)


async def test_report_unreachable_releases_a_qemu_stopped_over_qmp(qstate: Path, block: str) -> None:
    state = qstate
    cfg = load(qemu_config(state, f"{block}.1", extra='health_interval = "never"'))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("uk")
        await sup.report_unreachable(first, "no first byte")
        assert first.state is State.READY  # healthy: kept
        await qmp_command(state, "stop")
        await sup.report_unreachable(first, "no first byte")
        assert first.state is State.STOPPED
        assert first.cause is not None and "paused" in first.cause
        assert sup.services["uk"].hung == 1 and qemus(state) == []
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")


async def test_report_unreachable_releases_a_sigstopped_qemu(qstate: Path, block: str) -> None:
    state = qstate
    cfg = load(qemu_config(state, f"{block}.1", extra='health_interval = "never"'))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("uk")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: process_state(pid) == "T")
            with trio.fail_after(5):  # killed at once: a frozen QEMU would not answer QMP
                await sup.report_unreachable(first, "no first byte")
            assert first.state is State.STOPPED and not alive(pid)
            assert first.cause is not None and "SIGSTOP" in first.cause
            assert not list((state / "run").glob("uk-*"))  # its QMP socket and pid file
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["qmp-stop", "sigstop"])
async def test_health_probes_replace_a_hung_qemu(qstate: Path, block: str, how: str) -> None:
    state = qstate
    extra = 'health_interval = "200ms"\nhealth_timeout = "1s"\nhealth_failures = 2'
    cfg = load(qemu_config(state, f"{block}.1", extra=extra))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["uk"]
        first = await sup.acquire("uk")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        try:
            with trio.move_on_after(0.7):  # a few healthy probes change nothing
                await wait_until(lambda: first.state is not State.READY)
            assert first.state is State.READY
            if how == "qmp-stop":
                await qmp_command(state, "stop")
            else:
                os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: first.state is State.STOPPED, timeout=15)
            assert rt.hung == 1 and not alive(pid)
            assert first.cause is not None and "2 health probes failed in a row" in first.cause
            # The next request boots a new instance and is served by it.
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            assert rt.instance is not None and rt.instance is not first
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---- one daemon per state directory, signals: real daemons ------------------------------------


async def spawn(conf: Path, log: Path) -> trio.Process:
    with open(log, "ab") as logfile:
        return await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile
        )


async def resolves(server: tuple[str, int], name: str) -> None:
    """Poll (with a deadline) until ``name`` gets an answer with an address."""
    from .conftest import query_udp

    with trio.fail_after(20):
        while True:
            with trio.move_on_after(0.5):
                try:
                    if (await query_udp(server, name)).rr:
                        return
                except OSError:
                    pass
            await trio.sleep(0.05)


def daemon_config(tmp_path: Path, block: str, name: str = "jl.toml") -> Path:
    conf = tmp_path / name
    text = config_text(tmp_path / "state", service("hello", f"{block}.1", extra='answer = "wait"'))
    conf.write_text(text.replace("127.0.0.1:0", f"{block}.53:5353"))
    return conf


async def test_a_second_daemon_on_the_same_state_dir_exits_and_kills_nothing(
    tmp_path: Path, block: str
) -> None:
    from .conftest import children_of

    first = await spawn(daemon_config(tmp_path, block), tmp_path / "first.log")
    try:
        await resolves((f"{block}.53", 5353), "hello.jit.test")
        kids = children_of(first.pid)
        assert len(kids) == 1
        # Same state directory, another DNS address: it must not even get to the sweep.
        other = tmp_path / "second.toml"
        other.write_text((tmp_path / "jl.toml").read_text().replace(f"{block}.53:5353",
                                                                    f"{block}.54:5353"))
        second = await spawn(other, tmp_path / "second.log")
        with trio.fail_after(20):
            code = await second.wait()
        err = (tmp_path / "second.log").read_text()
        assert code == 1, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last == (
            f"jitlaunch: error: the state directory {tmp_path / 'state'} is in use by another "
            f"jitlaunch daemon (pid {first.pid}); one daemon per state directory"
        )
        assert all(alive(k) for k in kids) and first.returncode is None
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
    finally:
        first.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await first.wait() == 0
    # Once the first has gone, the directory is free again.
    third = await spawn(tmp_path / "jl.toml", tmp_path / "third.log")
    try:
        await resolves((f"{block}.53", 5353), "hello.jit.test")
    finally:
        third.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await third.wait() == 0


async def test_signals_never_orphan_instances(tmp_path: Path, block: str) -> None:
    from .conftest import children_of

    log = tmp_path / "daemon.log"
    proc = await spawn(daemon_config(tmp_path, block), log)
    try:
        await resolves((f"{block}.53", 5353), "hello.jit.test")
        kids = children_of(proc.pid)
        assert len(kids) == 1
        # SIGHUP, SIGUSR1, SIGUSR2: logged, the daemon and its instance carry on.
        for sig, line in ((signal.SIGHUP, "SIGHUP: reloading is not supported yet; ignored"),
                          (signal.SIGUSR1, "status: hello: <Instance hello#1 ready process"),
                          (signal.SIGUSR2, "SIGUSR2: ignored")):
            proc.send_signal(sig)
            await wait_until(lambda line=line: line in log.read_text())
            assert proc.returncode is None and all(alive(k) for k in kids)
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
        # SIGQUIT: stop at once, no drain, but nothing left behind.
        proc.send_signal(signal.SIGQUIT)
        with trio.fail_after(20):
            code = await proc.wait()
        assert code == 0, log.read_text()
        assert "SIGQUIT: stopping every instance at once" in log.read_text()
        assert not any(alive(k) for k in kids)
    finally:
        proc.kill()
        await proc.wait()
