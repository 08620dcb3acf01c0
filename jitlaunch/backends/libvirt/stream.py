"""A domain's serial console read through libvirt (``virDomainOpenConsole``), for hosts whose
files we cannot read: a remote URI's console file would be on the other host.

The domain's serial is a pty on the libvirt host; libvirtd opens it and relays it over the
connection as a ``virStream``. The stream is non-blocking and read in libvirt's event thread
(:mod:`.conn` runs it): its callback reads what is there, appends it to the instance's local
log (``O_APPEND``, so the instance-log cap's copy-truncate applies as to any log) and hands
the bytes to trio with the trio token; the trio loop never blocks and no worker thread is
held for a console's lifetime. The stream ends (``on_end`` with the reason, once) when the
domain stops, when libvirtd closes the connection, or when :meth:`ConsoleStream.close` is
called; none of these is an error of the daemon.

QEMU drops what the guest writes to a pty that nobody has open, so the backend creates (or
restores) the domain paused, opens its console, and only then resumes it: no byte is lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ...statedir import open_private

log = logging.getLogger("jitlaunch.libvirt")

#: The most read from the stream in one call.
CHUNK = 1 << 16


class ConsoleStream:
    """One open console. ``on_data(bytes)`` and ``on_end(reason)`` are called on the trio
    loop (through ``token``), in the order the bytes came; ``on_end`` at most once."""

    def __init__(self, name: str, log_path: Path, token: trio.lowlevel.TrioToken,
                 on_data: Callable[[bytes], None], on_end: Callable[[str], None]) -> None:
        self.name = name
        self.log_path = log_path
        self._token = token
        self._on_data = on_data
        self._on_end = on_end
        self._lock = threading.Lock()
        self._stream: Any = None
        self._fd = -1
        self.received = 0
        self.ended: str | None = None

    def __repr__(self) -> str:
        state = f"ended: {self.ended}" if self.ended else "open" if self._stream else "new"
        return f"<ConsoleStream {self.name} {state}, {self.received} bytes>"

    def open(self, libvirt: Any, conn: Any, dom: Any) -> None:
        """In a worker thread: open the log and the console of ``dom`` on ``conn`` (taking it
        over from any other client, ``VIR_DOMAIN_CONSOLE_FORCE``). libvirtError or OSError
        if it cannot be opened (then nothing is left open); nothing is left open either if
        :meth:`close` came meanwhile."""
        fd = open_private(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            if self.ended is not None:  # closed already: take the console from no one
                raise _ClosedMeanwhile
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
                with self._lock:
                    if self.ended is not None:  # closed meanwhile (a destroy, a newer open)
                        raise _ClosedMeanwhile
                    self._stream, self._fd = stream, fd
                    stream.eventAddCallback(
                        libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                        | libvirt.VIR_STREAM_EVENT_HANGUP, self._readable, libvirt)
            except BaseException:
                with self._lock:
                    self._stream, self._fd = None, -1
                _quietly(stream.abort)
                raise
        except _ClosedMeanwhile:
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise

    def _readable(self, stream: Any, _events: int, libvirt: Any) -> None:
        """In libvirt's event thread: read everything there is; end on EOF or an error."""
        ended = None
        with self._lock:
            while stream is self._stream:  # not closed meanwhile
                try:
                    data = stream.recv(CHUNK)
                except libvirt.libvirtError as exc:
                    ended = str(exc.get_error_message() or exc)
                    break
                if data == -2:  # nothing more for now
                    break
                if not data:
                    ended = "the console closed"
                    break
                self.received += len(data)
                try:
                    os.write(self._fd, data)
                except OSError as exc:  # a full disk must not cost the READY line
                    log.debug("%s: writing the console log: %s", self.name, exc)
                self._soon(self._on_data, data)
        if ended is not None:
            self._end(ended)

    def close(self) -> None:
        """Close the console (any thread; it may block briefly on a remote connection).
        Idempotent."""
        self._end("closed by jitlaunch")

    def _end(self, reason: str) -> None:
        """Release the stream and the log; report ``reason`` if it is the first end. The
        libvirt calls run outside the lock: a remote stream's abort is an RPC."""
        with self._lock:
            stream, self._stream = self._stream, None
            fd, self._fd = self._fd, -1
            first = self.ended is None
            if first:
                self.ended = reason
        if stream is not None:
            _quietly(stream.eventRemoveCallback)
            _quietly(stream.abort)
        if fd >= 0:
            os.close(fd)
        if first:
            self._soon(self._on_end, reason)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # the daemon is gone


class _ClosedMeanwhile(Exception):
    """The stream was closed while :meth:`ConsoleStream.open` opened it."""


def _quietly(fn: Callable[[], Any]) -> None:
    """libvirt calls on a stream that may be dead already (the domain or connection gone)."""
    try:
        fn()
    except Exception as exc:
        log.debug("console stream: %s", exc)
