"""Driving podman through its command line, and what the kernel tells about a container.

Each call is a ``podman`` process (~30 ms for ``pause`` or ``unpause`` on 2 shared cores,
~150 ms for a ``run``; bench/podman). Its REST API answers an unpause in ~6 ms, but needs a
``podman system service`` process kept alive beside the daemon. So podman makes and removes
containers, and a pause writes the container's freezer cgroup directly (:func:`freeze`,
:func:`set_frozen`): a wake from pause costs microseconds, not a process.

Errors: a failed call raises BootFailed with podman's own last line of error output.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trio

from ...errors import BootFailed

#: The longest one podman call may take (a ``run`` of a large image mounts its layers).
CALL_TIMEOUT = 60.0


async def podman(binary: str, *args: str, timeout: float = CALL_TIMEOUT) -> str:  # noqa: ASYNC109
    """Run ``podman ARGS``; its standard output, stripped. BootFailed if it cannot be run,
    fails, or takes longer than ``timeout`` (it is killed then)."""
    what = f"podman {args[0]}" if args else "podman"
    try:
        with trio.fail_after(timeout):
            # A session of its own: a signal to the daemon's process group (Ctrl-C, a
            # supervisor's SIGTERM to the group) must not cut a `podman rm` short and leave
            # the container behind; the daemon ends its podman calls itself.
            done = await trio.run_process(
                [binary, *args], capture_stdout=True, capture_stderr=True, check=False,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
    except trio.TooSlowError:
        raise BootFailed(f"{what} took longer than {timeout:g} s") from None
    except OSError as exc:
        raise BootFailed(f"cannot run {binary}: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BootFailed(f"{what} failed: {lines[-1] if lines else f'status {done.returncode}'}")
    out: str = done.stdout.decode(errors="replace").strip()
    return out


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of ``pid`` (its
    /proc/PID/net/tcp and tcp6). No connection is made: a published port's forwarder on the
    host accepts before anything listens inside."""
    want = f":{port:04X} "
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # local_address is field 1 ("0100007F:1F90"), st is field 3 (0A: LISTEN)
                    if len(fields) > 3 and fields[3] == "0A" and (fields[1] + " ").endswith(want):
                        return True
        except OSError:
            continue
    return False


def frozen(path: Path) -> bool:
    """Whether the processes of the freezer cgroup ``path`` (:func:`freezer_of`) are frozen,
    by us or by anyone (``podman pause``)."""
    try:
        return (path / "freezer.state").read_text().strip() == "FROZEN"
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        return "frozen 1" in (path / "cgroup.events").read_text()
    except OSError:
        return False


def set_frozen(path: Path, on: bool) -> None:
    """Ask the kernel to freeze (or thaw) every process of the cgroup ``path``; a freeze
    completes later (see :func:`freeze`). OSError if the cgroup cannot be written."""
    v1 = path / "freezer.state"
    if v1.exists():
        v1.write_text("FROZEN" if on else "THAWED")
    else:
        (path / "cgroup.freeze").write_text("1" if on else "0")


async def freeze(path: Path, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Freeze the cgroup ``path`` and wait until every process in it is frozen. OSError
    if it cannot be written; BootFailed if it is not frozen within ``timeout``."""
    set_frozen(path, True)
    with trio.move_on_after(timeout):
        while True:  # FREEZING until every task has stopped (a poll: the kernel tells no one)
            if frozen(path):
                return
            await trio.sleep(0.001)
    set_frozen(path, False)
    raise BootFailed(f"the cgroup {path} was not frozen within {timeout:g} s")


def freezer_of(pid: int) -> Path | None:
    """The freezer cgroup directory of ``pid`` (cgroup v1's freezer, else cgroup2's), or
    None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return Path("/sys/fs/cgroup/freezer") / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
                if (root / "cgroup.controllers").exists():
                    return root / line[3:].lstrip("/")
    return None


def read_pid(path: Path) -> int:
    """The pid in the pidfile podman wrote; BootFailed if there is none."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise BootFailed(f"podman wrote no container pid to {path}") from exc


async def wait_pid_gone(pid: int) -> None:
    """Return once ``pid`` (not our child: the container's first process) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
