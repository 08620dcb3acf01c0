"""Our units under a real systemd (252 here), PID 1 of its own namespaces (tests/systemd_ns.py).

One systemd for the module. systemd/jitlaunch.service and jitlaunch.socket are used as
shipped, with one drop-in of the test's: ExecStart= runs this checkout's .venv and config,
WatchdogSec= is short, and this checkout and the Python the .venv was made from are bound in
read-only where the unit's sandbox hides them (/root and /home: ProtectHome=; /tmp:
PrivateTmp=). The daemon's state directory is /var/lib/jitlaunch of the namespace, in the
overlay's throw-away upper layer.
"""

from __future__ import annotations

import json
import re
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import systemd_ns
from .conftest import ECHO_SERVER, ROOT
from .systemd_ns import SystemdNamespace, systemd_namespace

why_not = systemd_ns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")

UNITS = ROOT / "systemd"
WATCHDOG = 3.0
CONFIG = """
[daemon]
drain_timeout = "2s"
control_group = "jlctl"

[dns]
listen = ["0.0.0.0:53"]
zones = ["jit.test"]
nameserver_addresses = ["127.0.0.1"]

[[service]]
name = "py"
front = ["127.77.0.2"]
ports = [8080]
idle_timeout = "5m"
[service.process]
command = "{python} -m jitlaunch.demo_http --address {address} --port {port} --name {name}"
subnet = "127.77.1.0/24"

[[service]]
name = "hello"
backend = "qemu"
front = ["127.77.0.1"]
ports = [8080]
[service.qemu]
kernel = "KERNEL"
guest_ports = [80]
machine = "microvm,acpi=off,pic=off,pit=off,rtc=off"
""".replace("KERNEL", str(ROOT / "images" / "build" / "hello.elf"))


#: Host directories the namespace must show even where it mounts its own tmpfs (a checkout
#: in /tmp): this checkout, the virtualenv running the tests and the Python it was made from.
KEEP = (ROOT, Path(sys.prefix), Path(sys.base_prefix))


def _dropin() -> str:
    lines = [
        "[Service]",
        "ExecStart=",
        f"ExecStart={sys.prefix}/bin/jitlaunch run --config /etc/jitlaunch/jitlaunch.toml",
        f"WatchdogSec={WATCHDOG:g}s",
        # py's front comes from systemd too, named after the service.
        "Sockets=jitlaunch.socket jitlaunch-py.socket",
    ]
    # What the unit's sandbox hides (ProtectHome= hides /root and /home, PrivateTmp= /tmp):
    # the virtualenv running the tests, the Python it was made from and this checkout, bound
    # in read-only.
    hidden = [p for p in (Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                          ROOT.resolve())
              if p.parts[1:2] in (("root",), ("home",), ("tmp",))]
    if any(p.parts[1:2] in (("root",), ("home",)) for p in hidden):
        lines.append("ProtectHome=tmpfs")
    lines += [f"BindReadOnlyPaths={p}" for p in hidden]
    return "[Unit]\nRequires=jitlaunch-py.socket\nAfter=jitlaunch-py.socket\n" + \
        "\n".join(lines) + "\n"


FRONT_SOCKET = """[Socket]
ListenStream=127.77.0.2:8080
FileDescriptorName=py
Service=jitlaunch.service
"""


#: Global kernel settings a systemd boot would set from sysctl.d (not namespaced): the
#: module checks that none of them changed on the host.
HOST_SETTINGS = ("fs/protected_fifos", "fs/protected_hardlinks", "fs/protected_regular",
                 "fs/protected_symlinks", "kernel/sysrq", "kernel/core_uses_pid",
                 "kernel/pid_max")


def _host_state() -> dict[str, str]:
    state = {"/proc/1/cgroup": Path("/proc/1/cgroup").read_text(),
             "/proc/self/cgroup": Path("/proc/self/cgroup").read_text()}
    for name in HOST_SETTINGS:
        path = Path("/proc/sys") / name
        if path.exists():
            state[str(path)] = path.read_text()
    return state


@pytest.fixture(scope="module")
def ns() -> Iterator[SystemdNamespace]:
    before = _host_state()
    yield from _namespace()
    assert _host_state() == before, "the namespace's systemd changed something on the host"


def _namespace() -> Iterator[SystemdNamespace]:
    units = {
        "jitlaunch.service": (UNITS / "jitlaunch.service").read_text(),
        "jitlaunch.socket": (UNITS / "jitlaunch.socket").read_text(),
        "jitlaunch.service.d/test.conf": _dropin(),
        "jitlaunch-py.socket": FRONT_SOCKET,
    }
    with systemd_namespace(units, keep=KEEP) as ns:
        # SupplementaryGroups=kvm needs the group; the overlay keeps /etc/group throw-away.
        ns.run(["sh", "-c", "getent group kvm >/dev/null || groupadd -r kvm"])
        # The control group, a member of it and a user outside it.
        ns.run(["groupadd", "-r", "jlctl"])
        ns.run(["useradd", "-r", "-M", "-G", "jlctl", "jlmember"])
        ns.run(["useradd", "-r", "-M", "jloutsider"])
        ns.write("/etc/jitlaunch/jitlaunch.toml", CONFIG)
        yield ns


@pytest.fixture(autouse=True)
def _fresh(ns: SystemdNamespace) -> None:
    # Each test restarts the service a few times: without this, systemd's start rate limit
    # (5 in 10 s) would fail a later test's start.
    ns.systemctl("reset-failed", "jitlaunch.service", "jitlaunch.socket", check=False)


def _dig(ns: SystemdNamespace, name: str, *extra: str) -> list[str]:
    # One try: a query that starts the service waits in the socket until the daemon reads it
    # (a Python start on a loaded machine can take seconds).
    out = ns.run(["dig", "+short", "+time=20", "+tries=1", "@127.0.0.1", name, *extra],
                 namespaces="-n").stdout
    return out.split()


def _active(ns: SystemdNamespace) -> bool:
    return ns.show("jitlaunch.service", "ActiveState") == "active"


def _main_pid(ns: SystemdNamespace) -> int:
    return int(ns.show("jitlaunch.service", "MainPID"))


def _running(ns: SystemdNamespace) -> None:
    """The service active and READY (Type=notify: active only once READY=1 arrived)."""
    ns.systemctl("start", "jitlaunch.socket", "jitlaunch.service")
    ns.wait_for(lambda: _active(ns), what="jitlaunch.service active")


def _boot_py(ns: SystemdNamespace) -> int:
    """Look py up, wait until its instance is ready; return the instance's pid (host)."""
    ns.run([f"{ROOT}/.venv/bin/jitlaunch", "probe", "py.jit.test", "--server", "127.0.0.1:53",
            "--port", "8080"], namespaces="-n")
    kids = [p for p in ns.cgroup_pids("jitlaunch.service")
            if "demo_http" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert len(kids) == 1, kids
    return kids[0]


def test_the_namespace_leaves_the_host_alone(ns: SystemdNamespace) -> None:
    # PID 1 of this machine and this process stay where they were; the namespace's systemd
    # sits in its own init.scope under the test's cgroup.
    assert "0::/\n" in Path("/proc/1/cgroup").read_text()
    assert Path("/proc/self/cgroup").read_text().splitlines()[-1] == "0::/"
    assert ns.pid in [int(p) for p in (
        systemd_ns.UNIFIED / ns.cgroup / "init.scope" / "cgroup.procs").read_text().split()]
    assert ns.run(["cat", "/proc/1/cgroup"]).stdout.strip().endswith("0::/init.scope")


def test_the_namespace_cannot_change_kernel_settings(ns: SystemdNamespace) -> None:
    _running(ns)  # pulls in sysinit.target, whose units would apply sysctl.d
    probe = ns.run(["sh", "-c", "echo 1 > /proc/sys/fs/protected_regular"], check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    for unit in ("systemd-sysctl.service", "systemd-modules-load.service"):
        assert ns.show(unit, "LoadState") == "masked"


def test_security_exposure_is_what_the_unit_says(ns: SystemdNamespace) -> None:
    # The unit as shipped, without the test's drop-in, under another name.
    ns.write("/etc/systemd/system/jlanalyze.service", (UNITS / "jitlaunch.service").read_text())
    ns.systemctl("daemon-reload")
    out = ns.run(["systemd-analyze", "security", "--no-pager", "jlanalyze.service"]).stdout
    score = re.search(r"Overall exposure level for jlanalyze.service: ([0-9.]+)", out)
    assert score is not None, out
    claimed = re.search(r"security jitlaunch.service` \(systemd 252\): ([0-9.]+)",
                        (UNITS / "jitlaunch.service").read_text())
    assert claimed is not None
    assert float(score.group(1)) == float(claimed.group(1)), "update the comment in the unit"


def test_socket_activation_serves_udp_and_tcp_with_our_status(ns: SystemdNamespace) -> None:
    ns.systemctl("stop", "jitlaunch.service")
    ns.systemctl("start", "jitlaunch.socket")
    assert ns.show("jitlaunch.service", "ActiveState") == "inactive"
    # The first query starts the service through the socket and is answered by it, with
    # py's front: the query boots py.
    assert _dig(ns, "py.jit.test") == ["127.77.0.2"]
    # DNS answers as soon as it runs; READY=1 (hence "active") follows once every other
    # listener is up too.
    ns.wait_for(lambda: _active(ns), what="jitlaunch.service active")
    # Answers give py's front while it boots and its own address once it is ready: wait for
    # ready rather than race py's boot, then the hand-over is served over TCP too.
    ns.wait_for(lambda: ns.show("jitlaunch.service", "StatusText")
                == "2 services; 1 running, 0 booting", timeout=10, what="py ready in STATUS=")
    assert _dig(ns, "py.jit.test", "+tcp") == ["127.77.1.1"]
    assert _dig(ns, "jit.test", "NS", "+tcp") == ["ns.jit.test."]
    status = ns.systemctl("status", "--no-pager", "jitlaunch.service", check=False).stdout
    assert "Active: active (running)" in status, status
    assert 'Status: "2 services; 1 running, 0 booting"' in status, status


def test_status_line_follows_the_instances(ns: SystemdNamespace) -> None:
    _running(ns)
    _boot_py(ns)
    ns.wait_for(lambda: ns.show("jitlaunch.service", "StatusText")
                == "2 services; 1 running, 0 booting", timeout=5, what="STATUS= update")


@pytest.mark.slow
def test_watchdog_restarts_a_stuck_daemon(ns: SystemdNamespace) -> None:
    _running(ns)
    old = _main_pid(ns)
    restarts = int(ns.show("jitlaunch.service", "NRestarts"))
    ns.run(["kill", "-STOP", str(old)])
    stuck = time.monotonic()
    ns.wait_for(lambda: _main_pid(ns) not in (0, old) and _active(ns),
                timeout=WATCHDOG + 15, what="a restart by the watchdog")
    assert time.monotonic() - stuck < WATCHDOG + 10
    assert int(ns.show("jitlaunch.service", "NRestarts")) == restarts + 1
    assert _dig(ns, "py.jit.test") == ["127.77.0.2"]


def test_stop_leaves_nothing_in_the_cgroup(ns: SystemdNamespace) -> None:
    _running(ns)
    instance = _boot_py(ns)
    group = systemd_ns.UNIFIED / ns.cgroup / ns.show("jitlaunch.service", "ControlGroup").lstrip("/")
    # The instance runs in a cgroup of its own below the service's (Delegate=yes).
    assert any(str(instance) in p.read_text().split() for p in group.glob("*/cgroup.procs"))
    ns.systemctl("stop", "jitlaunch.service")
    assert ns.cgroup_pids("jitlaunch.service") == []
    assert not group.exists() or not [p for p in group.iterdir() if p.is_dir()]
    assert not Path(f"/proc/{instance}").exists() or "Z" in _state(instance)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("how", ["restart", "sigkill"])
def test_restart_and_a_killed_daemon_come_back_serving(ns: SystemdNamespace, how: str) -> None:
    _running(ns)
    instance = _boot_py(ns)
    old = _main_pid(ns)
    if how == "restart":
        ns.systemctl("restart", "jitlaunch.service")
    else:
        ns.run(["kill", "-KILL", str(old)])
    ns.wait_for(lambda: _main_pid(ns) not in (0, old) and _active(ns), timeout=20,
                what="the service back")
    ns.wait_for(lambda: _state(instance) in ("gone", "Z"), timeout=10,
                what="the old instance gone")
    assert _dig(ns, "py.jit.test") == ["127.77.0.2"]
    again = _boot_py(ns)
    assert again != instance


def test_the_journal_of_a_failed_start_names_the_problem(ns: SystemdNamespace) -> None:
    # A config whose dns.listen differs from the socket unit: a clear error, no crash loop.
    ns.systemctl("stop", "jitlaunch.service")
    ns.write("/etc/jitlaunch/jitlaunch.toml", CONFIG.replace("0.0.0.0:53", "127.0.0.1:53"))
    try:
        ns.systemctl("start", "jitlaunch.socket")
        ns.systemctl("start", "jitlaunch.service", check=False)
        ns.wait_for(lambda: ns.show("jitlaunch.service", "ActiveState") in ("failed", "activating"),
                    what="the failed start")
        ns.wait_for(lambda: "socket activation: the dns socket UDP 0.0.0.0:53 is not in "
                    "dns.listen (127.0.0.1:53)" in _journal(ns), timeout=10,
                    what="the error in the journal")
    finally:
        ns.systemctl("stop", "jitlaunch.service")
        ns.systemctl("reset-failed", "jitlaunch.service", check=False)
        ns.write("/etc/jitlaunch/jitlaunch.toml", CONFIG)


def _journal(ns: SystemdNamespace) -> str:
    # By identifier: a process that exits at once may be gone before journald can tell its
    # unit from its cgroup, but its stdout stream always carries the identifier.
    return ns.run(["journalctl", "-t", "jitlaunch", "--no-pager", "-o", "cat"]).stdout


def test_a_namespace_removes_its_cgroups_mounts_and_files() -> None:
    with systemd_namespace({}) as other:
        dirs = [systemd_ns.UNIFIED / other.cgroup, systemd_ns.NAMED / other.cgroup, other.base]
        assert all(d.exists() for d in dirs)
        pid = other.pid
    assert not any(d.exists() for d in dirs)
    assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    assert str(other.base) not in Path("/proc/self/mountinfo").read_text()


def _jitlaunch(ns: SystemdNamespace, *args: str) -> list[str]:
    out = ns.run([f"{ROOT}/.venv/bin/jitlaunch", *args]).stdout
    return out.splitlines()


def test_jitlaunch_status_start_stop_against_the_unit(ns: SystemdNamespace) -> None:
    _running(ns)
    ns.systemctl("restart", "jitlaunch.service")  # no instance from an earlier test
    ns.wait_for(lambda: _active(ns), what="jitlaunch.service active")
    sock = "/run/jitlaunch/control.sock"
    mode = ns.run(["stat", "-c", "%a %U %G", sock]).stdout.split()
    assert mode == ["660", "root", "jlctl"]
    assert _row(ns, "py")[:3] == ["py", "process", "stopped"]
    assert _jitlaunch(ns, "start", "py") == ["py#1 ready at 127.77.1.1"]
    assert _row(ns, "py")[:5] == ["py", "process", "ready",
                                                         _jitlaunch_pid(ns), "127.77.1.1"]
    ns.wait_for(lambda: ns.show("jitlaunch.service", "StatusText")
                == "2 services; 1 running, 0 booting", timeout=5, what="STATUS= update")
    assert _jitlaunch(ns, "stop", "py") == ["py#1 stopped"]
    assert _row(ns, "py")[:3] == ["py", "process", "stopped"]


def _row(ns: SystemdNamespace, service: str) -> list[str]:
    """``jitlaunch status``'s row for ``service``, split in columns."""
    rows = [line.split() for line in _jitlaunch(ns, "status")[1:]]
    (row,) = [r for r in rows if r[0] == service]
    return row


def _jitlaunch_pid(ns: SystemdNamespace) -> str:
    reply = json.loads("\n".join(_jitlaunch(ns, "status", "--json")))
    return str(reply["services"][0]["instance"]["pid"])


# A client with the system Python only: the users of the namespace cannot read a .venv made
# from a Python under /root.
_CLIENT = ("import socket; s = socket.socket(socket.AF_UNIX); "
           "s.connect('/run/jitlaunch/control.sock'); "
           "s.sendall(b'{\"version\": 1, \"command\": \"status\"}\\n'); "
           "print(s.makefile().readline(), end='')")


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
def test_only_root_and_the_control_group_are_served(ns: SystemdNamespace) -> None:
    _running(ns)
    member = ns.run(["/usr/bin/python3", "-c", _CLIENT], user="jlmember")
    assert json.loads(member.stdout)["ok"] is True
    outsider = ns.run(["/usr/bin/python3", "-c", _CLIENT], user="jloutsider", check=False)
    assert outsider.returncode != 0 and "PermissionError" in outsider.stderr


def test_a_front_passed_by_systemd_is_served(ns: SystemdNamespace) -> None:
    _running(ns)
    # The listening socket on py's front is shared by systemd (which bound it) and the
    # daemon (which was passed it), and py is served through it.
    listening = ns.run(["ss", "-Hltnp", "src", "127.77.0.2:8080"], namespaces="-n").stdout
    users = set(re.findall(r'\("([^"]+)",pid=', listening))
    assert len(listening.splitlines()) == 1 and users == {"systemd", "jitlaunch"}, listening
    _boot_py(ns)


@pytest.mark.skipif(not (ROOT / "images" / "build" / "hello.elf").exists(),
                    reason="needs the unikernel (make -C images)")
def test_a_unikernel_boots_under_the_hardened_unit(ns: SystemdNamespace) -> None:
    # QEMU under the unit's sandbox: /dev/kvm through DevicePolicy=closed (TCG without it),
    # its QMP socket and pid file in the state directory, no ProtectHome= paths.
    _running(ns)
    started = _jitlaunch(ns, "start", "hello")
    assert started == ["hello#1 ready"], started
    page = ns.run(["curl", "-s", "-m", "20", "http://127.77.0.1:8080/"], namespaces="-n").stdout
    assert "jitlaunch hello unikernel" in page
    assert _jitlaunch(ns, "stop", "hello") == ["hello#1 stopped"]


# One line in, the same line back through the proxy: a client held open across reloads.
_ECHO_CLIENT = """import socket, sys
s = socket.create_connection(("127.77.0.3", 8080), timeout=20)
for line in sys.stdin:
    s.sendall(line.encode())
    got = b""
    while not got.endswith(b"\\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    print(got.decode(), end="", flush=True)
"""


def _service(name: str, front: str, command: str, extra: str = "") -> str:
    return (f'\n[[service]]\nname = "{name}"\nfront = ["{front}"]\nports = [8080]\n{extra}\n'
            f'[service.process]\ncommand = "{command}"\n')


def test_systemctl_reload_adds_removes_changes_and_rejects(ns: SystemdNamespace) -> None:
    """`systemctl reload` (ExecReload=, SIGHUP) and `jitlaunch reload`: services added,
    removed and changed; a broken config rejected with the old one serving and the unit
    active; an open proxied connection to an unchanged service carries on byte for byte
    throughout."""
    import subprocess

    _running(ns)
    ns.write("/etc/jitlaunch/echo.py", ECHO_SERVER)
    demo = "{python} -m jitlaunch.demo_http --address {address} --port {port} --name {name}"
    echo = _service("e", "127.77.0.3", "{python} /etc/jitlaunch/echo.py {address} {port}")
    main = _main_pid(ns)

    def outcomes() -> list[str]:
        return re.findall(r"(?:reloaded |reload \(SIGHUP\) rejected).*", _journal(ns))

    def reload(text: str, expect: str) -> None:
        before = len(outcomes())
        ns.write("/etc/jitlaunch/jitlaunch.toml", text)
        ns.systemctl("reload", "jitlaunch.service")
        # systemctl returns once kill has sent the SIGHUP; the daemon logs the outcome.
        ns.wait_for(lambda: len(outcomes()) > before, timeout=20, what="the reload's log line")
        assert expect in outcomes()[-1], _journal(ns)[-2000:]
        ns.wait_for(lambda: _active(ns), what="jitlaunch.service active after the reload")
        assert _main_pid(ns) == main

    client = None
    try:
        reload(CONFIG + echo + _service("x", "127.77.0.4", demo), "added e, x")
        assert _dig(ns, "x.jit.test") == ["127.77.0.4"]
        client = subprocess.Popen(
            ["nsenter", "-t", str(ns.pid), "-n", "--", sys.executable, "-c", _ECHO_CLIENT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert client.stdin is not None and client.stdout is not None

        def roundtrip(line: str) -> None:
            assert client is not None and client.stdin and client.stdout
            client.stdin.write(line + "\n")
            client.stdin.flush()
            # The client prints one line per line sent (its reads time out after 20 s).
            ready, _, _ = select.select([client.stdout], [], [], 30)
            assert ready, f"no echo within 30 s\n{_journal(ns)[-2000:]}"
            assert client.stdout.readline() == line + "\n"

        roundtrip("one " * 100)
        # Remove x, add y, change py: DNS follows, e's connection carries on.
        changed = CONFIG.replace('idle_timeout = "5m"', 'idle_timeout = "4m"')
        reload(changed + echo + _service("y", "127.77.0.5", demo),
               "added y; removed x; changed py: idle_timeout")
        assert _dig(ns, "y.jit.test") == ["127.77.0.5"]
        assert _dig(ns, "x.jit.test") == []
        roundtrip("two " * 1000)
        # A broken config: rejected, the unit active, the old config serving.
        reload(changed + echo + "[[service\n", "rejected, the running config stays")
        assert _dig(ns, "y.jit.test") == ["127.77.0.5"]
        assert ns.show("jitlaunch.service", "StatusText").startswith("4 services;")
        roundtrip("three")
        # `jitlaunch reload` over the control socket: the error, exit status 1.
        rejected = ns.run([f"{ROOT}/.venv/bin/jitlaunch", "reload"], check=False)
        assert rejected.returncode == 1, rejected
        assert rejected.stderr.startswith("jitlaunch: error: /etc/jitlaunch/jitlaunch.toml: "
                                          "not valid TOML"), rejected.stderr
        assert _active(ns) and _main_pid(ns) == main
        # py's front was passed by systemd (jitlaunch-py.socket): it cannot be dropped.
        head, _py, hello = CONFIG.split("[[service]]")
        ns.write("/etc/jitlaunch/jitlaunch.toml", head + "[[service]]" + hello)
        rejected = ns.run([f"{ROOT}/.venv/bin/jitlaunch", "reload"], check=False)
        assert rejected.returncode == 1 and "service 'py': front 127.77.0.2 port 8080 was " \
            "passed by systemd" in rejected.stderr, rejected
        roundtrip("four")
        client.stdin.close()
        assert client.wait(timeout=10) == 0
        client.stdout.close()
        client = None
        ns.write("/etc/jitlaunch/jitlaunch.toml", CONFIG)
        assert _jitlaunch(ns, "reload") == ["reloaded: removed e, y; changed py: idle_timeout"]
        assert _dig(ns, "e.jit.test") == []
        assert _active(ns) and _main_pid(ns) == main
    finally:
        if client is not None:
            client.kill()
            client.wait()
            for stream in (client.stdin, client.stdout):
                if stream is not None:
                    stream.close()
        ns.write("/etc/jitlaunch/jitlaunch.toml", CONFIG)
        ns.systemctl("reload", "jitlaunch.service", check=False)
