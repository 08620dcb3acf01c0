"""Reload with real daemons on loopback and real processes: SIGHUP and ``jitlaunch reload``
add, remove and change services; broken configs are rejected and the old one keeps serving;
open and held connections of unchanged services survive byte for byte; DNS never drops a
query while reloads run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing
from dnslib import QTYPE, RCODE, DNSRecord

from jitlaunch.controlproto import format_status, status_report
from jitlaunch.daemon import Daemon

from .conftest import (
    DEMO,
    ECHO_SERVER,
    PYTHON,
    alive,
    children_of,
    config_text,
    http_get,
    load_config,
    query_udp,
    running,
    wait_until,
)
from .helpers import get, scrape


def service(name: str, front: str, command: str = DEMO, extra: str = "", port: int = 8080) -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [{port}]
idle_timeout = 60
{extra}
[service.process]
command = "{command}"
grace = "2s"
"""


def demo(name: str) -> str:
    return DEMO.replace("--name {name}", f"--name {name}")


def echo(tmp_path: Path, gate: Path | None = None) -> str:
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    return f"{PYTHON} {script} {{address}} {{port}}" + (f" {gate}" if gate else "")


def write(path: Path, tmp_path: Path, *services: str, top: str = "", dns: str = "") -> Path:
    path.write_text(config_text(tmp_path / "state", "".join(services), top=top, dns=dns))
    return path


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fd_count(pid: int) -> int:
    """``pid``'s fd count once it has not changed for 0.3 s: a proxied connection the client
    saw end is closed by the daemon a moment later."""
    with trio.fail_after(15):
        count, since = fd_count(pid), trio.current_time()
        while trio.current_time() - since < 0.3:
            await trio.sleep(0.01)
            now = fd_count(pid)
            if now != count:
                count, since = now, trio.current_time()
    return count


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [PYTHON, "-m", "jitlaunch.cli", *args], capture_stdout=True, capture_stderr=True,
        check=False,
    )


async def refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def closed(host: str, port: int) -> None:
    """Until connecting to ``host``:``port`` is refused. Not at once: the daemon closes a
    front synchronously, but a child being forked at that moment (a boot) holds a copy of
    the listening socket until it closes its inherited fds, a few milliseconds."""
    with trio.fail_after(10):
        while not await refused(host, port):
            await trio.sleep(0.01)


async def rcode(d: Daemon, name: str) -> int:
    ep = d.dns_endpoints[0]
    return int((await query_udp((ep.host, ep.port), name)).header.rcode)


async def echo_roundtrip(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "the connection was closed"
            got += chunk
    return got


async def test_reload_adds_removes_and_changes_services(tmp_path: Path, block: str) -> None:
    """In-process: the plan applied; DNS follows at once; the removed service's instance is
    stopped (reason reload) and its front closed; the changed one keeps its instance until
    it stops, then boots the new settings; nothing leaks."""
    conf = write(tmp_path / "jl.toml", tmp_path,
                 service("a", f"{block}.1", demo("a")), service("b", f"{block}.2", demo("b")),
                 service("c", f"{block}.3", demo("c")))
    async with running(load_config(conf)) as d:
        sup = d.supervisor
        for host, name in ((f"{block}.1", "a"), (f"{block}.2", "b"), (f"{block}.3", "c")):
            assert f"Hello from {name}<" in (await http_get(host, 8080)).decode()
        a_inst, b_inst, c_inst = (sup.services[n].instance for n in "abc")
        assert a_inst and b_inst and c_inst and c_inst.handle is not None
        c_pid = c_inst.handle.pid
        fds = await settled_fd_count(os.getpid())

        write(conf, tmp_path, service("a", f"{block}.1", demo("a")),
              service("b", f"{block}.2", demo("b2"), extra="ttl = 7"),
              service("d", f"{block}.4", demo("d")))
        result = await d.reload("test")
        assert result.ok, result.message
        assert result.message == "added d; removed c; changed b: process.command, ttl"
        # Until c's instance is stopped, `jitlaunch status` says it is leaving (no checkpoint
        # since the reload: its instance cannot be stopped yet).
        report = status_report(sup.status(), sup.config.path, trio.current_time())
        assert [s["removed"] for s in report["services"]] == [False, False, True, False]
        assert format_status(report).splitlines()[3].startswith("c(removed) ")
        # DNS at once: d exists, c does not, b's new TTL.
        assert await rcode(d, "d.jit.test") == RCODE.NOERROR
        assert await rcode(d, "c.jit.test") == RCODE.NXDOMAIN
        ep = d.dns_endpoints[0]
        reply = await query_udp((ep.host, ep.port), "b.jit.test")
        assert [rr.ttl for rr in reply.rr if rr.rtype == QTYPE.A] == [7]
        # c: front closed at once, its instance stopped, then forgotten.
        await closed(f"{block}.3", 8080)
        await wait_until(lambda: "c" not in sup.services)
        assert not alive(c_pid)
        assert sup.retired_stops[("c", "reload", "destroy")] == 1
        samples = await scrape(d)
        assert get(samples, "jitlaunch_stops_total", service="c", reason="reload",
                   mode="destroy") == 1
        assert get(samples, "jitlaunch_reloads_total", result="ok") == 1
        # a untouched; b still runs the instance it had, with its old settings.
        assert sup.services["a"].instance is a_inst and sup.services["b"].instance is b_inst
        assert "Hello from b<" in (await http_get(f"{block}.2", 8080)).decode()
        assert "Hello from d<" in (await http_get(f"{block}.4", 8080)).decode()
        # b's next instance boots the new command.
        stopped = sup.stop("b")
        assert stopped is b_inst
        await b_inst.run.released.wait()
        assert "Hello from b2<" in (await http_get(f"{block}.2", 8080)).decode()
        assert sup.services["b"].instance is not b_inst

        # Back to a, b, c: the same number of fds as before (d's front and instance gone, c's
        # front bound again), and only the instances that should run.
        write(conf, tmp_path, service("a", f"{block}.1", demo("a")),
              service("b", f"{block}.2", demo("b")), service("c", f"{block}.3", demo("c")))
        result = await d.reload("test")
        assert result.ok and result.message == "added c; removed d; changed b: process.command, ttl"
        await wait_until(lambda: "d" not in sup.services)
        b_now = sup.services["b"].instance
        assert b_now is not None
        sup.stop("b")
        await b_now.run.released.wait()
        assert "Hello from c<" in (await http_get(f"{block}.3", 8080)).decode()
        assert "Hello from b<" in (await http_get(f"{block}.2", 8080)).decode()
        await wait_until(lambda: fd_count(os.getpid()) == fds, what=f"{fds} fds")
        names = sorted(n for n, rt in sup.services.items() if rt.instance is not None)
        assert names == ["a", "b", "c"]
        assert len(children_of(os.getpid())) == 3


async def test_sighup_and_jitlaunch_reload_in_a_real_daemon(tmp_path: Path, block: str) -> None:
    """A daemon process: SIGHUP, then `jitlaunch reload`, each adding and removing a service;
    the removed instance's process is gone, the daemon's fds and children back where they
    were; `jitlaunch reload` prints the summary."""
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    conf.write_text(conf.read_text().replace('[dns]\nlisten = ["127.0.0.1:0"]',
                                             f'[dns]\nlisten = ["{block}.53:5353"]'))
    assert f"{block}.53:5353" in conf.read_text()
    text = conf.read_text()
    log = tmp_path / "daemon.log"
    with open(log, "ab") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile)
    server = (f"{block}.53", 5353)
    sock = str(tmp_path / "state" / "control.sock")
    try:
        await wait_until(lambda: "serving 1 service" in log.read_text(), timeout=30)
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
        def fd_list() -> list[str]:
            return sorted(os.readlink(f"/proc/{proc.pid}/fd/{n}")
                          for n in os.listdir(f"/proc/{proc.pid}/fd"))

        fds, kids = await settled_fd_count(proc.pid), children_of(proc.pid)
        assert len(kids) == 1

        conf.write_text(text + service("x", f"{block}.2", demo("x")))
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "(SIGHUP): added x" in log.read_text())
        assert int((await query_udp(server, "x.jit.test")).header.rcode) == RCODE.NOERROR
        assert "Hello from x<" in (await http_get(f"{block}.2", 8080)).decode()
        x_pids = set(children_of(proc.pid)) - set(kids)
        assert x_pids
        # A burst of SIGHUPs (the kernel and trio coalesce pending ones; those that arrive
        # while a reload waits are merged into it): the daemon and its instances carry on.
        for _ in range(20):
            proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: log.read_text().count("(SIGHUP): no changes") >= 1)
        assert log.read_text().count("(SIGHUP): no changes") <= 20
        assert int((await query_udp(server, "x.jit.test")).header.rcode) == RCODE.NOERROR
        assert set(children_of(proc.pid)) == set(kids) | x_pids

        conf.write_text(text)
        res = await cli("reload", "--socket", sock)
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode() == "reloaded: removed x\n"
        assert int((await query_udp(server, "x.jit.test")).header.rcode) == RCODE.NXDOMAIN
        await closed(f"{block}.2", 8080)
        await wait_until(lambda: not any(alive(p) for p in x_pids))
        await wait_until(lambda: sorted(children_of(proc.pid)) == sorted(kids))
        await wait_until(lambda: fd_count(proc.pid) == fds, what=f"{fds} fds: {fd_list()}")
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
        assert "Traceback" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    assert not any(alive(k) for k in kids)


async def test_broken_configs_are_rejected_and_the_old_one_serves(
    tmp_path: Path, block: str
) -> None:
    """A syntax error, an invalid value, a restart-only key and a front that cannot be bound:
    each rejected with the error returned by `jitlaunch reload` (exit status 1), nothing of
    it applied, and the old config keeps serving."""
    good = [service("a", f"{block}.1", demo("a"))]
    conf = write(tmp_path / "jl.toml", tmp_path, *good)
    sock = str(tmp_path / "state" / "control.sock")
    with socket.socket() as taken:
        taken.bind((f"{block}.9", 8080))
        taken.listen()
        async with running(load_config(conf)) as d:
            assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
            inst = d.supervisor.services["a"].instance
            base = conf.read_text()
            cases = [
                (base + "[[service\n", "not valid TOML"),
                (base.replace("idle_timeout = 60", 'idle_timeout = "soon"'),
                 "service 'a': idle_timeout"),
                (base.replace('state_dir = "', 'state_dir = "/nonexistent'),
                 "these keys change only with a restart: daemon.state_dir"),
                # What `jitlaunch check` calls an error: a command that does not exist.
                (base + service("b", f"{block}.8", "/nonexistent/demo {port}"),
                 "service 'b': process.command: "),
                # b's front is free, c's is taken: neither is added.
                (base + service("b", f"{block}.8", demo("b"))
                 + service("c", f"{block}.9", demo("c")),
                 f"{block}.9:8080: Address already in use"),
            ]
            for text, expected in cases:
                conf.write_text(text)
                res = await cli("reload", "--socket", sock)
                assert res.returncode == 1, (text, res.stdout)
                err = res.stderr.decode()
                assert err.startswith("jitlaunch: error: ") and expected in err, err
                assert "Traceback" not in err
                assert set(d.supervisor.services) == {"a"}
                await closed(f"{block}.8", 8080)
                assert await rcode(d, "b.jit.test") == RCODE.NXDOMAIN
                assert await rcode(d, "a.jit.test") == RCODE.NOERROR
                assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
            assert d.supervisor.services["a"].instance is inst
            assert d.metrics.reloads == {"rejected": len(cases)}
            samples = await scrape(d)
            assert get(samples, "jitlaunch_reloads_total", result="rejected") == len(cases)
            assert get(samples, "jitlaunch_config_last_reload_successful") == 0
            # Fixed, it goes through.
            conf.write_text(base + service("b", f"{block}.8", demo("b")))
            res = await cli("reload", "--socket", sock)
            assert res.returncode == 0 and res.stdout == b"reloaded: added b\n", res.stderr
            assert "Hello from b<" in (await http_get(f"{block}.8", 8080)).decode()
            assert get(await scrape(d), "jitlaunch_config_last_reload_successful") == 1


async def test_open_and_held_connections_of_unchanged_services_survive(
    tmp_path: Path, block: str
) -> None:
    """An open proxied connection to an unchanged service keeps relaying byte for byte across
    reloads, and so does a connection held while its (unchanged) service boots."""
    gate = tmp_path / "gate"
    conf = write(tmp_path / "jl.toml", tmp_path,
                 service("e", f"{block}.1", echo(tmp_path)),
                 service("slow", f"{block}.2", echo(tmp_path, gate)))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        open_stream = await trio.open_tcp_stream(f"{block}.1", 8080)
        held = await trio.open_tcp_stream(f"{block}.2", 8080)
        async with open_stream, held:
            assert await echo_roundtrip(open_stream, b"before") == b"before"
            e_inst = d.supervisor.services["e"].instance
            await held.send_all(b"held-1;")  # buffered: slow is booting
            slow = d.supervisor.services["slow"]
            await wait_until(lambda: slow.connections == 1 and slow.instance is not None)
            for extra in ("x", "y"):
                conf.write_text(base + service(extra, f"{block}.3", demo(extra)))
                assert (await d.reload("test")).ok
                assert await echo_roundtrip(open_stream, f"during-{extra}".encode()) == \
                    f"during-{extra}".encode()
                await held.send_all(f"held-{extra};".encode())
            conf.write_text(base)
            assert (await d.reload("test")).message == "removed y"
            gate.touch()
            expected = b"held-1;held-x;held-y;"
            got = b""
            with trio.fail_after(20):
                while len(got) < len(expected):
                    got += await held.receive_some(65536)
            assert got == expected
            assert await echo_roundtrip(open_stream, b"after" * 1000) == b"after" * 1000
            assert d.supervisor.services["e"].instance is e_inst
            assert d.proxy.closed == {}


async def test_dns_flood_during_reloads_answers_every_query(tmp_path: Path, block: str) -> None:
    """Queries for an unchanged service and for one that comes and goes, from several
    clients, while the config is reloaded again and again: every query is answered, the
    unchanged name always NOERROR, the other NOERROR or NXDOMAIN (never half of each)."""
    # RRL off: these clients share one prefix and ask far more than its rate.
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")),
                 dns="[dns.rrl]\nrate = 0")
    base = conf.read_text()
    with_x = base + service("x", f"{block}.2", demo("x"))
    async with running(load_config(conf)) as d:
        ep = d.dns_endpoints[0]
        sent = answered = 0
        codes: dict[tuple[str, int], int] = {}
        reloads = 0
        done = trio.Event()

        async def client(name: str) -> None:
            nonlocal sent, answered
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            with sock:
                await sock.connect((ep.host, ep.port))
                while not done.is_set():
                    q = DNSRecord.question(name, "A")
                    await sock.send(q.pack())
                    sent += 1
                    with trio.fail_after(5):
                        reply = DNSRecord.parse(await sock.recv(65535))
                    assert reply.header.id == q.header.id
                    answered += 1
                    key = (name, int(reply.header.rcode))
                    codes[key] = codes.get(key, 0) + 1

        async def reloader() -> None:
            nonlocal reloads
            for i in range(20):
                conf.write_text(with_x if i % 2 == 0 else base)
                result = await d.reload("test")
                assert result.ok, result.message
                reloads += 1
                await trio.sleep(0.02)  # let queries through between reloads
            done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for name in ("a.jit.test", "x.jit.test") * 4:
                    nursery.start_soon(client, name)
                nursery.start_soon(reloader)
        assert reloads == 20
        assert sent == answered and answered > 200, (sent, answered)
        assert set(codes) <= {("a.jit.test", RCODE.NOERROR), ("x.jit.test", RCODE.NOERROR),
                              ("x.jit.test", RCODE.NXDOMAIN)}, codes
        assert ("x.jit.test", RCODE.NOERROR) in codes and ("x.jit.test", RCODE.NXDOMAIN) in codes
        assert d.dns.counts["internal_error"] == 0


async def test_reload_concurrency_shutdown_and_a_racing_boot(tmp_path: Path, block: str) -> None:
    """Two reloads at once run one after the other; a reload racing the boot of a changed
    service (settings and then ports) leaks no instance; a reload while stopping is
    refused."""
    gate = tmp_path / "gate"
    conf = write(tmp_path / "jl.toml", tmp_path, service("s", f"{block}.1", echo(tmp_path, gate)))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        sup = d.supervisor
        results = []

        async def reload() -> None:
            results.append(await d.reload("test"))

        conf.write_text(base + service("x", f"{block}.2", demo("x")))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload)
            nursery.start_soon(reload)
        assert [r.message for r in results] == ["added x", "no changes"]
        # SIGHUPs while a reload waits for the one in progress (the lock held here, as a
        # running reload holds it) are merged into the waiting one, which has not read the
        # file yet. (Started together with no reload in progress, whether a signal finds the
        # first reload still waiting is up to trio's scheduling, which it randomises.)
        async with trio.open_nursery() as nursery:
            async with d._reload_lock:
                nursery.start_soon(reload)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(d.reload_on_signal)
                nursery.start_soon(d.reload_on_signal)
                await trio.testing.wait_all_tasks_blocked()
        assert d.metrics.reloads == {"ok": 3}
        assert results[-1].ok and len(results) == 3

        # s boots (held by the gate); a reload changes it twice: the boot it had goes on
        # under the old settings, then a port change replaces it once ready.
        sup.request("s")
        inst = sup.services["s"].instance
        assert inst is not None
        conf.write_text(base.replace("idle_timeout = 60", "idle_timeout = 30"))
        assert (await d.reload("test")).message == "removed x; changed s: idle_timeout"
        conf.write_text(base.replace("idle_timeout = 60", "idle_timeout = 30")
                        .replace("ports = [8080]", "ports = [8081]"))
        result = await d.reload("test")
        assert result.message == "changed s: ports (instance replaced)"
        await closed(f"{block}.1", 8080)
        gate.touch()
        await inst.run.released.wait()
        assert sup.services["s"].stops[("reload", "destroy")] == 1
        stream = await trio.open_tcp_stream(f"{block}.1", 8081)
        async with stream:
            assert await echo_roundtrip(stream, b"new port") == b"new port"
        new = sup.services["s"].instance
        assert new is not inst and new is not None and new.service.ports == (8081,)
        assert len(children_of(os.getpid())) == 1

        d.stop()
        result = await d.reload("test")
        assert not result.ok and "stopping" in result.message


async def test_reload_notifies_systemd_before_and_after(tmp_path: Path, block: str) -> None:
    """RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, in µs) before, READY=1 with a
    STATUS= line after; the same around a rejected reload."""
    import time

    from jitlaunch.systemd import Notifier

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.setblocking(False)
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    daemon = Daemon(load_config(conf), notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")}))

    def datagrams() -> list[list[str]]:
        out = []
        while True:
            try:
                out.append(receiver.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return out

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            # The start's READY=1 comes from a task started once serve() reported started.
            start: list[list[str]] = []
            await wait_until(lambda: bool(start.extend(datagrams()) or start))
            assert start[0][0] == "READY=1"
            for text, ok in ((conf.read_text() + service("b", f"{block}.2"), True),
                             ("[[service\n", False)):
                conf.write_text(text)
                before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                assert (await daemon.reload("test")).ok is ok
                after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                got = [m for m in datagrams() if not m[0].startswith("STATUS=")]
                assert [m[0] for m in got] == ["RELOADING=1", "READY=1"], got
                usec = int(got[0][1].removeprefix("MONOTONIC_USEC="))
                assert before <= usec <= after
                assert got[1] == ["READY=1", "STATUS=2 services; 0 running, 0 booting"]
            daemon.stop()
    finally:
        daemon.notifier.close()
        receiver.close()


async def test_dns_and_host_settings_apply_at_once(tmp_path: Path, block: str) -> None:
    """Zones, the SOA serial, TTLs, RRL and the host's admission settings change with the
    reload, the running instance untouched."""
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        ep = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
        inst = d.supervisor.services["a"].instance
        soa = await query_udp(ep, "jit.test", "SOA")
        assert soa.rr[0].rdata.times[0] == 1
        assert int((await query_udp(ep, "a.other.test")).header.rcode) == RCODE.REFUSED
        conf.write_text(base.replace('zones = ["jit.test"]', 'zones = ["jit.test", "other.test"]\n'
                                     '[dns.soa]\nserial = 42\n[dns.rrl]\nrate = 7\n'
                                     '[host]\nmax_queued = 3\nqueue_timeout = "4s"\n'
                                     '[host.wake]\nrate = 0'))
        result = await d.reload("test")
        assert result.ok, result.message
        assert result.message == ("changed a: names; changed dns.zones, dns.rrl.rate, "
                                  "host.max_queued, host.queue_timeout, host.wake.rate")
        assert (await query_udp(ep, "jit.test", "SOA")).rr[0].rdata.times[0] == 42
        assert (await query_udp(ep, "other.test", "SOA")).rr[0].rdata.times[0] == 42
        reply = await query_udp(ep, "a.other.test")
        assert int(reply.header.rcode) == RCODE.NOERROR and reply.rr
        assert d.dns.rrl.rate == 7 and d.dns.config.dns.rrl.rate == 7
        sup = d.supervisor
        assert sup.queue.bound == 3 and sup.config.host.queue_timeout == 4
        assert sup.wake.config.rate == 0
        assert sup.services["a"].instance is inst


async def test_an_unchanged_qemu_service_keeps_its_instance_and_warm_pool(
    tmp_path: Path, block: str
) -> None:
    """Real QEMU: a reload that adds a service leaves the unchanged qemu service's running
    instance and warm pool member alone (same processes); changing the pooled service is
    refused (its pool is set up at start)."""
    from .conftest import qemus
    from .helpers import qemu_service

    state = tmp_path / "state"
    conf = write(tmp_path / "jl.toml", tmp_path,
                 qemu_service(f"{block}.1", extra="max_instances = 2", qemu="pool = 1"))
    base = conf.read_text()
    try:
        async with running(load_config(conf)) as d:
            pool = d.backends["qemu"].pools["uk"]  # type: ignore[attr-defined]
            await wait_until(lambda: len(pool) == 1, timeout=60)
            inst = await d.supervisor.acquire("uk")
            await wait_until(lambda: len(pool) == 1, timeout=60)  # refilled
            member, pids = pool[0], sorted(qemus(state))
            assert len(pids) == 2
            conf.write_text(base + service("a", f"{block}.2", demo("a")))
            assert (await d.reload("test")).message == "added a"
            assert "Hello from a<" in (await http_get(f"{block}.2", 8080)).decode()
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            assert pool == [member] and d.supervisor.services["uk"].instance is inst
            assert sorted(qemus(state)) == pids
            conf.write_text(base.replace("pool = 1", "pool = 1\nmemory = 96"))
            result = await d.reload("test")
            assert not result.ok and "'uk': qemu.pool = 1" in result.message, result.message
            assert pool == [member] and sorted(qemus(state)) == pids
    finally:
        leaked = qemus(state)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, "QEMU processes leaked"


async def test_proxy_settings_apply_to_services_already_served(tmp_path: Path, block: str) -> None:
    """``proxy.max_connecting`` and ``proxy.max_connections`` change with the reload for a
    service that has been served already (its connect limiter and the splice pipes' bound
    were set from the old config)."""
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
        assert d.proxy._connecting["a"].total_tokens == 32
        conf.write_text(base.replace("[metrics]", "[proxy]\nmax_connecting = 2\n"
                                     "max_connections = 100\n[metrics]"))
        result = await d.reload("test")
        assert result.ok, result.message
        assert d.proxy.max_connections == 100
        assert d.proxy._connecting["a"].total_tokens == 2
        assert d.proxy.pipes.limit == 50
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()


async def test_a_qemu_service_a_reload_points_at_a_new_kernel_can_save(
    tmp_path: Path, block: str
) -> None:
    """Real QEMU: a reload gives the qemu service a kernel image the backend did not know at
    start, and ``stop = "save"``: its next instance is saved (the image's id is known)."""
    import shutil

    from jitlaunch.lifecycle.state import State

    from .conftest import KERNEL, qemus
    from .helpers import qemu_service

    state = tmp_path / "state"
    conf = write(tmp_path / "jl.toml", tmp_path, qemu_service(f"{block}.1"))
    base = conf.read_text()
    kernel = tmp_path / "copy.elf"
    shutil.copy(KERNEL, kernel)
    try:
        async with running(load_config(conf)) as d:
            conf.write_text(base.replace(f'kernel = "{KERNEL}"', f'kernel = "{kernel}"')
                            .replace('boot_timeout = "20s"', 'boot_timeout = "20s"\nstop = "save"'))
            result = await d.reload("test")
            assert result.message == "changed uk: qemu.kernel, stop", result.message
            inst = await d.supervisor.acquire("uk")
            assert d.supervisor.stop("uk") is inst
            with trio.fail_after(30):
                await inst.run.released.wait()
            assert inst.state is State.SAVED
            assert d.backends["qemu"].saved_path("uk").exists()  # type: ignore[attr-defined]
    finally:
        leaked = qemus(state)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, "QEMU processes leaked"


async def test_a_front_that_cannot_get_a_socket_rejects_the_reload(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors (EMFILE) when a reload makes a new front's socket: the reload
    is rejected with the reason, counted, and the running config stays (the OSError escaped
    Daemon.reload: ``jitlaunch reload`` got no reply and nothing was logged or counted)."""
    import errno

    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        conf.write_text(base + service("b", f"{block}.2", demo("b")))

        def emfile(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        with monkeypatch.context() as m:
            m.setattr(trio.socket, "socket", emfile)
            result = await d.reload("test")
        assert not result.ok
        assert f"{block}.2:8080" in result.message and "Too many open files" in result.message
        assert d.metrics.reloads["rejected"] == 1 and not d.metrics.last_reload_ok
        assert "b" not in d.supervisor.services
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()


async def test_log_level_debug_by_reload_turns_the_dns_query_log_on_and_off(
    tmp_path: Path, block: str
) -> None:
    """``log_level = "debug"`` by a reload logs DNS queries at once (README: "at debug level
    it also logs DNS queries"), and back to ``info`` stops it (the query log decided whether
    it was on only when DNS started serving)."""
    import logging

    logger = logging.getLogger("jitlaunch")
    level = logger.level
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")),
                 top='log_level = "info"')
    base = conf.read_text()
    try:
        async with running(load_config(conf)) as d:
            assert not d.dns.query_log.enabled
            conf.write_text(base.replace('log_level = "info"', 'log_level = "debug"'))
            assert (await d.reload("test")).message == "changed daemon.log_level"
            assert d.dns.query_log.enabled
            conf.write_text(base)
            assert (await d.reload("test")).ok
            assert not d.dns.query_log.enabled
    finally:
        logger.setLevel(level)


async def test_a_service_a_reload_removed_goes_while_the_daemon_drains(
    tmp_path: Path, block: str
) -> None:
    """Shutdown right after a reload removed a running service: the drain waits for another
    service's open connection while the removed one's runtime is dropped, and goes on
    (the drain iterated the services while waiting: RuntimeError, dictionary changed size)."""
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")),
                 service("b", f"{block}.2", echo(tmp_path)))
    async with running(load_config(conf)) as d:
        sup = d.supervisor
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
        stream = await trio.open_tcp_stream(f"{block}.2", 8080)
        async with stream:
            assert await echo_roundtrip(stream, b"held") == b"held"
            conf.write_text(config_text(tmp_path / "state", service("b", f"{block}.2",
                                                                    echo(tmp_path))))
            assert (await d.reload("test")).message == "removed a"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.drain)
                await wait_until(lambda: "a" not in sup.services, timeout=10)
                await stream.aclose()


async def test_a_qemu_kernel_image_that_cannot_be_read_does_not_break_the_reload(
    tmp_path: Path, block: str
) -> None:
    """A reload points the qemu service at a kernel image the daemon cannot read (EIO here;
    a non-root daemon: a file of another user's, mode 0600, which ``jitlaunch check`` does not
    see): the reload is taken (its boot says why it fails) instead of raising OSError."""
    from .conftest import KERNEL
    from .helpers import qemu_service

    conf = write(tmp_path / "jl.toml", tmp_path, qemu_service(f"{block}.1"))
    base = conf.read_text()
    async with running(load_config(conf)) as d:
        conf.write_text(base.replace(f'kernel = "{KERNEL}"', 'kernel = "/proc/self/mem"'))
        result = await d.reload("test")
        assert result.ok and result.message == "changed uk: qemu.kernel", result.message


async def test_a_bug_in_a_reload_is_a_rejected_reload_and_the_daemon_serves(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception inside a reload (a bug) is logged, counted as rejected, turns
    the last-reload gauge off (its alert fires) and is returned to the caller; the daemon
    carries on."""
    conf = write(tmp_path / "jl.toml", tmp_path, service("a", f"{block}.1", demo("a")))
    async with running(load_config(conf)) as d:

        async def broken(trigger: str) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(d, "_reload", broken)
        result = await d.reload("test")
        assert not result.ok and "RuntimeError('a bug')" in result.message
        assert d.metrics.reloads == {"rejected": 1} and d.metrics.last_reload_ok is False
        await d.reload_on_signal()
        assert d.metrics.reloads == {"rejected": 2}
        assert "Hello from a<" in (await http_get(f"{block}.1", 8080)).decode()
