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
import trio.testing

from jitlaunch.backends.base import process_state
from jitlaunch.lifecycle.state import State

from .conftest import DEMO, PYTHON, alive, config_text, http_get, load, qemus, running, wait_until
from .helpers import qemu_service

# A listener that stops listening on SIGUSR1 and stays alive: unreachable, but not dead. The
# handler is in place before it listens (it is ready then): SIGUSR1's default is to die.
DEAF = """
import signal, socket, sys
signal.signal(signal.SIGUSR1, lambda *_: s.close())
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
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


def listening(host: str, port: int) -> bool:
    """Whether a TCP socket listens on IPv4 ``host:port`` (or the wildcard address) in this
    network namespace, read from /proc/net/tcp. Unlike a test connect, a look adds nothing to
    the listener's accept queue: connects to a dying listener that no longer accepts fill
    its backlog (5 for the demo server), and the next SYN is dropped and retried a second
    later."""
    wanted = {f"{int.from_bytes(socket.inet_aton(a), 'little'):08X}:{port:04X}"
              for a in (host, "0.0.0.0")}
    with open("/proc/net/tcp") as f:
        next(f)
        return any(fields[1] in wanted and fields[3] == "0A"  # TCP_LISTEN
                   for fields in (line.split() for line in f))


def wait_refused(host: str, port: int) -> None:
    """Block (without letting trio run) until nothing listens on ``host:port`` any more, so
    that a connect there is refused."""
    deadline = time.monotonic() + 5
    while listening(host, port):
        assert time.monotonic() < deadline, f"{host}:{port} still listens after 5 s"
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
        assert rt.deaths == 1 and first.run.cause == "its process is gone"
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")


async def test_dns_never_hands_over_a_dead_instance(tmp_path: Path, block: str) -> None:
    from .conftest import answers, query_udp

    text = service("hello", f"{block}.1").replace('grace = "5s"', f'subnet = "{block}.128/25"')
    cfg = load(config_text(tmp_path, text))
    async with running(cfg) as d:
        sup = d.supervisor
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        assert first.handle.address == f"{block}.129"
        os.kill(first.handle.pid, signal.SIGKILL)
        wait_reapable(first.handle.pid)
        assert first.state is State.READY
        # The first look at it (here the DNS answer) sees it dead: the front address.
        rec = await query_udp(server, "hello.jit.test")
        assert answers(rec) == [f"{block}.1"]
        assert first.state is not State.READY and sup.services["hello"].deaths == 1


async def test_the_first_request_after_a_kill_is_served(tmp_path: Path, block: str) -> None:
    """Through the front, in the death window: the proxy's connect is refused, it reports
    the instance, the supervisor releases it, and the client is served by the next one."""
    cfg = load(config_text(tmp_path, service("hello", f"{block}.1")))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["hello"]
        for n in range(1, 6):
            inst = await sup.acquire("hello")
            assert inst.number == n and inst.handle is not None and inst.handle.pid is not None
            host, port = inst.handle.endpoint(8080)
            os.kill(inst.handle.pid, signal.SIGKILL)
            wait_refused(host, port)
            assert inst.state is State.READY  # the supervisor has not seen it die
            assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
            assert rt.instance is not None and rt.instance.number == n + 1
        assert rt.deaths + rt.hung == 5


async def test_a_frozen_instance_behind_the_front_is_replaced(tmp_path: Path, block: str) -> None:
    """SIGSTOP: the kernel still accepts connections for it, nothing answers. The proxy's
    answer timer reports it; the supervisor finds it stopped and replaces it at once."""
    text = config_text(tmp_path, service("hello", f"{block}.1", extra='health_interval = "never"'),
                       top="").replace("[dns]", '[proxy]\nanswer_timeout = "1s"\n[dns]')
    cfg = load(text)
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["hello"]
        first = await sup.acquire("hello")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            await wait_until(lambda: process_state(pid) == "T")
            with trio.fail_after(10):
                while True:  # the first request(s) may be closed unanswered
                    try:
                        if (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200"):
                            break
                    except trio.BrokenResourceError:
                        pass
            assert first.state is State.STOPPED and not alive(pid)
            assert rt.hung == 1 and first.run.cause is not None and "SIGSTOP" in first.run.cause
            assert rt.instance is not None and rt.instance is not first
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


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
        rt = sup.services["hello"]
        # Dead, or (while the kernel still tears the killed process down, its listener
        # already closed) hung: released either way, counted once.
        assert second is not first and rt.deaths + rt.hung == 1


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
        host, port = first.handle.endpoint(8080)
        os.kill(pid, signal.SIGUSR1)  # it closes its listener and lives on
        await wait_until(lambda: not listening(host, port))
        assert alive(pid) and first.state is State.READY
        await sup.report_unreachable(first, "connect refused")
        assert first.state is State.STOPPED and not alive(pid)
        assert sup.services["deaf"].hung == 1
        assert first.run.cause is not None and "connection refused" in first.run.cause.lower()
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
        assert first.run.cause is not None and "2 health probes failed in a row" in first.run.cause
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
        assert first.run.cause is not None and "paused" in first.run.cause
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
            assert first.run.cause is not None and "SIGSTOP" in first.run.cause
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
            assert first.run.cause is not None and "2 health probes failed in a row" in first.run.cause
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
        # SIGHUP (a reload of the same file), SIGUSR1, SIGUSR2: logged, the daemon and its
        # instance carry on.
        for sig, line in ((signal.SIGHUP, "(SIGHUP): no changes"),
                          (signal.SIGUSR1, "status: hello: hello#1 ready (process, pid="),
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


# ---- warm pool and paused instances: real QEMU ------------------------------------------------


def run_files(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "run").glob("uk-*"))


async def test_status_names_every_instance_and_pool_member(qstate: Path, block: str) -> None:
    cfg = load(qemu_config(qstate, f"{block}.1", extra="max_instances = 2", qemu="pool = 1"))
    async with running(cfg) as d:
        sup = d.supervisor
        pool = d.backends["qemu"].pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1)
        inst = await sup.acquire("uk")
        await wait_until(lambda: len(pool) == 1)  # refilled
        assert inst.handle is not None
        lines = sup.status_lines()
        assert lines[0].startswith(f"uk: uk#1 ready (qemu, pid={inst.handle.pid} ")
        assert lines[1] == f"uk: warm pool 1 of 1: pid={pool[0].pid}"
        assert sorted(qemus(qstate)) == sorted([inst.handle.pid, pool[0].pid])


async def test_a_paused_qemu_that_dies_is_cleaned_up_at_once(qstate: Path, block: str) -> None:
    state = qstate
    extra = 'stop = "pause"\nidle_timeout = "300ms"\nhealth_interval = "never"'
    cfg = load(qemu_config(state, f"{block}.1", extra=extra))
    async with running(cfg) as d:
        sup = d.supervisor
        rt = sup.services["uk"]
        first = await sup.acquire("uk")
        assert first.handle is not None and first.handle.pid is not None
        pid = first.handle.pid
        await wait_until(lambda: first.state is State.SAVED)
        assert alive(pid) and len(run_files(state)) == 2  # its QMP socket and pid file
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: rt.instance is None, timeout=5)
        assert first.state is State.STOPPED and first.handle is None and rt.deaths == 1
        assert run_files(state) == []
        # The next start boots a fresh QEMU; only that one runs.
        second = await sup.acquire("uk")
        assert second is not first and second.handle is not None
        assert second.handle.pid != pid and qemus(state) == [second.handle.pid]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")


async def test_a_paused_qemu_is_watched_only_while_saved(qstate: Path, block: str) -> None:
    """A pause, a resume, a pause again: the resumed instance is the same QEMU, served, and
    the watch of the paused one does not get in its way."""
    state = qstate
    extra = 'stop = "pause"\nidle_timeout = "300ms"\nhealth_interval = "never"'
    cfg = load(qemu_config(state, f"{block}.1", extra=extra))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("uk")
        assert first.handle is not None
        pid = first.handle.pid
        for _ in range(2):
            await wait_until(lambda: first.state is State.SAVED)
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            assert first.state is State.READY and first.handle is not None
            assert first.handle.pid == pid
        assert sup.services["uk"].deaths == 0


@pytest.mark.parametrize("where", ["pool", "paused"])
async def test_a_resume_that_fails_destroys_the_member(qstate: Path, block: str, where: str) -> None:
    """A frozen paused QEMU (SIGSTOP) cannot resume: after RESUME_TIMEOUT it is destroyed and a
    fresh instance serves the request; nothing outlives its use."""
    state = qstate
    if where == "pool":
        cfg = load(qemu_config(state, f"{block}.1", extra="max_instances = 2", qemu="pool = 1"))
    else:
        extra = 'stop = "pause"\nidle_timeout = "300ms"\nhealth_interval = "never"'
        cfg = load(qemu_config(state, f"{block}.1", extra=extra))
    async with running(cfg) as d:
        sup = d.supervisor
        if where == "pool":
            pool = d.backends["qemu"].pools["uk"]  # type: ignore[attr-defined]
            await wait_until(lambda: len(pool) == 1)
            frozen = pool[0].pid
        else:
            first = await sup.acquire("uk")
            assert first.handle is not None
            frozen = first.handle.pid
            await wait_until(lambda: first.state is State.SAVED)
        try:
            os.kill(frozen, signal.SIGSTOP)
            await wait_until(lambda: process_state(frozen) == "T")
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            inst = sup.services["uk"].instance
            assert inst is not None and inst.handle is not None and inst.handle.pid != frozen
            assert not alive(frozen)
            assert sup.services["uk"].boot_failures == 0
        finally:
            if alive(frozen):
                os.kill(frozen, signal.SIGKILL)


# ---- a backend that raises: no instance task ends the daemon ----------------------------------


class Boom(RuntimeError):
    pass


def raising_backend(where: str):  # type: ignore[no-untyped-def]
    from .helpers import FakeBackend, FakeHandle

    class RaisingHandle(FakeHandle):
        async def wait_ready(self) -> None:
            await super().wait_ready()
            if where == "wait_ready":
                raise Boom(where)

        async def wait_exited(self) -> str:
            if where == "wait_exited":
                await trio.sleep(1)
                raise Boom(where)
            return await super().wait_exited()

        def alive(self) -> bool:
            if where == "alive":
                raise Boom(where)
            return True

        async def probe(self, timeout: float) -> str | None:
            if where == "probe":
                raise Boom(where)
            return None

        async def stop(self, mode: str, grace: float) -> bool:
            await super().stop(mode, grace)
            if where == "stop":
                raise Boom(where)
            return False

    class RaisingBackend(FakeBackend):
        async def start(self, service, number, saved):  # type: ignore[no-untyped-def]
            self.starts.append(trio.current_time())
            if where == "start":
                raise Boom(where)
            if where == "start-oserror":
                raise OSError(28, "No space left on device")
            h = RaisingHandle(self.boot_time, None)
            self.handles.append(h)
            return h

    return RaisingBackend()


@pytest.mark.parametrize(
    "where", ["start", "start-oserror", "wait_ready", "wait_exited", "alive", "probe", "stop"]
)
async def test_a_raising_backend_never_ends_the_supervisor(
    tmp_path: Path, where: str, autojump_clock: trio.testing.MockClock
) -> None:
    from jitlaunch.errors import BootFailed
    from jitlaunch.lifecycle.supervisor import Supervisor

    from .helpers import make

    sup, _ = make(tmp_path, 'health_interval = "1s"')
    backend = raising_backend(where)
    sup = Supervisor(sup.config, {"process": backend})
    rt = sup.services["hello"]
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for _ in range(3):  # again and again: every failure ends only its own instance
            try:
                inst = await sup.acquire("hello")
            except BootFailed as exc:
                assert where in ("start", "start-oserror", "wait_ready")
                if where == "start-oserror":
                    assert str(exc) == "cannot start it: No space left on device"
                else:
                    assert str(exc) == f"internal error: Boom('{where}')"
                await trio.sleep_until(rt.retry_at)
                continue
            sup.request("hello")
            await trio.sleep(70)  # idle stop, health probes, the raising wait_exited
            assert inst.state in (State.STOPPED, State.READY)
        assert len(backend.starts) >= 2
        if where == "probe":  # every probe "failed": hung after 3 of them, each time
            assert rt.hung >= 2
        if where == "wait_exited":  # its watch broke after 1 s: released, a new one each time
            assert len(backend.starts) == 3 and rt.idle_stops == 0
        if where in ("stop", "alive"):  # plain idle stops
            assert rt.idle_stops >= 2
        nursery.cancel_scope.cancel()


# ---- pure parts -------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    from jitlaunch.backoff import backoff_delay

    assert [backoff_delay(n, 1, 5) for n in range(7)] == [0, 1, 2, 4, 5, 5, 5]
    assert backoff_delay(10_000, 0.2, 60) == 60  # no overflow


def test_backend_errors_become_boot_failures_with_a_reason() -> None:
    from jitlaunch.backends.base import map_errors
    from jitlaunch.backends.qmp import QMPError
    from jitlaunch.errors import BootFailed

    cases: list[tuple[BaseException, str]] = [
        (QMPError("cont", {"class": "GenericError", "desc": "no"}), "cannot resume it: QMP cont: no"),
        (trio.TooSlowError(), "cannot resume it: timed out"),
        (ConnectionRefusedError(111, "Connection refused"), "cannot resume it: Connection refused"),
        (BootFailed("as it is"), "as it is"),
    ]
    for raised, message in cases:
        with pytest.raises(BootFailed) as info, map_errors("cannot resume it"):
            raise raised
        assert str(info.value) == message
    with pytest.raises(KeyError), map_errors("a bug passes"):
        raise KeyError("x")


async def test_health_probes_replace_a_guest_that_stopped_listening(qstate: Path, block: str) -> None:
    """Through user networking QEMU accepts for the guest; the probe sees the guest refuse
    (here: the forward points at a port the guest does not listen on) and replaces it."""
    state = qstate
    extra = 'health_interval = "200ms"\nhealth_timeout = "1s"\nhealth_failures = 2'
    qemu = 'cmdline = "ip={ip}/{prefix} gw={gateway} port=80 name={name}"'
    text = qemu_config(state, f"{block}.1", extra=extra, qemu=qemu)
    cfg = load(text.replace("guest_ports = [80]", "guest_ports = [81]"))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("uk")
        await wait_until(lambda: first.state is State.STOPPED, timeout=15)
        assert sup.services["uk"].hung == 1
        assert first.run.cause is not None and "the guest refused a connection on port 81" in first.run.cause


# ---- health timing on virtual time (a fake backend: the supervisor's logic alone) --------------


def probing_backend(probe_time: float):  # type: ignore[no-untyped-def]
    from .helpers import FakeBackend, FakeHandle

    class ProbedHandle(FakeHandle):
        sick: str | None = None
        probes: list[float]

        async def probe(self, timeout: float) -> str | None:
            self.probes.append(trio.current_time())
            await trio.sleep(probe_time)
            return self.sick

    class ProbedBackend(FakeBackend):
        async def start(self, service, number, saved):  # type: ignore[no-untyped-def]
            self.starts.append(trio.current_time())
            h = ProbedHandle(self.boot_time, None)
            h.probes = []
            self.handles.append(h)
            return h

    return ProbedBackend()


async def test_hung_after_n_failed_probes_in_a_row_at_exact_times(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from jitlaunch.lifecycle.supervisor import Supervisor

    from .helpers import make

    cfg = make(tmp_path, 'health_interval = "5s"\nhealth_timeout = "2s"\nhealth_failures = 3')[0].config
    backend = probing_backend(probe_time=0.5)
    sup = Supervisor(cfg, {"process": backend})
    rt = sup.services["hello"]
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = await sup.acquire("hello")
        t_ready = trio.current_time()
        handle = backend.handles[0]
        sup.connection_opened("hello")  # keeps it from idling
        # Two failures, then a success: the count starts again.
        await trio.sleep(1)
        handle.sick = "connect refused"
        await trio.sleep(10.5)  # probes at +5 and +10.5 failed
        handle.sick = None
        await trio.sleep(5.5)  # the one at +16 passed
        handle.sick = "connect refused"
        while first.state is State.READY:
            await rt.changed.wait()
        # Probes every 5 s after the previous one ended: +5, +10.5, +16, +21.5, +27, +32.5.
        assert [p - t_ready for p in handle.probes] == pytest.approx([5, 10.5, 16, 21.5, 27, 32.5])
        assert trio.current_time() - t_ready == pytest.approx(33)
        assert rt.hung == 1 and first.run.cause == (
            "3 health probes failed in a row (last: connect refused)"
        )
        await first.run.released.wait()
        assert handle.stopped_with == "destroy" and trio.current_time() - t_ready == pytest.approx(33)
        sup.connection_closed("hello")
        nursery.cancel_scope.cancel()


async def test_a_burst_of_reports_shares_one_check(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from jitlaunch.lifecycle.supervisor import Supervisor

    from .helpers import make

    cfg = make(tmp_path, 'health_interval = "never"')[0].config
    backend = probing_backend(probe_time=0.3)
    sup = Supervisor(cfg, {"process": backend})
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = await sup.acquire("hello")
        handle = backend.handles[0]
        handle.sick = "connect refused"
        t0 = trio.current_time()
        async with trio.open_nursery() as reports:
            for _ in range(100):
                reports.start_soon(sup.report_unreachable, first, "refused")
        assert len(handle.probes) == 1 and trio.current_time() - t0 == pytest.approx(0.3)
        assert first.state is State.STOPPED and sup.services["hello"].hung == 1
        assert sup.services["hello"].unreachable_reports == 100
        nursery.cancel_scope.cancel()
