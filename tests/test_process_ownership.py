"""The daemon never harms what is not its own, and its own never escapes it (issue 16).

Real daemons, real processes. A process instance's command leaves a grandchild behind in a
session of its own (``setsid sleep``, also with a cleared environment: ``setsid env -i``):
a stop of the instance, a SIGTERM of the daemon, and the next start after a SIGKILL of the
daemon all end it; a daemon on another state directory, even one whose path starts like
ours (``<dir>`` and ``<dir>:b``), ends nothing of ours. Instances never see the daemon's
environment. Every cgroup a test's daemons make is gone when the test ends (the ``cgroups``
fixture checks, and removes what is left even when the test fails).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from dnslib import RCODE

from jitlaunch.backends import procgroup
from jitlaunch.backends.childenv import DEFAULT_PATH
from jitlaunch.backends.owner import state_id
from jitlaunch.backends.process import ProcessBackend
from jitlaunch.controlproto import call
from jitlaunch.daemon import Daemon

from .conftest import DEMO, PYTHON, alive, config_text, load, query_udp, running, wait_until

OWN = procgroup.own_cgroup()
CGROUPS = procgroup.cgroup_problem(OWN) is None
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason="needs a cgroup2 hierarchy the test may "
                                   f"write ({procgroup.cgroup_problem(OWN)})")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
#: Runs as any user: the system's interpreter (the .venv's may live where nobody may read).
SERVE = "/usr/bin/python3 -u -m http.server --bind {address} {port}"
ESCAPES = {"setsid": "setsid", "env -i": "setsid env -i"}


def _tag() -> str:
    """A sleep time no other process on the machine uses: the grandchild's name."""
    return f"7777.{secrets.randbelow(10**6):06d}"


def _sleepers(tag: str) -> list[int]:
    """Live processes running ``sleep <tag>``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", tag.encode()] and alive(int(entry)):
            found.append(int(entry))
    return found


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


def _command(tag: str, escape: str = "setsid", serve: str = DEMO) -> str:
    """A command that leaves ``sleep <tag>`` behind, escaped from its process group."""
    return f"sh -c '{escape} sleep {tag} & exec {serve}'"


def _service(front: str, command: str, process: str = "", name: str = "svc") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [18080]
answer = "wait"
idle_timeout = "5m"
boot_timeout = "20s"
[service.process]
command = "{command}"
grace = "2s"
{process}
"""


def _cgroups_of(state: Path) -> list[Path]:
    if OWN is None:
        return []
    prefix = f"jitlaunch-{state_id(state)}-"
    return [p for p in OWN.iterdir() if p.name.startswith(prefix)]


class Cleanup:
    """What a test made that must not outlive it: the state directories (their cgroups) and
    the grandchildren's tags."""

    def __init__(self) -> None:
        self.states: list[Path] = []
        self.tags: list[str] = []

    def state(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.states.append(path)
        return path

    def tag(self) -> str:
        self.tags.append(tag := _tag())
        return tag


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    made = Cleanup()
    failed = []
    try:
        yield made
    finally:
        for tag in made.tags:
            for pid in _sleepers(tag):
                failed.append(f"sleep {tag} (pid {pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for state in made.states:
            for group in _cgroups_of(state):
                failed.append(str(group))
                procgroup.remove_tree(group)
    assert not failed, f"left behind: {failed}"


async def _ask(server: tuple[str, int], name: str = "svc") -> None:
    reply = await query_udp(server, f"{name}.jit.test")
    assert reply.header.rcode == RCODE.NOERROR


def _server(daemon: Daemon) -> tuple[str, int]:
    ep = daemon.dns_endpoints[0]
    return ep.host, ep.port


@pytest.mark.parametrize("escape", list(ESCAPES))
async def test_jitlaunch_stop_ends_a_grandchild_in_a_session_of_its_own(
    tmp_path: Path, block: str, cleanup: Cleanup, escape: str
) -> None:
    state = cleanup.state(tmp_path)
    tag = cleanup.tag()
    async with running(load(config_text(state, _service(f"{block}.1",
                                                        _command(tag, ESCAPES[escape]))))) as d:
        await _ask(_server(d))
        await wait_until(lambda: len(_sleepers(tag)) == 1)
        if CGROUPS:
            assert len(_cgroups_of(state)) == 1
        reply = await trio.to_thread.run_sync(
            lambda: call(state / "control.sock", {"command": "stop", "service": "svc"}))
        assert reply["ok"] is True, reply
        assert _sleepers(tag) == []
        assert _cgroups_of(state) == []


async def _daemon_process(conf: Path, log: Path, server: tuple[str, int]) -> trio.Process:
    """``jitlaunch run`` as a process of its own, once it has answered a lookup of svc (its
    instance is ready: the service answers "wait")."""
    with open(log, "wb") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile)
    try:
        with trio.fail_after(30):
            while True:
                with trio.move_on_after(1):
                    try:
                        if (await query_udp(server, "svc.jit.test")).rr:
                            return proc
                    except OSError:
                        pass
                assert proc.returncode is None, _read(log)
                await trio.sleep(0.05)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


def _config_file(state: Path, block: str, command: str) -> tuple[Path, tuple[str, int]]:
    conf = state / "jl.toml"
    text = config_text(state, _service(f"{block}.1", command))
    conf.write_text(text.replace("127.0.0.1:0", f"{block}.53:5353"))
    return conf, (f"{block}.53", 5353)


async def test_sigterm_of_the_daemon_ends_a_grandchild_in_a_session_of_its_own(
    tmp_path: Path, block: str, cleanup: Cleanup
) -> None:
    state = cleanup.state(tmp_path)
    tag = cleanup.tag()
    conf, server = _config_file(state, block, _command(tag, ESCAPES["env -i"]))
    proc = await _daemon_process(conf, tmp_path / "log", server)
    try:
        await wait_until(lambda: len(_sleepers(tag)) == 1)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        proc.kill()
        await proc.wait()
    assert _sleepers(tag) == []
    assert _cgroups_of(state) == []


@pytest.mark.parametrize("escape", list(ESCAPES))
async def test_after_a_sigkill_the_next_daemon_on_the_directory_ends_everything(
    tmp_path: Path, block: str, cleanup: Cleanup, escape: str
) -> None:
    """What a daemon killed outright leaves (its instance's cgroup, a grandchild with its
    environment cleared) survives a daemon on another state directory, even one whose path
    the killed one's starts with, and is ended by the next daemon on its own."""
    state = cleanup.state(tmp_path / "jl:b")
    other = cleanup.state(tmp_path / "jl")
    tag = cleanup.tag()
    conf, server = _config_file(state, block, _command(tag, ESCAPES[escape]))
    proc = await _daemon_process(conf, tmp_path / "log", server)
    try:
        await wait_until(lambda: len(_sleepers(tag)) == 1)
        sleeper = _sleepers(tag)
        proc.kill()
        await proc.wait()
    finally:
        proc.kill()
        await proc.wait()
    assert _sleepers(tag) == sleeper
    if CGROUPS:
        assert len(_cgroups_of(state)) == 1  # the instance's, left behind
    async with running(load(config_text(other, _service(f"{block}.2", DEMO)))) as d:
        await _ask(_server(d))
        assert _sleepers(tag) == sleeper
        assert len(_cgroups_of(state)) == (1 if CGROUPS else 0)
    assert _sleepers(tag) == sleeper
    async with running(load(config_text(state, _service(f"{block}.1", DEMO)))):
        assert _sleepers(tag) == []  # the sweep is done before the daemon serves
        assert _cgroups_of(state) == []


@pytest.mark.parametrize("user", [None, "nobody"])
async def test_the_daemons_environment_does_not_reach_an_instance(
    tmp_path: Path, block: str, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch,
    user: str | None
) -> None:
    if user is not None and os.geteuid() != 0:
        pytest.skip("switching users needs root")
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t-of-the-daemon")
    monkeypatch.setenv("LANG", "C.UTF-8")
    state = cleanup.state(tmp_path)
    process = 'environment = { GREETING = "hello" }'
    if user is not None:
        process += f'\nuser = "{user}"'
    command = f"sh -c 'env; exec {SERVE}'"
    async with running(load(config_text(state, _service(f"{block}.1", command, process)))) as d:
        await _ask(_server(d))
        inst = d.supervisor.services["svc"].instance
        assert inst is not None and inst.handle is not None and inst.handle.pid is not None
        environ = _read(Path(f"/proc/{inst.handle.pid}/environ")).split("\0")
        names = {v.split("=", 1)[0] for v in environ if v}
        assert "SECRET_TOKEN" not in names
        assert f"PATH={DEFAULT_PATH}" in environ
        assert "LANG=C.UTF-8" in environ and "GREETING=hello" in environ
        assert f"JITLAUNCH_INSTANCE={state.resolve()}:svc#1" in environ
        if user is not None:
            assert f"USER={user}" in environ
        logfile = state / "logs" / "svc.log"
        await wait_until(lambda: "GREETING=hello" in logfile.read_text())
        assert "s3cr3t" not in logfile.read_text()


@pytest.mark.parametrize(("mine", "theirs"), [("jl", "jl:b"), ("jl", "jl:svc#1"),
                                              ("jl:b", "jl")])
async def test_a_daemon_ends_nothing_of_a_daemon_on_another_state_directory(
    tmp_path: Path, block: str, cleanup: Cleanup, mine: str, theirs: str
) -> None:
    """Two live daemons on state directories whose paths start alike: starting and stopping
    one (with an instance of its own) kills nothing of the other's."""
    their_state = cleanup.state(tmp_path / theirs)
    my_state = cleanup.state(tmp_path / mine)
    tag = cleanup.tag()
    theirs_cfg = load(config_text(their_state, _service(f"{block}.1", _command(tag))))
    async with running(theirs_cfg) as them:
        await _ask(_server(them))
        inst = them.supervisor.services["svc"].instance
        assert inst is not None and inst.handle is not None
        victims = [inst.handle.pid, *_sleepers(tag)]
        assert len(victims) == 2
        groups = _cgroups_of(their_state)
        async with running(load(config_text(my_state, _service(f"{block}.2", DEMO)))) as me:
            await _ask(_server(me))
            assert all(alive(p) for p in victims)
        assert all(alive(p) for p in victims)
        assert len(groups) == (1 if CGROUPS else 0)
        assert _cgroups_of(their_state) == groups
        assert _cgroups_of(my_state) == []


@needs_cgroups
async def test_a_cgroup_of_another_identity_is_never_swept(tmp_path: Path,
                                                            cleanup: Cleanup) -> None:
    """Names are compared whole: a cgroup of another state directory is left alone, even
    one that starts with our name."""
    assert OWN is not None
    mine = procgroup.open_containers(cleanup.state(tmp_path / "a"))
    theirs = procgroup.open_containers(cleanup.state(tmp_path / "b"))
    kept = [OWN / f"jitlaunch-{theirs.id}-svc-1", OWN / f"jitlaunch-{mine.id}x-svc-1",
            OWN / f"jitlaunch-{mine.id}"]
    try:
        for group in kept:
            group.mkdir()
        (OWN / f"jitlaunch-{mine.id}-svc-1").mkdir()
        assert mine.sweep() == [str(OWN / f"jitlaunch-{mine.id}-svc-1")]
        assert all(group.is_dir() for group in kept)
    finally:
        for group in kept:
            procgroup.remove_tree(group)


@pytest.mark.skipif(procgroup.pidns_problem()[1] is not None,
                    reason=f"needs PID namespaces: {procgroup.pidns_problem()[1]}")
@pytest.mark.parametrize("escape", list(ESCAPES))
async def test_in_a_pid_namespace_a_stop_ends_every_descendant(
    tmp_path: Path, block: str, cleanup: Cleanup, escape: str
) -> None:
    """Where the daemon may not make cgroups, a PID namespace per instance: its init passes
    SIGTERM on, and takes everything with it."""
    state = cleanup.state(tmp_path)
    tag = cleanup.tag()
    cfg = load(config_text(state, _service(f"{block}.1", _command(tag, ESCAPES[escape]))))
    backend = ProcessBackend(state)
    backend.containers = procgroup.open_containers(state, procgroup.PIDNS)
    assert backend.containers.kind == procgroup.PIDNS
    daemon = Daemon(cfg, backends={"process": backend})
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        try:
            await _ask(_server(daemon))
            await wait_until(lambda: len(_sleepers(tag)) == 1)
            assert _cgroups_of(state) == []
            inst = daemon.supervisor.stop("svc")
            assert inst is not None
            # SIGTERM reaches the command through the namespace's init: it stops before the
            # grace (2 s) is up, without SIGKILL.
            with trio.fail_after(1.5):
                await inst.run.released.wait()
            assert _sleepers(tag) == []
        finally:
            daemon.stop()


async def test_the_daemons_environment_does_not_reach_qemu(
    tmp_path: Path, block: str, cleanup: Cleanup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import KERNEL, qemus
    from .helpers import qemu_service as service

    if not KERNEL.exists():
        pytest.skip(f"needs the unikernel ({KERNEL}: make -C images)")
    monkeypatch.setenv("SECRET_TOKEN", "s3cr3t-of-the-daemon")
    state = cleanup.state(tmp_path)
    try:
        async with running(load(config_text(state, service(f"{block}.1",
                                                           'answer = "wait"')))) as d:
            await _ask(_server(d), "uk")
            (pid,) = qemus(state)
            environ = _read(Path(f"/proc/{pid}/environ")).split("\0")
            assert "SECRET_TOKEN" not in {v.split("=", 1)[0] for v in environ}
            assert f"PATH={DEFAULT_PATH}" in environ
    finally:
        for pid in qemus(state):
            os.kill(pid, signal.SIGKILL)


TAPS = """
import ipaddress, sys, trio
from jitlaunch.backends import bridge

async def main():
    subnet = ipaddress.IPv4Network("10.78.0.0/24")
    for owner in sys.argv[1:]:
        print((await bridge.attach("jl0", subnet, owner)).tap)

trio.run(main)
"""


def test_the_tap_sweep_removes_only_taps_of_its_own_identity(tmp_path: Path) -> None:
    """Taps carry their daemon's state directory identity: the sweep at start removes an
    earlier run's of its own, never another daemon's (live or gone), and still removes a
    tap without an identity (an older version's) whose daemon is gone."""
    import shutil
    import subprocess

    from .conftest import ROOT

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    ns = f"jltest-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    inside = ["ip", "netns", "exec", ns]

    def links() -> list[str]:
        out = subprocess.run([*inside, "ip", "-br", "link"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return [line.split()[0].split("@")[0] for line in out.splitlines()]

    try:
        mine, theirs = state_id(tmp_path / "jl"), state_id(tmp_path / "jl:b")
        made = subprocess.run([*inside, PYTHON, "-c", TAPS, mine, theirs], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert made.returncode == 0, made.stderr
        my_tap, their_tap = made.stdout.split()
        old_tap = "jlt00000100001"  # an older version's, its daemon (pid 1) not jitlaunch
        subprocess.run([*inside, "ip", "tuntap", "add", old_tap, "mode", "tap"], check=True,
                       timeout=10)
        sweep = subprocess.run(
            [*inside, PYTHON, "-c", "import sys; from jitlaunch.backends import bridge; "
             "print(' '.join(sorted(bridge.remove_leftover_taps(sys.argv[1]))))", mine],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert sweep.returncode == 0, sweep.stderr
        assert sweep.stdout.split() == sorted([my_tap, old_tap])
        assert their_tap in links() and my_tap not in links()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


async def test_a_command_not_found_fails_its_boot_saying_so(
    tmp_path: Path, block: str, cleanup: Cleanup
) -> None:
    """The command runs through its container's shell, yet a missing program is still a
    boot failure that names it, and leaves no container behind."""
    state = cleanup.state(tmp_path)
    async with running(load(config_text(state, _service(f"{block}.1",
                                                        "no-such-program-jl {port}")))) as d:
        reply = await query_udp(_server(d), "svc.jit.test")
        assert reply.header.rcode == RCODE.SERVFAIL
        error = d.supervisor.services["svc"].last_error
        assert error is not None
        assert f"cannot run 'no-such-program-jl': not found in PATH ({DEFAULT_PATH})" in error
        assert _cgroups_of(state) == []
