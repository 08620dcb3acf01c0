"""Every path through an instance's life ends served: backend x stop mode x how the instance
ended x how it is woken next, generated. Each cell boots the service, ends its instance one
way, wakes it another, and checks that a real HTTP request through the front is answered by
a ready instance; the daemon then stops and nothing of the test is left running (conftest's
check) and no saved state outlives a mode that does not keep one.

Backends: process (destroy, shutdown: it has no pause or save), qemu with the bundled
unikernel (every mode; a warm pool for destroy) and podman with the bundled image (every
mode; a warm pool for destroy; each mode x end with one way of waking, the three ways taken
in turn, to keep the suite's time: every wake still meets every mode and most ends). libvirt's
stop modes run through the same supervisor paths and are covered by
tests/test_libvirt_real.py against a real libvirtd; its cells are not generated here (each
needs a private libvirtd: minutes, not seconds).

A cell's id names it: ``qemu-pause-requested-lookup``. Most cells are marked slow; the fast
lane runs one per way an instance can end.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from jitlaunch.lifecycle.state import State

from .conftest import (
    DEMO,
    ROOT,
    config_text,
    fresh_block,
    http_get,
    load_config,
    query_udp,
    running,
    wait_until,
)

KERNEL = ROOT / "images" / "build" / "hello.elf"
MODES = {"process": ("destroy", "shutdown"), "qemu": ("destroy", "shutdown", "pause", "save"),
         "podman": ("destroy", "shutdown", "pause", "save")}
IMAGE = "localhost/jitlaunch-httpd:latest"
ENDS = ("idle", "requested", "evicted", "reload", "died", "hung", "restart")
WAKES = ("lookup", "connection", "start")
PORT, RELOADED_PORT = 18080, 18081
#: One cell per way of ending in the fast lane (the rest are slow).
FAST = {"process-destroy-idle-lookup", "process-shutdown-requested-connection",
        "qemu-pause-requested-lookup", "qemu-save-requested-connection",
        "qemu-pause-evicted-start", "process-destroy-reload-connection",
        "qemu-destroy-died-lookup", "process-destroy-hung-connection",
        "qemu-pause-restart-connection", "qemu-destroy-pool-connection",
        "podman-pause-requested-lookup", "podman-save-died-connection"}


def _cells() -> list[pytest.param]:  # type: ignore[valid-type]
    out = []
    for backend, modes in MODES.items():
        if backend == "podman":
            turn = itertools.cycle(WAKES)
            out += [(backend, mode, end, next(turn)) for mode, end in itertools.product(modes, ENDS)]
            continue
        for mode, end, wake in itertools.product(modes, ENDS, WAKES):
            out.append((backend, mode, end, wake))
    # A warm pool member takes the place of a destroyed instance (the pool refills after).
    out += [("qemu", "destroy", "pool", wake) for wake in WAKES]
    out += [("podman", "destroy", "pool", "connection")]
    params = []
    for cell in out:
        name = "-".join(cell)
        marks = [] if name in FAST else [pytest.mark.slow]
        params.append(pytest.param(*cell, id=name, marks=marks))
    return params


def _service(backend: str, mode: str, end: str, block: str, port: int) -> str:
    idle = "300ms" if end == "idle" else "5m"
    health = ('health_interval = "200ms"\nhealth_timeout = "300ms"\nhealth_failures = 1\n'
              if end == "hung" else "")
    head = f"""
[[service]]
name = "svc"
front = ["{block}.1"]
ports = [{port}]
answer = "proxy"
stop = "{mode}"
idle_timeout = "{idle}"
boot_timeout = "20s"
{health}"""
    if backend == "process":
        return head + f'[service.process]\ncommand = "{DEMO}"\nuser = "root"\ngrace = "2s"\n'
    pool = "pool = 1\n" if end == "pool" else ""
    if end == "pool":
        head += "max_instances = 2\n"
    if backend == "podman":
        return head + (f'backend = "podman"\n[service.podman]\nimage = "{IMAGE}"\n'
                       f'container_ports = [8080]\ngrace = "2s"\n{pool}')
    return head + (f'backend = "qemu"\n[service.qemu]\nkernel = "{KERNEL}"\n'
                   f'guest_ports = [80]\naccel = "tcg"\ngrace = "2s"\n{pool}')


def _other(block: str) -> str:
    return f"""
[[service]]
name = "other"
front = ["{block}.2"]
ports = [{PORT}]
answer = "proxy"
idle_timeout = "5m"
[service.process]
command = "{DEMO}"
user = "root"
"""


def _write(path: Path, state: Path, backend: str, mode: str, end: str, block: str,
           port: int) -> Path:
    top = "[host]\nmax_instances = 1\n" if end == "evicted" else ""
    path.write_text(config_text(state, _service(backend, mode, end, block, port)
                                + _other(block), top=top))
    return path


def podman_image(image: str) -> bool:
    """Whether podman and runc are here and ``image`` is in podman's store."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return False
    return subprocess.run(["podman", "image", "exists", image], capture_output=True,
                          check=False).returncode == 0


def _server(d) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    return d.dns_endpoints[0].host, d.dns_endpoints[0].port


async def _served(d, block: str, port: int) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(30):
        body = await http_get(f"{block}.1", port)
    assert body.startswith(b"HTTP/1.1 200"), body
    inst = d.supervisor.services["svc"].instance
    assert inst is not None and inst.state is State.READY, inst


async def _released(inst) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(30):
        await inst.run.released.wait()


async def _end(d, how: str, block: str, conf: Path, state: Path,  # type: ignore[no-untyped-def]
               backend: str, mode: str) -> int:
    """End svc's instance ``how``; return the port it is served on from then on."""
    sup = d.supervisor
    rt = sup.services["svc"]
    inst = rt.instance
    assert inst is not None and inst.handle is not None
    if how == "idle":
        await wait_until(lambda: inst.state in (State.STOPPED, State.SAVED), timeout=30)
        await _released(inst)
    elif how == "requested":
        assert sup.stop("svc") is inst
        await _released(inst)
    elif how == "evicted":
        other = await sup.acquire("other", proven=True)
        assert other.state is State.READY
        await _released(inst)
        assert sup.admission["evicted"] >= 1
    elif how == "reload":
        _write(conf, state, backend, mode, how, block, RELOADED_PORT)
        result = await d.reload("test")
        assert result.ok, result.message
        await _released(inst)
        return RELOADED_PORT
    elif how in ("died", "hung"):
        pid = inst.handle.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL if how == "died" else signal.SIGSTOP)
        await _released(inst)
        assert rt.stops[("hung" if how == "hung" else "died", "destroy")] == 1
    elif how == "pool":
        assert sup.stop("svc") is inst
        await _released(inst)
        pools = (d.backends["podman"].pools if backend == "podman"
                 else d.backends["qemu"].warm).pools
        await wait_until(lambda: bool(pools.get("svc")), timeout=30)
    else:
        raise AssertionError(how)
    return PORT


async def _wake(d, how: str, block: str, port: int) -> None:  # type: ignore[no-untyped-def]
    if how == "lookup":
        sup = d.supervisor
        refused = sup.admission["refused_unproven"]
        with trio.fail_after(10):
            rec = await query_udp(_server(d), "svc.jit.test")
        assert [str(r.rdata) for r in rec.rr] == [f"{block}.1"]
        # The lookup boots the service, unless it would have to evict (the host is full):
        # a UDP lookup without a cookie may be forged, and may not; the client's connection
        # to the front (below) then does.
        await wait_until(lambda: ((i := sup.services["svc"].instance) is not None
                         and i.state is State.READY)
                         or sup.admission["refused_unproven"] > refused, timeout=30)
    elif how == "start":
        with trio.fail_after(30):
            await d.supervisor.acquire("svc")
    await _served(d, block, port)


@pytest.mark.parametrize(("backend", "mode", "end", "wake"), _cells())
async def test_every_path_ends_served(tmp_path: Path, backend: str, mode: str, end: str,
                                      wake: str) -> None:
    if backend == "qemu" and not KERNEL.exists():
        pytest.skip("needs the bundled image (make -C images)")
    if backend == "podman" and not podman_image(IMAGE):
        pytest.skip(f"needs podman, runc and {IMAGE} (scripts/setup)")
    block = fresh_block()
    state = tmp_path / "state"
    conf = _write(tmp_path / "jl.toml", state, backend, mode, end, block, PORT)
    port = PORT
    if end == "restart":
        async with running(load_config(conf)) as d:
            await _served(d, block, port)
        # The daemon stopped (shutdown: every instance destroyed); a new one on the same
        # state directory is woken.
        async with running(load_config(conf)) as d:
            await _wake(d, wake, block, port)
    else:
        async with running(load_config(conf)) as d:
            await _served(d, block, port)
            port = await _end(d, end, block, conf, state, backend, mode)
            await _wake(d, wake, block, port)
            # And once more: a second end of the same kind is served too (a mark of the
            # first run must not decide the second).
            if end in ("requested", "idle"):
                port = await _end(d, end, block, conf, state, backend, mode)
                await _wake(d, wake, block, port)
    saved = state / "saved" / "svc.state"
    assert not saved.exists() or mode == "save", "a saved state outlived its mode"
