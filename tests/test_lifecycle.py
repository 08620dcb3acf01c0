"""The state machine table, and the supervisor's timers on trio's virtual clock.

The supervisor runs against a fake backend here (this is a unit test of its logic); the
integration tests drive it with real processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing

from jitlaunch.errors import BootFailed, BootTimeout, IllegalTransition, InBackoff
from jitlaunch.lifecycle.answers import ServiceAnswer, answer_for
from jitlaunch.lifecycle.state import TRANSITIONS, Event, State, next_state
from jitlaunch.lifecycle.supervisor import Supervisor

from .helpers import make

# ---- the table -----------------------------------------------------------------------------


def answer(sup: Supervisor, name: str) -> ServiceAnswer:
    """What DNS says about service ``name`` now: the snapshot through the pure policy."""
    return answer_for(sup.services[name].config, sup.snapshot(name), trio.current_time())


def test_every_listed_transition() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert next_state(state, event) is target


def test_every_other_transition_is_illegal_with_a_precise_message() -> None:
    for state in State:
        for event in Event:
            if (state, event) in TRANSITIONS:
                continue
            with pytest.raises(IllegalTransition) as info:
                next_state(state, event)
            assert str(info.value).startswith(f"event {event} is not allowed in state {state} (")


def test_message_lists_what_is_allowed() -> None:
    with pytest.raises(IllegalTransition, match=r"event ready is not allowed in state stopped "
                       r"\(allowed: start\)"):
        next_state(State.STOPPED, Event.READY)
    with pytest.raises(IllegalTransition, match=r"\(allowed: none, it is terminal\)"):
        next_state(State.FAILED, Event.START)


def test_a_full_life() -> None:
    s = State.STOPPED
    for event in (Event.START, Event.READY, Event.DRAIN, Event.STOP, Event.SAVED, Event.START,
                  Event.READY, Event.DIED, Event.STOPPED):
        s = next_state(s, event)
    assert s is State.STOPPED


# ---- the supervisor on virtual time ---------------------------------------------------------


async def test_boot_then_idle_stop_at_exact_times(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path)
    await nursery.start(sup.run)
    t0 = trio.current_time()
    inst = await sup.acquire("hello")
    assert trio.current_time() - t0 == pytest.approx(0.5)
    assert inst.state is State.READY and repr(inst) == "<Instance hello#1 ready process>"
    rt = sup.services["hello"]
    # Activity at +10 s pushes the idle stop to +70 s.
    await trio.sleep_until(t0 + 10)
    sup.touch("hello")
    while rt.instance is not None:
        await rt.changed.wait()
    assert trio.current_time() - t0 == pytest.approx(70)
    assert inst.state is State.STOPPED
    assert backend.handles[0].stopped_with == "destroy"
    assert rt.idle_stops == 1


async def test_never_idle_while_a_connection_is_open(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, _ = make(tmp_path)
    await nursery.start(sup.run)
    t0 = trio.current_time()
    inst = await sup.acquire("hello")
    sup.connection_opened("hello")
    await trio.sleep(1000)
    assert inst.state is State.READY
    sup.connection_closed("hello")  # at t0 + 1000.5
    rt = sup.services["hello"]
    while rt.instance is not None:
        await rt.changed.wait()
    assert trio.current_time() - t0 == pytest.approx(1060.5)


async def test_concurrent_requests_share_one_boot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path)
    await nursery.start(sup.run)
    got = []

    async def one() -> None:
        got.append(await sup.acquire("hello"))

    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(one)
    assert len(backend.starts) == 1 and len({id(i) for i in got}) == 1


async def test_boot_timeout_fails_then_backs_off_exponentially(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path)
    backend.boot_time = 100  # never ready within the 5 s boot timeout
    await nursery.start(sup.run)
    t0 = trio.current_time()
    with pytest.raises(BootTimeout, match="not ready within the boot timeout of 5 s"):
        await sup.acquire("hello")
    assert trio.current_time() - t0 == pytest.approx(5)
    rt = sup.services["hello"]
    # Backoff 1 s, 2 s, 4 s, then capped at 5 s; requests in between start nothing.
    expected_starts = [0.0]
    for delay in (1, 2, 4, 5, 5):
        with pytest.raises(InBackoff):
            await sup.acquire("hello")
        assert len(backend.starts) == len(expected_starts)
        await trio.sleep_until(rt.retry_at)
        expected_starts.append(trio.current_time() - t0)
        with pytest.raises(BootTimeout):
            await sup.acquire("hello")
        assert rt.retry_at - trio.current_time() == pytest.approx(min(delay * 2, 5))
    assert [s - t0 for s in backend.starts] == pytest.approx(expected_starts)
    # 5 s boot + 1 s wait, then each boot (5 s) plus the doubled, capped wait.
    assert expected_starts == pytest.approx([0, 6, 13, 22, 32, 42])


async def test_failed_boot_fails_every_waiter_and_success_resets_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path)
    backend.fail = "exit"
    await nursery.start(sup.run)
    errors: list[str] = []

    async def one() -> None:
        try:
            await sup.acquire("hello")
        except BootFailed as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert errors == ["exited with status 3 before it was ready"] * 5
    rt = sup.services["hello"]
    assert rt.boot_failures == 1 and rt.failures == 1
    assert answer(sup, "hello").servfail is False  # handoff mode: front address, short TTL
    backend.fail = None
    await trio.sleep_until(rt.retry_at)
    await sup.acquire("hello")
    assert rt.failures == 0


async def test_backend_error_is_a_boot_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path, 'answer = "wait"')
    backend.fail = "error"
    await nursery.start(sup.run)
    with pytest.raises(BootFailed, match="the fake refused"):
        await sup.acquire("hello")
    assert answer(sup, "hello").servfail


async def test_death_is_noticed_at_once_and_next_request_boots_anew(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, backend = make(tmp_path)
    await nursery.start(sup.run)
    first = await sup.acquire("hello")
    t_death = trio.current_time() + 3
    await trio.sleep_until(t_death)
    backend.handles[0].die()
    rt = sup.services["hello"]
    while rt.instance is not None:
        await rt.changed.wait()
    assert trio.current_time() == pytest.approx(t_death)
    assert first.state is State.STOPPED and rt.deaths == 1
    second = await sup.acquire("hello")
    assert second.number == 2 and len(backend.starts) == 2


async def test_answers_follow_the_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sup, _ = make(tmp_path)
    await nursery.start(sup.run)
    booting = answer(sup, "hello")
    assert (booting.v4, booting.ttl) == (("127.77.0.1",), 1)
    sup.request("hello")
    inst = await sup.acquire("hello")
    ready = answer(sup, "hello")
    assert (ready.v4, ready.ttl) == (("127.77.0.1",), 30)  # the fake has no own address
    inst.handle.address = "127.77.1.9"  # type: ignore[union-attr]
    assert answer(sup, "hello").v4 == ("127.77.1.9",)


async def test_shutdown_stops_instances_shielded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, backend = make(tmp_path)
    async with trio.open_nursery() as n:
        await n.start(sup.run)
        inst = await sup.acquire("hello")
        n.cancel_scope.cancel()
    assert inst.state is State.STOPPED
    assert backend.handles[0].stopped_with == "destroy"
    assert sup.request("hello") is None
    assert math.isfinite(inst.ready_at)
