"""A small trio client for QEMU's QMP (the JSON machine protocol) over a unix socket.

One command at a time (concurrent callers queue on a lock): :meth:`QMP.execute` sends
``{"execute": ..., "id": n}`` and reads lines until the reply with that id, skipping
asynchronous events (``{"event": ...}``): nothing here waits for one. Errors come back as
:class:`~jitlaunch.errors.ProtocolError` (a broken connection, a malformed line, no reply
within :attr:`QMP.reply_timeout`) or :class:`QMPError`
(QEMU refused the command); never a bare OSError or trio.TooSlowError.
"""

from __future__ import annotations

import array
import json
import socket
from typing import Any

import trio

from ..errors import ProtocolError

MAX_LINE = 1 << 20
#: How long a command may wait for its reply before it fails with ProtocolError (the
#: default of :attr:`QMP.reply_timeout`): QEMU answers in milliseconds unless it is hung
#: (SIGSTOP, a stuck main loop).
REPLY_TIMEOUT = 5.0


class QMPError(ProtocolError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "?"))
        super().__init__(f"QMP {command}: {error.get('desc', error)}")


class QMP:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._next_id = 0
        self._lock = trio.StrictFIFOLock()
        self.reply_timeout = REPLY_TIMEOUT

    @classmethod
    async def connect(cls, path: str) -> QMP:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise ProtocolError(f"cannot connect to QMP at {path}: {exc.strerror or exc}") from exc
        qmp = cls(stream)
        try:
            greeting = await qmp._read()
            if "QMP" not in greeting:
                raise ProtocolError(f"not a QMP greeting: {greeting!r}")
            await qmp.execute("qmp_capabilities")
        except BaseException:
            await qmp.aclose()
            raise
        return qmp

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command and return its ``return`` value. ProtocolError if QEMU does not
        answer within :attr:`reply_timeout` seconds (a late reply is skipped by the next
        command, which matches replies by id)."""
        async with self._lock:
            with trio.move_on_after(self.reply_timeout) as scope:
                return await self._execute(command, arguments)
        assert scope.cancelled_caught
        raise ProtocolError(f"QMP {command}: no answer within {self.reply_timeout:g} s")

    async def send_fd(self, name: str, fd: int) -> None:
        """QMP ``getfd``: give QEMU a copy of our descriptor ``fd`` (SCM_RIGHTS on the
        socket) under ``name``, for a later command that takes ``fd:<name>``. QEMU then
        writes or reads it whatever user it runs as (``-runas``)."""
        async with self._lock:
            with trio.move_on_after(self.reply_timeout) as scope:
                await self._execute("getfd", {"fdname": name}, fd=fd)
                return
        assert scope.cancelled_caught
        raise ProtocolError(f"QMP getfd: no answer within {self.reply_timeout:g} s")

    async def _execute(self, command: str, arguments: dict[str, Any], fd: int | None = None) -> Any:
        self._next_id += 1
        ident = self._next_id
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fd is not None:
                # The descriptor rides on the first byte; the rest, if the kernel took only
                # part, follows plainly.
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                sent = await self._stream.socket.sendmsg([data], ancillary)
                data = data[sent:]
            if data:
                await self._stream.send_all(data)
        except OSError as exc:
            raise ProtocolError(f"QMP {command}: {exc.strerror or exc}") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ProtocolError(f"QMP {command}: connection lost") from exc
        while True:
            reply = await self._read()
            if reply.get("id") != ident:
                continue
            if "error" in reply:
                raise QMPError(command, reply["error"])
            return reply.get("return")

    async def _read(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise ProtocolError(f"malformed QMP line: {line[:200]!r}") from exc
                if not isinstance(msg, dict):
                    raise ProtocolError(f"malformed QMP line: {line[:200]!r}")
                return msg
            if len(self._buf) > MAX_LINE:
                raise ProtocolError("QMP line too long")
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ProtocolError("QMP connection lost") from exc
            if not data:
                raise ProtocolError("QMP connection closed")
            self._buf += data

    async def aclose(self) -> None:
        await self._stream.aclose()
