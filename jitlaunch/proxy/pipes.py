"""The relay's system calls: splice pipes lent from a pool, and socket reads, writes and
half-closes made without blocking, waiting only when the kernel says EAGAIN (a trio stream
method checkpoints at every call, a task switch per call on the proxy's hot path).

Every function here raises :class:`Broken` naming the side that failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Awaitable, Callable

import trio

#: Bytes moved per splice(2) call: each pipe is made this large (if the kernel lets us).
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Broken(Exception):
    """One side of a relay broke; ``side`` is ``"src"`` or ``"dst"`` of the pump."""

    def __init__(self, side: str) -> None:
        super().__init__(side)
        self.side = side


class PipePool:
    """Splice pipes shared by every relay: at most ``limit`` open at once, up to ``keep`` of
    them kept open while unused. :meth:`take` returns None when none can be had (the caller
    copies through Python instead), never raises."""

    def __init__(self, limit: int, keep: int = 64) -> None:
        self.limit = limit
        self.keep = keep
        #: Pipes open now, lent or idle.
        self.open = 0
        #: Times a pipe could not be had (at the limit, or pipe2 failed).
        self.misses = 0
        self._idle: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int] | None:
        if self._idle:
            return self._idle.pop()
        if self.open >= self.limit:
            self.misses += 1
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # EMFILE, ENFILE: carry on without
            self.misses += 1
            return None
        with contextlib.suppress(OSError):  # a larger pipe moves more per call, if allowed
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        self.open += 1
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an empty pipe."""
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold data."""
        self.open -= 1
        for fd in pipe:
            os.close(fd)

    def close(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())

    def __repr__(self) -> str:
        return f"<PipePool open={self.open}/{self.limit} idle={len(self._idle)}>"


async def wait(
    wait: Callable[[trio.socket.SocketType], Awaitable[None]],
    sock: trio.socket.SocketType,
    side: str,
) -> None:
    try:
        await wait(sock)
    except (trio.ClosedResourceError, OSError) as exc:
        raise Broken(side) from exc


async def write_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data`` to ``sock``; raises Broken("dst")."""
    fd = sock.fileno()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await wait(trio.lowlevel.wait_writable, sock, "dst")
            continue
        except OSError as exc:
            raise Broken("dst") from exc
        view = view[n:]


async def send_all(stream: trio.abc.SendStream, data: bytes) -> None:
    if isinstance(stream, trio.SocketStream):
        await write_all(stream.socket, data)
    else:
        await stream.send_all(data)


async def send_eof(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close ``stream``; a socket's at once (trio's send_eof checkpoints, a cost per
    connection). Raises OSError or trio's stream errors."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.shutdown(socket.SHUT_WR)
    else:
        await stream.send_eof()


async def splice_burst(
    src: trio.socket.SocketType,
    dst: trio.socket.SocketType,
    pipe: tuple[int, int],
    note: Callable[[int], None],
) -> bool:
    """Move what ``src`` has now to ``dst`` through ``pipe``; False at src's EOF.

    Returns with the pipe empty. Raises Broken naming the side that failed.
    """
    r, w = pipe
    sfd, dfd = src.fileno(), dst.fileno()
    busy = 0  # chunks moved in a row without waiting
    while True:
        try:
            n = os.splice(sfd, w, PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return True
        except OSError as exc:
            raise Broken("src") from exc
        if n == 0:
            return False
        note(n)
        while n:
            try:
                n -= os.splice(r, dfd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                busy = 0
                try:
                    await trio.lowlevel.wait_writable(dst)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise Broken("dst") from exc
            except OSError as exc:
                raise Broken("dst") from exc
        busy += 1
        if busy >= 16:  # never waited for a while: let other tasks run
            busy = 0
            await trio.lowlevel.checkpoint()
