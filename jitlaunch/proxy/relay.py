"""One relayed connection: bytes both ways between a client and an instance, and its timers.

Bytes go socket -> pipe -> socket with splice(2), never through Python, when both ends are
sockets and a pipe is free; otherwise (no pipe left, or streams that are not sockets, as in
tests) they are copied through a 64 KiB buffer. Either way a chunk is fully sent before the
next is read, so a slow reader slows the writer down (backpressure, no unbounded buffering).
A FIN is passed on as a half-close.

Pipes are not owned by a connection: a :class:`PipePool` lends one for a burst (while the
source has data) and takes it back once it is empty, so an idle connection holds only its two
sockets.

Until the instance has sent its first byte, what the client sends is copied through Python
and kept (up to a bound), so that a connection whose instance resets before answering can be
replayed to the next instance (see :attr:`Relay.replay`).

The timers (:class:`Activity`, pure) end a relay when

* ``first_data``: the client has sent nothing within ``first_data`` of the relay's start;
* ``no_answer`` / ``first_answer``: the client sent bytes and the instance has sent nothing
  since, for ``answer`` seconds (``first_answer`` when the instance never sent anything on
  this connection, so it may be hung);
* ``idle``: no byte moved either way for ``idle`` seconds;
* ``half_close``: one side sent EOF and no byte moved for ``half_close`` seconds since.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ..aio import first_of

#: Bytes moved per splice(2) call: each pipe is made this large (if the kernel lets us).
PIPE_SIZE = 1 << 20
#: Bytes per read on the copy path.
CHUNK = 1 << 16
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

#: How a relay can end. ``done``: both sides sent EOF. ``client_reset``/``instance_reset``:
#: that side broke the connection. ``unanswered_reset``: the instance broke it before sending
#: a byte (replayable). ``unaccepted``: abandoned by the caller (:meth:`Relay.abandon`)
#: because the instance never accepted it. The rest are the timers above.
OUTCOMES = (
    "done", "client_reset", "instance_reset", "unanswered_reset", "unaccepted",
    "first_data", "no_answer", "first_answer", "idle", "half_close",
)


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


@dataclass(frozen=True)
class Timeouts:
    """The relay timers, in seconds; ``math.inf`` for none."""

    first_data: float = math.inf
    answer: float = math.inf
    idle: float = math.inf
    half_close: float = math.inf


class Activity:
    """What a relay has seen and when, and the deadline that follows (pure, no I/O).

    Times come from the caller (``trio.current_time()``)."""

    def __init__(self, now: float, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.started = now
        self.last_byte = now
        self.client_bytes = 0
        self.instance_bytes = 0
        #: When the client sent its first byte since the instance's last one, if it did.
        self.unanswered_since: float | None = None
        self.eof_at: float | None = None

    def from_client(self, n: int, now: float) -> None:
        self.client_bytes += n
        self.last_byte = now
        if self.unanswered_since is None:
            self.unanswered_since = now

    def from_instance(self, n: int, now: float) -> None:
        self.instance_bytes += n
        self.last_byte = now
        self.unanswered_since = None

    def eof(self, now: float) -> None:
        if self.eof_at is None:
            self.eof_at = now

    def deadline(self) -> tuple[float, str]:
        """The earliest time the relay must end, and the reason (one of the timers)."""
        t = self.timeouts
        options = [(self.last_byte + t.idle, "idle")]
        if self.client_bytes == 0:
            options.append((self.started + t.first_data, "first_data"))
        if self.unanswered_since is not None:
            why = "no_answer" if self.instance_bytes else "first_answer"
            options.append((self.unanswered_since + t.answer, why))
        if self.eof_at is not None:
            options.append((max(self.eof_at, self.last_byte) + t.half_close, "half_close"))
        return min(options)

    def __repr__(self) -> str:
        return (
            f"<Activity client={self.client_bytes} instance={self.instance_bytes} "
            f"deadline={self.deadline()}>"
        )


class _Broken(Exception):
    """One side of a relay broke; ``side`` is ``"src"`` or ``"dst"`` of the pump."""

    def __init__(self, side: str) -> None:
        super().__init__(side)
        self.side = side


class Relay:
    """Copy both ways between ``client`` and ``upstream`` until both sent EOF, a side breaks
    or a timer fires; :meth:`run` returns how it ended (one of :data:`OUTCOMES`).

    ``buffered`` (and ``client_eof``) are what the client sent before the relay began; they
    are sent to the instance first. Until the instance answers, the client's bytes are kept
    in :attr:`replay` (``None`` once more than ``keep`` bytes were sent, or once the instance
    answered). If the instance sends EOF before any byte while the client has sent bytes
    (all kept) but not its EOF, ``closed_unanswered()`` decides: True ends the relay as
    ``unanswered_reset`` (the instance is dead: replay elsewhere), False passes the EOF on.
    Neither stream is closed.
    """

    def __init__(
        self,
        client: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        timeouts: Timeouts,
        pool: PipePool | None,
        *,
        buffered: bytes = b"",
        client_eof: bool = False,
        keep: int = 0,
        closed_unanswered: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.pool = pool
        self.activity = Activity(trio.current_time(), timeouts)
        self.keep = keep
        replayable = keep > 0 and len(buffered) <= keep
        self.replay: bytearray | None = bytearray(buffered) if replayable else None
        self.buffered = buffered
        self.client_eof = client_eof
        self._outcome: str | None = None
        #: Set at the instance's first byte.
        self.answered = trio.Event()
        self.closed_unanswered = closed_unanswered
        self._scope = trio.CancelScope()

    def _note_client(self, n: int) -> None:
        self.activity.from_client(n, trio.current_time())

    def _note_eof(self) -> None:
        self.activity.eof(trio.current_time())

    def _note_instance(self, n: int) -> None:
        if not self.activity.instance_bytes:
            self.answered.set()
        self.activity.from_instance(n, trio.current_time())
        self.replay = None

    async def run(self) -> str:
        """Relay until the end; returns the outcome. Cancellation propagates."""
        if self.buffered:
            self._note_client(len(self.buffered))
        try:
            if self.buffered:
                await self.upstream.send_all(self.buffered)
            if self.client_eof:
                self._note_eof()
                await self.upstream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return "unanswered_reset"
        with self._scope:
            _, outcome = await first_of(self._both_ways, self._timers)
            assert isinstance(outcome, str)
            return outcome
        return self._outcome or "unanswered_reset"

    def _unanswered(self) -> bool:
        """The client sent bytes, all kept for a replay, and the instance sent none."""
        return (
            self.activity.client_bytes > 0
            and not self.activity.instance_bytes
            and self.replay is not None
        )

    def abandon(self, outcome: str) -> None:
        """End the relay at once with ``outcome``, if the instance has not answered yet."""
        if not self.activity.instance_bytes:
            self._outcome = outcome
            self._scope.cancel()

    async def _both_ways(self) -> str:
        async with trio.open_nursery() as both:
            if not self.client_eof:
                both.start_soon(self._direction, True, both.cancel_scope)
            both.start_soon(self._direction, False, both.cancel_scope)
        return self._outcome or "done"

    async def _timers(self) -> str:
        # Bytes never wake this task (that would cost a task switch per request). A deadline
        # can only move earlier when an answer or half-close clock starts, and such a clock
        # ends at least ``step`` after it starts: so waking at least every ``step`` is never
        # late.
        t = self.activity.timeouts
        step = min(t.answer, t.half_close)
        while True:
            deadline, reason = self.activity.deadline()
            now = trio.current_time()
            if now >= deadline:
                return reason
            await trio.sleep_until(min(deadline, now + step))

    async def _direction(self, from_client: bool, both: trio.CancelScope) -> None:
        src, dst = (self.client, self.upstream) if from_client else (self.upstream, self.client)
        try:
            await self._pump(src, dst, from_client)
            if (
                not from_client
                and self._unanswered()
                and not self.client_eof  # else the close may well be the answer to the EOF
                and self.closed_unanswered is not None
                and await self.closed_unanswered()
            ):
                self._outcome = "unanswered_reset"
                both.cancel()
                return
            self._note_eof()
            if from_client:
                self.client_eof = True
            try:
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Broken("dst") from exc
        except _Broken as exc:
            client_side = (exc.side == "src") == from_client
            if client_side:
                self._outcome = "client_reset"
            elif not self.activity.instance_bytes and self.replay is not None:
                # Unlike a FIN, a reset is never an answer: replay what the client sent, even
                # nothing yet (a dying instance resets the connections in its accept queue,
                # maybe before the client's request was read).
                self._outcome = "unanswered_reset"
            else:
                self._outcome = "instance_reset"
            both.cancel()

    async def _pump(
        self, src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, from_client: bool
    ) -> None:
        """Move src to dst until src's EOF."""
        note = self._note_client if from_client else self._note_instance
        pool = self.pool
        splice = (
            pool is not None
            and isinstance(src, trio.SocketStream)
            and isinstance(dst, trio.SocketStream)
        )
        while True:
            copying = from_client and self.replay is not None
            if splice and not copying:
                assert isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream)
                assert pool is not None
                try:
                    await trio.lowlevel.wait_readable(src.socket)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise _Broken("src") from exc
                pipe = pool.take()
                if pipe is not None:
                    try:
                        more = await _splice_burst(src.socket, dst.socket, pipe, note)
                    except BaseException:
                        pool.discard(pipe)  # it may hold bytes
                        raise
                    pool.give(pipe)
                    if not more:
                        return
                    continue
            try:
                data = await src.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Broken("src") from exc
            if not data:
                return
            note(len(data))
            if copying and self.replay is not None:
                if len(self.replay) + len(data) <= self.keep:
                    self.replay.extend(data)
                else:
                    self.replay = None
            try:
                await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Broken("dst") from exc


async def _splice_burst(
    src: trio.socket.SocketType,
    dst: trio.socket.SocketType,
    pipe: tuple[int, int],
    note: Callable[[int], None],
) -> bool:
    """Move what ``src`` has now to ``dst`` through ``pipe``; False at src's EOF.

    Returns with the pipe empty. Raises _Broken naming the side that failed.
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
            raise _Broken("src") from exc
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
                    raise _Broken("dst") from exc
            except OSError as exc:
                raise _Broken("dst") from exc
        busy += 1
        if busy >= 16:  # never waited for a while: let other tasks run
            busy = 0
            await trio.lowlevel.checkpoint()
