"""The podman backend with real podman and real containers (runc, slirp4netns), built from
images/containers/ without a registry: a lookup boots the image and the front serves it;
idle teardown in each stop mode; resume under load; a container killed or paused from
outside is replaced; a daemon SIGKILLed and restarted removes its own containers and never
anyone else's; the host budget counts containers; nothing is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from jitlaunch.backends.podman import PodmanSettings
from jitlaunch.backends.podman.backend import criu_problem
from jitlaunch.backends.podman.cli import frozen
from jitlaunch.backends.podman.settings import container_name, run_argv
from jitlaunch.errors import ConfigError
from jitlaunch.lifecycle.admission import PODMAN_OVERHEAD, instance_memory
from jitlaunch.lifecycle.state import State

from .conftest import ROOT, config_text, http_get, load, query_udp, running, wait_until
from .helpers import dns_server, host, instance_state

IMAGE = "localhost/jitlaunch-httpd:latest"
BODY = b"Hello from a container woken by a DNS lookup."
LABEL = "org.jitlaunch.state-dir"

needs_podman = pytest.mark.skipif(shutil.which("podman") is None or shutil.which("runc") is None,
                                  reason="needs podman and runc (apt install podman runc)")


def service(block: str, name: str = "web", n: int = 1, stop: str = "destroy", extra: str = "",
            podman: str = "") -> str:
    return f"""
[[service]]
name = "{name}"
backend = "podman"
front = ["{block}.{n}"]
ports = [8080]
stop = "{stop}"
{extra}
[service.podman]
{"" if podman.startswith("image") else f'image = "{IMAGE}"'}
{podman}
"""


def containers(label_value: str) -> list[str]:
    """The names of the containers labelled with exactly this state directory."""
    out = subprocess.run(["podman", "ps", "--all", "--filter", f"label={LABEL}={label_value}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def ours(state: Path) -> list[str]:
    return containers(str(state.resolve()))


def remove(*names: str) -> None:
    if names:
        subprocess.run(["podman", "rm", "--force", "--ignore", "--time", "0", *names],
                       capture_output=True, check=False)


def conmons(prefix: str) -> list[int]:
    """conmon processes of containers whose name starts with ``prefix``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"conmon") and any(a.startswith(prefix.encode())
                                                              for a in argv):
                found.append(int(entry))
    return found


@pytest.fixture(scope="session")
def image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("needs podman (apt install podman runc)")
    subprocess.run([ROOT / "images" / "containers" / "build"], check=True, capture_output=True)
    return IMAGE


@pytest.fixture
def pstate(tmp_path: Path, image: str) -> Iterator[Path]:
    """A state directory; afterwards, no container labelled with it and no conmon of ours."""
    state = tmp_path / "state"
    before = overlay_mounts()
    yield state
    left = containers(str(state.resolve()))
    remove(*left)
    from jitlaunch.backends.owner import state_id

    leaked = conmons(f"jitlaunch-{state_id(state)}-")
    assert not left, f"containers left behind: {left}"
    assert not leaked, f"conmon processes left behind: {leaked}"
    assert overlay_mounts() <= before, "a container's root file system is still mounted"


def overlay_mounts() -> int:
    """Mounts of podman's storage (each container's root file system while it exists)."""
    with open("/proc/self/mounts") as f:
        return sum("/containers/storage/overlay" in line for line in f)


def handle_name(d, name: str = "web") -> str:  # type: ignore[no-untyped-def]
    inst = d.supervisor.services[name].instance
    assert inst is not None and inst.handle is not None
    return str(inst.handle.name)


# ---- pure parts ------------------------------------------------------------------------


def test_settings_errors_name_the_key(tmp_path: Path) -> None:
    for podman, key in (('image = "-x"', "image"), ('image = "a"\nready = "http"', "ready"),
                        ('image = "a"\nenv = { "A=B" = "c" }', "env"),
                        ('image = "a"\ncpus = 0', "cpus"),
                        ('image = "a"\ncontainer_ports = [1, 2]', "container_ports"),
                        ('image = "a"\nnetwork = "host"', "network"),
                        ('image = "a"\nruntime = "kata"', "runtime")):
        with pytest.raises(ConfigError, match=key):
            load(config_text(tmp_path, service("127.0.0", podman=podman)))


def test_the_run_command_line() -> None:
    s = PodmanSettings(image="img", container_ports=(80,), command=("httpd", "-f"),
                       env=(("A", "1"),), memory=64, cpus=0.5, user="1000")
    argv = run_argv(s, name="n", state_dir=Path("/s"), service="web", publish={8080: 31000},
                    log_path=Path("/s/logs/web.log"))
    line = " ".join(argv)
    assert argv[:3] == ["podman", "run", "--detach"]
    assert f"--label {LABEL}=/s" in line and "--publish 127.0.0.1:31000:80/tcp" in line
    assert "--network slirp4netns:port_handler=slirp4netns" in line and "--read-only" in line
    assert "--memory 64m" in line and "--cpus 0.5" in line and "--env A=1" in line
    assert "--runtime runc" in line and "--ulimit nofile=" in line
    assert argv[-3:] == ["img", "httpd", "-f"]
    assert container_name("abcd1234", "web", 2, 7) == "jitlaunch-abcd1234-web-2-7"


def test_the_host_budget_counts_a_container_and_podman(tmp_path: Path) -> None:
    cfg = load(config_text(tmp_path, service("127.0.0", podman="memory = 48")))
    assert instance_memory(cfg.services[0]) == 48 + PODMAN_OVERHEAD


# ---- real podman -----------------------------------------------------------------------


@needs_podman
async def test_a_lookup_boots_the_image_and_the_front_serves_it(pstate: Path, block: str) -> None:
    cfg = load(config_text(pstate, service(block)))
    async with running(cfg) as d:
        reply = await query_udp(dns_server(d), "web.jit.test")
        assert [str(r.rdata) for r in reply.rr] == [f"{block}.1"]
        body = await http_get(f"{block}.1", 8080)
        assert body.startswith(b"HTTP/1.1 200") and BODY in body, body
        name = handle_name(d)
        assert ours(pstate) == [name]
        assert d.supervisor.services["web"].instance.handle.wake == "cold"  # type: ignore[union-attr]
    assert ours(pstate) == []


@needs_podman
@pytest.mark.parametrize("stop", ["destroy", "shutdown", "pause", "save"])
async def test_idle_teardown_in_each_stop_mode(
    pstate: Path, block: str, stop: str, caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = load(config_text(pstate, service(block, stop=stop, extra='idle_timeout = "1s"')))
    criu = await criu_problem() if stop == "save" else None
    async with running(cfg) as d:
        sup = d.supervisor
        assert BODY in await http_get(f"{block}.1", 8080)
        name = handle_name(d)
        kept = stop in ("pause", "save")
        await wait_until(lambda: instance_state(sup, "web") is (State.SAVED if kept else None),
                         timeout=20)
        if kept:
            assert ours(pstate) == [name]
            handle = sup.services["web"].instance.handle  # type: ignore[union-attr]
            assert handle is not None and handle.freezer is not None  # type: ignore[attr-defined]
            assert frozen(handle.freezer)  # type: ignore[attr-defined]
        else:
            assert ours(pstate) == []
        if stop == "save" and criu is not None:
            assert any('stop = "save" cannot work here' in r.getMessage() and criu in
                       r.getMessage() for r in caplog.records), "CRIU's problem not said"
        assert BODY in await http_get(f"{block}.1", 8080)
        inst = sup.services["web"].instance
        assert inst is not None and inst.handle is not None
        if kept:
            assert inst.handle.name == name  # type: ignore[attr-defined]
            assert inst.handle.wake == ("restore" if stop == "save" and criu is None
                                        else "resume")
        else:
            assert inst.handle.wake == "cold"
    assert ours(pstate) == []


@needs_podman
async def test_pause_and_resume_under_load(pstate: Path, block: str) -> None:
    cfg = load(config_text(pstate, service(block, stop="pause", extra='idle_timeout = "1s"')))
    async with running(cfg) as d:
        sup = d.supervisor
        for _round in range(2):
            await wait_until(lambda: instance_state(sup, "web") in (None, State.SAVED),
                             timeout=20)
            bodies: list[bytes] = []

            async def one(bodies: list[bytes] = bodies) -> None:
                bodies.append(await http_get(f"{block}.1", 8080))

            async with trio.open_nursery() as n:
                for _ in range(40):
                    n.start_soon(one)
            assert len(bodies) == 40 and all(BODY in b for b in bodies)
        assert len(ours(pstate)) == 1


@needs_podman
async def test_a_container_killed_from_outside_is_replaced(pstate: Path, block: str) -> None:
    cfg = load(config_text(pstate, service(block)))
    async with running(cfg) as d:
        assert BODY in await http_get(f"{block}.1", 8080)
        name = handle_name(d)
        subprocess.run(["podman", "kill", name], check=True, capture_output=True)
        await wait_until(lambda: d.supervisor.services["web"].instance is None
                         or handle_name(d) != name, timeout=10)
        assert BODY in await http_get(f"{block}.1", 8080)
        assert handle_name(d) != name
        await wait_until(lambda: name not in ours(pstate), timeout=10)


@needs_podman
async def test_a_container_paused_from_outside_is_replaced_by_the_health_check(
    pstate: Path, block: str,
) -> None:
    extra = 'health_interval = "300ms"\nhealth_timeout = "1s"\nhealth_failures = 2'
    cfg = load(config_text(pstate, service(block, extra=extra)))
    async with running(cfg) as d:
        assert BODY in await http_get(f"{block}.1", 8080)
        name = handle_name(d)
        subprocess.run(["podman", "pause", name], check=True, capture_output=True)
        await wait_until(lambda: d.supervisor.services["web"].instance is None
                         or handle_name(d) != name, timeout=15)
        assert BODY in await http_get(f"{block}.1", 8080)
        assert handle_name(d) != name
        await wait_until(lambda: name not in ours(pstate), timeout=10)


@needs_podman
async def test_the_host_budget_evicts_a_container_for_another(pstate: Path, block: str) -> None:
    # 80 MiB: one container of 32 MiB counts 40 with podman's overhead; two fit, not three.
    text = (service(block, "a", 1, podman="memory = 32") + service(block, "b", 2, podman="memory = 32")
            + service(block, "c", 3, podman="memory = 32"))
    cfg = load(config_text(pstate, text, top=host(memory=80)))
    async with running(cfg) as d:
        for n in (1, 2, 3):
            assert BODY in await http_get(f"{block}.{n}", 8080)
        sup = d.supervisor
        assert sup.admission["evicted"] == 1
        assert sum(instance_state(sup, s) is State.READY for s in "abc") == 2
        await wait_until(lambda: len(ours(pstate)) == 2, timeout=10)


@needs_podman
async def test_a_restarted_daemon_removes_its_own_containers_and_no_one_elses(
    pstate: Path, block: str, tmp_path: Path,
) -> None:
    config = tmp_path / "podman.toml"
    dns_port = _free_udp_port()
    config.write_text(config_text(pstate, service(block), metrics="listen = []").replace(
        '127.0.0.1:0"]\nzones', f'127.0.0.1:{dns_port}"]\nzones'))
    mine = _resolved(pstate)
    # Someone else's containers: another state directory (ours with a suffix), and none.
    others = [f"other-{os.getpid()}-{i}" for i in range(2)]
    for name, labels in zip(others, ([f"{LABEL}={mine}2"], []), strict=True):
        subprocess.run(["podman", "run", "--detach", "--name", name, "--runtime", "runc",
                        "--network", "none", "--ulimit", "nofile=64:64", "--ulimit",
                        "nproc=64:64", *(a for lab in labels for a in ("--label", lab)),
                        IMAGE], check=True, capture_output=True)
    try:
        first = _daemon(config)
        try:
            await _wait_dns(dns_port)
            assert BODY in await http_get(f"{block}.1", 8080)
            left = ours(pstate)
            assert len(left) == 1
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert ours(pstate) == left  # a daemon killed outright cannot remove it
        second = _daemon(config)
        try:
            await _wait_dns(dns_port)
            await wait_until(lambda: left[0] not in ours(pstate), timeout=20)
            assert ours(pstate) == []  # (nothing was looked up: nothing new runs)
            running_names = subprocess.run(["podman", "ps", "--format", "{{.Names}}"],
                                           capture_output=True, text=True).stdout.split()
            assert all(o in running_names for o in others)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        remove(*others)


@needs_podman
async def test_conf_podman_toml_serves(pstate: Path, block: str) -> None:
    text = (ROOT / "conf" / "podman.toml").read_text()
    text = text.replace("127.0.0.1:5300", "127.0.0.1:0").replace("127.77.0.", f"{block}.")
    text = f'[daemon]\nstate_dir = "{pstate}"\n[metrics]\nlisten = ["127.0.0.1:0"]\n' + text
    cfg = load(text, str(ROOT / "conf" / "podman.toml"))
    async with running(cfg) as d:
        reply = await query_udp(dns_server(d), "web.jit.test")
        assert reply.rr
        assert BODY in await http_get(f"{block}.5", 8080)


def _resolved(path: Path) -> str:
    return str(path.resolve())


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _daemon(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "jitlaunch.cli", "run", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


async def _wait_dns(port: int) -> None:
    async def answered() -> bool:
        try:
            with trio.move_on_after(0.5):
                await query_udp(("127.0.0.1", port), "jit.test", "SOA")  # (boots nothing)
                return True
        except OSError:
            pass
        return False

    with trio.fail_after(20):
        while not await answered():
            await trio.sleep(0.05)


@needs_podman
def test_check_names_what_is_missing(tmp_path: Path, image: str) -> None:
    from jitlaunch.backends.podman.check import HYBRID_MARK, criu_problem_now, podman_problems

    cfg = load(config_text(tmp_path, service("127.0.0", stop="save", podman=(
        'image = "localhost/jitlaunch-no-such-image:1"\nruntime = "crun"'))))
    found = {key: (error, text) for error, text, key in podman_problems(cfg.services[0])}
    assert found["podman.image"][0] and "not in podman's store" in found["podman.image"][1]
    if shutil.which("crun") is None:
        assert "'crun' is not installed" in found["podman.runtime"][1]
    elif HYBRID_MARK.is_dir():
        assert "hybrid cgroups" in found["podman.runtime"][1]
    criu = criu_problem_now()
    assert (criu is None) == ("stop" not in found)
    if criu is not None:
        assert not found["stop"][0] and criu in found["stop"][1]
    good = load(config_text(tmp_path, service("127.0.0")))
    assert podman_problems(good.services[0]) == []


@needs_podman
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                    or shutil.which("nsenter") is None,
                    reason="needs root, iproute2 and nsenter for a network namespace")
async def test_bridge_networking_hands_the_containers_address_over(
    pstate: Path, netns: list[str], tmp_path: Path,
) -> None:
    """Daemon and client inside a network namespace of the test's own: the container gets a
    veth onto jitlaunch's bridge and an address of its own, which DNS hands over once it is
    ready; the client reaches it there directly; the veth goes with the container."""
    text = config_text(pstate, service("127.77.0", stop="pause", extra='idle_timeout = "2s"',
                                       podman='network = "bridge"\nsubnet = "10.79.0.0/24"'),
                       metrics="listen = []").replace('"127.0.0.1:0"]\nzones',
                                                      '"127.0.0.1:5300"]\nzones')
    conf = tmp_path / "bridge.toml"
    conf.write_text(text)
    # Only the network namespace: `ip netns exec` would also remount /sys in a mount
    # namespace of its own, without the cgroup mounts runc needs.
    netns = ["nsenter", f"--net=/run/netns/{netns[-1]}"]
    log = tmp_path / "daemon.log"
    with open(log, "wb") as logfile:
        proc = await trio.lowlevel.open_process(
            [*netns, sys.executable, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
            stderr=logfile)
    try:
        async def ask() -> str:
            res = await trio.run_process(
                [*netns, "dig", "+short", "+time=1", "+tries=1", "-p", "5300", "@127.0.0.1",
                 "web.jit.test", "A"], capture_stdout=True, check=False)
            lines = [ln for ln in res.stdout.decode().splitlines() if not ln.startswith(";")]
            return "\n".join(lines).strip()

        async def get(addr: str) -> str:
            res = await trio.run_process(
                [*netns, "curl", "-s", "-m", "5", f"http://{addr}:8080/"],
                capture_stdout=True, check=False)
            return res.stdout.decode()

        with trio.fail_after(30):
            while not (first := await ask()):
                await trio.sleep(0.05)
        assert first == "127.77.0.1"  # booting: the front
        with trio.fail_after(30):
            while (addr := await ask()) == "127.77.0.1":
                await trio.sleep(0.05)
        assert addr == "10.79.0.2", log.read_text()  # ready: handed over
        assert BODY.decode() in await get(addr)
        links = subprocess.run([*netns, "ip", "-br", "link"], capture_output=True,
                               text=True).stdout
        assert "jlt" in links and "jl0" in links
        # Idle: paused (frozen), its address kept; a lookup thaws it and it serves again.
        await wait_until(lambda: "stopping (pause)" in log.read_text(), timeout=20)
        assert await ask() in ("127.77.0.1", addr)  # (the front while it wakes)
        assert BODY.decode() in await get("127.77.0.1")
        assert BODY.decode() in await get(addr)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        links = subprocess.run([*netns, "ip", "-br", "link"], capture_output=True,
                               text=True).stdout
        assert "jlt" not in links  # the veth went with the container
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_podman
async def test_ready_on_a_log_line(pstate: Path, block: str) -> None:
    """ready = "log:TEXT": ready once the container's output holds TEXT (not at the port)."""
    podman = ('command = ["/bin/sh", "-c", "sleep 0.3; echo serving now; '
              'exec httpd -f -p 8080 -h /www"]\nready = "log:serving now"')
    cfg = load(config_text(pstate, service(block, podman=podman)))
    async with running(cfg) as d:
        assert BODY in await http_get(f"{block}.1", 8080)
        inst = d.supervisor.services["web"].instance
        assert inst is not None and inst.handle is not None
        assert b"serving now" in inst.handle.log_path.read_bytes()  # type: ignore[attr-defined]


async def test_podman_calls_run_in_a_session_of_their_own() -> None:
    """A signal to the daemon's process group (Ctrl-C in a terminal) must not cut a podman
    call short: a `podman rm` interrupted so left its container behind (bench/podman saw it)."""
    from jitlaunch.backends.podman.cli import podman

    out = await podman(sys.executable, "-c", "import os; print(os.getsid(0), os.getpgid(0))")
    sid, pgid = map(int, out.split())
    assert sid != os.getsid(0) and pgid != os.getpgid(0)
