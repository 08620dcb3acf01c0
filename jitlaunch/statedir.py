"""The state directory, safe from its other users (the rules sshd's StrictModes applies to a
home directory).

The daemon writes as its own user (often root) into ``daemon.state_dir``: the lock, instance
logs and their rotation, saved VM states, QEMU's pid files and QMP sockets. Anyone else who
can create or rename entries there could plant a symlink (``jitlaunch.lock`` ->
``/etc/shadow``) and have the daemon truncate, overwrite or copy out a file of the daemon's
user. So:

* :func:`prepare_state_dir` (at start, before the lock) creates what is missing with mode
  0755 and refuses, in one line naming the path, what it found and what is required, a state
  directory that is not owned by the daemon's user or is writable by group or others, or one
  below a directory that someone other than root or the daemon's user owns or can write
  (a sticky directory such as /tmp is fine: others cannot rename our entries there).
  :func:`state_dir_problem` says the same without creating anything (``jitlaunch check``).
* The subdirectories the daemon uses (:data:`SUBDIRS`) obey the same rule, and must be real
  directories, not symlinks: :func:`ensure_subdir` creates one (0755) or refuses it.
* Every file in there is opened without following a symlink and only if it is a regular
  file of ours with one link (:func:`open_private`, :func:`instance_log`,
  :func:`read_private`, :func:`write_private`); renames and unlinks act on the entry itself.
  A path that QEMU or libvirtd opens itself (a QMP socket, a pid file, a console file, a
  saved state) lies in one of those directories, which nobody else can write.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import pwd
import stat
from pathlib import Path

from .errors import StateDirUnsafe
from .logutil import LimitedLog

log = logging.getLogger("jitlaunch.logs")
_limited = LimitedLog(log)

#: The subdirectories of the state directory that the daemon and its backends use.
SUBDIRS = ("logs", "run", "saved", "libvirt")
#: Mode of the directories the daemon creates (then less the umask).
DIR_MODE = 0o755


class NotOurs(OSError):
    """A path in the state directory that is a symlink, not a regular file (or directory),
    not the daemon user's, or a hard link: it is neither followed nor written. An OSError,
    so that callers' handling of a file they cannot open covers it."""

    def __init__(self, path: os.PathLike[str] | str, why: str) -> None:
        super().__init__(errno.EPERM, f"{os.fspath(path)} {why}; jitlaunch does not follow "
                                      "or write it (remove it)")
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return str(self.strerror)


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def dir_problem(path: Path, st: os.stat_result, uid: int, what: str) -> str | None:
    """Why directory ``path`` (``st``: its lstat) is not safe to keep the daemon's files in
    for a daemon running as ``uid``, or None. ``what`` names it in the message."""
    mode = stat.S_IMODE(st.st_mode)
    found = f"owner {_who(st.st_uid)}, mode {mode:04o}"
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symbolic link; it must be a directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    if st.st_uid != uid or _writable_by_others(st):
        return (f"{what} {path} has {found}; it must be owned by {_who(uid)} (the daemon's "
                f"user) and not writable by group or others (chown {uid} {path}; chmod go-w "
                f"{path})")
    return None


def _ancestor_problem(path: Path, uid: int) -> str | None:
    """Why a directory above the state directory lets someone else replace it, or None:
    each must be owned by root or ``uid`` and not writable by group or others unless sticky.
    Both the path as written and the one its symlinks resolve to are checked."""
    seen: set[Path] = set()
    for chain in (path, Path(os.path.realpath(path))):
        for parent in chain.parents:
            if parent in seen:
                continue
            seen.add(parent)
            try:
                st = os.stat(parent)
            except OSError:
                continue  # not there yet: created by us, below one that is checked
            sticky = bool(st.st_mode & stat.S_ISVTX)
            if st.st_uid not in (0, uid) or (_writable_by_others(st) and not sticky):
                return (f"the state directory {path} lies in {parent} (owner {_who(st.st_uid)}, "
                        f"mode {stat.S_IMODE(st.st_mode):04o}), which others could use to "
                        f"replace it; every directory above it must be owned by root or "
                        f"{_who(uid)} and not writable by group or others (unless sticky, "
                        "as /tmp)")
    return None


def state_dir_problem(path: Path, uid: int | None = None) -> str | None:
    """Why the daemon (running as ``uid``, by default this process's effective uid) would
    refuse ``path`` as its state directory, or None. Creates nothing: a directory that does
    not exist yet is fine if the daemon could create it safely."""
    uid = os.geteuid() if uid is None else uid
    path = Path(os.path.abspath(path))
    if (problem := _ancestor_problem(path, uid)) is not None:
        return problem
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at the state directory {path}: {exc.strerror or exc}"
    if (problem := dir_problem(path, st, uid, "the state directory")) is not None:
        return problem
    for name in SUBDIRS:
        sub = path / name
        try:
            sub_st = os.lstat(sub)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"cannot look at {sub}: {exc.strerror or exc}"
        if (problem := dir_problem(sub, sub_st, uid, "the state subdirectory")) is not None:
            return problem
    return None


def prepare_state_dir(path: Path) -> None:
    """Create the state directory (and what is missing above it) with mode 0755, and its
    ``logs`` subdirectory; StateDirUnsafe, one line saying what is wrong and what is
    required, if the directory is not safe (see the module's docstring)."""
    path = Path(os.path.abspath(path))
    uid = os.geteuid()
    if (problem := _ancestor_problem(path, uid)) is not None:
        raise StateDirUnsafe(problem)
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateDirUnsafe(f"cannot create the state directory {path}: "
                                 f"{exc.strerror or exc}") from exc
    if (problem := state_dir_problem(path, uid)) is not None:
        raise StateDirUnsafe(problem)
    try:
        ensure_subdir(path / "logs")
    except OSError as exc:
        raise StateDirUnsafe(str(exc)) from exc


def ensure_subdir(path: Path) -> Path:
    """``path``, a subdirectory of the state directory, created (0755) if missing; NotOurs
    if it is a symlink, not a directory, someone else's or writable by group or others.
    Returns ``path``. A state directory that does not exist yet is prepared first
    (:func:`prepare_state_dir`: a backend run on its own, in tests)."""
    if not os.path.lexists(path.parent):
        prepare_state_dir(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    problem = dir_problem(path, st, os.geteuid(), "the state subdirectory")
    if problem is not None:
        err = NotOurs(path, "")
        err.strerror = problem
        raise err
    return path


def _check_fd(fd: int, path: os.PathLike[str] | str) -> None:
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid != os.geteuid():
        why = f"belongs to {_who(st.st_uid)}, not to the daemon's user"
    elif st.st_nlink != 1:
        why = f"has {st.st_nlink} hard links"
    if why is not None:
        os.close(fd)
        raise NotOurs(path, why)


def open_private(path: os.PathLike[str] | str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` for a file in the state directory: never through a symlink (NotOurs),
    and only a regular file of the daemon's user with one link (else NotOurs, the
    descriptor closed). Do not pass O_TRUNC: an existing file is checked only once open;
    truncate it afterwards (``os.ftruncate``) or replace it (:func:`write_private`)."""
    assert not flags & os.O_TRUNC, "truncate after the check, not in the open"
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotOurs(path, "is a symbolic link") from None
        raise
    _check_fd(fd, path)
    if not flags & os.O_NONBLOCK:
        os.set_blocking(fd, True)
    return fd


def nofollow(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that does not follow a symlink (ELOOP), for files in
    the state directory that others write (a console file libvirt's virtlogd writes)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o644)


def _opener(path: str, flags: int) -> int:
    return open_private(path, flags & ~os.O_TRUNC)


def read_private(path: os.PathLike[str] | str, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of a file of ours in the state directory (see
    :func:`open_private`)."""
    fd = open_private(path, os.O_RDONLY)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with a new file holding ``data``: written to ``<path>.new``
    (created, never opened through whatever was there) and renamed over ``path``, which
    replaces the entry itself, link or not."""
    tmp = path.with_name(path.name + ".new")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


class LockHeld(Exception):
    """Another process holds the lock: ``args[0]`` is what it wrote into the file."""


def lock_file(fd: int, path: os.PathLike[str] | str, note: str) -> int:
    """Take an exclusive, non-blocking flock on the open ``fd`` (of ``path``) and write
    ``note`` into the file for people to read (a full disk is logged, not fatal); returns
    ``fd``, whose lock lives as long as it stays open (the kernel drops it if we die).
    LockHeld with the holder's note if another process holds it; OSError for anything else.
    ``fd`` is closed when it raises."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
            except OSError:
                pass
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockHeld(holder) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
    except OSError as exc:
        log.warning("cannot write into %s: %s", path, exc.strerror or exc)
    return fd


def is_private_file(path: Path) -> bool:
    """Whether ``path`` is a regular file of the daemon's user (not a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


class InstanceLog(io.FileIO):
    """An instance's log as the daemon writes it (a QEMU console, its header lines), opened
    as :func:`open_private` does (append, created 0644). A write never raises for a full or
    failing disk: the output is dropped instead, which is logged once (and once more when
    writing works again), so that a boot never fails because its log cannot grow."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        super().__init__(os.fspath(path), "ab", opener=_opener)
        self.dropped = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        try:
            written = super().write(data)
        except OSError as exc:
            if not self.dropped:
                _limited.warning(f"drop:{self.name}", "cannot write to the instance log %s "
                                 "(%s): output is being dropped until it can", self.name,
                                 exc.strerror or exc)
            self.dropped += len(data)
            return 0
        if self.dropped:
            log.info("writing to the instance log %s again; %d bytes were dropped", self.name,
                     self.dropped)
            self.dropped = 0
        return written or 0
