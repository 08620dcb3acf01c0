#!/usr/bin/env python3
"""Soak: one daemon under a bounded mix of lookups, proxied connections, instance kills and
fd pressure; at the end it must be alive, consistent, back to its size, and leave nothing.

Run from the repository root:  python3 bench/soak/run.py [--duration 120]

One ``jitlaunch run`` (its own state directory in a temporary directory, DNS on a free
loopback port) serves three services, all in ``proxy`` answer mode with a short idle
timeout, so that instances come and go during the run:

* ``py``: the demo HTTP responder as a host process;
* ``uk``: the bundled unikernel on the qemu backend (TCG), stopped with ``destroy``;
* ``ukp``: the same, stopped with ``pause`` (the next request resumes it).

For ``--duration`` seconds these run at once, each bounded in rate:

* DNS lookups over UDP for the service names and random names (NXDOMAIN);
* proxied HTTP connections of five kinds: short (GET, read the reply), half-closed (GET,
  then shut the write side, read the reply), long (keep-alive, a GET every 0.5 s for a few
  seconds), reset (connect, send half a request, close with SO_LINGER 0), slow (one byte
  every 0.5 s, then close);
* instance faults: every few seconds one instance of the daemon is SIGKILLed, and now and
  then one is SIGSTOPped (and left stopped: the daemon must notice the hang);
* fd pressure: now and then a burst of ``--burst`` connections to one front, held for a
  second and closed.

Then the clients stop and the daemon is left to settle (its instances idle out). The run
fails (exit 1) if the daemon died or logged a traceback; if, after settling, its RSS grew by
more than ``--rss-slack`` MiB or its fd count by more than 16 over the first settled
measurement; if a SIGUSR1 status report (when the daemon writes one) names an instance pid
that is not a live process of the daemon's, or a live instance process is not reported; or
if after SIGTERM the daemon does not exit 0 within 30 s, or any process it started, or any
pid/QMP file in its run directory, is left. Figures: bench/results/soak.json and soak.txt.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    ROOT,
    BenchError,
    ProcessGroup,
    _descendants,
    free_port,
    jitlaunch_command,
    loopback_block,
    machine_info,
    poll,
    table,
    warn_if_busy,
    write_results,
)

KERNEL = ROOT / "images" / "build" / "hello.elf"
IDLE = 3.0
FD_SLACK = 16
CLIENT_TIMEOUT = 15.0


def config(tmp: Path, dns_port: int, block: str, metrics_port: int) -> str:
    uk = f"""
backend = "qemu"
ports = [8080]
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "tcg"
machine = "microvm,acpi=off,pic=off,pit=off,rtc=off"
grace = "1s"
"""
    return f"""
[daemon]
state_dir = "{tmp / 'state'}"
drain_timeout = "2s"

[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["soak.test"]

[dns.rrl]
rate = 0

[metrics]
listen = ["127.0.0.1:{metrics_port}"]

[defaults]
answer = "proxy"
idle_timeout = "{IDLE}s"
boot_timeout = "10s"
retry_backoff = "250ms"
retry_backoff_max = "1s"

[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080]
[service.process]
command = "{sys.executable} -m jitlaunch.demo_http --address {{address}} --port {{port}} --name {{name}}"
grace = "1s"

[[service]]
name = "uk"
front = ["{block}.2"]
{uk}
[[service]]
name = "ukp"
front = ["{block}.3"]
stop = "pause"
{uk}
"""


def connect(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(CLIENT_TIMEOUT)
    try:
        s.bind(("127.0.0.1", 0))  # a source port of its own (see tests/test_unikernel.py)
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def read_head(s: socket.socket) -> bytes:
    """Read until the end of an HTTP reply's head (or EOF); the body's start may follow."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def http_get(host: str, port: int) -> bool:
    with connect(host, port) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: soak\r\n\r\n")
        return read_head(s).startswith(b"HTTP/1.")


class Soak:
    def __init__(self, dns: tuple[str, int], fronts: dict[str, tuple[str, int]], daemon_pid: int,
                 deadline: float, burst: int) -> None:
        self.dns = dns
        self.fronts = fronts
        self.daemon_pid = daemon_pid
        self.deadline = deadline
        self.burst = burst
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopped_pids: set[int] = set()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    # ---- DNS ---------------------------------------------------------------------------

    def dns_worker(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(1.0)
        names = [*self.fronts, "nope", "also-nope"]
        ident = 0
        while self.running():
            ident = (ident + 1) & 0xFFFF
            name = random.choice(names)
            if name.endswith("nope"):
                name = f"r{random.getrandbits(32):x}"
            qname = b"".join(bytes([len(p)]) + p for p in (name.encode(), b"soak", b"test")) + b"\0"
            packet = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
            try:
                sock.sendto(packet, self.dns)
                self.count("dns sent")
                reply = sock.recv(4096)
                if reply[:2] == packet[:2]:
                    self.count("dns answered")
            except OSError:
                self.count("dns unanswered")
            time.sleep(0.005)
        sock.close()

    # ---- proxied connections --------------------------------------------------------------

    def http_worker(self, kind: str) -> None:
        while self.running():
            service = random.choice(list(self.fronts))
            host, port = self.fronts[service]
            try:
                ok = getattr(self, f"conn_{kind}")(host, port)
                self.count(f"{kind} {'served' if ok else 'unserved'}")
                if not ok:
                    self.count(f"unserved by {service}: no reply")
            except OSError as exc:
                self.count(f"{kind} unserved")
                self.count(f"unserved by {service}: {type(exc).__name__}")
            time.sleep(random.uniform(0.01, 0.1))

    def conn_short(self, host: str, port: int) -> bool:
        return http_get(host, port)

    def conn_half(self, host: str, port: int) -> bool:
        with connect(host, port) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: soak\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            return read_head(s).startswith(b"HTTP/1.")

    def conn_long(self, host: str, port: int) -> bool:
        with connect(host, port) as s:
            for _ in range(random.randint(2, 8)):
                s.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
                head = read_head(s)
                if not head.startswith(b"HTTP/1."):
                    return False
                match = re.search(rb"(?i)content-length:\s*(\d+)", head)
                body = head.split(b"\r\n\r\n", 1)[1]
                want = int(match.group(1)) if match else 0
                while len(body) < want:
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    body += chunk
                time.sleep(0.5)
            return True

    def conn_reset(self, host: str, port: int) -> bool:
        s = connect(host, port)
        s.sendall(b"GET / HT")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return True

    def conn_slow(self, host: str, port: int) -> bool:
        with connect(host, port) as s:
            for byte in b"GET /":
                s.sendall(bytes([byte]))
                time.sleep(0.5)
                if not self.running():
                    break
        return True

    # ---- faults ----------------------------------------------------------------------------

    def instances(self) -> list[int]:
        return _descendants(self.daemon_pid)

    def fault_worker(self, every: float) -> None:
        n = 0
        while self.running():
            time.sleep(every)
            pids = [p for p in self.instances() if p not in self.stopped_pids]
            if not pids:
                continue
            pid = random.choice(pids)
            n += 1
            try:
                if n % 4 == 0:
                    os.kill(pid, signal.SIGSTOP)
                    self.stopped_pids.add(pid)
                    self.count("instances SIGSTOPped")
                else:
                    os.kill(pid, signal.SIGKILL)
                    self.count("instances SIGKILLed")
            except ProcessLookupError:
                pass

    def fd_worker(self, every: float) -> None:
        while self.running():
            time.sleep(every)
            host, port = self.fronts["py"]
            socks = []
            for _ in range(self.burst):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect_ex((host, port))
                except OSError:
                    s.close()
                    break
                socks.append(s)
            self.count("burst connections", len(socks))
            time.sleep(1.0)
            for s in socks:
                s.close()


#: Series of the daemon's own metrics quoted in the results: why it closed connections, how
#: relays ended, why instances stopped.
QUOTED = ("jitlaunch_proxy_connections_closed_total", "jitlaunch_proxy_relays_ended_total",
          "jitlaunch_stops_total", "jitlaunch_proxy_retries_total",
          "jitlaunch_unreachable_reports_total")


def scrape(port: int) -> dict[str, float]:
    """The daemon's metrics in QUOTED, summed by series name and labels (zeros left out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    found: dict[str, float] = {}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(QUOTED):
            key, _, value = line.rpartition(" ")
            if float(value):
                found[key] = float(value)
    return found


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def settled(pid: int) -> bool:
    """Every instance has idled out: no live process of the daemon's is left but at most one
    paused QEMU of ``ukp`` (a paused instance is a process that waits for its next request)."""
    live = [p for p in _descendants(pid) if alive(p)]
    return not [p for p in live if b"jitlaunch:ukp:" not in cmdline(p)] and len(live) <= 1


def settle(pid: int, timeout: float) -> bool:
    """Wait until :func:`settled`; False on timeout or if the daemon is gone."""
    try:
        poll(lambda: not alive(pid) or settled(pid), timeout, "the instances to idle out", interval=0.2)
    except BenchError:
        return False
    return alive(pid)


def status_report(pid: int, log: Path) -> set[int] | None:
    """Ask for a SIGUSR1 status report; the instance pids it names, or None if the daemon
    writes none (a status line carries ``pid=N`` for each live instance)."""
    before = log.stat().st_size

    def report() -> str:
        return log.read_bytes()[before:].decode(errors="replace")

    os.kill(pid, signal.SIGUSR1)
    try:
        poll(lambda: "status" in report().lower(), 2.0, "a SIGUSR1 status report")
    except BenchError:
        return None
    time.sleep(0.2)  # the report's other lines follow its first at once
    return {int(m) for m in re.findall(r"pid=(\d+)", report())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--burst", type=int, default=1500, help="connections per fd-pressure burst")
    ap.add_argument("--rss-slack", type=float, default=20.0, help="MiB of RSS growth allowed")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    warn_if_busy("soak")
    if not KERNEL.is_file():
        raise BenchError(f"{KERNEL} missing: run make -C images")
    violations: list[str] = []
    counts: Counter[str] = Counter()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jl-soak-") as tmpdir, ProcessGroup(Path(tmpdir)) as procs:
        tmp = Path(tmpdir)
        block = loopback_block()
        dns_port = free_port()
        cfg = tmp / "soak.toml"
        metrics_port = free_port()
        cfg.write_text(config(tmp, dns_port, block, metrics_port))
        daemon = procs.start("jitlaunch", [*jitlaunch_command(), "run", "--config", str(cfg)], cwd=tmp)
        log = tmp / "jitlaunch.log"
        fronts = {"py": (f"{block}.1", 8080), "uk": (f"{block}.2", 8080), "ukp": (f"{block}.3", 8080)}
        poll(lambda: all(http_get(*f) for f in fronts.values()),
             60, "every service to serve a first request", interval=0.2, procs=procs)
        # The first settled measurement: every path has run once and every instance idled out.
        settle(daemon.pid, 30)
        rss0, fds0 = proc_rss_kib(daemon.pid), proc_fds(daemon.pid)
        start = time.monotonic()
        soak = Soak(("127.0.0.1", dns_port), fronts, daemon.pid, start + args.duration, args.burst)
        threads = [threading.Thread(target=soak.dns_worker, daemon=True)]
        for kind in ("short", "short", "half", "long", "reset", "slow"):
            threads.append(threading.Thread(target=soak.http_worker, args=(kind,), daemon=True))
        threads.append(threading.Thread(target=soak.fault_worker, args=(3.0,), daemon=True))
        threads.append(threading.Thread(target=soak.fd_worker, args=(20.0,), daemon=True))
        for t in threads:
            t.start()
        peak_fds = peak_rss = 0
        while time.monotonic() < soak.deadline:
            time.sleep(1.0)
            procs.remember_children()
            if daemon.poll() is not None:
                break
            peak_fds = max(peak_fds, proc_fds(daemon.pid))
            peak_rss = max(peak_rss, proc_rss_kib(daemon.pid))
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT + 10)
        counts = soak.counts
        if daemon.poll() is not None:
            violations.append(f"the daemon died (status {daemon.returncode})")
        else:
            # Consistency while instances run: wake every service, then compare the report.
            for f in fronts.values():
                try:
                    http_get(*f)
                except OSError:
                    pass
            procs.remember_children()  # the report's signal may end a daemon that mishandles it
            try:
                figures.update(scrape(metrics_port))
            except OSError as exc:
                violations.append(f"the metrics endpoint did not answer: {exc}")
            reported = status_report(daemon.pid, log)
            if reported is None:
                figures["status_report"] = "the daemon writes no SIGUSR1 status report; not checked"
            else:
                # A process instance's pid is its session leader; QEMU's is QEMU itself.
                missing = reported - {p for p in _descendants(daemon.pid) if alive(p)}
                if missing:
                    violations.append(f"status names pids that are not live instances: {sorted(missing)}")
            if not settle(daemon.pid, 60):
                violations.append("instances did not idle out within 60 s after the load stopped")
            rss1, fds1 = proc_rss_kib(daemon.pid), proc_fds(daemon.pid)
            figures.update(rss_kib_start=rss0, rss_kib_end=rss1, fds_start=fds0, fds_end=fds1,
                           peak_fds=peak_fds, peak_rss_kib=peak_rss)
            if rss1 - rss0 > args.rss_slack * 1024:
                violations.append(f"RSS grew from {rss0} to {rss1} KiB")
            if fds1 - fds0 > FD_SLACK:
                violations.append(f"fd count grew from {fds0} to {fds1}")
            procs.remember_children()
            known = set().union(*procs.known.values())
            if daemon.poll() is not None:
                violations.append(f"the daemon died (status {daemon.returncode}) before SIGTERM")
            else:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    violations.append("the daemon did not exit within 30 s of SIGTERM")
                if daemon.returncode not in (0, None):
                    violations.append(f"the daemon exited with status {daemon.returncode} after SIGTERM")
            left = sorted(p for p in known if alive(p))
            if left:
                violations.append(f"processes left after SIGTERM: {left}")
            run_dir = tmp / "state" / "run"
            leftovers = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
            if leftovers:
                violations.append(f"files left in the run directory: {leftovers}")
        text_log = log.read_text(errors="replace") if log.exists() else ""
        if "Traceback" in text_log:
            violations.append("the daemon logged a traceback: " + text_log.split("Traceback", 1)[1][:400])
        figures["log_lines"] = text_log.count("\n")

    rows = [["count", "value"], *[[k, str(v)] for k, v in sorted(counts.items())]]
    rows += [[k, str(v)] for k, v in figures.items()]
    text = (f"soak: {args.duration:g} s of mixed load against one daemon\n" + table(rows) + "\n"
            + ("violations:\n  " + "\n  ".join(violations) if violations else "no violations") + "\n")
    print(text)
    if not args.no_write:
        write_results("soak", {"machine": machine_info(), "duration_s": args.duration,
                               "counts": dict(counts), "figures": figures, "violations": violations},
                      text)
    return 1 if violations else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        sys.exit(2 if "required tool" in str(exc) else 1)
