"""The control socket: how ``jitlaunch status``, ``start``, ``stop`` and ``reload`` talk to
the daemon.

A unix stream socket, ``control.sock`` in ``$RUNTIME_DIRECTORY`` (systemd's
``RuntimeDirectory=``, /run/jitlaunch) or else in the state directory; mode 0660, group
``daemon.control_group`` (root's otherwise). Besides the file mode, every connection's peer
credentials (SO_PEERCRED) are checked when it is accepted: root, or a process in the control
group; anyone else gets one error reply and the connection is closed, and never holds one of
the :data:`MAX_CLIENTS` slots.

What a client can hold (:mod:`jitlaunch.slots`): at most :data:`MAX_CLIENTS` connections at
once, :data:`MAX_PER_UID` of one uid. Past either, the oldest connection that is waiting for
its next request (of that uid, or of anyone) is closed to make room; a connection whose
command is under way is never closed so, and when every one is busy the new connection is
closed at once. Each request line must arrive whole within :data:`REQUEST_TIMEOUT` of the
connection's accept or of our previous reply, however its bytes are paced.

One daemon per control socket: a daemon whose socket is not in its own state directory (it is
in ``$RUNTIME_DIRECTORY``) holds a lock on ``control.sock.lock`` beside it
(:func:`claim_control_path`), so that a second daemon given the same runtime directory stops
at its start saying so, rather than taking the first one's socket; and a daemon removes the
socket at its exit only if it is still the one it bound.

Protocol, version 1: one JSON object per line each way, a reply for every request, in order;
a connection may carry several. Requests::

    {"version": 1, "command": "status"}
    {"version": 1, "command": "start", "service": "hello"}
    {"version": 1, "command": "stop", "service": "hello"}
    {"version": 1, "command": "reload"}

Replies carry ``"version": 1`` and ``"ok"``; a failure has ``"error"`` (one line for a
person) and ``"kind"``: ``bad-request`` (malformed JSON, unknown command or service, a wrong
version: the request is at fault), ``refused`` (credentials), ``failed`` (the daemon tried:
a boot failed) or ``rejected`` (a reload whose config was not taken: the error says why, the
running config stays). A reload's reply has ``summary`` and the services ``added``,
``removed`` and ``changed``. A request line is at most :data:`MAX_REQUEST` bytes. No request, however
malformed, can end the daemon: each connection's task catches everything, logs it once
(rate-limited) and ends only itself.

:func:`parse_request` and :func:`status_report` are pure; :class:`ControlServer` moves bytes;
:func:`call` is the client.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import math
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .config import Config, Endpoint
from .errors import BootFailed, ConfigError, JitlaunchError, ListenError
from .lifecycle.status import InstanceStatus
from .lifecycle.supervisor import Supervisor
from .logutil import LimitedLog
from .net import serve
from .slots import Slot, Slots
from .statedir import LockHeld, lock_file

if TYPE_CHECKING:
    from .lifecycle.reload import ReloadResult

log = logging.getLogger("jitlaunch.control")
_limited = LimitedLog(log)

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"
#: The longest request line accepted, newline included.
MAX_REQUEST = 4096
#: Each request line must arrive whole within this of the accept or of the previous reply.
REQUEST_TIMEOUT = 10.0
#: A reply not taken by the client within this closes the connection.
IDLE_TIMEOUT = 30.0
#: Connections served at once (see the module docstring for who gives way past it) ...
MAX_CLIENTS = 16
#: ... and of them, by one uid.
MAX_PER_UID = 8
#: A refused peer's error reply must be taken within this.
REFUSAL_TIMEOUT = 2.0
#: How long ``start`` waits beyond the service's boot timeout, and ``stop`` beyond its grace.
MARGIN = 15.0
COMMANDS = ("status", "start", "stop", "reload")
#: The longest path a unix socket can be bound to (sun_path, with its NUL).
MAX_PATH = 107


class ControlError(JitlaunchError):
    """The control socket could not be reached, or the daemon's reply made no sense."""


def control_path(config: Config, env: Mapping[str, str]) -> Path:
    """Where the daemon puts its control socket: ``$RUNTIME_DIRECTORY`` (its first entry)
    when systemd made one, else the state directory."""
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return (Path(runtime) if runtime else config.daemon.state_dir) / SOCKET_NAME


def claim_control_path(path: Path, state_dir: Path) -> int | None:
    """Make ``path`` this daemon's control socket path for as long as the returned
    descriptor stays open: an exclusive flock on ``<path>.lock``, which then holds our pid
    and state directory. None when ``path`` is in ``state_dir``, whose own lock already
    makes us its only daemon (and no file is added there).

    Raises ListenError naming the other daemon if one holds it: two daemons given the same
    ``$RUNTIME_DIRECTORY`` would otherwise take each other's socket.
    """
    if path.parent == state_dir:
        return None
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ListenError(f"cannot open the lock file {lock}: {exc.strerror or exc}") from exc
    try:
        lock_file(fd, lock, f"{os.getpid()}\n{state_dir}\n")
    except LockHeld as held:
        pid, _, other = held.args[0].partition("\n")
        holder = f" (pid {pid}, state directory {other.strip()})" if pid.isdigit() else ""
        raise ListenError(
            f"the control socket {path} belongs to another jitlaunch daemon{holder}; two "
            f"daemons cannot share the runtime directory {path.parent} ($RUNTIME_DIRECTORY): "
            "give each its own"
        ) from None
    except OSError as exc:
        raise ListenError(f"cannot lock {lock}: {exc.strerror or exc}") from exc
    return fd


# ---- the protocol, without I/O ----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    command: str
    service: str | None = None


class BadRequest(Exception):
    """A request line that is not a valid request; the message says why."""


def parse_request(line: bytes, services: Collection[str]) -> Request:
    """One request line into a Request; BadRequest (never anything else) if it is not one."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"not a JSON document: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("expected a JSON object such as {\"version\": 1, \"command\": \"status\"}")
    version = doc.get("version")
    if version is None:
        raise BadRequest("missing \"version\" (this daemon speaks version 1)")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported version {version!r} (this daemon speaks version 1)")
    command = doc.get("command")
    if command not in COMMANDS:
        raise BadRequest(f"unknown command {command!r} (expected one of {', '.join(COMMANDS)})")
    unknown = sorted(set(doc) - {"version", "command", "service"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    if command in ("status", "reload"):
        if "service" in doc:
            raise BadRequest(f"{command} takes no service")
        return Request(command)
    service = doc.get("service")
    if not isinstance(service, str):
        raise BadRequest(f"{command} needs \"service\": the name of a service")
    if service not in services:
        known = ", ".join(sorted(services)) or "none"
        raise BadRequest(f"unknown service {service[:64]!r} (services: {known})")
    return Request(command, service)


def error_reply(kind: str, message: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": False, "kind": kind, "error": message}


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": True, **fields}


def _age(now: float, then: float) -> float | None:
    return round(now - then, 3) if math.isfinite(then) else None


def describe_instance(inst: InstanceStatus, now: float) -> dict[str, Any]:
    boot = inst.boot_time
    return {
        "label": inst.label,
        "state": inst.shown,
        "pid": inst.pid,
        "address": inst.address,
        "uptime": _age(now, inst.started_at),
        "boot_time": round(boot, 3) if math.isfinite(boot) else None,
    }


def status_report(supervisor: Supervisor, now: float) -> dict[str, Any]:
    """The ``status`` reply: every service, its instance and its counters."""
    services = []
    for rt in supervisor.status().services:
        svc = rt.config
        inst = rt.instance
        services.append({
            "name": svc.name,
            "backend": svc.backend,
            "answer": svc.answer,
            "names": list(svc.names),
            "fronts": [str(Endpoint(a, p)) for a in svc.front for p in svc.ports],
            "instance": describe_instance(inst, now) if inst is not None else None,
            "connections": rt.connections,
            "last_activity_age": _age(now, rt.last_activity),
            "last_failure": rt.last_error,
            "last_failure_age": _age(now, rt.last_error_at),
            "backoff": round(left, 3) if (left := rt.backing_off(now)) is not None else None,
            "boots": rt.boots,
            "boot_failures": rt.boot_failures,
            "deaths": rt.deaths,
            "idle_stops": rt.idle_stops,
            "removed": rt.removed,
        })
    return ok_reply(pid=os.getpid(), config=supervisor.config.path, services=services)


# ---- the server -------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def _groups_of(peer: Peer) -> set[int]:
    """The peer's groups: from /proc when we may read it, else from the group database."""
    groups = {peer.gid}
    try:
        for line in Path(f"/proc/{peer.pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return groups | {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    with contextlib.suppress(KeyError):
        name = pwd.getpwuid(peer.uid).pw_name
        groups |= {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return groups


def allowed(peer: Peer, gid: int | None) -> bool:
    """Root, or (when a control group is set) a process in that group."""
    return peer.uid == 0 or (gid is not None and gid in _groups_of(peer))


class _Client:
    """An admitted connection: with a slot, or, for a peer that may not use the socket
    (``slot`` None), only to be told so and closed."""

    def __init__(self, server: ControlServer, peer: Peer, slot: Slot | None) -> None:
        self.server, self.peer, self.slot = server, peer, slot

    def release(self) -> None:
        if self.slot is None:
            self.server.refusing -= 1
        else:
            self.slot.release()


class ControlServer:
    """Serves the control socket. ``await nursery.start(server.serve)`` binds it first."""

    def __init__(
        self, config: Config, supervisor: Supervisor, path: Path,
        reload: Callable[[str], Awaitable[ReloadResult]] | None = None,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.path = path
        self._reload = reload
        self.gid: int | None = None
        #: Replies sent, by kind (``ok``, ``bad-request``, ``refused``, ``failed``,
        #: ``rejected``); connections closed for a newer one while waiting for a request
        #: (``evicted``), without a whole request in time (``timeout``), or at once because
        #: every slot was busy (``refused_busy``); and ``internal_error`` (a bug in this
        #: module: must stay 0).
        self.counts: dict[str, int] = {}
        self.slots = Slots(MAX_CLIENTS, MAX_PER_UID)
        #: Refused peers being told so (bounded by MAX_CLIENTS; they hold no slot).
        self.refusing = 0
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` from now on (a reload): its path and its service list."""
        self.config = config

    def __repr__(self) -> str:
        return f"<ControlServer {self.path} group={self.gid}>"

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    async def serve(self, *, task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report its path (None if it cannot have one), serve until
        cancelled, then remove it. Raises ListenError if it cannot be bound."""
        group = self.config.daemon.control_group
        if group is not None:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ListenError(
                    f"daemon.control_group: there is no group {group!r} on this host"
                ) from None
        if len(os.fsencode(self.path)) > MAX_PATH:
            log.warning("no control socket: its path %s is longer than %d bytes", self.path, MAX_PATH)
            task_status.started(None)
            await trio.sleep_forever()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._remove_stale()
            # Created 0600 and opened up once it has its group: never briefly too open.
            with _umask(0o177):
                await sock.bind(os.fspath(self.path))
            st = os.lstat(self.path)
            self._bound = (st.st_dev, st.st_ino)
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            os.chmod(self.path, 0o660)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ListenError(f"cannot create the control socket {self.path}: {exc.strerror or exc}") from exc
        listener = trio.SocketListener(sock)
        try:
            log.info("control socket %s", self.path)
            task_status.started(self.path)
            await serve(listener, self._admit, self._connection, what="control socket",
                        log=_limited, on_failure=self._failed)
        finally:
            self._unlink_ours()
            sock.close()

    def _unlink_ours(self) -> None:
        """Remove the socket file if it is still the one we bound (never another's)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()

    def _admit(self, stream: trio.SocketStream) -> _Client | None:
        """Check the peer, then give it a slot, or a refusal to send (or nothing)."""
        try:
            peer = peer_of(stream.socket)  # type: ignore[arg-type]
            ok = allowed(peer, self.gid)
        except OSError:  # gone already
            return None
        if not ok:
            if self.refusing >= MAX_CLIENTS:
                self._count("refused_busy")
                _limited.warning("refused_busy", "control socket: too many refused peers at "
                                 "once; closing a new connection")
                return None
            self.refusing += 1
            return _Client(self, peer, None)
        evictions = self.slots.evictions
        slot = self.slots.take(peer.uid, evict=True)
        if self.slots.evictions != evictions:
            self._count("evicted")
            _limited.warning("evicted", "control socket: too many connections; closing the "
                             "oldest one waiting for a request")
        if slot is None:
            self._count("refused_busy")
            _limited.warning("refused_busy", "control socket: every connection is busy with "
                             "a command; closing a new one")
            return None
        return _Client(self, peer, slot)

    def _failed(self, client: _Client, exc: Exception) -> None:
        if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
            return  # the client went away
        self._count("internal_error")
        _limited.error("connection", "control connection failed", exc_info=exc)

    async def _refuse(self, stream: trio.SocketStream, peer: Peer) -> None:
        with trio.move_on_after(REFUSAL_TIMEOUT):
            who = "root or the group " + repr(self.config.daemon.control_group) \
                if self.gid is not None else "root"
            await self._send(stream, error_reply(
                "refused", f"permission denied: uid {peer.uid} is not {who}"))
            await _close_after_reply(stream)

    def _remove_stale(self) -> None:
        # The state directory's lock, or claim_control_path's beside a socket elsewhere,
        # makes us the only daemon here: a socket left at this path is a dead daemon's.
        # Anything else is not ours to remove.
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"{self.path} exists and is not a socket; not removing it")
        self.path.unlink()

    async def _connection(self, stream: trio.SocketStream, client: _Client) -> None:
        """One client (run by :func:`jitlaunch.net.serve`, which counts what it raises)."""
        slot = client.slot
        if slot is None:
            await self._refuse(stream, client.peer)
            return
        # slot.scope is cancelled if a newer connection takes this one's slot while it waits
        # for a request (slot.reading); an eviction is counted and logged where it was decided.
        with slot.scope:
            await self._serve_requests(stream, slot)

    async def _serve_requests(self, stream: trio.SocketStream, slot: Slot) -> None:
        buf = bytearray()
        while True:
            slot.reading = True
            # One deadline for the whole line: a byte now and then does not extend it.
            with trio.move_on_after(REQUEST_TIMEOUT) as timer:
                while (end := buf.find(b"\n")) < 0:
                    if len(buf) >= MAX_REQUEST:
                        await self._send(stream, error_reply(
                            "bad-request", f"request longer than {MAX_REQUEST} bytes"))
                        await _close_after_reply(stream)
                        return
                    data = await stream.receive_some(MAX_REQUEST)
                    if not data:  # closed
                        return
                    buf += data
            if timer.cancelled_caught:
                self._count("timeout")
                _limited.log(logging.INFO, "timeout", "control socket: no whole request within "
                             "%g s; closing the connection", REQUEST_TIMEOUT)
                return
            slot.reading = False
            line = bytes(buf[:end])
            del buf[: end + 1]
            await self._send(stream, await self._answer(line))

    async def _send(self, stream: trio.SocketStream, reply: dict[str, Any]) -> None:
        self._count("ok" if reply["ok"] else reply["kind"])
        with trio.move_on_after(IDLE_TIMEOUT):
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line, self.supervisor.service_names())
        except BadRequest as exc:
            return error_reply("bad-request", str(exc))
        if request.command == "status":
            return status_report(self.supervisor, trio.current_time())
        if request.command == "reload":
            return await self._do_reload()
        assert request.service is not None
        if request.command == "start":
            return await self._start(request.service)
        return await self._stop(request.service)

    async def _do_reload(self) -> dict[str, Any]:
        if self._reload is None:
            return error_reply("failed", "this daemon cannot reload")
        result = await self._reload("jitlaunch reload")
        if not result.ok:
            return error_reply("rejected", result.message)
        plan = result.plan
        return ok_reply(
            summary=result.message,
            added=list(plan.added) if plan else [], removed=list(plan.removed) if plan else [],
            changed=list(plan.changed_names) if plan else [],
        )

    async def _start(self, name: str) -> dict[str, Any]:
        svc = self.supervisor.service_status(name).config
        try:
            with trio.fail_after(svc.boot_timeout + MARGIN):
                inst = await self.supervisor.acquire(name)
        except BootFailed as exc:
            return error_reply("failed", f"{name}: {exc}")
        except trio.TooSlowError:
            return error_reply("failed", f"{name}: not ready within {svc.boot_timeout + MARGIN:g} s")
        return ok_reply(instance=describe_instance(InstanceStatus.of(inst), trio.current_time()))

    async def _stop(self, name: str) -> dict[str, Any]:
        inst = self.supervisor.stop(name)
        if inst is None:
            return ok_reply(stopped=None)
        svc = self.supervisor.service_status(name).config
        grace = getattr(svc.settings, "grace", 5.0)
        limit = svc.boot_timeout + grace + MARGIN
        with trio.move_on_after(limit):
            await inst.run.released.wait()
            return ok_reply(stopped=inst.label, state=str(inst.state))
        return error_reply("failed", f"{inst.label} did not stop within {limit:g} s")


async def _close_after_reply(stream: trio.SocketStream) -> None:
    """End a connection we will not read from any more without losing our last reply:
    closing with unread input would reset it, and the client could see the reset first. So
    end our side, then read and drop what the client still sends, bounded in time."""
    with trio.move_on_after(1.0):
        await stream.send_eof()
        while await stream.receive_some(65536):
            pass


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ---- the client -------------------------------------------------------------------------


def call(path: Path, request: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request, return the daemon's reply. Raises ControlError when the socket
    cannot be reached or the reply is not a reply."""
    line = json.dumps({"version": PROTOCOL_VERSION, **request}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except PermissionError:
        raise ControlError(
            f"permission denied on {path}: run as root or as a member of the daemon's "
            "control group (daemon.control_group)"
        ) from None
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is the daemon running?") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path}: is the daemon running?") from None
    except TimeoutError:
        raise ControlError(f"no reply on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon on {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"the daemon on {path} sent no valid reply ({data[:80]!r})")
    return reply


#: Where the packaged unit's daemon puts its control socket (RuntimeDirectory=jitlaunch).
SYSTEM_SOCKET = Path("/run/jitlaunch") / SOCKET_NAME


def client_socket(config_path: str | None, env: Mapping[str, str] | None = None,
                  system: Path = SYSTEM_SOCKET) -> Path:
    """The control socket a command-line client should use, the first that exists of: the
    one in the state directory of ``config_path`` (when a config is named and can be read),
    ``$RUNTIME_DIRECTORY/control.sock``, the system daemon's ``/run/jitlaunch/control.sock``;
    else the state directory's (of the built-in config when None), which the caller's
    connect then reports missing. A config that cannot be read is not needed when a runtime
    or system socket exists (a reload of a broken file is the daemon's to reject); else it
    raises ConfigError."""
    from .backends import SETTINGS
    from .config import load_config

    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    found = [p for p in ((Path(runtime) / SOCKET_NAME) if runtime else None, system)
             if p is not None and p.exists()]
    own: Path | None = None
    error: ConfigError | None = None
    if config_path is not None or not found:
        try:
            own = load_config(config_path, backends=SETTINGS).daemon.state_dir / SOCKET_NAME
        except ConfigError as exc:
            error = exc
    if own is not None and (own.exists() or not found):
        return own
    if found:
        return found[0]
    assert error is not None
    raise error


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.0f}h"


def format_status(reply: Mapping[str, Any]) -> str:
    """The ``status`` reply as a table for a person, one line per service."""
    head = ("SERVICE", "BACKEND", "STATE", "PID", "ADDRESS", "AGE", "IDLE", "BOOT", "CONNS",
            "LAST FAILURE")
    rows = [head]
    for svc in reply.get("services", []):
        inst = svc.get("instance") or {}
        failure = svc.get("last_failure")
        if failure:
            failure = f"{_seconds(svc.get('last_failure_age'))} ago: {failure}"
        name = str(svc.get("name")) + ("(removed)" if svc.get("removed") else "")
        rows.append((
            name, str(svc.get("backend")), inst.get("state", "stopped"),
            str(inst.get("pid") or "-"), inst.get("address") or "-", _seconds(inst.get("uptime")),
            _seconds(svc.get("last_activity_age")), _seconds(inst.get("boot_time")),
            str(svc.get("connections", 0)), failure or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)
