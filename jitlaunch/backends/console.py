"""A sans-IO scanner of a VM's serial console, shared by the qemu and libvirt backends.

Bytes go in (:meth:`ConsoleScanner.feed`, in pieces of any size, one byte at a time
included) and events come out: :data:`READY` when a line starts with ``READY`` followed by
white space (the bundled unikernel's ``READY <ip>:<port>``), :data:`KVM_FAILURE` when a line
says KVM could not run the guest (QEMU prints ``KVM internal error`` or ``emulation
failure`` and pauses). The scanner also keeps the last lines for a failure's message
(:meth:`ConsoleScanner.last_lines`, :func:`last_words`). It does no I/O and keeps at most
``MAX_LINE`` bytes of an unfinished line.
"""

from __future__ import annotations

import os
import re
from collections import deque

READY = "ready"
KVM_FAILURE = "kvm-failure"

_READY = re.compile(rb"^READY\s")
_KVM_FAILURE = re.compile(rb"KVM internal error|emulation failure")
#: Console lines kept for a failure's message (QEMU's own error is usually the last one).
TAIL_LINES = 8
#: An unfinished line longer than this keeps only its end.
MAX_LINE = 4096
#: QEMU's error lines start with its program name (``qemu-system-x86_64: ...``).
_QEMU_SAYS = re.compile(r"^[\w./-]*qemu[\w.-]*: ")


class ConsoleScanner:
    """Turns console bytes into events; see the module's docstring."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._tail: deque[bytes] = deque(maxlen=TAIL_LINES)

    def __repr__(self) -> str:
        return f"<ConsoleScanner {len(self._tail)} lines kept, {len(self._line)} bytes pending>"

    def feed(self, data: bytes | bytearray) -> list[str]:
        """Scan ``data`` (the console's next bytes); return the events its complete lines
        raise, in order."""
        events = []
        self._line += data
        while (nl := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:nl])
            del self._line[: nl + 1]
            if line.strip():
                self._tail.append(line[:1024])
            if _READY.match(line):
                events.append(READY)
            elif _KVM_FAILURE.search(line):
                events.append(KVM_FAILURE)
        if len(self._line) > MAX_LINE:
            del self._line[:-MAX_LINE]
        return events

    def last_lines(self) -> list[bytes]:
        """The last lines seen, the unfinished one included."""
        return [*self._tail, bytes(self._line)]

    def said(self, pattern: re.Pattern[bytes]) -> bool:
        """Whether one of the last lines matches ``pattern``."""
        return any(pattern.search(line) for line in self.last_lines())


def last_words(lines: list[bytes], binary: str) -> str:
    """The cause to quote from the end of an instance's console: QEMU's own error lines
    (``qemu-system-x86_64: ...``) if there are any, else the last line; printable, bounded."""
    text = [" ".join(ln.decode(errors="replace").split()) for ln in lines]
    text = ["".join(c if c.isprintable() else "?" for c in t) for t in text if t]
    prog = os.path.basename(binary) + ":"
    own = [t for t in text if _QEMU_SAYS.match(t) or t.startswith(prog)]
    words = " / ".join(own[-2:] or text[-1:])
    # QEMU's messages end with the point (``prog: -option value: what is wrong``): a long
    # one keeps its start and its end.
    return words if len(words) <= 300 else f"{words[:95]} ... {words[-200:]}"
