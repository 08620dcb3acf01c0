"""A real systemd (252 here) as PID 1 of its own namespaces, for testing our units.

PID 1 of this machine is not systemd. This starts one that is PID 1 of new mount, PID, UTS,
IPC, network and cgroup namespaces, over a throw-away overlay of ``/``, following issue 9's
recipe. What keeps the host safe:

* **Never from the root cgroup.** A systemd started there moves every process of the machine
  into its own ``init.scope``. The wrapper shell first moves *itself* into a new child cgroup
  of both the cgroup2 hierarchy (``/sys/fs/cgroup/unified``) and the named v1 one
  (``/sys/fs/cgroup/systemd``), then execs ``unshare --cgroup``: the namespace's cgroup root
  is that child, and nothing systemd does can reach above it.
* **cgroup2 is mounted at the new root's /sys/fs/cgroup before systemd starts,** so systemd
  sees the unified hierarchy only (otherwise it picks hybrid mode and writes into the host's
  v1 hierarchies).
* /proc/sys and /proc/sysrq-trigger are read-only inside, and the boot units that would act
  on the host's kernel (systemd-sysctl, module loading, the random seed, binfmt) are masked:
  most kernel settings are not namespaced.
* Every mount is made inside the private mount namespace (gone with its last process); the
  root is an overlay with its upper layer on a tmpfs, so whatever the units write (``/etc``,
  ``/var/lib/jitlaunch``) vanishes too; the network namespace has only its own loopback.
* :meth:`SystemdNamespace.close` powers systemd off (bounded), kills what is left, waits for
  it, and removes the two cgroups and the temporary directory, on every path.

Commands run inside with ``nsenter -t PID -a`` (every namespace and the new root), or with
``-n`` only (the host's files, the namespace's loopback) for host tools such as ``dig``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

UNIFIED = Path("/sys/fs/cgroup/unified")
NAMED = Path("/sys/fs/cgroup/systemd")
SYSTEMD = "/lib/systemd/systemd"
#: The target systemd starts; the fixture writes it, tests add Wants= to their units.
TARGET = "jltest.target"

#: Units of the boot (pulled in by sysinit.target) that would act on the host's kernel rather
#: than on the namespace: masked, besides /proc/sys being read-only.
MASKED = (
    "systemd-sysctl.service", "systemd-modules-load.service", "modprobe@.service",
    "kmod-static-nodes.service", "systemd-random-seed.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-journald-audit.socket", "systemd-hwdb-update.service",
)

# Runs on the host: moves itself into the test's cgroups, then becomes `unshare`.
_WRAPPER = """#!/bin/sh
set -eu
echo $$ > "{unified}/cgroup.procs"
echo $$ > "{named}/cgroup.procs"
exec unshare --mount --pid --fork --uts --ipc --net --cgroup --propagation private \\
    /bin/sh "{base}/inner.sh"
"""

# Runs as PID 1 of the new namespaces: builds the new root, pivots into it, execs systemd.
_INNER = """#!/bin/sh
set -eu
B="{base}/fs"
mount -t tmpfs -o mode=755 jltest "$B"
mkdir "$B/upper" "$B/work" "$B/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$B/root"
R="$B/root"
mount -t proc proc "$R/proc"
# Kernel settings are the host's (most of /proc/sys is not namespaced): read-only, as
# systemd-nspawn does, so that no unit (systemd-sysctl, tmpfiles' w lines) can change them.
for p in sys sysrq-trigger; do
    [ -e "$R/proc/$p" ] || continue
    mount --bind "$R/proc/$p" "$R/proc/$p"
    mount -o remount,bind,ro "$R/proc/$p"
done
mount -t sysfs -o ro sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid jltest-dev "$R/dev"
for dev in null zero full random urandom tty kvm net/tun; do
    [ -e "/dev/$dev" ] || continue
    mkdir -p "$(dirname "$R/dev/$dev")"
    touch "$R/dev/$dev"
    mount --bind "/dev/$dev" "$R/dev/$dev"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev jltest-shm "$R/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev jltest-run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev jltest-tmp "$R/tmp"
{binds}cp -r "{base}/units/." "$R/etc/systemd/system/"
cd "$R"
mkdir -p .jltest-oldroot
pivot_root . .jltest-oldroot
umount -l /.jltest-oldroot
rmdir /.jltest-oldroot
exec env -i container=unshare {systemd} --system --unit={target}
"""


class SystemdError(AssertionError):
    """The namespace's systemd did not do what a test expected (its log is in the message)."""


class SystemdNamespace:
    """A running systemd in its own namespaces. Use :func:`systemd_namespace`."""

    def __init__(self, units: Mapping[str, str], keep: Sequence[Path] = ()) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="jltest-systemd-"))
        self.cgroup = f"jltest-{os.getpid()}-{secrets.token_hex(4)}"
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []
        self._units = dict(units)
        # Host directories under the namespace's fresh /tmp, /run or /dev (a checkout in
        # /tmp), bound in read-only at the same path so that they stay visible.
        self._keep = [Path(p).resolve() for p in keep if _hidden(Path(p).resolve())]

    # ---- starting and stopping ---------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        (self.base / "fs").mkdir()
        units = self.base / "units"
        units.mkdir()
        (units / TARGET).write_text("[Unit]\nDescription=jitlaunch tests\n")
        for name in MASKED:
            (units / name).symlink_to("/dev/null")
        for name, text in self._units.items():
            path = units / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for hierarchy in (UNIFIED, NAMED):
            path = hierarchy / self.cgroup
            path.mkdir()
            self._cgroups.append(path)
        fill = {
            "unified": UNIFIED / self.cgroup, "named": NAMED / self.cgroup, "base": self.base,
            "systemd": SYSTEMD, "target": TARGET,
            "binds": "".join(
                f'mkdir -p "$R{p}"\nmount --bind "{p}" "$R{p}"\n'
                f'mount -o remount,bind,ro "$R{p}"\n' for p in self._keep
            ),
        }
        (self.base / "wrapper.sh").write_text(_WRAPPER.format(**fill))
        (self.base / "inner.sh").write_text(_INNER.format(**fill))
        with open(self.base / "systemd.log", "wb") as out:
            self._proc = subprocess.Popen(
                ["/bin/sh", str(self.base / "wrapper.sh")], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        # The wrapper becomes unshare (same pid); its one child becomes systemd (PID 1 inside).
        while not self.pid:
            self._check_alive()
            kids = _children(self._proc.pid)
            if kids and _exe(kids[0]) == os.path.realpath(SYSTEMD):
                self.pid = kids[0]
            elif time.monotonic() > deadline:
                raise SystemdError(f"systemd did not start within {timeout} s\n{self.log()}")
            else:
                time.sleep(0.01)
        # systemctl needs the manager's private socket; it appears once generators have run.
        while not Path(f"/proc/{self.pid}/root/run/systemd/private").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SystemdError(f"systemd did not listen within {timeout} s\n{self.log()}")
            time.sleep(0.01)
        left = max(1.0, deadline - time.monotonic())
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
        if state.stdout.strip() not in ("running", "degraded"):
            raise SystemdError(f"systemd did not come up: {state.stdout.strip()!r}\n{self.log()}")

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise SystemdError(
                f"the namespace ended early (status {self._proc.returncode})\n{self.log()}"
            )

    def close(self, timeout: float = 10.0) -> None:
        """Power off, kill what is left, remove the cgroups and the temporary directory."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                if self.pid:
                    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                        self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=5)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Killing PID 1 of a PID namespace kills every process in it.
                    for pid in (self.pid, self._proc.pid):
                        if pid:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                    self._proc.wait(timeout)
        finally:
            self._remove_cgroups(timeout)
            shutil.rmtree(self.base, ignore_errors=True)

    def _remove_cgroups(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for top in self._cgroups:
            while top.exists():
                try:
                    # Deepest first: a cgroup can only be removed once it has no children.
                    for path in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                        path.rmdir()
                    top.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # its last processes are still being reaped

    # ---- using it ----------------------------------------------------------------------

    def log(self) -> str:
        try:
            return (self.base / "systemd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        namespaces: str = "-a", user: str | None = None, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside (``namespaces="-n"``: the namespace's network only).

        ``user`` runs it as that user of the namespace (``setpriv``)."""
        prefix = ["nsenter", "-t", str(self.pid), namespaces, "--"]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                       "--reset-env"]
        proc = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and proc.returncode != 0:
            raise SystemdError(
                f"{' '.join(argv)} exited with {proc.returncode}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -P``)."""
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def write(self, path: str, text: str) -> None:
        """Write a file inside the namespace (in the overlay's throw-away upper layer)."""
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path], input=text)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "a condition"
    ) -> None:
        """Poll ``predicate`` until it holds (never a bare sleep), or fail with the log."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                journal = self.run(["journalctl", "--no-pager", "-n", "60"], check=False).stdout
                raise SystemdError(f"{what} did not happen within {timeout} s\n{journal}")
            self._check_alive()
            time.sleep(0.05)

    def cgroup_pids(self, unit: str) -> list[int]:
        """Host pids of the processes in a unit's cgroup and the cgroups below it (a unit
        with Delegate= makes its own), empty when it has none."""
        group = self.show(unit, "ControlGroup")
        if not group:
            return []
        pids = []
        for top, _, _ in os.walk(UNIFIED / self.cgroup / group.lstrip("/")):
            try:
                pids += [int(p) for p in (Path(top) / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                continue
        return pids


@contextlib.contextmanager
def systemd_namespace(
    units: Mapping[str, str], timeout: float = 30.0, keep: Sequence[Path] = ()
) -> Iterator[SystemdNamespace]:
    """A running systemd with ``units`` (file name -> text) in /etc/systemd/system; the
    directories in ``keep`` stay visible inside even where the namespace mounts a fresh
    tmpfs (/tmp, /run, /dev)."""
    ns = SystemdNamespace(units, keep)
    try:
        ns.start(timeout)
        yield ns
    finally:
        ns.close()


def _hidden(path: Path) -> bool:
    """Whether the namespace's root does not show ``path`` of the host: under its own tmpfs
    mounts (/tmp, /run, /dev), or on another file system than / (the overlay's lower layer
    is / alone, without the mounts below it)."""
    if path.parts[1:2] in (("tmp",), ("run",), ("dev",)):
        return True
    try:
        return path.stat().st_dev != Path("/").stat().st_dev
    except OSError:
        return False


def available() -> str | None:
    """Why a namespace systemd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not Path(SYSTEMD).exists():
        return f"needs {SYSTEMD} (apt-get install systemd)"
    if not (UNIFIED / "cgroup.procs").exists() or not (NAMED / "cgroup.procs").exists():
        return f"needs the cgroup layout of {UNIFIED} and {NAMED}"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux)"
    return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
