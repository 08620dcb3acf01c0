"""One libvirt connection, used from trio: blocking calls in worker threads through a
limiter, lifecycle events and the connection's loss delivered into trio with its token.

libvirt's default event loop is registered once per process, before any connection is
opened (libvirt requires that order), and runs in a daemon thread. A lost connection (the
close callback, or a call failing on a dead socket) is reopened on next use with a short
back-off; after each reopen the owner's ``on_reconnect`` resynchronises (``listAllDomains``)
without touching running domains. Every libvirtError leaving :meth:`Connection.call` is a
BootFailed naming what failed, with libvirt's message kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from ...errors import BootFailed

log = logging.getLogger("jitlaunch.libvirt")

T = TypeVar("T")
#: Keepalive: a probe every 5 s, the connection declared dead after 3 unanswered ones.
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
#: The longest wait before reopening a lost connection (doubling from 0.1 s).
RECONNECT_MAX = 2.0
#: libvirt error codes (virterror.h) that mean "that domain is gone" or "not running".
ERR_NO_DOMAIN, ERR_OPERATION_INVALID = 42, 55

_event_loop_lock = threading.Lock()
_event_loop_started = False


def import_libvirt() -> Any:
    """The libvirt module with its event loop running; BootFailed if it is not installed."""
    global _event_loop_started
    try:
        import libvirt
    except ImportError as exc:
        raise BootFailed("the libvirt backend needs libvirt-python "
                         "(pip install 'jitlaunch[libvirt]')") from exc
    with _event_loop_lock:
        if not _event_loop_started:
            libvirt.virEventRegisterDefaultImpl()
            # libvirt prints every error to stderr unless told otherwise; ours are raised.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            threading.Thread(target=_run_events, args=(libvirt,), daemon=True,
                             name="libvirt-events").start()
            _event_loop_started = True
    return libvirt


def _run_events(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if get is not None else None
    return str(text or exc)


def error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    return get() if get is not None else None


class Connection:
    """The connection to one URI. ``on_event(name, event, detail)`` is called on the trio
    loop for every domain lifecycle event, ``on_reconnect()`` after the connection has been
    reopened."""

    def __init__(
        self, uri: str, *, limiter: trio.CapacityLimiter,
        on_event: Callable[[str, int, int], None], on_reconnect: Callable[[], None],
    ) -> None:
        self.uri = uri
        self._limiter = limiter
        self._on_event = on_event
        self._on_reconnect = on_reconnect
        self._conn: Any = None
        self._lock = trio.Lock()
        self._opened = 0
        self._failures = 0
        self._token = trio.lowlevel.current_trio_token()
        #: Set when libvirt closed the connection (the owner reopens it: :meth:`reopen`).
        self.lost = trio.Event()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<libvirt.Connection {self.uri} {state}, opened {self._opened} times>"

    async def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` in a worker thread. A call failing because the connection died
        is retried once on a new one. BootFailed("``what``: libvirt's message") otherwise."""
        for attempt in (1, 2):
            conn = await self._get(what)
            try:
                return await trio.to_thread.run_sync(fn, conn, limiter=self._limiter)
            except Exception as exc:
                if not _is_libvirt_error(exc):
                    raise
                if attempt == 1 and not await self._alive(conn):
                    log.warning("libvirt connection to %s lost (%s); reconnecting", self.uri,
                                message(exc))
                    self._drop(conn)
                    self._failures = 1
                    continue
                raise BootFailed(f"{what}: {message(exc)}") from exc
        raise AssertionError("unreachable")

    async def reopen(self) -> None:
        """Reopen a lost connection, retrying with back-off until it works (cancellable)."""
        self.lost = trio.Event()
        while True:
            try:
                await self._get("reconnect")
                return
            except BootFailed as exc:
                log.warning("%s", exc)

    async def _alive(self, conn: Any) -> bool:
        try:
            return bool(await trio.to_thread.run_sync(conn.isAlive, limiter=self._limiter))
        except Exception:
            return False

    def _drop(self, conn: Any) -> None:
        if self._conn is conn:
            self._conn = None

    async def _get(self, what: str) -> Any:
        async with self._lock:
            if self._conn is not None:
                return self._conn
            if self._failures:
                await trio.sleep(min(RECONNECT_MAX, 0.1 * 2 ** (self._failures - 1)))
            try:
                conn = await trio.to_thread.run_sync(self._open, limiter=self._limiter)
            except Exception as exc:
                self._failures += 1
                if not _is_libvirt_error(exc):
                    raise
                raise BootFailed(f"{what}: cannot connect to libvirt at {self.uri}: "
                                 f"{message(exc)}") from exc
            self._failures = 0
            self._conn = conn
            self._opened += 1
            if self._opened > 1:
                log.info("libvirt connection to %s reopened", self.uri)
                self._on_reconnect()
            return conn

    def _open(self) -> Any:
        """In a worker thread: open, keepalive, event and close callbacks."""
        libvirt = import_libvirt()
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        except libvirt.libvirtError:
            pass  # local drivers (test:///) have no keepalive
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event_cb, None)
        try:
            conn.registerCloseCallback(self._close_cb, None)
        except libvirt.libvirtError:
            pass  # neither a close callback
        return conn

    # The callbacks run in libvirt's event thread: hand over to trio and return at once.

    def _event_cb(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._soon(self._on_event, dom.name(), event, detail)

    def _close_cb(self, conn: Any, reason: int, _opaque: Any) -> None:
        self._soon(self._closed, conn, reason)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the daemon is gone

    def _closed(self, conn: Any, reason: int) -> None:
        if self._conn is conn:
            log.warning("libvirt connection to %s closed (reason %d); reconnecting on next use",
                        self.uri, reason)
            self._conn = None
            self._failures = 1
            self.lost.set()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
                except Exception as exc:
                    log.debug("closing the libvirt connection: %s", message(exc))


def _is_libvirt_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "libvirtError"
