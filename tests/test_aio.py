"""The shared trio helpers: first_of and LimitedLog."""

from __future__ import annotations

import logging

import pytest
import trio

from jitlaunch.aio import first_of
from jitlaunch.logutil import LimitedLog


async def test_first_of_returns_the_first_and_cancels_the_rest(autojump_clock: trio.abc.Clock) -> None:
    cancelled = []

    async def slow() -> str:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            cancelled.append("slow")
            raise
        return "slow"

    async def fast() -> str:
        await trio.sleep(1)
        return "fast"

    start = trio.current_time()
    assert await first_of(slow, fast) == (1, "fast")
    assert trio.current_time() - start == 1
    assert cancelled == ["slow"]


async def test_first_of_raises_the_first_failure_unwrapped(autojump_clock: trio.abc.Clock) -> None:
    async def boom() -> None:
        await trio.sleep(1)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await first_of(trio.sleep_forever, boom)


async def test_first_of_lets_an_outer_cancel_through(autojump_clock: trio.abc.Clock) -> None:
    with trio.move_on_after(1) as scope:
        await first_of(trio.sleep_forever, trio.sleep_forever)
    assert scope.cancelled_caught


def test_limited_log_writes_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = LimitedLog(logging.getLogger("jitlaunch.test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "jitlaunch.test"):
        for _ in range(1000):
            limited.warning("bad", "bad packet")
        now[0] = 10.0
        limited.warning("bad", "bad packet")
        limited.warning("other", "other thing")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "bad packet",
        "bad packet (999 more like it in the last 10 s)",
        "other thing",
    ]
    assert limited.counts == {"bad": 1001, "other": 1}
