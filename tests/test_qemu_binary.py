"""Which QEMU program runs an instance: the reduced build (``qemu-system-x86_64-microvm``:
KVM only, no user networking) where it applies, the full QEMU otherwise, either when forced;
and saved states restored across the two. Real QEMU, real KVM; bridge networking inside a
network namespace of the test's own."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from jitlaunch.backends.qemu import QemuBackend, kvm_usable
from jitlaunch.backends.qemu.settings import FULL_BINARY, REDUCED_BINARY, saved_meta
from jitlaunch.backends.vm import image_id
from jitlaunch.config import ServiceConfig
from jitlaunch.errors import BootFailed

from .conftest import (
    KERNEL,
    PYTHON,
    ROOT,
    config_text,
    http_get,
    load,
    needs_netns,
    qemus,
    running,
    wait_until,
)
from .helpers import qemu_service

needs_both = pytest.mark.skipif(
    not kvm_usable() or shutil.which(REDUCED_BINARY) is None or shutil.which(FULL_BINARY) is None,
    reason=f"needs a usable /dev/kvm and both {FULL_BINARY} and {REDUCED_BINARY} "
           "(Debian's qemu-system-x86)",
)

#: The daemon's boot line: ``hello#1: QEMU pid 4242 (qemu-system-x86_64-microvm, kvm)``.
BOOT_LINE = re.compile(r"hello#\d+: QEMU pid (\d+) \(([^,]+), (kvm|tcg)([^)]*)\)")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    leaked = qemus(tmp_path)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, "QEMU processes leaked"


def bridge_config(state: Path, qemu: str = "", extra: str = "") -> Path:
    """conf/bridge.toml (accel auto, no pool) on ``state``, with more keys for the service
    and for its qemu table."""
    text = (ROOT / "conf" / "bridge.toml").read_text().replace("pool = 1", qemu)
    text = text.replace("[dns]", f'[daemon]\nstate_dir = "{state}"\n\n[dns]')
    text = text.replace('answer = "handoff"', f'answer = "handoff"\n{extra}')
    conf = state / "bridge.toml"
    conf.write_text(text.replace("../images/build/hello.elf", str(KERNEL)))
    return conf


@asynccontextmanager
async def daemon(inside: list[str], conf: Path, logname: str) -> AsyncIterator[Path]:
    """``jitlaunch run`` inside the namespace, serving; yields its log. Stopped with SIGINT
    (it must exit 0), killed if it does not."""
    log = conf.parent / logname
    proc = None
    try:
        with open(log, "wb") as logfile:
            proc = await trio.lowlevel.open_process(
                [*inside, PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
                stderr=logfile)
        await wait_until(lambda: b"serving" in log.read_bytes() or proc.returncode is not None,
                         timeout=30)
        assert proc.returncode is None, log.read_text()
        yield log
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0, log.read_text()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


async def probe(inside: list[str], log: Path) -> None:
    """A lookup and a GET through the namespace's DNS and bridge: HTTP 200."""
    res = await trio.run_process(
        [*inside, PYTHON, "-m", "jitlaunch.cli", "probe", "hello.jit.test", "--server",
         "127.0.0.1:5300", "--port", "80"], capture_stdout=True, capture_stderr=True, check=False)
    if res.returncode != 0:
        raise AssertionError(res.stderr.decode() + await trio.Path(log).read_text())
    assert b"HTTP/1.1 200 OK" in res.stdout


def boots(log: Path) -> list[tuple[int, str, str, str]]:
    """(pid, program, accel, the rest) of each QEMU the daemon started, from its log."""
    return [(int(p), prog, accel, rest)
            for p, prog, accel, rest in BOOT_LINE.findall(log.read_text(errors="replace"))]


def exe(pid: int) -> str:
    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))


@needs_both
@needs_netns
@pytest.mark.parametrize(("binary", "expected"), [
    ("auto", REDUCED_BINARY), (FULL_BINARY, FULL_BINARY), (REDUCED_BINARY, REDUCED_BINARY),
])
async def test_bridge_with_kvm_runs_the_reduced_build_unless_forced(
    state: Path, netns: list[str], binary: str, expected: str,
) -> None:
    """Bridge networking and KVM: ``auto`` runs the reduced build, which serves; forcing
    either program runs that one. The boot line names the program, and it is what runs."""
    conf = bridge_config(state, qemu=f'binary = "{binary}"')
    async with daemon(netns, conf, "daemon.log") as log:
        await probe(netns, log)
        [(pid, program, accel, _)] = boots(log)
        assert (program, accel) == (expected, "kvm")
        assert exe(pid) == expected


@needs_both
async def test_user_networking_runs_the_full_qemu(state: Path, block: str) -> None:
    """User networking (which the reduced build lacks) under KVM: ``auto`` runs the full QEMU."""
    cfg = load(config_text(state, qemu_service(f"{block}.1", accel="auto")))
    async with running(cfg) as d:
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")
        inst = d.supervisor.services["uk"].instance
        assert inst is not None and inst.handle is not None and inst.handle.pid is not None
        assert inst.handle.binary == FULL_BINARY and exe(inst.handle.pid) == FULL_BINARY
        assert inst.handle.describe().endswith(f"{FULL_BINARY} kvm")  # in the status and repr


async def test_forced_reduced_build_without_kvm_is_a_clear_boot_failure(state: Path) -> None:
    """``binary`` forced to the reduced build, ``accel = "auto"`` and no usable KVM: the
    boot fails before anything is made, saying why and what to set."""
    cfg = load(config_text(state, qemu_service(
        "127.0.0.1", accel="auto", qemu=f'network = "bridge"\nbinary = "{REDUCED_BINARY}"')))
    backend = QemuBackend(state, list(cfg.services))
    backend._kvm = False  # as on a host whose /dev/kvm does not open
    with pytest.raises(BootFailed) as err:
        await backend.start(cfg.services[0], 1, None)
    message = str(err.value)
    assert "reduced build, which runs with KVM only" in message
    assert "/dev/kvm is not usable here" in message and 'binary = "auto"' in message
    assert not qemus(state)


def test_check_reports_the_reduced_build_forced_without_kvm(
    state: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``jitlaunch check`` says the same before anything runs; with KVM it has nothing to say
    about the program (when it is installed)."""
    from jitlaunch.backends import vm as settings
    from jitlaunch.checks import host_findings

    cfg = load(config_text(state, qemu_service(
        "127.0.0.1", accel="auto", qemu=f'network = "bridge"\nbinary = "{REDUCED_BINARY}"')))
    monkeypatch.setattr(settings, "kvm_usable", lambda: False)
    found = [(f.error, f.key, f.message) for f in host_findings(cfg, ports=False)
             if f.key == "qemu.binary"]
    assert found == [(True, "qemu.binary",
                      f"binary = {REDUCED_BINARY!r} is QEMU's reduced build, which runs with KVM "
                      'only (it has no TCG), and /dev/kvm is not usable here; set binary = "auto" '
                      'or "qemu-system-x86_64"')]
    if shutil.which(REDUCED_BINARY) is not None:
        monkeypatch.setattr(settings, "kvm_usable", lambda: True)
        assert not [f for f in host_findings(cfg, ports=False) if f.key == "qemu.binary"]


@needs_both
@needs_netns
@pytest.mark.parametrize(("first", "then"), [
    (FULL_BINARY, "auto"), (REDUCED_BINARY, FULL_BINARY),
])
async def test_a_state_saved_by_one_program_is_restored_by_the_other(
    state: Path, netns: list[str], first: str, then: str,
) -> None:
    """Full QEMU and its reduced build of the same version restore each other's saved
    states: saved by one daemon, restored by the next with the other program, serving."""
    saved = state / "saved" / "hello.state"
    conf = bridge_config(state, qemu=f'binary = "{first}"', extra='stop = "save"\nidle_timeout = "1s"')
    async with daemon(netns, conf, "first.log") as log:
        await probe(netns, log)
        await wait_until(lambda: "hello#1 saved" in log.read_text() and saved.exists(),
                         timeout=30)
        [(_, program, _, _)] = boots(log)
        assert program == first
    conf = bridge_config(state, qemu=f'binary = "{then}"', extra='stop = "save"\nidle_timeout = "10m"')
    async with daemon(netns, conf, "then.log") as log:
        await probe(netns, log)
        [(pid, program, accel, rest)] = boots(log)
        assert program != first and exe(pid) == program and accel == "kvm"
        assert rest == ", restoring" and not saved.exists()
        assert "discarding its saved state" not in log.read_text()


def _saved_by_qemu_1_0(state: Path) -> tuple[QemuBackend, ServiceConfig, Path]:
    """A backend for one TCG service with a saved state whose description says QEMU 1.0.0
    saved it (the image and settings match): the backend, the service, the state file."""
    cfg = load(config_text(state, qemu_service("127.0.0.1", accel="tcg")))
    svc = cfg.services[0]
    backend = QemuBackend(state, list(cfg.services))
    backend.image_ids[svc.settings.kernel] = image_id(svc.settings.kernel)
    saved = backend.saved_path(svc.name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_bytes(b"state")
    saved.with_suffix(".image").write_text(saved_meta(
        backend.image_ids[svc.settings.kernel], svc.settings, "tcg", "02:00:00:00:00:09",
        "QEMU emulator version 1.0.0"))
    return backend, svc, saved


async def test_a_state_saved_by_another_qemu_version_is_discarded_saying_so(
    state: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """After an upgrade of QEMU a saved state is not restored; the log says that the version
    is why (not that the image or the settings changed)."""
    import logging

    backend, svc, saved = _saved_by_qemu_1_0(state)

    class Launched(Exception):
        pass

    async def launch(*args: object, **kwargs: object) -> None:
        assert kwargs["incoming"] is None
        raise Launched

    monkeypatch.setattr(backend, "_launch", launch)
    with caplog.at_level(logging.INFO), pytest.raises(Launched):
        await backend.start(svc, 1, None)
    assert not saved.exists()
    assert "QEMU's version" in caplog.text, caplog.text


async def test_a_saved_state_is_kept_when_qemus_version_cannot_be_told(
    state: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``qemu --version`` failing once (a timeout on a loaded host) fails that boot and keeps
    the saved state: it is not discarded as if QEMU had changed."""
    backend, svc, saved = _saved_by_qemu_1_0(state)

    async def unknown(binary: str) -> str:
        return ""

    monkeypatch.setattr(backend, "qemu_version", unknown)
    with pytest.raises(BootFailed, match="the state is kept"):
        await backend.start(svc, 1, None)
    assert saved.exists() and saved.with_suffix(".image").exists()
    assert not qemus(state)
