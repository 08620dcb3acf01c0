"""The small async interface every backend implements.

A backend turns a service's configuration into running instances. The supervisor owns the
state machine and the timing; the backend only does what it is asked and reports what happens.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import trio

from ..config import Endpoint, ServiceConfig
from ..errors import BootFailed, ProtocolError
from ..statedir import InstanceLog, ensure_subdir

#: How often the TCP readiness probe tries to connect: a ready instance is noticed within this.
PROBE_INTERVAL = 0.005


class Handle(abc.ABC):
    """One instance as its backend sees it.

    Attributes:
        address: the instance's own address if clients can reach it directly (DNS hands it
            over once the instance is ready), else None: the front address stays in the path.
        pid: the host process id, for logs and the repr, or None.
        wake: how :meth:`Backend.start` got it, set by the backend on each start: ``cold``
            (a fresh boot), ``pool`` (a warm pool member), ``resume`` (a paused instance) or
            ``restore`` (from saved state). For the metrics' wake-up histogram.
    """

    address: str | None = None
    pid: int | None = None
    wake: str = "cold"

    @abc.abstractmethod
    def endpoint(self, port: int) -> tuple[str, int]:
        """Where the proxy connects for front port ``port``."""

    @abc.abstractmethod
    async def wait_ready(self) -> None:
        """Return once the instance accepts connections. Never returns if it doesn't; the
        supervisor bounds it with the boot timeout and races it with :meth:`wait_exited`.
        May raise BootFailed with a precise cause (e.g. a KVM emulation failure)."""

    @abc.abstractmethod
    async def wait_exited(self) -> str:
        """Return, at once, when the instance has gone away; the result says how
        (``"exited with status 1"``). Cancellable."""

    @abc.abstractmethod
    async def stop(self, mode: str, grace: float) -> bool:
        """Release the instance in ``mode`` (one of the backend's stop modes), waiting at most
        ``grace`` seconds for a polite stop before forcing it. Returns True when the
        instance's state was kept (pause, save) and a later :meth:`Backend.start` with this
        handle resumes it. Called shielded; must finish in bounded time and release
        everything (processes, files, addresses) when it returns False. ``destroy`` with a
        ``grace`` of 0 (a dead or hung instance) kills at once without asking politely."""

    def alive(self) -> bool:
        """Cheap and synchronous: True while the instance's process exists and is not a
        zombie. A dead instance must never be handed out (DNS, the proxy), even in the few
        milliseconds before :meth:`wait_exited` has noticed. The default looks at
        :attr:`pid` in /proc (True when there is no pid to look at)."""
        return self.pid is None or _running(self.pid)

    async def probe(self, timeout: float) -> str | None:  # noqa: ASYNC109 - a timeout is a reason
        """A health probe of a ready instance: None if it is healthy, else a short reason
        (``"connect to 127.0.0.1:8080 refused"``). Must return within about ``timeout``
        seconds (the caller bounds it too) and never raise for an unhealthy instance: every
        failure is a reason. The default knows nothing to probe and says healthy."""
        return None

    #: How far :meth:`traffic` may move between two samples a second apart without a client
    #: (a guest's ARP answers on its tap), and how far one :meth:`probe` moves it.
    traffic_noise: int = 0
    probe_traffic: int = 0

    async def traffic(self) -> int | None:
        """A counter that grows while clients use the instance directly, at its own
        :attr:`address`, where the proxy does not see them: packets the guest sent on its
        tap, connections to the process's address. Only its changes matter (see
        jitlaunch/lifecycle/activity.py); a health probe may move it by :attr:`probe_traffic`
        at most. Cheap: called at most once a second while a handed-over instance waits to go
        idle. None: this instance has no such counter (it is not asked again). Raises
        OSError (or any error) when it cannot be read now: counted as unknown, logged once,
        asked again later. The default has no counter."""
        return None

    def discard_restore(self) -> str | None:
        """After a boot that failed while it restored a saved state: delete that state (it
        cannot be restored: truncated, corrupt, from another program), and return what to
        log (the state's path and the program's own words); None when it was not a restore.
        The caller then boots the instance afresh."""
        return None

    def describe(self) -> str:
        """A short description for logs and reprs: ``pid=4242 127.77.1.2``."""
        parts = []
        if self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.address:
            parts.append(self.address)
        return " ".join(parts)


class Backend(abc.ABC):
    """A way to run instances (process, qemu, libvirt). Chosen by name in the config."""

    name: str = "?"

    @abc.abstractmethod
    async def start(self, service: ServiceConfig, number: int, saved: Handle | None) -> Handle:
        """Launch instance ``number`` of ``service`` and return at once, without waiting for
        readiness. ``saved`` is the handle of a paused or saved instance to resume.
        Raises BootFailed when it cannot even be launched."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (cleaning up after an earlier run, keeping a warm pool). Runs for
        the daemon's lifetime; reports started once the backend can take :meth:`start`."""
        task_status.started()
        await trio.sleep_forever()

    def status_lines(self) -> list[str]:
        """Lines about instances the backend holds beyond the supervisor's (a warm pool), for
        the daemon's status report; each names its processes as ``pid=N``."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release whatever the backend holds beyond its instances (called shielded)."""


@contextlib.contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Translate the outside world's errors escaping a backend call into BootFailed, with
    ``what`` failed as the message's start and the original as ``__cause__``: QMP and other
    protocol errors, OSError, and a trio timeout inside the backend (``trio.TooSlowError``).
    BootFailed passes as it is; anything else is a bug and passes too (the supervisor logs
    it with its traceback). Cancellation is never touched."""
    try:
        yield
    except BootFailed:
        raise
    except ProtocolError as exc:
        raise BootFailed(f"{what}: {exc}") from exc
    except OSError as exc:
        raise BootFailed(f"{what}: {exc.strerror or exc}") from exc
    except trio.TooSlowError as exc:
        raise BootFailed(f"{what}: timed out") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may take it before we do)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Block (in a worker thread) until every pid has exited or ``timeout`` passes. A zombie
    counts as gone: a killed orphan has let go of its ports and taps and only waits for init
    to reap it."""
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"


def open_instance_log(log_dir: Path, service: str, number: int, argv: list[str]) -> IO[bytes]:
    """The per-service log an instance writes to; the previous instance's is kept as .log.1
    (renamed: whatever the entry was, nothing it points to is touched). Opened as the state
    directory's files are (statedir.py: NotOurs for a planted one); writing to it never
    fails (:class:`InstanceLog`). OSError if it cannot be opened."""
    ensure_subdir(log_dir)
    path = log_dir / f"{service}.log"
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, path.with_suffix(".log.1"))
    f = InstanceLog(path)
    f.write(f"# jitlaunch: {service}#{number}: {shlex.join(argv)}\n".encode())
    return f


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` in /proc (``R``, ``S``, ``T`` stopped, ``Z``), or None
    if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


async def connect_check(host: str, port: int, timeout: float) -> str | None:  # noqa: ASYNC109
    """One TCP connect to ``host:port`` bounded by ``timeout``: None if it was accepted,
    else why not. For health probes; never raises for a failed connect."""
    where = Endpoint(host, port)
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    with trio.move_on_after(timeout):
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except OSError as exc:
            return f"connect to {where} failed: {exc.strerror or exc}"
        finally:
            sock.close()
        return None
    return f"connect to {where} timed out after {timeout:g} s"


async def probe_tcp(host: str, port: int, interval: float = PROBE_INTERVAL) -> None:
    """Return once a TCP connection to ``host:port`` succeeds; poll every ``interval``."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    while True:
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT):
                raise
        else:
            return
        finally:
            sock.close()
        await trio.sleep(interval)
