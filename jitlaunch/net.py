"""Listening sockets and the one accept loop every stream listener uses.

DNS over TCP, the proxy's fronts, the metrics endpoint and the control socket all serve
through :func:`serve`. Its contract, which each of them relies on:

* It accepts until cancelled, or until the listener is closed under it (a reload that drops a
  front): then it returns.
* A failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM, or any other OSError) never ends it: it is
  counted by ``on_accept_error``, logged once per burst through the caller's rate-limited log,
  and the loop pauses :data:`ACCEPT_PAUSE` seconds before the next accept, so a descriptor
  shortage cannot spin the event loop.
* Each accepted stream is offered to ``admit`` (synchronous, no I/O): it returns a ticket to
  serve the connection, or None to refuse it (``admit`` has counted and logged the refusal; the
  loop closes the socket at once); an ``admit`` that raises refuses that connection, logged.
  This is where the caps live (:mod:`jitlaunch.slots`: connections per source prefix and in
  all, counted once per listener).
* An admitted connection runs ``handler(stream, ticket)`` in a task of its own in
  ``handlers`` (a nursery that may outlive the loop, so that closing a listener does not cut
  its open connections). Whatever the handler raises (but Cancelled) stays in that task:
  ``on_failure(ticket, exc)`` counts and logs it. Afterwards, on every path, the ticket is
  released and the stream is closed.

Listening: :func:`listen_tcp` binds one TCP listener and translates a failure into a
:class:`~jitlaunch.errors.ListenError` that names the address; :func:`bound_endpoint` says
where a listener really is (the port when 0 was asked for).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from .config import Endpoint
from .errors import ListenError
from .logutil import LimitedLog

#: After a failed accept, wait this long before the next one.
ACCEPT_PAUSE = 0.1

#: The accept (and socket) errors that mean "no descriptor or buffer left".
FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Ticket(Protocol):
    """What ``admit`` hands a connection: released once its handler has ended."""

    def release(self) -> None: ...


T = TypeVar("T", bound=Ticket)


def fd_shortage(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps, or a member of its group) says we ran out of
    descriptors or socket buffers."""
    if isinstance(exc, BaseExceptionGroup):
        return any(fd_shortage(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.errno in FD_ERRNOS:
        return True
    return exc.__cause__ is not None and fd_shortage(exc.__cause__)


async def serve(
    listener: trio.SocketListener,
    admit: Callable[[trio.SocketStream], T | None],
    handler: Callable[[trio.SocketStream, T], Awaitable[None]],
    *,
    what: str,
    log: LimitedLog,
    on_failure: Callable[[T, Exception], None],
    on_accept_error: Callable[[OSError], None] | None = None,
    handlers: trio.Nursery | None = None,
) -> None:
    """Accept on ``listener`` until cancelled or closed; see the module docstring.

    ``what`` names the listener in the log line of a failed accept ("proxy for hello").
    Without ``handlers``, connections run in a nursery of the loop's own, and cancelling the
    loop ends them too.
    """
    async with _nursery_or(handlers) as nursery:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # the listener was closed under us (a reload dropped it)
            except OSError as exc:
                if on_accept_error is not None:
                    on_accept_error(exc)
                log.warning(f"accept:{what}", "%s: accept failed: %s; pausing %g s",
                            what, exc, ACCEPT_PAUSE)
                await trio.sleep(ACCEPT_PAUSE)
                continue
            try:
                ticket = admit(stream)
            except Exception as exc:  # a bug: it must cost this connection only
                log.error(f"admit:{what}", "%s: admitting a connection failed: %r", what, exc,
                          exc_info=exc)
                ticket = None
            if ticket is None:
                stream.socket.close()
                continue
            nursery.start_soon(_run, stream, ticket, handler, on_failure)


@contextlib.asynccontextmanager
async def _nursery_or(given: trio.Nursery | None) -> AsyncIterator[trio.Nursery]:
    if given is not None:
        yield given
    else:
        async with trio.open_nursery() as nursery:
            yield nursery


async def _run(
    stream: trio.SocketStream,
    ticket: T,
    handler: Callable[[trio.SocketStream, T], Awaitable[None]],
    on_failure: Callable[[T, Exception], None],
) -> None:
    try:
        await handler(stream, ticket)
    except Exception as exc:
        on_failure(ticket, exc)
    finally:
        ticket.release()
        stream.socket.close()  # (aclose_forcefully would cost two checkpoints per connection)


def listen_error(what: str, host: str, port: int, exc: OSError) -> ListenError:
    """A ListenError for a failed bind, with a hint for the usual causes."""
    hints = {
        errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        errno.EADDRINUSE: " (something else is listening there)",
        errno.EADDRNOTAVAIL: " (no interface has this address)",
    }
    where = Endpoint(host, port)
    return ListenError(
        f"cannot listen for {what} on {where}: {exc.strerror or exc}{hints.get(exc.errno or 0, '')}"
    )


def peer_host(stream: trio.SocketStream) -> str | None:
    """The address the connection comes from, or None if it was reset before we looked."""
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return None


async def listen_tcp(host: str, port: int, *, what: str, backlog: int = 1024) -> trio.SocketListener:
    """A TCP listener bound to ``host``:``port`` (IPv6 only for an IPv6 address, address
    reuse on). Raises ListenError naming ``what`` and the address (EMFILE included, so that a
    reload fails cleanly rather than letting the error escape). A cancel during the bind
    closes the socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise listen_error(what, host, port, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise listen_error(what, host, port, exc) from exc
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_endpoint(listener: trio.SocketListener) -> Endpoint:
    """Where ``listener`` is bound (the real port when 0 was asked for)."""
    host, port = listener.socket.getsockname()[:2]
    return Endpoint(host, port)


__all__ = ["ACCEPT_PAUSE", "FD_ERRNOS", "Ticket", "bound_endpoint", "fd_shortage",
           "listen_error", "listen_tcp", "peer_host", "serve"]
