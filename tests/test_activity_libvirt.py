"""A handed-over libvirt domain on our bridge in use is not stopped (issue 16 item 9): its
traffic is libvirt's interface stats for its MAC. Needs what tests/test_libvirt_real.py needs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from .conftest import KERNEL, PYTHON, ROOT, wait_until
from .helpers import FETCH_LOOP
from .libvirtd import BRIDGE_SERVICE, PrivateLibvirtd, needs_libvirtd

pytestmark = needs_libvirtd


@pytest.mark.slow
async def test_libvirt_bridge_domain_in_use_stays_up_then_goes_idle(
    tmp_path: Path, netns_libvirtd: tuple[list[str], PrivateLibvirtd],
) -> None:
    """The same with a libvirt domain on the bridge (libvirt's tap, its interface stats read
    through the connection): in use for 8 s with idle_timeout 2 s, then idle."""
    inside, lvd = netns_libvirtd
    conf = tmp_path / "bridge.toml"
    text = BRIDGE_SERVICE.format(uri=lvd.uri, kernel=KERNEL)
    assert 'idle_timeout = "1s"' in text
    conf.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
                    + text.replace('idle_timeout = "1s"', 'idle_timeout = "2s"'))
    daemon_log = tmp_path / "daemon.log"
    proc = None
    try:
        with open(daemon_log, "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*inside, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile, cwd=ROOT)
        await wait_until(lambda: b"serving" in daemon_log.read_bytes(), timeout=30)
        res = await trio.run_process([*inside, PYTHON, "-c", FETCH_LOOP, "8"],
                                     capture_stdout=True, capture_stderr=True, check=False)
        ended = trio.current_time()
        log = daemon_log.read_text()
        assert res.returncode == 0, res.stderr.decode() + log
        fetches, failed, _ = res.stdout.decode().split(" ", 2)
        assert int(fetches) >= 8 and failed == "0", res.stdout.decode() + log
        assert "idle for" not in log and log.count("ready in") == 1, log
        await wait_until(lambda: b"hello#1 idle for 2 s" in daemon_log.read_bytes(), timeout=15)
        assert trio.current_time() - ended < 2 + 6
        await wait_until(lambda: not lvd.domains(), timeout=20)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
