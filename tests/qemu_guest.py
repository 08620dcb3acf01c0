"""Boot images/build/hello.elf under QEMU microvm and talk to it (helpers for test_unikernel.py).

Everything here waits with deadlines (no bare sleeps) and cleans up after itself: the QEMU
process is terminated (then killed), its pipes are closed and its reader thread joined.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
IMAGE = IMAGES / "build" / "hello.elf"
QEMU = "qemu-system-x86_64"

_build_lock = threading.Lock()
_built = False


def ensure_image() -> Path:
    """Build the image once per session if it is missing (a fresh clone)."""
    global _built
    with _build_lock:
        if not IMAGE.exists() and not _built:
            subprocess.run(["make", "-C", str(IMAGES)], check=True, stdout=subprocess.DEVNULL)
            _built = True
    return IMAGE


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: microvm without ACPI and legacy devices: virtio interrupts then go to the first IOAPIC
#: (GSI 5 + slot) and microvm names the transport on the command line; boots faster.
LEAN_MACHINE = "microvm,acpi=off,pic=off,pit=off,rtc=off"


def qemu_argv(
    accel: str,
    append: str,
    netdev: str,
    image: Path | None = None,
    extra: list[str] | None = None,
    machine: str = "microvm",
) -> list[str]:
    return [
        QEMU, "-M", machine, "-accel", accel,
        "-nodefaults", "-no-user-config", "-nographic", "-m", "16",
        "-serial", "stdio",
        "-kernel", str(image or IMAGE), "-append", append,
        "-netdev", netdev, "-device", "virtio-net-device,netdev=n0",
        *(extra or []),
    ]  # fmt: skip


class Guest:
    """A running QEMU with the unikernel; serial console captured from stdout."""

    def __init__(self, argv: list[str], prefix: list[str] | None = None) -> None:
        self.argv = (prefix or []) + argv
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._lines: list[str] = []
        self._partial = b""
        self._cond = threading.Condition()
        self._eof = False
        self._stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 4096)
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                data = self._partial + chunk
                *lines, self._partial = data.split(b"\n")
                self._lines.extend(x.decode(errors="replace") for x in lines)
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 4096):
            self._stderr += chunk

    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self._lines) + (
                "\n" + self._partial.decode(errors="replace") if self._partial else ""
            )

    def diagnostics(self) -> str:
        err = self._stderr.decode(errors="replace")
        return f"argv: {' '.join(self.argv)}\nconsole:\n{self.console}\nstderr:\n{err}"

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"no {prefix!r} line from the guest\n{self.diagnostics()}")
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 10.0) -> str:
        return self.wait_line("READY ", timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._err_reader.join(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def user_guest(accel: str, name: str = "hello", extra_append: str = "") -> tuple[Guest, int, int]:
    """Boot with QEMU user networking; returns (guest, tcp_port, udp_port) on 127.0.0.1."""
    guest, tports, uport = user_guest_ports(accel, 1, name, extra_append)
    return guest, tports[0], uport


def user_guest_ports(
    accel: str, n: int, name: str = "hello", extra_append: str = ""
) -> tuple[Guest, list[int], int]:
    """Like user_guest with n host ports forwarded to guest port 80. slirp listens with a
    backlog of 1 per forward, so a burst of connects to one port is paced by SYN
    retransmission on the host; spreading them over several forwards avoids that."""
    ensure_image()
    tports, uport = [free_port() for _ in range(n)], free_port(socket.SOCK_DGRAM)
    fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{p}-:80" for p in tports)
    netdev = f"user,id=n0,{fwd},hostfwd=udp:127.0.0.1:{uport}-:7"
    append = f"name={name} {extra_append}".strip()
    return Guest(qemu_argv(accel, append, netdev)), tports, uport


# --- a small HTTP/1.1 client that checks framing strictly -------------------------------------


class HttpConn:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HttpConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", headers: str = "") -> None:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode())

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one response; Content-Length framing is mandatory."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed mid-headers: {self.buf!r}")
        raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        version, code, _reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs["content-length"])
        if head:
            return int(code), hdrs, b""
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(code), hdrs, body

    def at_eof(self) -> bool:
        """True when the peer has closed (after any buffered data)."""
        if self.buf:
            return False
        return not self._fill()


def get(port: int, path: str = "/", host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    with HttpConn(host, port) as c:
        c.request(path, headers="Connection: close\r\n")
        return c.response()
