"""Boot images/build/hello.elf under QEMU microvm and talk to it (helpers for test_unikernel.py).

Everything here waits with deadlines (no bare sleeps) and cleans up after itself: the QEMU
process is terminated (then killed), its pipes are closed and its reader thread joined.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

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

    def wait_count(self, prefix: str, count: int, timeout: float = 10.0) -> None:
        """Until `count` console lines start with `prefix`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for x in self._lines if x.startswith(prefix)) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"fewer than {count} {prefix!r} lines\n{self.diagnostics()}")
                self._cond.wait(left)

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
    accel: str, n: int, name: str = "hello", extra_append: str = "", extra: list[str] | None = None
) -> tuple[Guest, list[int], int]:
    """Like user_guest with n host ports forwarded to guest port 80. slirp listens with a
    backlog of 1 per forward, so a burst of connects to one port is paced by SYN
    retransmission on the host; spreading them over several forwards avoids that."""
    ensure_image()
    tports, uport = [free_port() for _ in range(n)], free_port(socket.SOCK_DGRAM)
    fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{p}-:80" for p in tports)
    netdev = f"user,id=n0,{fwd},hostfwd=udp:127.0.0.1:{uport}-:7"
    append = f"name={name} {extra_append}".strip()
    return Guest(qemu_argv(accel, append, netdev, extra=extra)), tports, uport


def hmp(qmp_path: str, command: str, timeout: float = 5.0) -> str:
    """Run one human monitor command over a QMP socket; its text output."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(qmp_path)
        f = s.makefile("rb")
        f.readline()  # greeting
        out = ""
        for cmd in (
            {"execute": "qmp_capabilities"},
            {"execute": "human-monitor-command", "arguments": {"command-line": command}},
        ):
            s.sendall(json.dumps(cmd).encode() + b"\n")
            while "return" not in (reply := json.loads(f.readline())):
                if "error" in reply:
                    raise AssertionError(f"QMP {command!r}: {reply['error']}")
            out = reply["return"] if isinstance(reply["return"], str) else ""
        return out


# --- a small HTTP/1.1 client that checks framing strictly -------------------------------------


class HttpConn:
    def __init__(
        self, host: str, port: int, timeout: float = 10.0, source: tuple[str, int] | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=source)
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


# --- a raw TCP peer on the guest's tap (run inside the test's network namespace) -------------

ETH_P_ALL = 0x0003


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class RawPeer:
    """A fake host (its own MAC and IP) speaking raw Ethernet on a tap, so TCP segments can be
    crafted and the guest's exact answers checked. Answers ARP for its own address."""

    def __init__(self, ifname: str, my_ip: str, guest_ip: str, src_ip: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.mac = bytes.fromhex("020000000099")
        self.ip = socket.inet_aton(my_ip)  # answers ARP for this one
        self.src = socket.inet_aton(src_ip) if src_ip else self.ip  # TCP from (and to) this one
        self.guest = socket.inet_aton(guest_ip)
        self.guest_mac = b"\xff" * 6
        self.arp_requests = 0

    def close(self) -> None:
        self.sock.close()

    def send_tcp(
        self, sport: int, dport: int, seq: int, ack: int, flags: str, data: bytes = b"", mss: int = 0
    ) -> None:
        bits = sum(b for c, b in zip("FSRPA", (1, 2, 4, 8, 16), strict=True) if c in flags)
        opts = struct.pack("!BBH", 2, 4, mss) if mss else b""
        hl = 20 + len(opts)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                          (hl // 4) << 4, bits, 65535, 0, 0) + opts + data  # fmt: skip
        pseudo = self.src + self.guest + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, self.src, self.guest)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        self.sock.send(self.guest_mac + self.mac + b"\x08\x00" + ip + tcp)

    def recv_tcp(self, timeout: float = 2.0, port: int | None = None) -> dict[str, Any] | None:
        """The next TCP segment from the guest (to our port `port` if given), or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                break
            frame = self.sock.recv(65536)
            if frame[6:12] == self.mac:
                continue  # our own transmission
            etype = frame[12:14]
            if etype == b"\x08\x06" and frame[38:42] == self.ip and frame[20:22] == b"\x00\x01":
                self.arp_requests += 1
                self.guest_mac = frame[22:28]
                arp = b"\x00\x01\x08\x00\x06\x04\x00\x02" + self.mac + self.ip + frame[22:28] + frame[28:32]
                self.sock.send(frame[22:28] + self.mac + b"\x08\x06" + arp)
                continue
            if etype != b"\x08\x00" or frame[23] != 6 or frame[30:34] != self.src:
                continue
            if frame[0:6] != self.mac:
                raise AssertionError(f"segment for us sent to MAC {frame[0:6].hex()}")
            self.guest_mac = frame[6:12]
            ihl = (frame[14] & 15) * 4
            tot = int.from_bytes(frame[16:18], "big")
            t = frame[14 + ihl : 14 + tot]
            sp, dp, seq, ack, off, fl, win = struct.unpack("!HHIIBBH", t[:16])
            if port is not None and dp != port:
                continue
            flags = "".join(c for c, b in zip("FSRPA", (1, 2, 4, 8, 16), strict=True) if fl & b)
            return {"sport": sp, "dport": dp, "seq": seq, "ack": ack, "flags": flags, "win": win,
                    "data": t[(off >> 4) * 4 :]}  # fmt: skip
        return None

    def expect(
        self, what: str, port: int | None = None, timeout: float = 2.0, syn: bool = False
    ) -> dict[str, Any]:
        """The next segment to `port`; SYN-ACKs are skipped unless `syn` (on a slow host the
        guest may retransmit its SYN-ACK before our handshake ACK reached it)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            seg = self.recv_tcp(left, port)
            if seg is None:
                break
            if "S" in seg["flags"] and not syn:
                continue
            return seg
        raise AssertionError(f"no segment from the guest: expected {what}")

    def quiet(self, port: int, timeout: float = 0.3) -> None:
        """Nothing but possible retransmissions (SYN, FIN or data) arrives for a while."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            seg = self.recv_tcp(left, port)
            if seg is None:
                return
            if "S" in seg["flags"] or "F" in seg["flags"] or seg["data"]:
                continue
            raise AssertionError(f"unexpected segment {seg}")


def tcp_conformance(ifname: str, guest_ip: str) -> None:
    """Crafted segments against the guest's TCP; raises AssertionError on a wrong answer."""
    p = RawPeer(ifname, "10.77.0.99", guest_ip)
    try:
        port, isn = 40001, 1000
        p.send_tcp(port, 80, isn, 0, "S", mss=1400)
        sa = p.expect("SYN-ACK", port, syn=True)
        assert sa["flags"] == "SA" and sa["ack"] == isn + 1, sa
        iss = sa["seq"]
        p.send_tcp(port, 80, isn, 0, "S", mss=1400)  # retransmitted SYN: same SYN-ACK
        sa2 = p.expect("SYN-ACK again", port, syn=True)
        assert sa2["flags"] == "SA" and sa2["seq"] == iss and sa2["ack"] == isn + 1, sa2
        p.send_tcp(port, 80, isn + 1, iss + 1, "A")
        p.quiet(port)
        # out-of-window data: ACKed with the unchanged rcv.nxt, not delivered
        p.send_tcp(port, 80, isn + 1 + 100000, iss + 1, "PA", b"GET / HTTP/1.1\r\n\r\n")
        a = p.expect("ACK for out-of-window data", port)
        assert a["flags"] == "A" and a["ack"] == isn + 1 and not a["data"], a
        part = b"GET /health HTTP/1.1\r\nHost: raw\r\n"
        p.send_tcp(port, 80, isn + 1, iss + 1, "PA", part)
        a = p.expect("ACK for the first part", port)
        assert a["ack"] == isn + 1 + len(part), a
        p.send_tcp(port, 80, isn + 1, iss + 1, "PA", part)  # duplicate: dup ACK
        a = p.expect("duplicate ACK", port)
        assert a["flags"] == "A" and a["ack"] == isn + 1 + len(part), a
        nxt = isn + 1 + len(part)
        p.send_tcp(port, 80, nxt, iss + 1, "PA", b"\r\n")
        nxt += 2
        r = p.expect("the response", port)
        assert r["data"].startswith(b"HTTP/1.1 200 OK") and r["seq"] == iss + 1 and r["ack"] == nxt, r
        # not acknowledged: the same bytes come again after the retransmission timeout
        rr = p.expect("a retransmission", port, timeout=3.0)
        assert rr["seq"] == r["seq"] and rr["data"] == r["data"], rr
        snd = iss + 1 + len(r["data"])
        p.send_tcp(port, 80, nxt, snd, "A")
        p.quiet(port)
        # our FIN: ACKed, then the server closes its side too
        p.send_tcp(port, 80, nxt, snd, "FA")
        seen_fin = False
        for _ in range(3):
            s = p.expect("ACK/FIN after our FIN", port)
            assert s["ack"] == nxt + 1, s
            if "F" in s["flags"]:
                seen_fin = True
                p.send_tcp(port, 80, nxt + 1, s["seq"] + 1, "A")
                break
        assert seen_fin
        p.quiet(port)
        # a segment for no connection: RST with seq = its ACK
        p.send_tcp(40002, 80, 5000, 123456, "A")
        rst = p.expect("RST for an unknown connection", 40002)
        assert rst["flags"] == "R" and rst["seq"] == 123456, rst
        # SYN to a closed port: RST|ACK acknowledging the SYN
        p.send_tcp(40003, 81, 7000, 0, "S")
        rst = p.expect("RST for a closed port", 40003)
        assert set(rst["flags"]) == {"R", "A"} and rst["ack"] == 7001, rst
        # RST not exactly at rcv.nxt: challenge ACK (RFC 5961); exact RST: connection gone
        port = 40004
        p.send_tcp(port, 80, 9000, 0, "S")
        sa = p.expect("SYN-ACK", port, syn=True)
        p.send_tcp(port, 80, 9001, sa["seq"] + 1, "A")
        p.send_tcp(port, 80, 9001 + 10, 0, "R")
        ca = p.expect("challenge ACK", port)
        assert ca["flags"] == "A" and ca["ack"] == 9001, ca
        p.send_tcp(port, 80, 9001, 0, "R")
        p.quiet(port)
        p.send_tcp(port, 80, 9001, sa["seq"] + 1, "PA", b"x")
        rst = p.expect("RST after the reset", port)
        assert "R" in rst["flags"], rst
        # a SYN without options still gets its SYN-ACK
        p.send_tcp(40005, 80, 1, 0, "S", mss=0)
        sa = p.expect("SYN-ACK without MSS option", 40005, syn=True)
        assert sa["flags"] == "SA"
        p.send_tcp(40005, 80, 2, 0, "R")
        # a SYN flood (more half-open connections than slots) does not lock out a client
        for k in range(150):
            p.send_tcp(41000 + k, 80, 77, 0, "S")
        sa = None
        for _ in range(10):  # like a real client, retransmit the SYN every second
            p.send_tcp(40006, 80, 900, 0, "S")
            sa = p.recv_tcp(1.0, 40006)
            if sa is not None:
                break
        assert sa is not None, "no SYN-ACK despite the flood"
        assert sa["flags"] == "SA" and sa["ack"] == 901, sa
        for k in range(150):
            p.send_tcp(41000 + k, 80, 78, 0, "R")
        p.send_tcp(40006, 80, 901, 0, "R")
    finally:
        p.close()
    print("RAW OK")


def off_link(ifname: str, guest_ip: str, gateway: str) -> None:
    """A SYN from an off-link address: the guest must ARP for its gateway (we answer as the
    gateway), then send its SYN-ACK there."""
    p = RawPeer(ifname, gateway, guest_ip, src_ip="192.0.2.7")
    try:
        p.send_tcp(40200, 80, 500, 0, "S", mss=1460)
        sa = p.expect("SYN-ACK via the gateway", 40200, timeout=5, syn=True)
        assert sa["flags"] == "SA" and sa["ack"] == 501, sa
        assert p.arp_requests >= 1, "the guest did not ARP for its gateway"
        p.send_tcp(40200, 80, 501, sa["seq"] + 1, "R")
    finally:
        p.close()
    print("OFFLINK OK")


def fuzz(ifname: str, guest_ip: str, frames: int = 3000, seed: int = 1) -> None:
    """Malformed frames at the guest (bounded count), then check it still answers a SYN.
    Lengths and checksums are kept consistent in about half of them so that the damage
    reaches the parsers behind the checksum checks."""
    import random

    rnd = random.Random(seed)
    p = RawPeer(ifname, "10.77.0.99", guest_ip)
    try:
        p.send_tcp(40100, 80, 1, 0, "S")  # learn the guest's MAC
        p.expect("SYN-ACK before fuzzing", 40100, syn=True)
        p.send_tcp(40100, 80, 2, 0, "R")
        for i in range(frames):
            kind = rnd.choice(["tcp", "udp", "icmp", "arp", "ip", "raw"])
            payload = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 1, 7, 20, 60, 300, 1400])))
            if kind == "raw":
                frame = p.guest_mac + p.mac + bytes(rnd.randrange(256) for _ in range(rnd.randrange(2, 60)))
                p.sock.send(frame)
                continue
            if kind == "arp":
                arp = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 40)))
                p.sock.send(b"\xff" * 6 + p.mac + b"\x08\x06" + arp)
                continue
            proto = {"tcp": 6, "udp": 17, "icmp": 1, "ip": rnd.randrange(256)}[kind]
            l4 = bytearray(payload)
            if kind == "tcp" and len(l4) >= 20:
                l4[2:4] = (80).to_bytes(2, "big") if rnd.random() < 0.7 else l4[2:4]
                l4[12] = rnd.choice([0x50, 0x60, 0xF0, 0x00, 0x80]) | (l4[12] & 0x0F)
                if rnd.random() < 0.5:
                    l4[13] = rnd.choice([0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x3F])
                if rnd.random() < 0.3 and len(l4) >= 24:
                    l4[20:24] = bytes([2, rnd.choice([0, 1, 2, 4, 255]), 0, 0])
            if kind == "icmp" and l4:
                l4[0] = rnd.choice([8, 0, 3, 255])
            if kind == "udp" and len(l4) >= 8:
                l4[2:4] = (7).to_bytes(2, "big") if rnd.random() < 0.5 else l4[2:4]
                l4[4:6] = rnd.choice([len(l4), 0, 7, 65535, rnd.randrange(65536)]).to_bytes(2, "big")
            good = rnd.random() < 0.5
            if good and kind in ("tcp", "udp", "icmp"):
                off = {"tcp": 16, "udp": 6, "icmp": 2}[kind]
                if len(l4) >= off + 2:
                    l4[off : off + 2] = b"\0\0"
                    pseudo = p.ip + p.guest + struct.pack("!BBH", 0, proto, len(l4))
                    ck = _csum(bytes(l4) if kind == "icmp" else pseudo + bytes(l4))
                    l4[off : off + 2] = ck.to_bytes(2, "big")
            ihl = rnd.choice([5, 5, 5, 4, 6, 15]) if not good else 5
            tot = 20 + len(l4) if good else rnd.choice([20 + len(l4), 0, 19, 65535, rnd.randrange(65536)])
            frag = 0 if good else rnd.choice([0, 0x2000, 0x0001, 0x4000])
            ver = 4 if good or rnd.random() < 0.7 else rnd.randrange(16)
            ip = struct.pack("!BBHHHBBH4s4s", (ver << 4) | ihl, 0, tot & 0xFFFF, i & 0xFFFF, frag, 64,
                             proto, 0, p.ip, p.guest)  # fmt: skip
            if good or rnd.random() < 0.5:
                ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
            opts = bytes(rnd.randrange(256) for _ in range(max(0, ihl * 4 - 20))) if ihl > 5 else b""
            p.sock.send(p.guest_mac + p.mac + b"\x08\x00" + ip + opts + bytes(l4))
        # drain whatever the guest answered, then a clean handshake must still work
        while p.recv_tcp(0.5) is not None:
            pass
        p.send_tcp(40101, 80, 100, 0, "S", mss=1460)
        sa = p.expect("SYN-ACK after fuzzing", 40101, timeout=5, syn=True)
        assert sa["flags"] == "SA" and sa["ack"] == 101, sa
        p.send_tcp(40101, 80, 101, sa["seq"] + 1, "R")
    finally:
        p.close()
    print("FUZZ OK")
