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
* :func:`sort_passed` matches those sockets against the config: ``dns`` sockets against
  ``dns.listen``, fronts (named ``proxy`` or after their service) against the services'
  fronts; anything else is a clear error.
* :func:`status_line` is the one-line ``STATUS=`` summary, and :func:`serve_notify` the task
  that sends ``READY=1``, keeps ``STATUS=`` current and pings the watchdog.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import trio

from .config import Config, Endpoint
from .errors import ListenError
from .lifecycle.state import State
from .lifecycle.supervisor import Supervisor

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
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
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
    return f"{kind} {Endpoint(str(host), port)}"


@dataclass
class PassedSockets:
    """The sockets systemd passed, sorted out against the config (see :func:`sort_passed`)."""

    #: One ``(udp, tcp)`` pair per ``dns.listen`` endpoint, in its order; None when no
    #: ``dns`` socket was passed (the daemon binds them itself).
    dns: list[tuple[socket.socket, socket.socket]] | None = None
    #: Listening TCP sockets for fronts, by ``(service, address, port)``; the proxy binds
    #: the fronts not here itself.
    fronts: dict[tuple[str, str, int], socket.socket] = field(default_factory=dict)

    def close(self) -> None:
        for udp, tcp in self.dns or ():
            udp.close()
            tcp.close()
        for sock in self.fronts.values():
            sock.close()


def _where(sock: socket.socket) -> tuple[str, int] | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return str(ipaddress.ip_address(host.split("%")[0])), port


def sort_passed(passed: Mapping[str, list[socket.socket]], config: Config) -> PassedSockets:
    """Match the sockets systemd passed (:func:`listen_fds`) against ``config``.

    * ``dns``: UDP and TCP sockets; when any is passed, every ``dns.listen`` endpoint must
      have exactly one of each (same address, same port), and each one passed must be one
      of ``dns.listen``. With none passed, the daemon binds ``dns.listen`` itself.
    * ``proxy`` or a service's name: listening TCP sockets, each on a front address and
      port of a service (of that service, when named after it). Fronts not passed are
      bound by the daemon.

    Raises ListenError, naming the socket and what the config says, for any other name, a
    socket that matches nothing, a duplicate, or a missing ``dns`` socket; every passed
    socket is closed then.
    """
    out = PassedSockets()
    try:
        _sort(passed, config, out)
    except BaseException:
        out.close()
        for socks in passed.values():
            for sock in socks:
                sock.close()
        raise
    return out


def _sort(passed: Mapping[str, list[socket.socket]], config: Config, out: PassedSockets) -> None:
    services = {s.name: s for s in config.services}
    unknown = sorted(set(passed) - {"dns", "proxy"} - set(services))
    if unknown:
        described = ", ".join(describe(s) for s in passed[unknown[0]])
        raise ListenError(
            f"socket activation: a socket named {unknown[0]!r} ({described}) was passed; "
            f"expected 'dns', 'proxy' or a service name ({', '.join(services) or 'none'}): "
            "check FileDescriptorName= in the socket unit"
        )
    listen = ", ".join(str(e) for e in config.dns.listen)
    if passed.get("dns"):
        pairs: dict[tuple[str, int], dict[int, socket.socket]] = {}
        for sock in passed["dns"]:
            where = _where(sock)
            if where is None or sock.type not in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                raise ListenError(
                    f"socket activation: the dns socket {describe(sock)} is not a UDP or TCP "
                    "socket"
                )
            if Endpoint(*where) not in config.dns.listen:
                raise ListenError(
                    f"socket activation: the dns socket {describe(sock)} is not in dns.listen "
                    f"({listen}); the socket unit and the config must list the same addresses"
                )
            kinds = pairs.setdefault(where, {})
            if sock.type in kinds:
                raise ListenError(f"socket activation: {describe(sock)} was passed twice")
            kinds[sock.type] = sock
        out.dns = []
        for ep in config.dns.listen:
            kinds = pairs.pop((ep.host, ep.port), {})
            for kind, name in ((socket.SOCK_DGRAM, "UDP"), (socket.SOCK_STREAM, "TCP")):
                if kind not in kinds:
                    raise ListenError(
                        f"socket activation: dns.listen {ep} has no {name} socket among those "
                        f"passed ({', '.join(describe(s) for s in passed['dns'])}); the socket "
                        "unit and the config must list the same addresses, UDP and TCP"
                    )
            udp, tcp = kinds[socket.SOCK_DGRAM], kinds[socket.SOCK_STREAM]
            udp.setblocking(False)
            out.dns.append((udp, tcp))
    for name in ["proxy", *services]:
        for sock in passed.get(name, []):
            where = _where(sock)
            owners = [
                s.name for s in config.services
                if (name == "proxy" or name == s.name) and where is not None
                and where[0] in s.front and where[1] in s.ports
            ]
            if where is None or sock.type != socket.SOCK_STREAM or not owners:
                of = "any service" if name == "proxy" else f"service {name!r}"
                raise ListenError(
                    f"socket activation: the {name} socket {describe(sock)} is not a front of "
                    f"{of} (a TCP socket on one of its front addresses and ports)"
                )
            key = (owners[0], *where)
            if key in out.fronts:
                raise ListenError(f"socket activation: {describe(sock)} was passed twice")
            out.fronts[key] = sock


def status_line(supervisor: Supervisor) -> str:
    """``3 services; 1 running, 1 booting; last failure: ...``, for ``STATUS=``."""
    running = booting = 0
    failure: tuple[float, str] | None = None
    status = supervisor.status()
    for rt in status.services:
        inst = rt.instance
        if inst is not None and inst.state in (State.READY, State.DRAINING):
            running += 1
        elif inst is not None and inst.state is State.STARTING:
            booting += 1
        if rt.last_error and (failure is None or rt.last_error_at >= failure[0]):
            failure = (rt.last_error_at, rt.last_error)
    count = sum(not rt.removed for rt in status.services)  # (not those leaving)
    line = f"{count} service{'s' if count != 1 else ''}; {running} running, {booting} booting"
    if failure is not None:
        line += f"; last failure: {failure[1]}"
    return line[:400]


#: How often the STATUS= line is checked for changes (it is sent only when it changed).
STATUS_INTERVAL = 0.5


async def serve_notify(
    notifier: Notifier, supervisor: Supervisor, watchdog: float | None, until: trio.Event
) -> None:
    """Send READY=1 with the first STATUS=, then keep STATUS= current and, when systemd
    asked for it, send WATCHDOG=1 every half of ``watchdog`` seconds, until ``until`` is set
    (the daemon is stopping). Start it once every listener and the supervisor are up. Never
    raises for a failed send (the notifier logs it)."""
    last = status_line(supervisor)
    notifier.send(READY=1, STATUS=last)
    next_ping = math.inf
    if watchdog is not None:
        notifier.send(WATCHDOG=1)
        next_ping = trio.current_time() + watchdog / 2
    generation = supervisor.generation
    while True:
        with trio.move_on_after(min(STATUS_INTERVAL, next_ping - trio.current_time())):
            await until.wait()
            return
        now = trio.current_time()
        if watchdog is not None and now >= next_ping:
            notifier.send(WATCHDOG=1)
            next_ping = now + watchdog / 2
        if supervisor.generation != generation:
            generation = supervisor.generation
            line = status_line(supervisor)
            if line != last:
                notifier.send(STATUS=line)
                last = line


#: While the daemon drains, it asks systemd for this much more stop time, every half of it.
EXTEND_STEP = 20.0


async def extend_stop_timeout(notifier: Notifier) -> None:
    """Send ``EXTEND_TIMEOUT_USEC=`` every half of :data:`EXTEND_STEP` until cancelled, so a
    long drain is not cut short by ``TimeoutStopSec=``."""
    while True:
        notifier.send(EXTEND_TIMEOUT_USEC=int(EXTEND_STEP * 1_000_000))
        await trio.sleep(EXTEND_STEP / 2)
