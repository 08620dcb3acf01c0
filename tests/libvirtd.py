"""A libvirtd of the test's own (or the benchmark's): its own configuration, state, runtime
and socket directories, optionally inside a network namespace, under scripts/subreaper.

libvirtd run as root (qemu:///system) has fixed paths: /etc/libvirt for its configuration
(qemu.conf cannot be chosen on the command line), /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt. So it runs in a mount namespace of its own
(``unshare --mount``) where directories under ``root`` are bound over those paths: nothing
of the host's libvirt is read or written, and a libvirtd already running on the host is
neither used nor disturbed. Its socket is ``root/sock/libvirt-sock``, reached through
:attr:`PrivateLibvirtd.uri` (``qemu:///system?socket=...``); restarted, it finds its
running domains again in the same directories.

Its qemu.conf: QEMU runs as root (it reads the test's images, writes the test's state
directory); ``cgroup_controllers = [ ]``, since by default libvirt puts each domain into
``/sys/fs/cgroup/<controller>/machine/<domain>.libvirt-qemu`` and leaves the ``machine``
directories behind on the host; ``stdio_handler = "file"`` (QEMU's output to
``root/log/qemu/<domain>.log``, without virtlogd). QEMU's capability cache is copied from the
host's if there is one, else from an earlier libvirtd of this process, which saves the ~9 s
probe of a first start.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The host paths replaced inside libvirtd's mount namespace, and the directory under
#: ``root`` bound over each.
BOUND = {"etc": "/etc/libvirt", "run": "/run", "lib": "/var/lib/libvirt",
         "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
QEMU_CONF = """\
user = "root"
group = "root"
cgroup_controllers = [ ]
stdio_handler = "file"
"""


def cgroup_dirs() -> set[str]:
    """libvirt's cgroup partitions, one level below each cgroup hierarchy
    (``/sys/fs/cgroup/*/machine*``: ``machine``, or ``machine.slice`` under systemd). Only
    these: other tests make cgroups of their own (tests/systemd_ns.py's ``jltest-*``) while
    the libvirt tests run."""
    base = Path("/sys/fs/cgroup")
    if not base.is_dir():
        return set()
    return {str(p) for p in base.glob("*/machine*") if p.is_dir() and not p.is_symlink()}


class PrivateLibvirtd:
    """``start()``, ``restart()`` (SIGTERM and a new one: its domains keep running) and
    ``stop()`` (destroys every domain first: they are all the test's). ``netns``: the name
    of a network namespace (``ip netns``) to run in. ``tcp_port``: also listen on
    127.0.0.1:``tcp_port`` without authentication (a "remote" URI for the tests).
    ``run_tmpfs``: /run is a tmpfs of libvirtd's mount namespace, as on a usual host, instead
    of ``root/run`` (libvirtd fsyncs a domain's status file there on each state change); it
    goes with libvirtd, so a restart would not find its domains again."""

    def __init__(self, root: Path, netns: str | None = None, tcp_port: int | None = None,
                 run_tmpfs: bool = False) -> None:
        self.root = root
        self.netns = netns
        self.tcp_port = tcp_port
        self.run_tmpfs = run_tmpfs
        self.procs: list[subprocess.Popen[bytes]] = []
        for sub in (*BOUND, "sock"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for caps in (Path("/var/cache/libvirt/qemu/capabilities"), PrivateLibvirtd._caps):
            if caps is not None and caps.is_dir() and any(caps.iterdir()) \
                    and not (root / "cache" / "qemu").exists():
                shutil.copytree(caps, root / "cache" / "qemu" / "capabilities")
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        conf = (f'unix_sock_dir = "{root / "sock"}"\nunix_sock_rw_perms = "0700"\n'
                'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
        if tcp_port is not None:
            conf += (f'listen_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\n'
                     f'listen_addr = "127.0.0.1"\ntcp_port = "{tcp_port}"\n')
        (root / "etc" / "libvirtd.conf").write_text(conf)
        self.uri = f"qemu:///system?socket={root / 'sock' / 'libvirt-sock'}"

    #: The capability cache of a libvirtd this process started, for the next one.
    _caps: Path | None = None

    def __repr__(self) -> str:
        pids = [p.pid for p in self.procs if p.poll() is None]
        return f"<PrivateLibvirtd {self.root} netns={self.netns} pids={pids}>"

    def _argv(self) -> list[str]:
        mounts = "; ".join(
            "mount -t tmpfs -o mode=755 tmpfs /run" if sub == "run" and self.run_tmpfs
            else f"mount --bind {shlex.quote(str(self.root / sub))} {path}"
            for sub, path in BOUND.items())
        daemon = [sys.executable, str(ROOT / "scripts" / "subreaper"), "libvirtd",
                  "-f", "/etc/libvirt/libvirtd.conf", *(["--listen"] if self.tcp_port else [])]
        # libvirtd locks a console's pty with /var/lock/LCK..<pty> (/var/lock is /run/lock).
        script = f"set -e; {mounts}; mkdir -p /run/lock; exec {shlex.join(daemon)}"
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*inside, "unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def connects(self) -> bool:
        import libvirt

        try:
            libvirt.open(self.uri).close()
            return True
        except libvirt.libvirtError:
            return False

    def start(self) -> None:
        deadline = time.monotonic() + 60  # a first start without a cache probes QEMU (~9 s)
        while True:
            log = open(self.root / "libvirtd.out", "ab")
            with log:
                proc = subprocess.Popen(self._argv(), start_new_session=True,
                                        stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            # A libvirtd still shutting down holds its pid file: the new one exits; again.
            while not self.connects() and proc.poll() is None:
                assert time.monotonic() < deadline, f"libvirtd did not answer within 60 s: {self.log()}"
                time.sleep(0.05)
            if proc.poll() is None:
                PrivateLibvirtd._caps = self.root / "cache" / "qemu" / "capabilities"
                return
            assert time.monotonic() < deadline, f"libvirtd did not start within 60 s: {self.log()}"

    def log(self) -> str:
        try:
            return (self.root / "libvirtd.out").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def restart(self) -> None:
        """SIGTERM to libvirtd (its domains keep running) and a new one."""
        self.procs[-1].terminate()
        deadline = time.monotonic() + 20
        while self.connects():
            assert time.monotonic() < deadline, "libvirtd did not stop"
            time.sleep(0.02)
        self.start()

    def domains(self) -> set[str]:
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            return {d.name() for d in conn.listAllDomains()}
        finally:
            conn.close()

    def destroy_all(self) -> list[str]:
        """Destroy every domain of this libvirtd (all of them are the test's)."""
        import libvirt

        names = []
        conn: Any = libvirt.open(self.uri)
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    names.append(dom.name())
                    dom.destroy()
        finally:
            conn.close()
        return names

    def stop(self) -> None:
        """Destroy the domains, stop libvirtd; kill what is left of its process groups."""
        if any(p.poll() is None for p in self.procs) and self.connects():
            with contextlib.suppress(Exception):
                self.destroy_all()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    # The subreaper waits for its orphans (a QEMU libvirt could not destroy).
                    for pid in [*_children(proc.pid), proc.pid]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    proc.wait()


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


needs_libvirtd = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("libvirtd") is None or shutil.which("unshare") is None,
    reason="needs root, libvirtd (scripts/setup installs it) and unshare")


BRIDGE_SERVICE = """
[dns]
listen = ["127.0.0.1:5300"]
zones = ["jit.test"]
ttl = 30

[metrics]
listen = ["127.0.0.1:0"]

[[service]]
name = "hello"
backend = "libvirt"
front = ["127.77.0.1"]
ports = [80]
answer = "handoff"
idle_timeout = "1s"
boot_timeout = "30s"

[service.libvirt]
uri = "{uri}"
kernel = "{kernel}"
accel = "tcg"
network = "bridge"
bridge = "jl0"
subnet = "10.77.0.0/24"
"""
