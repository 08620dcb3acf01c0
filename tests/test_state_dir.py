"""The state directory against its other users, a full disk and a config file that hangs,
with real daemon processes (issue 16: 5, 7, 8).

* A state directory someone else owns or can write (or a subdirectory, or a directory
  above it) is refused at start, in one line, before anything in it is opened: the
  symlinks planted there (lock, logs, the rotation's temporary file, a saved state) point at
  files that stay exactly as they were. ``jitlaunch check`` says the same.
* In a safe directory, a symlink is never followed: a planted lock is refused; planted logs
  are moved aside and replaced by the rotation (see test_planted_log_symlinks_...).
* On a full disk (a tmpfs in a mount namespace of the daemon's own) the log cap empties a
  log it cannot copy, leaves no temporary file, and a boot still succeeds.
* A reload whose config is a FIFO is refused at once; one stuck reading (a hung mount) is
  bounded and cancelled by a shutdown, which the reload's answer says.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from jitlaunch import daemon as daemon_module

from .conftest import (
    ECHO_SERVER,
    PYTHON,
    config_text,
    load_config,
    query_udp,
    running,
    wait_until,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to nobody, "
                                "mount namespaces)")
NOBODY = 65534


def service(block: str, extra: str = "", command: str | None = None) -> str:
    return f"""
[[service]]
name = "svc"
front = ["{block}.1"]
ports = [7000]
idle_timeout = 60
{extra}
[service.process]
command = "{command or PYTHON + ' -c pass'}"
grace = "2s"
"""


def echo_command(tmp_path: Path) -> str:
    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    return f"{PYTHON} {script} {{address}} {{port}}"


def chatty_command(tmp_path: Path) -> str:
    """Listens (so it is ready), then writes 64 KiB to stdout, ten times."""
    script = tmp_path / "chatty.py"
    script.write_text(ECHO_SERVER.replace("s.listen()\n", "s.listen()\n"
                                          "for _ in range(10):\n"
                                          "    os.write(1, b'x' * 65536)\n"))
    return f"{PYTHON} {script} {{address}} {{port}}"


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int, int]]:
    """Contents, mtime and mode of each target, to see that nothing touched them."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths}


def secrets(tmp_path: Path, n: int = 4) -> list[Path]:
    """Files only root can read, the targets of the planted symlinks."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    out = []
    for i in range(n):
        p = secret / f"target{i}"
        p.write_bytes(f"root's file {i}\n".encode() * 10)
        p.chmod(0o600)
        out.append(p)
    # Older mtimes than any write of the test could give them.
    for p in out:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    return out


def plant(state: Path, targets: list[Path]) -> None:
    """The symlinks of the report: the lock, a log, the rotation's temporary file and a
    saved state."""
    for sub in ("logs", "saved"):
        if not (state / sub).exists():
            (state / sub).mkdir()
    links = [state / "jitlaunch.lock", state / "logs" / "svc.log",
             state / "logs" / "svc.log.1.tmp", state / "saved" / "svc.state"]
    for link, target in zip(links, targets, strict=True):
        link.symlink_to(target)


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([PYTHON, "-m", "jitlaunch.cli", *args], capture_stdout=True,
                                  capture_stderr=True, check=False)


def _unsafe(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A state directory that is unsafe as ``case`` says, and the text the refusal names."""
    state = tmp_path / "state"
    if case == "above others can write":
        above = tmp_path / "open"
        above.mkdir()
        above.chmod(0o777)  # not sticky: anyone may rename our directory away
        state = above / "state"
    state.mkdir()
    state.chmod(0o755)
    if case == "nobody's":
        os.chown(state, NOBODY, NOBODY)
        return state, f"{state} has owner uid {NOBODY}"
    if case == "others can write":
        state.chmod(0o777)
        return state, f"{state} has owner uid 0 (root), mode 0777"
    if case == "group can write":
        state.chmod(0o775)
        return state, f"{state} has owner uid 0 (root), mode 0775"
    if case == "logs nobody's":
        (state / "logs").mkdir()
        os.chown(state / "logs", NOBODY, NOBODY)
        return state, f"{state}/logs has owner uid {NOBODY}"
    if case == "logs a symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o755)
        (state / "logs").symlink_to(elsewhere)
        return state, f"{state}/logs is a symbolic link"
    assert case == "above others can write"
    return state, f"lies in {state.parent} (owner uid 0 (root), mode 0777)"


@needs_root
@pytest.mark.parametrize("case", ["nobody's", "others can write", "group can write",
                                  "logs nobody's", "logs a symlink", "above others can write"])
async def test_a_state_dir_others_can_write_is_refused_and_nothing_is_followed(
        tmp_path: Path, block: str, case: str) -> None:
    state, found = _unsafe(tmp_path, case)
    targets = secrets(tmp_path)
    plant(state, targets)
    before = snapshot(targets)
    conf = tmp_path / "jl.toml"
    conf.write_text(config_text(state, service(block, command=echo_command(tmp_path)),
                                top="instance_log_max = 10"))
    res = await cli("check", str(conf))
    assert res.returncode == 2
    assert found in res.stderr.decode() and "daemon.state_dir" in res.stderr.decode()

    proc = await trio.lowlevel.open_process(
        [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with trio.move_on_after(30):
            status = await proc.wait()
        assert proc.returncode is not None, "the daemon runs on an unsafe state directory"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(65536)).decode()
    await proc.stderr.aclose()
    assert status == 1, err
    errors = [line for line in err.splitlines() if line.startswith("jitlaunch: error:")]
    assert len(errors) == 1, err
    assert found in errors[0] and "must be" in errors[0] and "Traceback" not in err
    assert snapshot(targets) == before
    for target in targets:  # none of them was made readable to others either
        assert target.stat().st_mode & 0o777 == 0o600


async def test_a_planted_lock_symlink_is_refused(tmp_path: Path, block: str) -> None:
    """Even in a safe directory the lock is opened without following a symlink: the daemon
    refuses to start, naming it, and its target is untouched."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    [target] = secrets(tmp_path, 1)
    (state / "jitlaunch.lock").symlink_to(target)
    before = snapshot([target])
    conf = tmp_path / "jl.toml"
    conf.write_text(config_text(state, service(block)))
    res = await cli("run", "--config", str(conf))
    assert res.returncode == 1
    err = res.stderr.decode()
    assert f"{state}/jitlaunch.lock is a symbolic link" in err and "Traceback" not in err
    assert snapshot([target]) == before


async def test_planted_log_symlinks_in_a_safe_dir_are_replaced_not_followed(
        tmp_path: Path, block: str) -> None:
    """Links planted as a service's log and as the rotation's temporary file (someone who
    could once write the directory, or its owner by mistake): the boot moves the log link
    aside (a rename: the link itself moves) and writes a new file; the rotation creates its
    temporary file afresh and renames it over the old link. The targets never change, and
    the links are gone once the log has rotated. (Moved aside rather than refused: a log
    is the daemon's to rotate, a rename never touches what a link points to, and a stale
    link should not stop a service booting.)"""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    log_target, tmp_target = secrets(tmp_path, 2)
    (state / "logs" / "svc.log").symlink_to(log_target)
    (state / "logs" / "svc.log.1.tmp").symlink_to(tmp_target)
    before = snapshot([log_target, tmp_target])
    cfg = load_config_text(tmp_path, config_text(
        state, service(block, command=chatty_command(tmp_path)),
        top="instance_log_max = 100000"))
    async with running(cfg) as d:
        ep = d.dns_endpoints[0]
        await query_udp((ep.host, ep.port), "svc.jit.test")
        log = state / "logs" / "svc.log"
        await wait_until(lambda: (state / "logs" / "svc.log.1").is_file()
                         and not (state / "logs" / "svc.log.1").is_symlink(), timeout=30)
        assert not (state / "logs" / "svc.log.1.tmp").exists()
        assert log.is_file() and not log.is_symlink()
        assert b"x" * 1000 in (state / "logs" / "svc.log.1").read_bytes() + log.read_bytes()
        assert snapshot([log_target, tmp_target]) == before


def load_config_text(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "jl.toml"
    path.write_text(text)
    return load_config(path)


# ---- a full disk ------------------------------------------------------------------------


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"f" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        with pytest.raises(OSError):  # not even one byte more
            os.write(fd, b"f")
    finally:
        os.close(fd)


class FullDiskDaemon:
    """A daemon whose state directory is a 4 MiB tmpfs, mounted in a mount namespace of its
    own (the machine's mounts are never touched), seen from here through
    /proc/<pid>/root."""

    def __init__(self, tmp_path: Path, conf: Path, state: Path) -> None:
        self.tmp_path = tmp_path
        self.conf = conf
        self.state = state
        self.log = tmp_path / "daemon.log"
        self.proc: trio.Process | None = None

    async def __aenter__(self) -> FullDiskDaemon:
        self.state.mkdir(mode=0o755)
        with open(self.log, "ab") as logfile:
            self.proc = await trio.lowlevel.open_process(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount -t tmpfs -o size=4m,mode=0755 jl-test "$1" && shift && exec "$@"',
                 "sh", str(self.state), PYTHON, "-m", "jitlaunch.cli", "run", "--config",
                 str(self.conf)], stderr=logfile, stdout=logfile)
        await wait_until(lambda: "serving 1 service" in self.text()
                         or self.proc is None or self.proc.poll() is not None, timeout=30)
        assert "serving 1 service" in self.text(), self.text()
        return self

    @property
    def root(self) -> Path:
        """The state directory as the daemon sees it (the tmpfs)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root{self.state}")

    def text(self) -> str:
        return self.log.read_text()

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError("the daemon did not stop on SIGTERM")
        assert exc[0] is not None or self.proc.returncode == 0, self.text()


def _has_unshare() -> bool:
    return shutil.which("unshare") is not None and os.geteuid() == 0


needs_mount_ns = pytest.mark.skipif(not _has_unshare(), reason="needs root and unshare(1) "
                                    "for a tmpfs in a private mount namespace")


@needs_mount_ns
async def test_a_log_that_cannot_be_copied_on_a_full_disk_is_emptied_in_place(
        tmp_path: Path, block: str) -> None:
    state = tmp_path / "state"
    conf = tmp_path / "jl.toml"
    conf.write_text(config_text(state, service(block), top="instance_log_max = 1048576"))
    async with FullDiskDaemon(tmp_path, conf, state) as d:
        root = d.root
        part = root / "big.part"
        part.write_bytes(b"l" * (2 << 20))  # a log of 2 MiB, over the cap ...
        _fill(root / "filler")  # ... on a disk with no room for its copy
        os.rename(part, root / "logs" / "big.log")
        await wait_until(lambda: (root / "logs" / "big.log").stat().st_size == 0,
                         what="the log emptied")
        assert not (root / "logs" / "big.log.1.tmp").exists()
        assert not (root / "logs" / "big.log.1").exists()
        assert d.text().count("no room to keep big.log as big.log.1") == 1
        assert "Traceback" not in d.text()


@needs_mount_ns
async def test_a_boot_on_a_full_disk_succeeds_and_says_its_output_is_dropped(
        tmp_path: Path, block: str) -> None:
    state = tmp_path / "state"
    conf = tmp_path / "jl.toml"
    conf.write_text(config_text(state, service(block, command=echo_command(tmp_path))))
    async with FullDiskDaemon(tmp_path, conf, state) as d:
        _fill(d.root / "filler")
        stream = await trio.open_tcp_stream(f"{block}.1", 7000)
        async with stream:
            await stream.send_all(b"ping")
            with trio.fail_after(30):
                got = b""
                while len(got) < 4:
                    chunk = await stream.receive_some(4)
                    assert chunk, f"the connection was closed: {d.text()}"
                    got += chunk
        assert got == b"ping"
        assert "cannot open the instance log" not in d.text()
        assert d.text().count("output is being dropped") == 1
        assert (d.root / "logs" / "svc.log").stat().st_size == 0


# ---- a reload that cannot read its file ------------------------------------------------


async def test_a_fifo_config_is_refused_at_once_and_sigterm_ends_the_daemon(
        tmp_path: Path, block: str) -> None:
    """The config file replaced by a FIFO: SIGHUP and `jitlaunch reload` are refused at
    once, saying why (they blocked forever, and the daemon with them); SIGTERM ends the
    daemon within its drain timeout and stop grace (2 s each here)."""
    state = tmp_path / "state"
    conf = tmp_path / "jl.toml"
    conf.write_text(config_text(state, service(block, command=echo_command(tmp_path))))
    log = tmp_path / "daemon.log"
    with open(log, "ab") as logfile:
        proc = await trio.lowlevel.open_process(
            [PYTHON, "-m", "jitlaunch.cli", "run", "--config", str(conf)], stderr=logfile)
    try:
        await wait_until(lambda: "serving 1 service" in log.read_text(), timeout=30)
        stream = await trio.open_tcp_stream(f"{block}.1", 7000)  # an instance to stop
        await stream.send_all(b"x")
        with trio.fail_after(30):
            assert await stream.receive_some(1) == b"x"
        conf.unlink()
        os.mkfifo(conf)
        proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "is a FIFO" in log.read_text())
        res = None
        with trio.move_on_after(10):
            res = await cli("reload", "--socket", str(state / "control.sock"))
        assert res is not None, "jitlaunch reload hangs"
        assert res.returncode == 1
        assert "cannot read the file: it is a FIFO" in res.stderr.decode()
        await stream.aclose()
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(2 + 2 + 5):
            await proc.wait()
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.returncode is None:
            with open(conf, "wb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) \
                    if conf.is_fifo() else open(os.devnull, "wb"):
                pass  # lets a reader blocked in open() go
            proc.kill()
            await proc.wait()


@pytest.fixture
def hung_read(monkeypatch: pytest.MonkeyPatch) -> Any:
    """load_config as on a hung mount: it blocks until the test ends."""
    release = threading.Event()

    def hung(*args: object, **kwargs: object) -> None:
        release.wait(30)
        raise AssertionError("released")

    monkeypatch.setattr(daemon_module, "load_config", hung)
    yield
    release.set()


async def test_a_reload_stuck_reading_is_cancelled_by_shutdown(
        tmp_path: Path, block: str, hung_read: Any) -> None:
    cfg = load_config_text(tmp_path, config_text(tmp_path / "state", service(block)))
    results: list[daemon_module.ReloadResult] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with running(cfg) as d:
                async def reload() -> None:
                    results.append(await d.reload("test"))

                nursery.start_soon(reload)
                await wait_until(lambda: d._reload_lock.locked())
            # running() stops the daemon on the way out: the reload is cancelled
    assert len(results) == 1 and not results[0].ok
    assert results[0].message.startswith("cancelled: the daemon is stopping")


async def test_a_reload_stuck_reading_is_bounded(
        tmp_path: Path, block: str, hung_read: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "RELOAD_READ_TIMEOUT", 0.5, raising=False)
    cfg = load_config_text(tmp_path, config_text(tmp_path / "state", service(block)))
    async with running(cfg) as d:
        with trio.fail_after(10):
            result = await d.reload("test")
        assert not result.ok and "took over 0.5 s" in result.message
        with trio.fail_after(10):  # and the next one is not held up by the first
            result = await d.reload("test")
        assert not result.ok and "took over 0.5 s" in result.message
