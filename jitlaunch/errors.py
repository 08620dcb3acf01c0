"""jitlaunch's own exception hierarchy, grouped by what the caller can do about it.

Errors from the outside world (OSError, libvirt, QMP, dnslib) are translated into these at
the edge where they occur, with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations


class JitlaunchError(Exception):
    """Base class of every error jitlaunch raises on purpose."""


class ConfigError(JitlaunchError):
    """The configuration is invalid. The message names the file, the service and the key.

    The CLI prints the message and exits with status 2; it never shows a traceback.
    """

    def __init__(
        self, path: str, message: str, *, service: str | None = None, key: str | None = None
    ) -> None:
        self.path = path
        self.service = service
        self.key = key
        self.reason = message
        where = path
        if service is not None:
            where += f": service {service!r}"
        if key is not None:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class BackendUnavailable(JitlaunchError):
    """A backend cannot be used on this host at all (missing binary, library or device)."""


class BootFailed(JitlaunchError):
    """An instance did not become ready: its process exited, it could not be started, or
    it did not answer within the boot timeout (see :class:`BootTimeout`)."""


class BootTimeout(BootFailed):
    """An instance did not become ready within its service's boot timeout."""


class InBackoff(BootFailed):
    """The service failed recently and is waiting before its next boot attempt."""


class AdmissionRefused(BootFailed):
    """A start found no room on the host: the admission queue was full, the start waited
    there longer than ``queue_timeout``, or it can never fit the host budget."""


class StateDirInUse(JitlaunchError):
    """Another daemon holds the lock on the state directory (one daemon per directory)."""


class StateDirUnsafe(JitlaunchError):
    """The state directory (or a directory above it, or one it holds) is not the daemon
    user's alone: someone else could plant files in it. The message says what is required."""


class IllegalTransition(JitlaunchError):
    """An instance was asked to make a state transition that its state machine forbids."""


class ProtocolError(JitlaunchError):
    """A peer sent bytes that do not follow the protocol (DNS, QMP, ...)."""


class ListenError(JitlaunchError):
    """A socket the daemon must listen on cannot be bound (address in use, no permission)."""
