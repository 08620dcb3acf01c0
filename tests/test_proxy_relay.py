"""The relay's timers and replay copy, on memory streams and virtual time (no sockets)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from jitlaunch.proxy.pipes import PipePool
from jitlaunch.proxy.relay import SPLICE_AFTER, Activity, Relay, Timeouts

T = Timeouts(first_data=10, answer=30, idle=600, half_close=20)


def pairs() -> tuple[trio.abc.HalfCloseableStream, ...]:
    """(client as the user holds it, client as the relay holds it, the same for upstream)."""
    user, client = trio.testing.memory_stream_pair()
    upstream, instance = trio.testing.memory_stream_pair()
    return user, client, upstream, instance


async def run_relay(relay: Relay) -> tuple[str, float]:
    start = trio.current_time()
    outcome = await relay.run()
    return outcome, trio.current_time() - start


def test_activity_deadlines_follow_the_rules() -> None:
    a = Activity(0.0, T)
    assert a.deadline() == (10, "first_data")
    a.from_client(1, 2.0)
    assert a.deadline() == (32, "first_answer")
    a.from_instance(5, 3.0)
    assert a.deadline() == (603, "idle")
    a.from_client(1, 100.0)
    a.from_client(1, 120.0)  # the clock runs from the first unanswered byte
    assert a.deadline() == (130, "no_answer")
    a.from_instance(1, 125.0)
    a.eof(126.0)
    assert a.deadline() == (146, "half_close")
    a.from_instance(1, 140.0)  # bytes after the EOF push the linger on
    assert a.deadline() == (160, "half_close")


async def test_silent_client_is_closed_after_first_data(autojump_clock: trio.abc.Clock) -> None:
    _user, client, upstream, _instance = pairs()
    outcome, took = await run_relay(Relay(client, upstream, T, None))
    assert (outcome, took) == ("first_data", 10)


async def test_slowloris_to_a_silent_instance_ends_at_answer_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    user, client, upstream, _instance = pairs()

    async def trickle() -> None:
        while True:
            await user.send_all(b"G")
            await trio.sleep(1)

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        outcome, took = await run_relay(Relay(client, upstream, T, None))
        n.cancel_scope.cancel()
    assert (outcome, took) == ("first_answer", 30)


async def test_trickle_after_an_answer_ends_at_answer_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    user, client, upstream, instance = pairs()

    async def client_side() -> None:
        await user.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await user.receive_some(100)
        await trio.sleep(50)
        while True:  # the next request, a byte a second, never finished
            await user.send_all(b"G")
            await trio.sleep(1)

    async def instance_side() -> None:
        await instance.receive_some(100)
        await instance.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
        while await instance.receive_some(100):
            pass

    async with trio.open_nursery() as n:
        n.start_soon(client_side)
        n.start_soon(instance_side)
        outcome, took = await run_relay(Relay(client, upstream, T, None))
        n.cancel_scope.cancel()
    assert (outcome, took) == ("no_answer", 80)


async def test_both_ways_quiet_ends_at_idle(autojump_clock: trio.abc.Clock) -> None:
    user, client, upstream, instance = pairs()

    async def exchange() -> None:
        await user.send_all(b"ping")
        assert await instance.receive_some(100) == b"ping"
        await trio.sleep(5)
        await instance.send_all(b"pong")
        assert await user.receive_some(100) == b"pong"

    async with trio.open_nursery() as n:
        n.start_soon(exchange)
        outcome, took = await run_relay(Relay(client, upstream, T, None))
    assert (outcome, took) == ("idle", 605)


async def test_half_closed_relay_lingers_then_ends(autojump_clock: trio.abc.Clock) -> None:
    user, client, upstream, instance = pairs()
    timeouts = Timeouts(first_data=10, answer=math.inf, idle=600, half_close=20)

    async def client_side() -> None:
        await user.send_all(b"request")
        await user.send_eof()

    async def instance_side() -> None:
        assert await instance.receive_some(100) == b"request"
        assert await instance.receive_some(100) == b""  # the client's EOF, passed on
        await trio.sleep(3)
        await instance.send_all(b"part")  # then it never finishes

    async with trio.open_nursery() as n:
        n.start_soon(client_side)
        n.start_soon(instance_side)
        outcome, took = await run_relay(Relay(client, upstream, timeouts, None))
    assert (outcome, took) == ("half_close", 23)
    assert await user.receive_some(100) == b"part"


async def test_both_eofs_end_the_relay_at_once(autojump_clock: trio.abc.Clock) -> None:
    user, client, upstream, instance = pairs()

    async def both() -> None:
        await user.send_all(b"q")
        await user.send_eof()
        assert await instance.receive_some(10) == b"q"
        await trio.sleep(1)
        await instance.send_all(b"a")
        await instance.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(both)
        outcome, took = await run_relay(Relay(client, upstream, T, None))
    assert (outcome, took) == ("done", 1)
    assert await user.receive_some(10) == b"a"
    assert await user.receive_some(10) == b""


class Resetting(trio.abc.HalfCloseableStream):
    """An instance that takes what it is sent, then resets the connection unanswered."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.got = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.got.extend(data)
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep(self.after)
        raise trio.BrokenResourceError("connection reset")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_unanswered_reset_keeps_everything_for_a_replay(
    autojump_clock: trio.abc.Clock,
) -> None:
    user, client, _, _ = pairs()
    dead = Resetting(after=2)
    await user.send_all(b" more")
    relay = Relay(client, dead, T, None, buffered=b"first", keep=100)
    outcome, took = await run_relay(relay)
    assert (outcome, took) == ("unanswered_reset", 2)
    assert relay.replay == b"first more" == dead.got
    assert not relay.client_eof


async def test_replay_copy_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    user, client, _, _ = pairs()
    dead = Resetting(after=2)
    await user.send_all(b"x" * 101)
    relay = Relay(client, dead, T, None, keep=100)
    assert await relay.run() == "instance_reset"  # nothing to replay
    assert relay.replay is None


@pytest.mark.parametrize("limit", [1, 2])
def test_pipe_pool_lends_at_most_its_limit(limit: int) -> None:
    pool = PipePool(limit, keep=1)
    taken = [pool.take() for _ in range(limit)]
    assert all(p is not None for p in taken) and pool.open == limit
    assert pool.take() is None and pool.misses == 1
    for p in taken:
        assert p is not None
        pool.give(p)
    assert pool.open == 1  # one kept, the rest closed
    pool.close()
    assert pool.open == 0


def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    import socket

    a, b = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


@pytest.mark.parametrize("limit", [0, 1, 4])
async def test_relay_moves_bulk_both_ways_with_or_without_pipes(limit: int) -> None:
    """Splice with pipes from the pool, or copy when none is left: the same bytes arrive."""
    user, client = socket_streams()
    upstream, instance = socket_streams()
    pool = PipePool(limit)
    up = bytes(range(256)) * 8192  # 2 MiB each way, more than the socket buffers
    down = bytes(reversed(range(256))) * 8192
    got_up = bytearray()
    got_down = bytearray()

    async def send(stream: trio.SocketStream, data: bytes) -> None:
        await stream.send_all(data)
        await stream.send_eof()

    async def receive(stream: trio.SocketStream, into: bytearray) -> None:
        while chunk := await stream.receive_some(65536):
            into.extend(chunk)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(send, user, up)
            n.start_soon(send, instance, down)
            n.start_soon(receive, user, got_down)
            n.start_soon(receive, instance, got_up)
            assert await Relay(client, upstream, T, pool, keep=1000).run() == "done"
    assert bytes(got_up) == up and bytes(got_down) == down
    assert pool.open <= limit
    assert pool.open == min(limit, 2)  # bulk went through pipes: one per direction
    pool.close()
    for s in (user, client, upstream, instance):
        await s.aclose()


@pytest.mark.parametrize(
    ("request_bytes", "client_eof", "asked"),
    [(b"GET", False, True), (b"", False, False), (b"GET", True, False), (b"", True, False)],
)
async def test_an_unanswered_close_is_questioned_only_with_a_request_pending(
    autojump_clock: trio.abc.Clock, request_bytes: bytes, client_eof: bool, asked: bool
) -> None:
    """A close after the client's EOF, or on a connection that asked nothing, is an answer
    in itself; only a close in the face of a pending request may mean a dying instance."""
    user, client, upstream, instance = pairs()
    questions = 0

    async def closed_unanswered() -> bool:
        nonlocal questions
        questions += 1
        return True

    async def both() -> None:
        if request_bytes:
            await user.send_all(request_bytes)
        if client_eof:
            await user.send_eof()
        await trio.sleep(1)
        await instance.send_eof()
        if not client_eof:
            await trio.sleep(1)
            await user.send_eof()

    async with trio.open_nursery() as n:
        n.start_soon(both)
        relay = Relay(client, upstream, T, None, keep=100, closed_unanswered=closed_unanswered)
        outcome = await relay.run()
    assert questions == int(asked)
    assert outcome == ("unanswered_reset" if asked else "done")


async def test_a_reset_before_the_clients_first_byte_is_replayable(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A dying instance resets the connections in its accept queue, maybe before the proxy
    has read the client's request: nothing is lost, so the client goes on to the next
    instance (an empty replay) rather than being closed unanswered."""
    _user, client, _, _ = pairs()
    dead = Resetting(after=0.001)
    relay = Relay(client, dead, T, None, keep=100)
    assert await relay.run() == "unanswered_reset"
    assert relay.replay == b"" and not relay.client_eof


@pytest.mark.parametrize(("size", "pipes"), [(100, 0), (SPLICE_AFTER * 4, 1)])
async def test_a_small_exchange_is_copied_not_spliced(size: int, pipes: int) -> None:
    """Below SPLICE_AFTER a read and a write cost less than splicing through a pipe: a small
    request and answer take no pipe; one large answer makes its direction splice."""
    user, client = socket_streams()
    upstream, instance = socket_streams()
    pool = PipePool(4)

    async def serve() -> None:
        assert await instance.receive_some(100) == b"GET"
        await instance.send_all(b"x" * size)
        await instance.send_eof()

    async def use() -> None:
        await user.send_all(b"GET")
        await user.send_eof()
        got = 0
        while chunk := await user.receive_some(65536):
            got += len(chunk)
        assert got == size

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(serve)
            n.start_soon(use)
            assert await Relay(client, upstream, T, pool, keep=1000).run() == "done"
    assert pool.open == pipes
    pool.close()
    for s in (user, client, upstream, instance):
        await s.aclose()
