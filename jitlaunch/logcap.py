"""Instance logs capped in size: a chatty guest or process must not fill the state directory.

Instance output goes to ``<state_dir>/logs/<service>.log``, written by the instance itself (a
process backend child holds the file as its stdout) or by the daemon (a QEMU console). Both
append (``O_APPEND``), so :func:`serve_log_caps` can rotate a log in place the way logrotate's
``copytruncate`` does: every ``interval`` it looks at each ``*.log`` there, and one that has
grown past ``max_bytes`` is copied to ``<name>.log.1`` (replacing it) and truncated to zero;
the writer carries on at the start of the empty file. When the copy cannot be made (the
disk is full) the log is emptied all the same, without its copy. A log therefore stays below
``max_bytes`` plus what is written in one interval, and at most two files per log exist
(``.log`` and ``.log.1``). What is written between the copy and the truncation is lost (a
few milliseconds' worth), which is the price of not owning the writer's descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

import trio

from .logutil import LimitedLog
from .statedir import NotOurs, open_private

log = logging.getLogger("jitlaunch.logs")
_limited = LimitedLog(log)

#: How often the logs' sizes are checked.
INTERVAL = 0.5


def rotate_if_large(path: Path, max_bytes: int) -> str | None:
    """Copy-truncate ``path`` to ``path.log.1`` if it is larger than ``max_bytes``. Blocking
    (run it in a thread); returns None if it was not, else ``"rotated"``, or ``"emptied"``
    when there was no room for the copy (logged here). OSError for a file it cannot handle,
    NotOurs for one it must not touch (a symlink, someone else's: see statedir.py).

    The copy goes to ``<name>.1.tmp``, created afresh (never through a planted link), and is
    renamed over ``<name>.1``. If it cannot be made (the disk is full), the temporary file
    is removed and the log is emptied in place all the same: a full disk must not keep a
    log full, nor leave files behind."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes:
        return None
    fd = open_private(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size <= max_bytes:
            return None
        done = "rotated"
        older = path.with_name(path.name + ".1")
        tmp = path.with_name(path.name + ".1.tmp")
        try:
            _copy(fd, tmp, size)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            _limited.warning(f"nospace:{path.name}", "no room to keep %s as %s (%s): emptied "
                             "it in place, its %d bytes are lost", path.name, older.name,
                             exc.strerror, size)
            done = "emptied"
        else:
            os.replace(tmp, older)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return done


def _copy(src: int, dst_path: Path, size: int) -> None:
    """The first ``size`` bytes of ``src`` into a new file ``dst_path`` (removed first if
    it was left over; O_EXCL and O_NOFOLLOW: never someone else's file)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst_path)
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o644)
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(src, min(1 << 20, size - offset), offset)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
            offset += len(chunk)
    finally:
        os.close(dst)


async def serve_log_caps(log_dir: Path, max_bytes: int, interval: float = INTERVAL) -> None:
    """Keep every ``*.log`` in ``log_dir`` below ``max_bytes`` (plus one interval's writes)
    until cancelled; ``max_bytes`` 0 means no cap (returns at once). Never raises for a file
    it cannot handle: that is logged (rate-limited) and tried again next time."""
    if max_bytes <= 0:
        return

    refused: set[str] = set()  # entries we must not touch, said once each

    def sweep() -> list[str]:
        rotated: list[str] = []
        try:
            paths = sorted(log_dir.glob("*.log"))
        except OSError:
            return rotated
        for path in paths:
            try:
                if rotate_if_large(path, max_bytes) == "rotated":
                    rotated.append(path.name)
                refused.discard(path.name)
            except NotOurs as exc:
                if path.name not in refused:
                    refused.add(path.name)
                    log.warning("not rotating %s: %s", path, exc)
            except OSError as exc:
                _limited.warning(f"rotate:{path.name}", "cannot rotate %s: %s", path, exc)
        return rotated

    while True:
        try:
            for name in await trio.to_thread.run_sync(sweep):
                _limited.log(logging.INFO, f"rotated:{name}",
                             "%s reached %d bytes; rotated to %s.1", name, max_bytes, name)
        except Exception:  # a bug here must not end the daemon
            _limited.error("sweep", "rotating instance logs failed", exc_info=True)
        await trio.sleep(interval)
