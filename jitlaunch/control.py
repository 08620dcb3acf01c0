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
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .config import Config
from .controlproto import (
    SOCKET_NAME,
    BadRequest,
    describe_instance,
    error_reply,
    ok_reply,
    parse_request,
    status_report,
)
from .errors import BootFailed, ListenError
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
#: The longest path a unix socket can be bound to (sun_path, with its NUL).
MAX_PATH = 107


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
            return status_report(self.supervisor.status(), self.config.path, trio.current_time())
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
        svc = self.supervisor.service_config(name)
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
        svc = self.supervisor.service_config(name)
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
