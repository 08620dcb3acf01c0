#!/usr/bin/env python3
"""Boot benchmark for the hello unikernel (images/build/hello.elf) under QEMU microvm.

For each accelerator (KVM when /dev/kvm opens, and TCG), N runs (default 20) of:

* start -> READY: from just before the QEMU process is spawned to the moment the
  ``READY <ip>:<port>`` line arrives on the serial console (a pipe);
* start -> first HTTP byte: same run; a client polls connect() to the hostfwd port on
  loopback and sends ``GET /`` until a reply byte arrives (user networking accepts the TCP
  connection on the host before the guest is up, so only a reply byte counts);
* resume -> READY: QEMU started paused (``-S``, QMP on a unix socket), capabilities
  negotiated, then the time from sending ``{"execute":"cont"}`` to the READY line;

and, on separate instances, after one request and 2 s of quiet:

* idle RSS: VmRSS of the QEMU process (/proc/PID/status);
* idle CPU: utime+stime of the QEMU process over 10 s (/proc/PID/stat), as % of one core;
* for context, request latency on the same instance: 50 ``GET /`` on one keep-alive
  connection and 50 on fresh connections (through slirp).

Prints a table with medians and p90 against the targets (with KVM: start -> first byte
<= 40 ms, resume -> READY <= 5 ms, idle CPU <= 1 %, RSS <= 32 MiB), for two machine
configurations (``-M microvm`` as jitlaunch runs it, and a lean variant without ACPI and
legacy PIC/PIT/RTC), and writes
bench/results/boot.json and bench/results/boot.txt. Exit status 0 when the KVM targets are
met, 1 when not (or a run failed), 2 when QEMU or the image is missing and cannot be built.

Run from the repository root: ``python3 bench/boot/run.py`` (about two to three minutes).
Only the standard library; every QEMU it starts is killed at the end, even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import kvm_usable

ROOT = Path(__file__).resolve().parent.parent.parent
IMAGE = ROOT / "images" / "build" / "hello.elf"
RESULTS = ROOT / "bench" / "results"
QEMU = "qemu-system-x86_64"
#: "default" is what jitlaunch's qemu backend runs; "lean" drops ACPI and the legacy PIC, PIT
#: and RTC, which the unikernel does not need (less firmware work before the kernel runs).
MACHINES = {
    "default": "microvm",
    "lean": "microvm,acpi=off,pic=off,pit=off,rtc=off",
}

TARGETS = {  # KVM targets
    "first_byte_ms": ("start -> first HTTP byte", "<=", 40.0, "ms"),
    "resume_ready_ms": ("resume (QMP cont) -> READY", "<=", 5.0, "ms"),
    "idle_cpu_pct": ("idle CPU over 10 s", "<=", 1.0, "%"),
    "idle_rss_mib": ("idle RSS", "<=", 32.0, "MiB"),
}


class BenchError(Exception):
    pass


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, -(-90 * len(s) // 100) - 1))
    return s[k]


class Qemu:
    """One QEMU; serial console on a pipe, read by a thread that timestamps lines."""

    def __init__(
        self, accel: str, machine: str, port: int, paused: bool = False, qmp: str | None = None
    ) -> None:
        argv = [
            QEMU, "-M", machine, "-accel", accel, "-nodefaults", "-no-user-config", "-nographic",
            "-m", "16", "-serial", "stdio", "-kernel", str(IMAGE), "-append", "name=bench",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80",
            "-device", "virtio-net-device,netdev=n0",
        ]  # fmt: skip
        if paused:
            argv += ["-S", "-qmp", f"unix:{qmp},server=on,wait=off"]
        self.ready_at: float | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            chunk = os.read(fd, 4096)
            now = time.monotonic()
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    self.lines.append(text)
                    if text.startswith("READY ") and self.ready_at is None:
                        self.ready_at = now
                self._cond.notify_all()

    def wait_ready(self, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.ready_at is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise BenchError(f"no READY line; console: {self.lines!r}")
                self._cond.wait(left)
            return self.ready_at

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def first_byte(port: int, deadline: float, every: float = 0.02, max_age: float = 0.4) -> float:
    """Poll: every 20 ms open a connection and send ``GET /``, keeping each attempt open for
    up to 400 ms, until any of them receives a reply byte; return when that byte arrived.
    (Connections made before the guest is up are accepted by slirp but their SYN to the
    guest is lost, so only a reply byte counts, and new attempts keep coming.)"""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    socks: list[tuple[float, socket.socket]] = []
    try:
        next_try = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise BenchError("no HTTP reply byte before the deadline")
            while socks and now - socks[0][0] > max_age:
                socks.pop(0)[1].close()
            if now >= next_try:
                next_try = now + every
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(req)
                    s.setblocking(False)
                    socks.append((now, s))
                except OSError:
                    s.close()
            if not socks:
                continue
            readable, _, _ = select.select(
                [x[1] for x in socks], [], [], max(0.0, next_try - time.monotonic())
            )
            for s in readable:
                try:
                    if s.recv(1):
                        return time.monotonic()
                except OSError:
                    pass
                socks[:] = [x for x in socks if x[1] is not s]  # closed or reset: drop it
                s.close()
    finally:
        for _, s in socks:
            s.close()


def run_cold(accel: str, machine: str) -> tuple[float, float]:
    port = free_port()
    q = Qemu(accel, machine, port)
    try:
        fb = first_byte(port, q.t0 + 10)
        ready = q.wait_ready()
        return (ready - q.t0) * 1000, (fb - q.t0) * 1000
    finally:
        q.close()


def qmp_command(f: Any, sock: socket.socket, cmd: str) -> None:
    sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
    while True:
        msg = json.loads(f.readline())
        if "return" in msg:
            return
        if "error" in msg:
            raise BenchError(f"QMP {cmd}: {msg['error']}")


def run_resume(accel: str, machine: str, tmp: str) -> float:
    path = os.path.join(tmp, f"qmp-{accel}-{time.monotonic_ns()}.sock")
    q = Qemu(accel, machine, free_port(), paused=True, qmp=path)
    try:
        deadline = time.monotonic() + 10
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError("QMP socket never appeared") from None
                    time.sleep(0.002)
            sock.settimeout(10)
            with sock.makefile("r") as f:
                json.loads(f.readline())  # greeting
                qmp_command(f, sock, "qmp_capabilities")
                t_cont = time.monotonic()
                sock.sendall(b'{"execute":"cont"}\n')
                ready = q.wait_ready()
        finally:
            sock.close()
        return (ready - t_cont) * 1000
    finally:
        q.close()
        if os.path.exists(path):
            os.unlink(path)


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no {field}")


def request_latencies(port: int, n: int) -> tuple[list[float], list[float]]:
    """n keep-alive requests on one connection, and n requests on fresh connections (ms)."""
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    def one(s: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d:
                raise BenchError("connection closed")
            buf += d
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            d = s.recv(65536)
            if not d:
                raise BenchError("connection closed")
            body += d

    keep, fresh = [], []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(n):
            t = time.monotonic()
            s.sendall(req)
            one(s)
            keep.append((time.monotonic() - t) * 1000)
    for _ in range(n):
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(req)
            one(s)
        fresh.append((time.monotonic() - t) * 1000)
    return keep, fresh


def run_idle(
    accel: str, machine: str, seconds: float
) -> tuple[float, float, float, list[float], list[float]]:
    port = free_port()
    q = Qemu(accel, machine, port)
    try:
        q.wait_ready()
        first_byte(port, time.monotonic() + 10)
        keep, fresh = request_latencies(port, 50)
        # let the connection's TIME_WAIT expire (the guest's timer stops when no
        # connection is left), then measure
        quiet_until = time.monotonic() + 2.0
        while time.monotonic() < quiet_until:
            time.sleep(quiet_until - time.monotonic())
        c0, t0 = proc_cpu_seconds(q.proc.pid), time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            time.sleep(end - time.monotonic())
        c1, t1 = proc_cpu_seconds(q.proc.pid), time.monotonic()
        rss = proc_status_mib(q.proc.pid, "VmRSS")
        anon = proc_status_mib(q.proc.pid, "RssAnon")
        return (c1 - c0) / (t1 - t0) * 100, rss, anon, keep, fresh
    finally:
        q.close()


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 2),
        "p90": round(p90(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "values": [round(v, 2) for v in values],
    }


def bench_accel(accel: str, machine: str, runs: int, idle_seconds: float, idle_runs: int) -> dict[str, Any]:
    ready, fb, resume = [], [], []
    with tempfile.TemporaryDirectory(prefix="jl-boot-") as tmp:
        for _ in range(runs):
            r, b = run_cold(accel, machine)
            ready.append(r)
            fb.append(b)
        for _ in range(runs):
            resume.append(run_resume(accel, machine, tmp))
    cpu, rss, anon, keep, fresh = [], [], [], [], []
    for _ in range(idle_runs):
        c, m, a, k, f = run_idle(accel, machine, idle_seconds)
        cpu.append(c)
        rss.append(m)
        anon.append(a)
        keep += k
        fresh += f
    return {
        "start_ready_ms": summarize(ready),
        "first_byte_ms": summarize(fb),
        "resume_ready_ms": summarize(resume),
        "idle_cpu_pct": summarize(cpu),
        "idle_rss_mib": summarize(rss),
        "idle_rss_anon_mib": summarize(anon),
        "keepalive_request_ms": summarize(keep),
        "new_connection_request_ms": summarize(fresh),
    }


ROWS = [
    ("start_ready_ms", "start -> READY", "ms"),
    ("first_byte_ms", "start -> first HTTP byte", "ms"),
    ("resume_ready_ms", "resume (QMP cont) -> READY", "ms"),
    ("idle_cpu_pct", "idle CPU (10 s)", "%"),
    ("idle_rss_mib", "idle RSS (VmRSS)", "MiB"),
    ("idle_rss_anon_mib", "idle RssAnon", "MiB"),
    ("keepalive_request_ms", "GET / keep-alive (50)", "ms"),
    ("new_connection_request_ms", "GET / new connection (50)", "ms"),
]


def verdicts(results: dict[str, Any]) -> dict[str, tuple[list[str], bool]]:
    """Per machine configuration: the KVM target lines and whether all were met."""
    out: dict[str, tuple[list[str], bool]] = {}
    for mname, by_accel in results.items():
        kvm = by_accel.get("kvm")
        if kvm is None:
            out[mname] = ([f"[{mname}] KVM not available: targets not checked"], False)
            continue
        lines, ok = [], True
        for key, (label, op, limit, unit) in TARGETS.items():
            value = kvm[key]["median"]
            passed = value <= limit
            ok &= passed
            lines.append(
                f"[{mname}] target (KVM) {label} {op} {limit:g} {unit}: "
                f"{'PASS' if passed else 'FAIL'} (median {value:g} {unit}, p90 {kvm[key]['p90']:g})"
            )
        out[mname] = (lines, ok)
    return out


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    out = [
        f"hello unikernel boot benchmark: {meta['runs']} runs per accelerator and machine (idle: "
        f"{meta['idle_runs']} x {meta['idle_seconds']:g} s), QEMU -m 16, user networking",
        f"image {meta['image']} ({meta['image_bytes']} bytes), {meta['qemu']}, {meta['cpus']} CPUs",
        "machines: " + "; ".join(f"{k} = -M {v}" for k, v in MACHINES.items() if k in results),
        "",
        f"{'machine':<8} {'accel':<5} {'measure':<30} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}  target",
    ]
    for mname, by_accel in results.items():
        for accel, r in by_accel.items():
            for key, label, unit in ROWS:
                s = r[key]
                tgt = TARGETS.get(key)
                target = (
                    (f"{tgt[1]} {tgt[2]:g} {tgt[3]}" + ("" if accel == "kvm" else " (KVM)")) if tgt else ""
                )
                out.append(
                    f"{mname:<8} {accel:<5} {label + ' (' + unit + ')':<30} {s['median']:>8.2f} "
                    f"{s['p90']:>8.2f} {s['min']:>8.2f} {s['max']:>8.2f}  {target}"
                )
    out.append("")
    for lines, _ in verdicts(results).values():
        out += lines
    out.append("(exit status follows the default machine, which is what jitlaunch runs)")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--idle-runs", type=int, default=1)
    ap.add_argument(
        "--accel", action="append", choices=["kvm", "tcg"], help="default: kvm (if usable) and tcg"
    )
    ap.add_argument("--machine", action="append", choices=list(MACHINES), help="default: all")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    if shutil.which(QEMU) is None:
        print(f"{QEMU} not found (apt-get install -y qemu-system-x86)", file=sys.stderr)
        return 2
    if not IMAGE.exists():
        try:
            subprocess.run(["make", "-C", str(ROOT / "images")], check=True, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"cannot build the image: {e}", file=sys.stderr)
            return 2
    accels = args.accel or (["kvm"] if kvm_usable() else []) + ["tcg"]
    if "kvm" in accels and not kvm_usable():
        print("/dev/kvm is not usable; skipping KVM", file=sys.stderr)
        accels.remove("kvm")

    qemu_version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    meta = {
        "runs": args.runs,
        "idle_runs": args.idle_runs,
        "idle_seconds": args.idle_seconds,
        "image": str(IMAGE.relative_to(ROOT)),
        "image_bytes": IMAGE.stat().st_size,
        "qemu": qemu_version,
        "host": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results: dict[str, Any] = {}
    try:
        for mname in args.machine or list(MACHINES):
            results[mname] = {}
            for accel in accels:
                print(
                    f"{mname}/{accel}: {args.runs} cold boots, {args.runs} paused boots, idle...",
                    file=sys.stderr,
                )
                results[mname][accel] = bench_accel(
                    accel, MACHINES[mname], args.runs, args.idle_seconds, args.idle_runs
                )
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    text = render(results, meta)
    print(text, end="")
    v = verdicts(results)
    ok = v["default"][1] if "default" in v else all(x[1] for x in v.values())
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "boot", "meta": meta, "machines": MACHINES,
               "targets_kvm": {k: t[2] for k, t in TARGETS.items()},
               "results": results, "kvm_targets_met": {m: x[1] for m, x in v.items()}}  # fmt: skip
        (RESULTS / "boot.json").write_text(json.dumps(doc, indent=2) + "\n")
        (RESULTS / "boot.txt").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
