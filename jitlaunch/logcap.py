"""Instance logs capped in size: a chatty guest or process must not fill the state directory.

Instance output goes to ``<state_dir>/logs/<service>.log``, written by the instance itself (a
process backend child holds the file as its stdout) or by the daemon (a QEMU console). Both
append (``O_APPEND``), so :func:`serve_log_caps` can rotate a log in place the way logrotate's
``copytruncate`` does: every ``interval`` it looks at each ``*.log`` there, and one that has
grown past ``max_bytes`` is copied to ``<name>.log.1`` (replacing it) and truncated to zero;
the writer carries on at the start of the empty file. A log therefore stays below
``max_bytes`` plus what is written in one interval, and at most two files per log exist
(``.log`` and ``.log.1``). What is written between the copy and the truncation is lost (a
few milliseconds' worth), which is the price of not owning the writer's descriptor.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import trio

from .logutil import LimitedLog

log = logging.getLogger("jitlaunch.logs")
_limited = LimitedLog(log)

#: How often the logs' sizes are checked.
INTERVAL = 0.5


def rotate_if_large(path: Path, max_bytes: int) -> bool:
    """Copy-truncate ``path`` to ``path.log.1`` if it is larger than ``max_bytes``. Blocking
    (run it in a thread); returns whether it rotated. OSError for a file it cannot handle."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    older = path.with_name(path.name + ".1")
    tmp = path.with_name(path.name + ".1.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, older)
    os.truncate(path, 0)
    return True


async def serve_log_caps(log_dir: Path, max_bytes: int, interval: float = INTERVAL) -> None:
    """Keep every ``*.log`` in ``log_dir`` below ``max_bytes`` (plus one interval's writes)
    until cancelled; ``max_bytes`` 0 means no cap (returns at once). Never raises for a file
    it cannot handle: that is logged (rate-limited) and tried again next time."""
    if max_bytes <= 0:
        return

    def sweep() -> list[str]:
        rotated: list[str] = []
        try:
            paths = sorted(log_dir.glob("*.log"))
        except OSError:
            return rotated
        for path in paths:
            try:
                if rotate_if_large(path, max_bytes):
                    rotated.append(path.name)
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
