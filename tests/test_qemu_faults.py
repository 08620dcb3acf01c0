"""The qemu backend under faults, with real QEMU: a host port taken before QEMU binds it, QEMU's
last words on a failed start, ``ready = "tcp"`` through user networking, QMP that does not
answer, and bridge networking (MACs, addresses) inside a network namespace of the test's own."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.aio import first_of
from jitlaunch.backends import qemu as qemu_backend
from jitlaunch.backends import vm as vm_module
from jitlaunch.backends.console import last_words
from jitlaunch.backends.qemu.usernet import guest_answered, slirp_fd
from jitlaunch.backends.vm import instance_mac
from jitlaunch.errors import BootFailed, ProtocolError
from jitlaunch.lifecycle.state import State

from .conftest import (
    KERNEL,
    PYTHON,
    ROOT,
    config_text,
    http_get,
    links,
    load,
    needs_netns,
    qemus,
    query_udp,
    running,
    wait_until,
)
from .helpers import dns_server as server
from .helpers import qemu_service as service


@pytest.fixture
def busy() -> Iterator[socket.socket]:
    """A listening socket on a free loopback port, as another program would hold it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s
    finally:
        s.close()


async def test_host_port_taken_before_qemu_binds_it_is_retried(
    state: Path, block: str, busy: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port free_port() picked is taken before QEMU binds it: the launch is retried at once
    with another port, and the boot neither fails nor counts as a failure."""
    taken = busy.getsockname()[1]
    real = vm_module.free_port
    calls = []

    def racy(host: str = "127.0.0.1") -> int:
        calls.append(host)
        return taken if len(calls) == 1 else real(host)

    monkeypatch.setattr(vm_module, "free_port", racy)
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "wait"')))
    async with running(cfg) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        rt = d.supervisor.services["uk"]
        assert rec.header.rcode == RCODE.NOERROR, rt.last_error
        assert rt.boot_failures == 0 and rt.boots == 1
        inst = rt.instance
        assert inst is not None and inst.state is State.READY and inst.handle is not None
        assert inst.handle.endpoint(18080)[1] != taken
        assert len(calls) >= 2
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200")
        assert len(qemus(state)) == 1  # the failed attempt left nothing behind
        log = (state / "logs" / "uk.log").read_text(errors="replace")
        assert "Could not set up host forwarding rule" in log  # the first attempt, kept


async def test_boot_failure_names_qemus_last_words(state: Path, block: str) -> None:
    """QEMU refuses the kernel: the boot failure (which the supervisor logs) quotes QEMU's own
    error line and names the log file."""
    kernel = state / "k.elf"
    kernel.write_bytes(b"not a kernel" * 100)
    text = service(f"{block}.1", extra='answer = "wait"').replace(str(KERNEL), str(kernel))
    async with running(load(config_text(state, text))) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        assert rec.header.rcode == RCODE.SERVFAIL
        error = d.supervisor.services["uk"].last_error or ""
        assert "status 1" in error and "invalid kernel header" in error, error
        assert str(state / "logs" / "uk.log") in error, error
        assert not list((state / "run").glob("*"))


async def test_console_is_drained_after_qemu_exits(state: Path, block: str) -> None:
    """QEMU's last words can still be on their way when its exit is seen (here a process that
    shares the console pipe delivers them 300 ms late): they reach the log and the failure."""
    kernel = state / "k.elf"
    kernel.write_bytes(b"not a kernel" * 100)
    wrapper = state / "late-qemu"
    wrapper.write_text(
        "#!/bin/bash\n"
        "exec > >(sleep 0.3; exec cat) 2>&1\n"
        'exec qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    text = service(f"{block}.1", extra='answer = "wait"', qemu=f'binary = "{wrapper}"')
    text = text.replace(str(KERNEL), str(kernel))
    async with running(load(config_text(state, text))) as d:
        rec = await query_udp(server(d), "uk.jit.test")
        assert rec.header.rcode == RCODE.SERVFAIL
        error = d.supervisor.services["uk"].last_error or ""
        log = (state / "logs" / "uk.log").read_text(errors="replace")
        assert "invalid kernel header" in log, log
        assert "invalid kernel header" in error, error


async def test_ready_tcp_with_user_networking_boots(state: Path, block: str) -> None:
    """`ready = "tcp"` through QEMU's host forward: the probe waits for the guest itself to
    answer (slirp accepts on the host side before the guest listens) and the boot succeeds."""
    cfg = load(config_text(state, service(f"{block}.1", extra='answer = "wait"', qemu='ready = "tcp"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        for _ in range(3):
            rec = await query_udp(server(d), "uk.jit.test")
            assert rec.header.rcode == RCODE.NOERROR, rt.last_error
            body = await http_get(f"{block}.1", 18080)
            assert body.startswith(b"HTTP/1.1 200")
            inst = rt.instance
            assert inst is not None and inst.handle is not None and inst.handle.pid is not None
            # the probe tells connections apart: ours is found by slirp's host socket
            assert isinstance(inst.handle, qemu_backend.QemuHandle)
            host, port = inst.handle.endpoint(18080)
            qmp = await inst.handle.qmp()
            async with await trio.open_tcp_stream(host, port) as stream:
                fd = None
                with trio.fail_after(5):
                    while fd is None:
                        fd = slirp_fd(inst.handle.pid, port, stream.socket.getsockname()[1])
                        await trio.sleep(0.005)
                    while not guest_answered(
                            await qmp.execute("human-monitor-command", **{"command-line": "info usernet"}),
                            80, fd):
                        await trio.sleep(0.005)
            os.kill(inst.handle.pid, 9)  # the next round boots a new one
            await wait_until(lambda: rt.instance is None)
        assert rt.boot_failures == 0


async def test_ready_tcp_waits_for_the_guest_not_for_slirp(state: Path, block: str) -> None:
    """With the guest's CPUs stopped (QEMU started with -S), slirp still accepts connections to
    the host forward; the probe must not call that ready. Once the guest runs, it is."""
    cfg = load(config_text(state, service(
        f"{block}.1", qemu='ready = "tcp"\nextra_args = ["-S"]')))
    async with running(cfg) as d:
        inst = d.supervisor.request("uk")
        assert inst is not None
        await wait_until(lambda: inst.handle is not None)
        handle = inst.handle
        assert handle is not None
        qmp = await handle.qmp()  # type: ignore[attr-defined]
        with trio.move_on_after(1.5):
            await wait_until(lambda: inst.state is not State.STARTING, timeout=2)
        assert inst.state is State.STARTING
        await qmp.execute("cont")
        await wait_until(lambda: inst.state is State.READY)
        body = await http_get(f"{block}.1", 18080)
        assert body.startswith(b"HTTP/1.1 200")


# ---- the pure parts -----------------------------------------------------------------------

USERNET = (
    "Hub -1 (n0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[{state}]      12       127.0.0.1 55205       10.0.2.15    {port}     0     0\r\n"
    "  TCP[HOST_FORWARD]   8       127.0.0.1 55205       10.0.2.15    80     0     0\r\n"
    "  UDP[236 sec]        9       10.0.2.15   123       10.0.2.2    80     0     0\r\n"
)


@pytest.mark.parametrize(
    ("state_", "port", "answered"),
    [("ESTABLISHED", 80, True), ("CLOSE_WAIT", 80, True), ("SYN_SENT", 80, False),
     ("ESTABLISHED", 81, False), ("NONE", 80, False)],
)
def test_guest_answered_reads_info_usernet(state_: str, port: int, answered: bool) -> None:
    text = USERNET.format(state=state_, port=port)
    assert guest_answered(text, 80) is answered
    assert guest_answered(text, 80, fd=12) is answered
    assert not guest_answered(text, 80, fd=13)  # another client's connection
    assert not guest_answered(USERNET.split("  TCP[{state}]")[0], 80)


def test_last_words_prefers_qemus_own_lines() -> None:
    lines = [b"hello: booting", b"qemu-system-x86_64: -kernel k.elf: invalid kernel header", b""]
    assert last_words(lines, "qemu-system-x86_64") == (
        "qemu-system-x86_64: -kernel k.elf: invalid kernel header")
    assert last_words([b"a", b"panic: \x1b[31mout of memory\x00"], "/x/kvm") == (
        "panic: ?[31mout of memory?")
    assert last_words([b"kvm: bad", b"guest"], "/x/kvm") == "kvm: bad"
    assert last_words([], "qemu") == ""
    assert len(last_words([b"x" * 5000], "qemu")) == 300
    long = b"qemu-system-x86_64: -qmp unix:/" + b"x" * 400 + b".qmp: UNIX socket path is too long"
    words = last_words([long], "qemu-system-x86_64")
    assert words.startswith("qemu-system-x86_64: -qmp") and words.endswith("is too long")


def test_instance_macs_are_distinct_stable_unicast(tmp_path: Path) -> None:
    macs = {instance_mac(tmp_path, s, n) for s in ("a", "b") for n in (1, 2, "pool3")}
    assert len(macs) == 6
    assert instance_mac(tmp_path, "a", 1) == instance_mac(tmp_path, "a", 1)
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 1 == 0 and first & 2 == 2 and len(bytes.fromhex(mac.replace(":", ""))) == 6


async def test_qmp_that_does_not_answer_fails_with_a_reason(state: Path, block: str) -> None:
    """A frozen QEMU (SIGSTOP) never answers QMP: a resume is a BootFailed naming the timeout,
    and opening QMP afresh a ProtocolError after the boot timeout, never a hang or a bare
    trio.TooSlowError."""
    cfg = load(config_text(state, service(f"{block}.1").replace('"20s"', '"2s"')))
    async with running(cfg) as d:
        backend = d.backends["qemu"]
        handle = await backend.start(cfg.services[0], 99, None)
        assert isinstance(handle, qemu_backend.QemuHandle) and handle.pid is not None
        try:
            with trio.fail_after(15):  # the console is read by wait_exited, as the supervisor does
                assert (await first_of(handle.wait_ready, handle.wait_exited))[0] == 0
            qmp = await handle.qmp()
            qmp.reply_timeout = 0.5
            os.kill(handle.pid, signal.SIGSTOP)
            with trio.fail_after(3), pytest.raises(BootFailed, match=r"no answer within 0\.5 s"):
                await handle.resume()
            await qmp.aclose()
            handle._qmp = None
            with trio.fail_after(5), pytest.raises(ProtocolError, match=r"within 2 s"):
                await handle.qmp()
        finally:
            os.kill(handle.pid, signal.SIGCONT)
            await handle.destroy()
        assert not list((state / "run").glob("*"))


# ---- bridge networking, inside a network namespace of the test's own -----------------------


ATTACH_CONCURRENTLY = """
import ipaddress, threading, trio
from jitlaunch.backends import bridge

on_loop = []
real_delete = bridge._delete_link

def delete(*args):
    on_loop.append(threading.current_thread() is threading.main_thread())
    real_delete(*args)

bridge._delete_link = delete

async def main():
    subnet = ipaddress.IPv4Network("10.77.0.0/24")
    leases = []

    async def one():
        leases.append(await bridge.attach("jl0", subnet, "0badcafe"))

    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(one)
    print(" ".join(sorted(lease.ip for lease in leases)))
    async with trio.open_nursery() as n:
        for lease in leases:
            n.start_soon(lease.release)
    print("on the event loop" if any(on_loop) else f"in worker threads: {len(on_loop)}")

trio.run(main)
"""


@needs_netns
def test_concurrent_attaches_get_distinct_addresses(netns: list[str]) -> None:
    """Four boots attach to the bridge at once: four addresses (reserved before the blocking
    netlink calls), and the releases delete the taps in worker threads, not on the loop."""
    res = subprocess.run([*netns, PYTHON, "-c", ATTACH_CONCURRENTLY], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    ips, where = res.stdout.splitlines()
    assert len(set(ips.split())) == 4, ips
    assert where == "in worker threads: 4"
    assert "jl0" in links(netns) and "jlt" not in links(netns)


@needs_netns
async def test_bridge_pool_refill_keeps_the_handed_out_address(
    state: Path, netns: list[str]
) -> None:
    """conf/bridge.toml (pool = 1): the refill's new member boots after a lookup took the pool
    member and DNS handed its address over. With one MAC for every guest the refill took that
    MAC over on the bridge and the address went dark; each guest has its own now."""
    text = (ROOT / "conf" / "bridge.toml").read_text()
    assert "pool = 1" in text
    text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
    conf = state / "bridge.toml"
    conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
    proc = None
    try:
        with open(state / "daemon.log", "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*netns, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile)

        async def ask() -> str:
            res = await trio.run_process(
                [*netns, "dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
                 "hello.jit.test", "A"], capture_stdout=True, check=False)
            lines = [ln for ln in res.stdout.decode().splitlines() if not ln.startswith(";")]
            return "\n".join(lines).strip()

        async def reachable(addr: str) -> bool:
            res = await trio.run_process(
                [*netns, PYTHON, "-c", f"import socket; s = socket.create_connection(('{addr}', 80), 1);"
                 "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.settimeout(1);"
                 "assert s.recv(100).startswith(b'HTTP/1.1 200')"],
                capture_stdout=True, capture_stderr=True, check=False)
            return res.returncode == 0

        # the pool member is booted and paused before any lookup
        daemon_log = state / "daemon.log"
        await wait_until(lambda: b"warm pool member is ready" in daemon_log.read_bytes(), timeout=30)
        with trio.fail_after(30):
            while not (addr := await ask()).startswith("10.77.0."):
                await trio.sleep(0.05)
        assert await reachable(addr)
        # the refill boots a second guest on the bridge (READY, then paused)
        await wait_until(lambda: daemon_log.read_bytes().count(b"warm pool member is ready") == 2,
                         timeout=30)
        assert len(qemus(state)) == 2
        for _ in range(5):  # the handed-out address keeps answering
            assert await reachable(addr), f"{addr} went dark after the pool refill"
        macs = set()
        for pid in qemus(state):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
            macs |= {a.split("mac=")[1] for a in argv if "mac=" in a}
        assert len(macs) == 2, macs
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert "jlt" not in links(netns)
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # a clean stop takes its QEMUs along
            with trio.move_on_after(20):
                await proc.wait()
            proc.kill()
            await proc.wait()


async def test_mac_is_kept_across_save_and_restore(state: Path, block: str) -> None:
    """stop = "save": the restored QEMU gets the MAC the guest booted with; a new instance
    another one. (The state directory has a space and a comma: QEMU and the shell see it quoted.)"""
    state = state / "a dir, too"
    cfg = load(config_text(state, service(
        f"{block}.1", extra='idle_timeout = "300ms"\nstop = "save"\nanswer = "proxy"')))
    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = rt.instance
        assert inst is not None and isinstance(inst.handle, qemu_backend.QemuHandle)
        mac = inst.handle.mac
        await wait_until(lambda: inst.state is State.SAVED, timeout=20)
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        assert rt.instance is inst and isinstance(inst.handle, qemu_backend.QemuHandle)
        assert inst.handle.restoring is None  # restored, not booted afresh
        assert inst.handle.mac == mac
        log = (state / "logs" / "uk.log").read_text(errors="replace")
        assert "-incoming" in log and f"mac={mac}" in log
    assert mac != instance_mac(state, "uk", 2)


async def test_no_fd_or_file_leaks_over_failed_and_killed_boots(state: Path, block: str) -> None:
    """Boots that fail at start-up (a bad kernel) and instances killed from outside leave the
    daemon's fd count where it was, and nothing in run/."""
    kernel = state / "k.elf"
    kernel.write_bytes(KERNEL.read_bytes())
    cfg = load(config_text(state, service(
        f"{block}.1", extra='answer = "wait"\nretry_backoff = "10ms"\nretry_backoff_max = "10ms"'
    ).replace(str(KERNEL), str(kernel))))

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with running(cfg) as d:
        rt = d.supervisor.services["uk"]

        async def cycle(good: bool) -> None:
            kernel.write_bytes(KERNEL.read_bytes() if good else b"not a kernel" * 100)
            with trio.fail_after(20):
                while (await query_udp(server(d), "uk.jit.test")).header.rcode != (
                        RCODE.NOERROR if good else RCODE.SERVFAIL):
                    await trio.sleep(0.02)
            if good:
                inst = rt.instance
                assert inst is not None and inst.handle is not None and inst.handle.pid
                os.kill(inst.handle.pid, signal.SIGKILL)
                await wait_until(lambda: rt.instance is None)
            else:
                await wait_until(lambda: rt.instance is None or rt.instance.state is State.FAILED)

        await cycle(True)
        await cycle(False)
        before = fds()
        for good in (True, False, True, False):
            await cycle(good)
        await wait_until(lambda: not list((state / "run").glob("*")))
        assert fds() == before
        assert not qemus(state)


@needs_netns
async def test_bridge_ready_tcp_boots(state: Path, netns: list[str]) -> None:
    """`ready = "tcp"` in bridge mode: the probe connects to the guest's own address before it
    answers ARP; unreachable is "not yet", and the boot succeeds well within its timeout."""
    text = (ROOT / "conf" / "bridge.toml").read_text().replace("pool = 1", 'ready = "tcp"')
    text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
    conf = state / "bridge.toml"
    conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
    proc = None
    try:
        with open(state / "daemon.log", "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*netns, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile)
        daemon_log = state / "daemon.log"
        await wait_until(lambda: b"serving" in daemon_log.read_bytes(), timeout=30)
        res = await trio.run_process(
            [*netns, PYTHON, "-m", "jitlaunch.cli", "probe", "hello.jit.test", "--server",
             "127.0.0.1:5300", "--port", "80"], capture_stdout=True, capture_stderr=True,
            check=False)
        assert res.returncode == 0, res.stderr.decode() + daemon_log.read_text()
        assert b"HTTP/1.1 200 OK" in res.stdout
        log = daemon_log.read_text()
        assert "hello#1 ready in" in log and "failed to boot" not in log, log
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(20):
                await proc.wait()
            proc.kill()
            await proc.wait()
