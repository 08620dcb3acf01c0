"""Small trio helpers shared by the daemon's parts."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import trio

T = TypeVar("T")

# trio 0.23 renamed to_thread.run_sync's ``cancellable`` to ``abandon_on_cancel``; Debian 12
# has 0.22, and later releases dropped the old name.
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel"
            in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")


async def run_sync_abandoned(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread that a cancel abandons: the caller goes on at once
    and the thread finishes (or hangs) on its own, its result dropped. Only for work whose
    result nobody else needs, such as reading a file that may hang."""
    return cast(T, await cast(Any, trio.to_thread.run_sync)(fn, *args, **{_ABANDON: True}))


async def first_of(*waits: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """Run every wait concurrently; when the first one finishes, cancel the others.

    Returns ``(index, value)`` of the first wait that returned. If the first to finish raised
    an ``Exception`` instead, that exception is raised here as it is (never wrapped in an
    ExceptionGroup), after the others have been cancelled. Cancellation from outside
    propagates as usual. This replaces the nursery-plus-``nonlocal`` race written out by hand.
    """
    if not waits:
        raise ValueError("first_of() needs at least one wait")
    winner: tuple[int, Any] | None = None
    failure: Exception | None = None

    async with trio.open_nursery() as nursery:

        async def run(index: int, wait: Callable[[], Awaitable[Any]]) -> None:
            nonlocal winner, failure
            try:
                value = await wait()
            except Exception as exc:
                if winner is None and failure is None:
                    failure = exc
            else:
                if winner is None and failure is None:
                    winner = (index, value)
            nursery.cancel_scope.cancel()

        for index, wait in enumerate(waits):
            nursery.start_soon(run, index, wait)
    if failure is not None:
        raise failure
    # Only our own cancel ends the nursery without a winner or a failure; an outer cancel
    # raised Cancelled out of it already.
    assert winner is not None
    return winner
