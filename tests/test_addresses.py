"""Addresses handed out are not given to another service while a client may still have them
cached (issue: s01's address went to s02 one second after s01 stopped, within its TTL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from jitlaunch.backends import addresses
from jitlaunch.backends.addresses import AddressesHeld, AddressPool
from jitlaunch.errors import BootFailed

from .conftest import DEMO, config_text, load, running, wait_until

HOSTS = [f"10.0.0.{i}" for i in range(1, 5)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_released_address_is_held_for_its_service() -> None:
    clock = Clock()
    pool = AddressPool(clock)
    a = pool.take(HOSTS, "s01", "net")
    assert a == "10.0.0.1"
    pool.release(a, "s01", 30)
    assert pool.held_for(a) == "s01"
    assert pool.take(HOSTS, "s02", "net") == "10.0.0.2"  # not s01's, though lower
    assert pool.take(HOSTS, "s01", "net") == a  # its own service takes it back at once
    pool.release(a, "s01", 30)
    clock.now += 30
    assert pool.held_for(a) is None
    assert pool.take(HOSTS, "s03", "net") == "10.0.0.3"  # one never used comes first
    assert pool.take(HOSTS, "s04", "net") == "10.0.0.4"
    assert pool.take(HOSTS, "s05", "net") == a  # then the one free the longest


def test_least_recently_released_goes_first_and_exhaustion_says_why() -> None:
    clock = Clock()
    pool = AddressPool(clock)
    taken = [pool.take(HOSTS, f"s{i}", "net") for i in range(4)]
    assert taken == HOSTS
    with pytest.raises(BootFailed, match="no free address left in net") as info:
        pool.take(HOSTS, "s9", "net")
    assert not isinstance(info.value, AddressesHeld)
    for i, address in enumerate(taken):
        pool.release(address, f"s{i}", 10)
        clock.now += 1
    with pytest.raises(AddressesHeld, match=r"held for the services .*\(the first in 6 s\)"):
        pool.take(HOSTS, "s9", "net")
    clock.now += 10
    assert pool.take(HOSTS, "s9", "net") == "10.0.0.1"  # released first
    assert pool.take(HOSTS, "s8", "net") == "10.0.0.2"
    pool.release("10.0.0.3", "s2", 0)  # never answered: nobody's
    assert pool.held_for("10.0.0.3") is None


def _service(name: str, block: str, ttl: int, answer: str = "handoff") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{block}.{1 if name == 's01' else 2}"]
ports = [8080]
ttl = {ttl}
answer = "{answer}"
idle_timeout = "5m"
[service.process]
command = "{DEMO}"
subnet = "{block}.128/25"
user = "root"
"""


async def test_another_service_does_not_get_an_address_within_its_ttl(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two process services on one subnet: s01 is handed out as A (TTL 1) and stopped; s02,
    started at once, gets another address; s01 gets A back at once; A's hold ends after the
    TTL and the margin (who gets it then: the allocator's unit tests)."""
    monkeypatch.setattr(addresses, "HOLD_MARGIN", 0.5)
    cfg = load(config_text(tmp_path, _service("s01", block, 1) + _service("s02", block, 1)))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("s01")
        assert first.handle is not None
        a = first.handle.address
        assert a == f"{block}.129"
        stopped = sup.stop("s01")
        assert stopped is not None
        with trio.fail_after(20):
            await stopped.run.released.wait()
        other = await sup.acquire("s02")
        assert other.handle is not None and other.handle.address != a
        again = await sup.acquire("s01")
        assert again.handle is not None and again.handle.address == a  # its own, at once
        stopped = sup.stop("s01")
        assert stopped is not None
        with trio.fail_after(20):
            await stopped.run.released.wait()
        pool = d.backends["process"].addresses  # type: ignore[attr-defined]
        assert pool.held_for(a) == "s01"
        await wait_until(lambda: pool.held_for(a) is None, timeout=10)  # TTL 1 + margin 0.5


async def test_proxy_mode_addresses_are_not_held(
    tmp_path: Path, block: str
) -> None:
    """Answer mode proxy never hands the instance's address out: nothing to hold."""
    cfg = load(config_text(tmp_path, _service("s01", block, 30, "proxy")
                           + _service("s02", block, 30, "proxy")))
    async with running(cfg) as d:
        sup = d.supervisor
        first = await sup.acquire("s01")
        assert first.handle is not None
        a = first.handle.address
        stopped = sup.stop("s01")
        assert stopped is not None
        with trio.fail_after(20):
            await stopped.run.released.wait()
        other = await sup.acquire("s02")
        assert other.handle is not None and other.handle.address == a


def test_jitlaunch_check_warns_about_a_shared_subnet(tmp_path: Path, block: str) -> None:
    from jitlaunch.checks import shared_subnet_warnings

    both = load(config_text(tmp_path, _service("s01", block, 30) + _service("s02", block, 30)))
    [warning] = shared_subnet_warnings(both)
    assert warning.startswith(f"services 's01', 's02' share {block}.128/25: an instance address")
    proxied = load(config_text(tmp_path, _service("s01", block, 30)
                               + _service("s02", block, 30, "proxy")))
    assert shared_subnet_warnings(proxied) == []
