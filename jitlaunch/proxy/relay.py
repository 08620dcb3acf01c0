"""One relayed connection: bytes both ways between a client and an instance, and its timers.

Bytes are copied through a 64 KiB buffer until a direction carries bulk (one read of
:data:`SPLICE_AFTER` bytes); from then on they go socket -> pipe -> socket with splice(2),
never through Python, when both ends are sockets and a pipe is free (else they are still
copied). Between sockets the relay makes plain non-blocking calls and waits only when the
kernel says EAGAIN. Either way a chunk is fully sent before the
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

import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .pipes import Broken, PipePool, send_all, send_eof, splice_burst, wait, write_all

#: Bytes per read on the copy path.
CHUNK = 1 << 16
#: A read of at least this many bytes switches its direction to splice(2): for less, a read
#: and a write cost fewer system calls than splicing in and out of a pipe.
SPLICE_AFTER = 1 << 14
#: The longest interval between two calls of a relay's ``watch``.
WATCH_MAX = 2.0

#: How a relay can end. ``done``: both sides sent EOF. ``client_reset``/``instance_reset``:
#: that side broke the connection. ``unanswered_reset``: the instance broke it before sending
#: a byte (replayable). ``unaccepted``: abandoned by the caller (:meth:`Relay.abandon`)
#: because the instance never accepted it. The rest are the timers above.
OUTCOMES = (
    "done", "client_reset", "instance_reset", "unanswered_reset", "unaccepted",
    "first_data", "no_answer", "first_answer", "idle", "half_close",
)


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


class Relay:
    """Copy both ways between ``client`` and ``upstream`` until both sent EOF, a side breaks
    or a timer fires; :meth:`run` returns how it ended (one of :data:`OUTCOMES`).

    ``buffered`` (and ``client_eof``) are what the client sent before the relay began; they
    are sent to the instance first. Until the instance answers, the client's bytes are kept
    in :attr:`replay` (``None`` once more than ``keep`` bytes were sent, or once the instance
    answered). If the instance sends EOF before any byte while the client has sent bytes
    (all kept) but not its EOF, ``closed_unanswered()`` decides: True ends the relay as
    ``unanswered_reset`` (the instance is dead: replay elsewhere), False passes the EOF on.
    ``on_answer()`` is called at the instance's first byte. Until then, ``watch()`` is called
    ``watch_after`` seconds into the relay and at doubling intervals (at most
    :data:`WATCH_MAX`) until it returns False; it may :meth:`abandon` the relay. Neither
    stream is closed.
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
        on_answer: Callable[[], None] | None = None,
        watch: Callable[[], bool] | None = None,
        watch_after: float = 0.25,
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
        self.on_answer = on_answer
        self.watch = watch
        self.watch_after = watch_after
        self._scope = trio.CancelScope()
        self._pumping = 0

    def _note_client(self, n: int) -> None:
        self.activity.from_client(n, trio.current_time())

    def _note_eof(self) -> None:
        self.activity.eof(trio.current_time())

    def _note_instance(self, n: int) -> None:
        if not self.activity.instance_bytes:
            self.answered.set()
            if self.on_answer is not None:
                self.on_answer()
        self.activity.from_instance(n, trio.current_time())
        self.replay = None

    async def run(self) -> str:
        """Relay until the end; returns the outcome. Cancellation propagates."""
        if self.buffered:
            self._note_client(len(self.buffered))
        try:
            if self.buffered:
                await send_all(self.upstream, self.buffered)
            if self.client_eof:
                self._note_eof()
                await send_eof(self.upstream)
        except (Broken, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return "unanswered_reset"
        # One nursery, two tasks besides this one: every task, checkpoint and cancellation
        # is a cost per connection on the proxy's hot path. The last direction to end, or
        # the first timer to fire, cancels the rest.
        with self._scope:
            async with trio.open_nursery() as both:
                self._pumping = 1 if self.client_eof else 2
                both.start_soon(self._timers, both.cancel_scope)
                if not self.client_eof:
                    both.start_soon(self._direction, True, both.cancel_scope)
                await self._direction(False, both.cancel_scope)
        return self._outcome or "done"

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

    async def _timers(self, both: trio.CancelScope) -> None:
        # Bytes never wake this task (that would cost a task switch per request). A deadline
        # can only move earlier when an answer or half-close clock starts, and such a clock
        # ends at least ``step`` after it starts: so waking at least every ``step`` is never
        # late.
        t = self.activity.timeouts
        step = min(t.answer, t.half_close)
        every = self.watch_after
        watch_at = self.activity.started + every if self.watch is not None else math.inf
        while True:
            deadline, reason = self.activity.deadline()
            now = trio.current_time()
            if now >= deadline:
                self._end(reason, both)
                return
            if now >= watch_at:
                assert self.watch is not None
                if self.activity.instance_bytes or not self.watch():
                    watch_at = math.inf
                else:
                    every = min(every * 2, WATCH_MAX)
                    watch_at = now + every
            await trio.sleep_until(min(deadline, now + step, watch_at))

    def _end(self, outcome: str, both: trio.CancelScope) -> None:
        """End the relay with ``outcome``, unless it has one already."""
        if self._outcome is None:
            self._outcome = outcome
        both.cancel()

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
                self._end("unanswered_reset", both)
                return
            self._note_eof()
            if from_client:
                self.client_eof = True
            try:
                await send_eof(dst)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Broken("dst") from exc
        except Broken as exc:
            client_side = (exc.side == "src") == from_client
            if client_side:
                self._end("client_reset", both)
            elif not self.activity.instance_bytes and self.replay is not None:
                # Unlike a FIN, a reset is never an answer: replay what the client sent, even
                # nothing yet (a dying instance resets the connections in its accept queue,
                # maybe before the client's request was read).
                self._end("unanswered_reset", both)
            else:
                self._end("instance_reset", both)
            return
        self._pumping -= 1
        if not self._pumping:  # both sides sent EOF: done
            both.cancel()

    async def _pump(
        self, src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, from_client: bool
    ) -> None:
        """Move src to dst until src's EOF."""
        if isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream):
            await self._pump_sockets(src.socket, dst.socket, from_client)
            return
        note = self._note_client if from_client else self._note_instance
        while True:
            try:
                data = await src.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Broken("src") from exc
            if not data:
                return
            note(len(data))
            if from_client:
                self._keep(data)
            try:
                await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Broken("dst") from exc

    async def _pump_sockets(
        self, src: trio.socket.SocketType, dst: trio.socket.SocketType, from_client: bool
    ) -> None:
        """:meth:`_pump` between sockets, by plain non-blocking calls that wait only when the
        kernel says EAGAIN (trio's stream methods checkpoint at every call, a task switch)."""
        note = self._note_client if from_client else self._note_instance
        pool = self.pool
        sfd = src.fileno()
        busy = 0  # chunks copied in a row without waiting
        bulk = False  # a read filled SPLICE_AFTER: splice from now on
        while True:
            if bulk and pool is not None and not (from_client and self.replay is not None):
                pipe = pool.take()
                if pipe is not None:
                    try:
                        more = await splice_burst(src, dst, pipe, note)
                    except BaseException:
                        pool.discard(pipe)  # it may hold bytes
                        raise
                    pool.give(pipe)
                    if not more:
                        return
                    await wait(trio.lowlevel.wait_readable, src, "src")
                    continue
            try:
                data = os.read(sfd, CHUNK)
            except BlockingIOError:
                busy = 0
                await wait(trio.lowlevel.wait_readable, src, "src")
                continue
            except OSError as exc:
                raise Broken("src") from exc
            if not data:
                return
            note(len(data))
            if from_client:
                self._keep(data)
            bulk = len(data) >= SPLICE_AFTER
            await write_all(dst, data)
            busy += 1
            if busy >= 16:  # never waited for a while: let other tasks run
                busy = 0
                await trio.lowlevel.checkpoint()

    def _keep(self, data: bytes | bytearray) -> None:
        """Keep the client's ``data`` for a replay, while the bound allows."""
        if self.replay is not None:
            if len(self.replay) + len(data) <= self.keep:
                self.replay.extend(data)
            else:
                self.replay = None
