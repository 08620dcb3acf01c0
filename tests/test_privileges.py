"""``user`` and ``group`` for instances: the process really runs as that user, with that
group and the user's own supplementary groups (never root's); an unknown user or a working
directory the user cannot enter is a clear boot failure."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.backends.process import _identity
from jitlaunch.backends.qemu import backend as qemu_backend
from jitlaunch.backends.qemu.argv import build_argv
from jitlaunch.backends.qemu.backend import qemu_runas
from jitlaunch.errors import BootFailed, ConfigError
from jitlaunch.identity import (
    Identity,
    UnknownIdentity,
    enter_problem,
    execute_problem,
    resolve,
)
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
    parse_config,
    qemus,
    query_udp,
    running,
    wait_until,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

#: A command the unprivileged user can run: the daemon's interpreter may live where it may not
#: (a pyenv under /root), the system's is readable by all.
SYSTEM_PYTHON = "/usr/bin/python3"
SERVE = f"{SYSTEM_PYTHON} -u -m http.server --bind {{address}} {{port}}"


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this host")


def _service(front: str, process: str, command: str = SERVE, extra: str = "") -> str:
    return f"""
[[service]]
name = "svc"
front = ["{front}"]
ports = [18080]
answer = "wait"
boot_timeout = "10s"
retry_backoff = "100ms"
{extra}
[service.process]
command = "{command}"
{process}
"""


def _status(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.toml")
    return str(info.value)


BASE = """
[dns]
zones = ["jit.test"]
[[service]]
name = "svc"
front = ["127.77.0.1"]
ports = [8080]
[service.process]
command = "true"
"""


def test_user_and_group_are_parsed_as_written() -> None:
    cfg = parse_config(BASE + 'user = "nobody"\ngroup = 4\n', "c.toml")
    settings = cfg.service("svc").settings
    assert (settings.user, settings.group) == ("nobody", 4)
    numeric = parse_config(BASE + 'user = "1234"\n', "c.toml").service("svc").settings
    assert (numeric.user, numeric.group) == (1234, None)
    assert _config_error(BASE + 'group = "nogroup"\n') == (
        "c.toml: service 'svc': process.group: needs user: set the user the instances run as too")
    assert _config_error(BASE + "user = true\n") == (
        "c.toml: service 'svc': process.user: expected a user name or uid, got True")
    assert _config_error(BASE + 'user = "a:b"\n') == (
        "c.toml: service 'svc': process.user: expected a user name or uid, got 'a:b'")
    assert _config_error(BASE + "user = -1\n").endswith("got -1")
    # A number as a string is a uid only in ASCII digits, and in the uid range as a number is.
    assert parse_config(BASE + 'user = "\u00b2"\n', "c.toml").service("svc").settings.user == "\u00b2"
    for big in ("4294967295", "99999999999999999999"):
        assert _config_error(BASE + f'user = "{big}"\n').endswith(f"got {big!r}")
        assert _config_error(BASE + f'user = "nobody"\ngroup = "{big}"\n').endswith(f"got {big!r}")


def test_resolve() -> None:
    nobody = _nobody()
    ident = resolve("nobody")
    assert (ident.uid, ident.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert ident.groups == tuple(os.getgrouplist("nobody", nobody.pw_gid))
    assert 0 not in ident.groups
    assert resolve("nobody", 0).gid == 0
    assert resolve(nobody.pw_uid).uid == nobody.pw_uid
    with pytest.raises(UnknownIdentity, match="user 'no-such-user-jl' does not exist on this host"):
        resolve("no-such-user-jl")
    with pytest.raises(UnknownIdentity, match="group 'no-such-group-jl' does not exist"):
        resolve("nobody", "no-such-group-jl")
    free_uid = next(u for u in range(40000, 50000) if not _has_uid(u))
    with pytest.raises(UnknownIdentity, match="has no entry in the passwd database"):
        resolve(free_uid)
    bare = resolve(free_uid, 40000)
    assert (bare.uid, bare.gid, bare.groups) == (free_uid, 40000, (40000,))


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may enter (pytest's tmp_path lies below a directory only root may
    enter), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="jl-privileges-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_enter_and_execute_problems(open_dir: Path) -> None:
    _nobody()
    tmp_path = open_dir
    nobody, root = resolve("nobody"), resolve("root")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inner").mkdir()
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    assert enter_problem(tmp_path, nobody) is None
    assert enter_problem(closed, root) is None
    assert enter_problem(closed, nobody) == f"{nobody} may not enter {closed}"
    assert enter_problem(closed / "inner", nobody) == f"{nobody} may not enter {closed}"
    assert enter_problem(tmp_path / "missing", nobody) == (
        f"{tmp_path / 'missing'}: No such file or directory")
    assert execute_problem(script, root) is None
    assert execute_problem(script, nobody) == f"{nobody} may not run {script}"
    script.chmod(0o755)
    assert execute_problem(script, nobody) is None
    script.chmod(0o644)
    assert execute_problem(script, root) == f"{script} is not an executable file"
    assert execute_problem(script, None) == f"{script} is not an executable file"
    assert execute_problem(tmp_path / "missing", None) == f"{tmp_path / 'missing'} does not exist"


@root_only
async def test_a_process_runs_as_its_user_and_group(tmp_path: Path, block: str) -> None:
    nobody = _nobody()
    cfg = load(config_text(tmp_path, _service(f"{block}.1", 'user = "nobody"')))
    async with running(cfg) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        reply = await query_udp(server, "svc.jit.test")
        assert reply.header.rcode == RCODE.NOERROR, d.supervisor.services["svc"].last_error
        inst = d.supervisor.services["svc"].instance
        assert inst is not None and inst.handle is not None and inst.handle.pid is not None
        st = _status(inst.handle.pid)
        assert st["Uid"] == [nobody.pw_uid] * 4
        assert st["Gid"] == [nobody.pw_gid] * 4
        assert sorted(st["Groups"]) == sorted(os.getgrouplist("nobody", nobody.pw_gid))
        assert 0 not in st["Groups"]
        environ = _environ(inst.handle.pid)
        assert b"USER=nobody" in environ and f"HOME={nobody.pw_dir}".encode() in environ
        # Its log was opened by the daemon and handed over: the child's output is in it.
        logfile = tmp_path / "logs" / "svc.log"
        await wait_until(lambda: "Serving HTTP" in logfile.read_text())

    other = load(config_text(tmp_path, _service(f"{block}.2", 'user = "nobody"\ngroup = "daemon"')))
    async with running(other) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        assert (await query_udp(server, "svc.jit.test")).header.rcode == RCODE.NOERROR
        inst = d.supervisor.services["svc"].instance
        assert inst is not None and inst.handle is not None and inst.handle.pid is not None
        st = _status(inst.handle.pid)
        gid = resolve("nobody", "daemon").gid
        assert st["Uid"] == [nobody.pw_uid] * 4 and st["Gid"] == [gid] * 4
        assert sorted(st["Groups"]) == sorted(os.getgrouplist("nobody", gid))


@root_only
async def test_a_uid_without_a_passwd_entry_gets_none_of_the_daemons_user_variables(
    tmp_path: Path, block: str,
) -> None:
    free_uid = next(u for u in range(40000, 50000) if not _has_uid(u))
    cfg = load(config_text(tmp_path, _service(f"{block}.1", f"user = {free_uid}\ngroup = {free_uid}")))
    env = {"HOME": "/root", "USER": "root", "LOGNAME": "root"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        async with running(cfg) as d:
            server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
            reply = await query_udp(server, "svc.jit.test")
            assert reply.header.rcode == RCODE.NOERROR, d.supervisor.services["svc"].last_error
            inst = d.supervisor.services["svc"].instance
            assert inst is not None and inst.handle is not None and inst.handle.pid is not None
            assert _status(inst.handle.pid)["Uid"] == [free_uid] * 4
            environ = _environ(inst.handle.pid)
    assert not [v for v in environ if v.split(b"=", 1)[0] == b"HOME"]
    assert f"USER={free_uid}".encode() in environ and f"LOGNAME={free_uid}".encode() in environ


@root_only
async def test_an_unknown_user_is_a_clear_boot_failure(tmp_path: Path, block: str) -> None:
    cfg = load(config_text(tmp_path, _service(f"{block}.1", 'user = "no-such-user-jl"')))
    async with running(cfg) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        assert (await query_udp(server, "svc.jit.test")).header.rcode == RCODE.SERVFAIL
        rt = d.supervisor.services["svc"]
        assert rt.last_error is not None
        assert "user 'no-such-user-jl' does not exist on this host" in rt.last_error


@root_only
async def test_a_directory_the_user_cannot_enter_is_a_clear_boot_failure(
    tmp_path: Path, block: str,
) -> None:
    _nobody()
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    cfg = load(config_text(tmp_path, _service(
        f"{block}.1", f'user = "nobody"\ndirectory = "{closed}"')))
    async with running(cfg) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        assert (await query_udp(server, "svc.jit.test")).header.rcode == RCODE.SERVFAIL
        rt = d.supervisor.services["svc"]
        assert rt.last_error is not None
        assert "cannot use the working directory: nobody (uid" in rt.last_error
        assert "may not enter" in rt.last_error



def test_a_symlink_loop_on_the_working_directory_is_a_boot_failure(tmp_path: Path) -> None:
    """Python 3.11's Path.resolve raises RuntimeError for a loop: it must not surface as an
    "internal error" (a traceback logged as a bug) but as the directory's problem."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    ident = resolve(os.getuid())
    problem = enter_problem(tmp_path / "a", ident)
    assert problem is not None and str(tmp_path / "a") in problem
    settings = parse_config(BASE + f'user = "{ident.label}"\ndirectory = "{tmp_path / "a"}"\n',
                            "c.toml").service("svc").settings
    with pytest.raises(BootFailed, match="cannot use the working directory"):
        _identity(settings)


async def test_the_qemu_user_is_looked_up_in_a_worker_thread(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As for a process service: NSS may ask a network service, which must not stall DNS."""
    if not KERNEL.exists():
        pytest.skip("needs the bundled image (make -C images)")
    threads: list[bool] = []

    def spy(user: str | int, group: str | int | None = None) -> Identity:
        threads.append(threading.current_thread() is threading.main_thread())
        return resolve(user, group)

    monkeypatch.setattr(qemu_backend, "resolve", spy)
    cfg = load(config_text(tmp_path, _qemu_service(f"{block}.1", "destroy",
                                                   'user = "no-such-user-jl"')))
    async with running(cfg) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        await query_udp(server, "uk.jit.test")  # answer = "proxy": the front, at once
        rt = d.supervisor.services["uk"]
        await wait_until(lambda: rt.last_error is not None)
        assert "user 'no-such-user-jl' does not exist on this host" in str(rt.last_error)
    assert threads and not any(threads)


def _qemu_service(front: str, mode: str, qemu: str) -> str:
    return f"""
[[service]]
name = "uk"
front = ["{front}"]
ports = [18080]
backend = "qemu"
boot_timeout = "20s"
idle_timeout = "500ms"
stop = "{mode}"
answer = "proxy"
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "tcg"
grace = "1s"
{qemu}
"""


@root_only
@pytest.mark.parametrize("mode", ["destroy", "shutdown", "pause", "save"])
async def test_qemu_runs_as_its_user_in_every_stop_mode(tmp_path: Path, block: str,
                                                        mode: str) -> None:
    """QEMU drops to the user (-runas) once its console, QMP socket, accelerator and network
    are open; every stop mode still works: pause and resume, and save (the file handed over
    by the daemon) then restore."""
    nobody = _nobody()
    if not KERNEL.exists() or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs QEMU and the bundled image (make -C images)")
    for qemu, uid, gid in (('user = "nobody"', nobody.pw_uid, nobody.pw_gid),
                           ('user = "nobody"\ngroup = "daemon"', nobody.pw_uid,
                            resolve("nobody", "daemon").gid)):
        state = tmp_path / f"run{qemu.count(chr(10))}"
        cfg = load(config_text(state, _qemu_service(f"{block}.1", mode, qemu)))
        async with running(cfg) as d:
            rt = d.supervisor.services["uk"]
            assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
            inst = rt.instance
            assert inst is not None and inst.handle is not None and inst.handle.pid is not None
            pid = inst.handle.pid
            st = _status(pid)
            assert (st["Uid"], st["Gid"]) == ([uid] * 4, [gid] * 4)
            assert 0 not in st["Groups"]
            await wait_until(lambda i=inst: i.state in (State.STOPPED, State.SAVED),
                             timeout=20)
            assert rt.idle_stops == 1, rt.last_error
            if mode == "save":
                assert (state / "saved" / "uk.state").stat().st_size > 0
            again = await http_get(f"{block}.1", 18080)
            assert again.startswith(b"HTTP/1.1 200"), rt.last_error
            now = rt.instance
            assert now is not None and now.handle is not None and now.handle.pid is not None
            if mode == "pause":
                assert now.handle.pid == pid
            if mode == "save":
                assert now.handle.pid != pid and "-incoming" in (state / "logs" / "uk.log").read_text()
            st = _status(now.handle.pid)
            assert (st["Uid"], st["Gid"]) == ([uid] * 4, [gid] * 4)


@needs_netns
async def test_qemu_as_its_user_with_bridge_networking(
    tmp_path: Path, netns: list[str],
) -> None:
    """conf/bridge.toml with user = "nobody": the tap is opened before QEMU drops to the user,
    so the guest on the bridge answers at its handed-over address; the warm pool member
    (booted, paused, resumed) runs as the user too."""
    nobody = _nobody()
    if not KERNEL.exists():
        pytest.skip("needs the bundled image (make -C images)")
    state = tmp_path / "state"
    text = (ROOT / "conf" / "bridge.toml").read_text()
    text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
    text = text.replace("pool = 1", 'pool = 1\nuser = "nobody"')
    conf = tmp_path / "bridge.toml"
    conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
    log = tmp_path / "daemon.log"
    proc = None
    try:
        with open(log, "wb") as out:
            proc = await trio.lowlevel.open_process(
                [*netns, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=out)
        # The pool member is booted (and paused) before the lookup takes it.
        await wait_until(lambda: "warm pool member is ready" in log.read_text(), timeout=40)
        with trio.fail_after(40):
            while True:
                res = await trio.run_process(
                    [*netns, "dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
                     "hello.jit.test", "A"], capture_stdout=True, check=False)
                addr = res.stdout.decode().strip()
                if addr.startswith("10.77.0."):
                    break
                assert proc.returncode is None, log.read_text()
                await trio.sleep(0.05)
        res = await trio.run_process(
            [*netns, PYTHON, "-c", f"import socket; s = socket.create_connection(('{addr}', 80), 2);"
             "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.settimeout(2);"
             "assert s.recv(100).startswith(b'HTTP/1.1 200')"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert res.returncode == 0, res.stderr
        # The pool refilled: its new member is READY, so its QEMU has dropped to the user (it
        # does that before it runs the guest; a QEMU still starting is root).
        await wait_until(lambda: log.read_text().count("warm pool member is ready") == 2,
                         timeout=40)
        assert len(qemus(state)) == 2
        for pid in qemus(state):
            st = _status(pid)
            assert (st["Uid"], st["Gid"]) == ([nobody.pw_uid] * 4, [nobody.pw_gid] * 4)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert "jlt" not in links(netns)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in qemus(state):
            os.kill(pid, signal.SIGKILL)


def test_qemu_runas() -> None:
    """-runas: a user name alone (QEMU then takes its groups), else uid:gid (that gid only)."""
    _nobody()
    settings = parse_config(BASE.replace('[service.process]\ncommand = "true"', f"""
backend = "qemu"
[service.qemu]
kernel = "{KERNEL}"
user = "nobody"
""")).service("svc").settings
    assert qemu_runas(settings) == "nobody"
    assert qemu_runas(replace(settings, user=None)) is None
    daemon_gid = resolve("nobody", "daemon").gid
    assert qemu_runas(replace(settings, group="daemon")) == f"{resolve('nobody').uid}:{daemon_gid}"
    assert qemu_runas(replace(settings, user=resolve("nobody").uid)) == (
        f"{resolve('nobody').uid}:{resolve('nobody').gid}")
    with pytest.raises(UnknownIdentity):
        qemu_runas(replace(settings, user="no-such-user-jl"))
    argv = build_argv(settings, binary="qemu", accel="tcg", cmdline="", qmp_path=Path("/q"),
                      pidfile=Path("/p"), service="svc", number=1, netdev="user,id=n0",
                      mac="02:00:00:00:00:01", runas="nobody")
    assert argv[argv.index("-runas") + 1] == "nobody"
    assert "-runas" not in build_argv(
        settings, binary="qemu", accel="tcg", cmdline="", qmp_path=Path("/q"), pidfile=Path("/p"),
        service="svc", number=1, netdev="user,id=n0", mac="02:00:00:00:00:01")


async def test_a_process_instance_does_not_inherit_the_daemons_systemd_channel(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOTIFY_SOCKET and the watchdog variables are the daemon's, not its instances'."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    cfg = load(config_text(tmp_path, _service(f"{block}.1", "")))
    async with running(cfg) as d:
        server = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        await query_udp(server, "svc.jit.test")
        inst = d.supervisor.services["svc"].instance
        assert inst is not None and inst.handle is not None and inst.handle.pid is not None
        names = {v.split(b"=", 1)[0] for v in _environ(inst.handle.pid)}
        assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC"}, names
        assert b"JITLAUNCH_INSTANCE" in names
