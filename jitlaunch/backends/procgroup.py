"""Each process instance in a container of its own that the kernel keeps track of, so that
a stop ends every process the instance started, however it left (``setsid``, a double fork,
a cleared environment).

One way per daemon, the first the host allows, chosen at start and logged once:

* ``cgroup``: a cgroup2 directory per instance, below the daemon's own cgroup (under
  systemd the service's, which needs ``Delegate=yes``), named
  ``jitlaunch-<state id>-<service>-<n>``. The child first runs a tiny shell that waits on
  its stdin until the daemon has moved it into its cgroup, then execs the command: nothing
  the command starts is ever outside. A stop signals every process in the cgroup, then
  ``cgroup.kill`` (or SIGKILL to each member until none is left, before Linux 5.14) and
  ``rmdir``. The parent directory is written to ``<state_dir>/cgroup``, so a daemon started
  after one that was killed outright finds the cgroups of its own state directory's
  identity (compared whole: :func:`~jitlaunch.backends.owner.state_id`) and removes them,
  and never anyone else's. The daemon itself stays in its cgroup, which then has both
  processes and children: cgroup2 allows that as long as no controller is enabled in its
  ``cgroup.subtree_control`` (the daemon enables none; with one enabled there, the daemon
  could not be in it at all).
* ``pid namespace``: ``unshare --pid --fork --kill-child`` runs a small shell as the init of
  a new PID namespace; it passes SIGTERM on to every process in the namespace and exits
  with the command's status. When the init goes (or ``unshare``, which takes it along), the
  kernel kills everything in the namespace. Needs CAP_SYS_ADMIN: a root daemon that may not
  write the cgroup2 hierarchy (no cgroup2 mounted, or a unit without ``Delegate=yes``).
* ``process group``: what is left. Signals go to the instance's process group: a process
  that leaves it (``setsid``) escapes a stop, and only the environment marker of the
  process backend finds it after a crash.

:func:`open_containers` chooses (blocking: run it in a worker thread); the
:class:`Container` of one instance is used as: :meth:`~Container.command` and
:attr:`~Container.stdin` for the spawn, :meth:`~Container.started` with the child's pid,
:meth:`~Container.signal` and :meth:`~Container.kill` to stop it, and
:meth:`~Container.remove` (blocking) once its leader has been reaped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .owner import state_id

log = logging.getLogger("jitlaunch.process")

CGROUP, PIDNS, PGROUP = "cgroup", "pid namespace", "process group"
KINDS = (CGROUP, PIDNS, PGROUP)
#: The file in the state directory naming the cgroup2 directory our instance cgroups are in.
RECORD = "cgroup"
PREFIX = "jitlaunch"
#: How long a removal waits for the processes of a killed cgroup to be gone.
REMOVE_TIMEOUT = 5.0

#: The gate: waits for one line on stdin (the daemon writes it once the shell is in its
#: cgroup), then becomes the command with /dev/null as its stdin. No line (the daemon gave
#: up): exit without running anything.
GATE = 'read _ || exit 1; exec "$@" </dev/null'
#: The init of a PID namespace: runs the command, passes SIGTERM and SIGINT on to every
#: process of the namespace, exits with the command's status (128 + n if a signal ended it).
INIT = """trap 'kill -TERM -1 2>/dev/null' TERM
trap 'kill -INT -1 2>/dev/null' INT
"$@" </dev/null &
c=$!
while :; do
  wait "$c"; s=$?
  if [ "$s" -gt 128 ] && kill -0 "$c" 2>/dev/null; then continue; fi
  exit "$s"
done"""
SHELL = "/bin/sh"


class Container:
    """One instance's container. The process-group kind, and the base of the others."""

    kind = PGROUP

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: int | None = None
        #: What the child's stdin must be (a gate's read end, or /dev/null).
        self.stdin: int = subprocess.DEVNULL

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"

    def command(self, argv: list[str]) -> list[str]:
        """The argv to spawn (``start_new_session=True``, stdin :attr:`stdin`) for ``argv``."""
        return argv

    def started(self, pid: int) -> None:
        """The child is running as ``pid``: let it go on. OSError if it cannot be contained
        (the caller then kills it and calls :meth:`remove`)."""
        self.pid = pid

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every process of the instance (as far as this kind can tell)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL every process of the instance."""
        self.signal(signal.SIGKILL)

    def remove(self) -> None:
        """Blocking: release the container once the instance is killed (idempotent)."""
        self.close_gate()

    def close_gate(self) -> None:
        if self.stdin != subprocess.DEVNULL:
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = subprocess.DEVNULL


class PidNamespace(Container):
    """The child is ``unshare``, whose child is the init of a new PID namespace. SIGTERM to
    the group reaches the init (which passes it on) and the command; SIGKILL ends ``unshare``
    and the init, and with the init the whole namespace."""

    kind = PIDNS

    def __init__(self, name: str, unshare: str) -> None:
        super().__init__(name)
        self.unshare = unshare

    def command(self, argv: list[str]) -> list[str]:
        return [self.unshare, "--pid", "--fork", "--kill-child", "--", SHELL, "-c", INIT,
                "jitlaunch-init", *argv]


class Cgroup(Container):
    """A cgroup2 directory of its own; the child waits at the gate until it is inside."""

    kind = CGROUP

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        try:
            path.mkdir()
        except FileExistsError:
            # A leftover that could not be removed (a process stuck in the kernel): ours by
            # its name; whatever is in it goes.
            kill_tree(path)
        try:
            self.stdin, self._gate = os.pipe()
        except OSError:
            remove_tree(path)
            raise

    def __repr__(self) -> str:
        return f"<Cgroup {self.path} pid={self.pid}>"

    def command(self, argv: list[str]) -> list[str]:
        return [SHELL, "-c", GATE, "jitlaunch-gate", *argv]

    def started(self, pid: int) -> None:
        self.pid = pid
        self.close_gate()  # the child has its own copy of the read end
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n")
            os.write(self._gate, b"go\n")
        finally:
            os.close(self._gate)
            self._gate = -1

    def signal(self, sig: int) -> None:
        for pid in members(self.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            kill_tree(self.path, wait=False)

    def remove(self) -> None:
        self.close_gate()
        if self._gate >= 0:
            os.close(self._gate)
            self._gate = -1
        remove_tree(self.path)


# ---- cgroup2 helpers (blocking) -----------------------------------------------------------


def _tree(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, deepest first."""
    found = []
    for top, dirs, _ in os.walk(path, topdown=False):
        found += [Path(top) / d for d in dirs]
    return [*found, path]


def members(path: Path) -> list[int]:
    """The pids in ``path`` and every cgroup below it."""
    pids = []
    for group in _tree(path):
        with contextlib.suppress(FileNotFoundError):
            pids += [int(p) for p in (group / "cgroup.procs").read_text().split()]
    return pids


def _populated(path: Path) -> bool:
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


def kill_tree(path: Path, wait: bool = True) -> None:
    """SIGKILL every process in ``path`` and below: ``cgroup.kill`` where the kernel has it
    (5.14), else each member until none is left. With ``wait``, until they are gone
    (bounded by REMOVE_TIMEOUT)."""
    try:
        (path / "cgroup.kill").write_text("1\n")
    except FileNotFoundError:
        if not path.exists():
            raise
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while (pids := members(path)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
    if wait:
        _wait_empty(path)


def _wait_empty(path: Path) -> None:
    # Exited processes leave the cgroup at once (zombies are not members): only live ones
    # keep it populated.
    deadline = time.monotonic() + REMOVE_TIMEOUT
    while _populated(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def remove_tree(path: Path) -> None:
    """Kill what is left in ``path``, wait until it is empty, remove it and every cgroup
    below it. OSError if it cannot be removed within REMOVE_TIMEOUT."""
    if not path.exists():
        return
    kill_tree(path)
    deadline = time.monotonic() + REMOVE_TIMEOUT
    for group in _tree(path):
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def own_cgroup() -> Path | None:
    """The cgroup2 directory this process is in (through a mount of the cgroup2 hierarchy
    that shows it), or None where there is none: no cgroup2, or not mounted here."""
    rel = None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hierarchy, _, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0":
                    rel = path
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except (OSError, ValueError):
        return None
    if rel is None or not rel.startswith("/"):
        return None
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if not right.startswith("cgroup2 ") or len(fields) < 5:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if rel == root or rel.startswith(root.rstrip("/") + "/"):
            return Path(point) / rel[len(root):].lstrip("/")
    return None


# ---- the choice ---------------------------------------------------------------------------


class Containers:
    """How this daemon contains the process instances of one state directory."""

    def __init__(self, state_dir: Path, kind: str, parent: Path | None = None,
                 unshare: str | None = None) -> None:
        self.state_dir = state_dir
        self.id = state_id(state_dir)
        self.kind = kind
        #: The cgroup2 directory our instance cgroups are made in (the cgroup kind).
        self.parent = parent
        self.unshare = unshare

    def __repr__(self) -> str:
        where = f" {self.parent}" if self.parent is not None else ""
        return f"<Containers {self.kind}{where} {self.id}>"

    def mine(self, name: str) -> bool:
        """Is the cgroup ``name`` one of this state directory's? The identity is compared
        whole: ``jitlaunch-<id>-...`` with exactly our id."""
        parts = name.split("-", 2)
        return len(parts) == 3 and parts[0] == PREFIX and parts[1] == self.id

    def open(self, service: str, number: int) -> Container:
        """A container for instance ``number`` of ``service``. OSError if it cannot be made."""
        name = f"{PREFIX}-{self.id}-{service}-{number}"
        if self.kind == CGROUP:
            assert self.parent is not None
            return Cgroup(name, self.parent / name)
        if self.kind == PIDNS:
            assert self.unshare is not None
            return PidNamespace(name, self.unshare)
        return Container(name)

    def sweep(self) -> list[str]:
        """Blocking: kill and remove the cgroups of our identity an earlier run left (below
        our own cgroup and below the one the state directory records), then record ours.
        Returns the paths removed; one that cannot be removed is logged and left."""
        places = [p for p in (self.parent, self._recorded()) if p is not None]
        removed = []
        for place in dict.fromkeys(places):
            try:
                names = [e.name for e in os.scandir(place) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for name in names:
                if self.mine(name):
                    try:
                        remove_tree(place / name)
                    except OSError as exc:
                        log.warning("cannot remove the cgroup %s left over from an earlier "
                                    "run: %s", place / name, exc.strerror or exc)
                        continue
                    removed.append(str(place / name))
        if self.kind == CGROUP and self.parent is not None:
            self._record(self.parent)
        return removed

    def _recorded(self) -> Path | None:
        """The parent an earlier run recorded, if it is a directory of a cgroup2 mount (the
        file is only a hint: what is removed there must still carry our identity)."""
        try:
            fd = os.open(self.state_dir / RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd) as f:
            text = f.read(4096).strip()
        path = Path(text)
        if not path.is_absolute() or not (path / "cgroup.procs").is_file():
            return None
        return path

    def _record(self, parent: Path) -> None:
        path = self.state_dir / RECORD
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(f"{parent}\n")
        except OSError as exc:
            log.warning("cannot write %s (a daemon started after a crash would not find "
                        "this run's cgroups): %s", path, exc.strerror or exc)


def cgroup_problem(parent: Path | None) -> str | None:
    if parent is None:
        return "no cgroup2 hierarchy is mounted where this process is"
    if not os.access(parent, os.W_OK) or not os.access(parent / "cgroup.procs", os.W_OK):
        return f"the daemon may not create cgroups in its own cgroup {parent}"
    return None


def pidns_problem() -> tuple[str | None, str | None]:
    """(unshare's path, None) if a PID namespace can be made here, else (None, why not)."""
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        return None, "unshare (util-linux) is not installed"
    try:
        res = subprocess.run([unshare, "--pid", "--fork", "--kill-child", "--", SHELL, "-c",
                              "exit 0"], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"unshare cannot run: {exc}"
    if res.returncode != 0:
        why = res.stderr.decode(errors="replace").strip().splitlines()
        return None, f"unshare --pid failed: {why[-1] if why else res.returncode}"
    return unshare, None


def open_containers(state_dir: Path, kind: str | None = None) -> Containers:
    """Blocking: choose how instances of ``state_dir`` are contained (``kind`` forces one:
    the tests) and log it once."""
    parent = own_cgroup()
    no_cgroup = cgroup_problem(parent)
    if kind in (None, CGROUP) and no_cgroup is None:
        log.info("process instances run each in a cgroup of its own below %s", parent)
        return Containers(state_dir, CGROUP, parent)
    unshare, no_pidns = (None, "not asked for") if kind == PGROUP else pidns_problem()
    if kind in (None, PIDNS) and unshare is not None:
        log.info("process instances run each in a PID namespace of its own (%s)",
                 no_cgroup or "as asked")
        return Containers(state_dir, PIDNS, parent if no_cgroup is None else None,
                          unshare)
    if kind is None:
        log.warning("process instances run in a process group only: a process that leaves "
                    "it (setsid) outlives its instance's stop (%s; %s)", no_cgroup,
                    no_pidns)
    return Containers(state_dir, PGROUP, parent if no_cgroup is None else None)
