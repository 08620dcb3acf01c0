"""systemd integration with the standard library only: sd_notify and socket activation.

* :class:`Notifier` sends sd_notify(3) messages: one datagram of ``KEY=VALUE`` lines to the
  AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
  leading ``@``). Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a no-op.
  A send that fails is logged once and never raises: the daemon must not die because its
  supervisor went away.
* :func:`watchdog_interval` reads ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, must
  be ours): the daemon sends ``WATCHDOG=1`` from its main trio loop every half of it, so a
  stuck loop stops the pings and systemd restarts it.
* :func:`listen_fds` takes the sockets systemd passed (sd_listen_fds(3)): when
  ``$LISTEN_PID`` is our pid, fds 3 .. 3 + ``$LISTEN_FDS`` - 1, named by ``$LISTEN_FDNAMES``
  (colon-separated; ``unknown`` when unnamed). The variables are removed from the
  environment afterwards, so that instances we start never see them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from .errors import ListenError

log = logging.getLogger("jitlaunch.systemd")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify_address(env: MutableMapping[str, str]) -> str | bytes | None:
    """Where sd_notify messages go: a filesystem path, an abstract name (bytes starting with
    NUL), or None when not run under systemd (or ``$NOTIFY_SOCKET`` is not a unix socket)."""
    raw = env.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


class Notifier:
    """Sends sd_notify messages; a no-op when not run under systemd."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        self.address = notify_address(os.environ if env is None else env)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``send(READY=1, STATUS="...")``); newlines in values are
        replaced, as a message is one line per field. True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        ).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # once: a gone supervisor would otherwise log every ping
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: MutableMapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds if systemd asks this process for pings, else None."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 1_000_000


def listen_fds(env: MutableMapping[str, str], pid: int) -> dict[str, list[socket.socket]]:
    """The sockets systemd passed us, by name, in the order passed; {} if none are ours.

    Raises ListenError if the variables are malformed or a passed fd is not a socket. The
    LISTEN_* variables are removed from ``env`` whenever they were meant for us.
    """
    if env.get("LISTEN_PID", "") != str(pid):
        return {}
    raw_count = env.get("LISTEN_FDS", "")
    names_raw = env.get("LISTEN_FDNAMES")
    for var in _LISTEN_VARS:
        env.pop(var, None)
    if not raw_count.isdigit():
        raise ListenError(f"socket activation: LISTEN_FDS={raw_count!r} is not a number")
    count = int(raw_count)
    names = names_raw.split(":") if names_raw is not None else ["unknown"] * count
    if len(names) != count:
        raise ListenError(
            f"socket activation: LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS says {count}"
        )
    passed: dict[str, list[socket.socket]] = {}
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ListenError(f"socket activation: fd {fd} ({name!r}) is not a socket: {exc}") from exc
        sock.set_inheritable(False)
        passed.setdefault(name or "unknown", []).append(sock)
    return passed


def describe(sock: socket.socket) -> str:
    """``UDP 127.0.0.1:53`` for a log line or an error message."""
    kind = {socket.SOCK_DGRAM: "UDP", socket.SOCK_STREAM: "TCP"}.get(sock.type, str(sock.type))
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, ValueError):
        return f"{kind} fd {sock.fileno()}"
    where = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"{kind} {where}"
