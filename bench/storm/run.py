"""A boot storm: N services (default 100, the bundled unikernel, qemu backend) woken at once.

Run from the repository root: ``.venv/bin/python bench/storm/run.py``. Each round is one
``jitlaunch run`` with N qemu services (user networking, TCG unless ``--accel kvm``; the
wake limit off, since every lookup comes from one address). At t0 a lookup for every name
goes out over UDP and, at once, one thread per service sends ``GET /`` through its front
address (the proxy holds it until the instance is ready). Quoted per round: the time from
the first lookup until every GET was answered, boots/s (N over that time), p50/p99 of each
service's time from t0 to its reply and of the boot itself (the daemon's "ready in" line:
from the boot's start, after any wait in the admission queue, to READY), the CPU time per
boot of the daemon and of each QEMU (up to the moment all are served), failures (GETs
without a 200, boots that failed), the daemon's RSS and the QEMUs' total RSS and PSS (and
instances per GiB of PSS), then a SIGTERM: the time until the daemon has exited and the QEMU
processes left behind (must be 0).

Rounds: ``max_booting`` unlimited (today's behaviour before the host budget) and each value
of ``--max-booting`` (default 16, 32, and the machine's default), in the same run. The
value with the most boots/s is the one to make the default.

Then the budget run: ``[host] max_instances = 20``, the wake limit at its default: a flood of
lookups for all N names for ``--flood-seconds`` from one source address and then from N
sources (one per /24 of 127.0.0.0/8); the number of QEMU processes is sampled every 10 ms
(the peak must never pass 20), and the daemon's admission counters (admitted, queued,
evicted, refused, wake-limited) are read from its SIGUSR1 status line.

Then the density (needs root, iproute2, a usable /dev/kvm and Debian's reduced build
``qemu-system-x86_64-microvm``): in a network namespace the bench creates (and always
deletes), ``--density-services`` (100) qemu services with bridge networking and KVM, each
woken by a lookup and a GET from inside the namespace and then left idle for ``--settle``
seconds; per instance, the QEMU's RSS and PSS and the daemon's share (its RSS and PSS growth
from before the wake, divided by N), their sums, and instances per GiB of each. Rounds, in one
run: the full ``qemu-system-x86_64`` and the reduced build, each with ``hugepages = false``
(the default: guest RAM a private memfd mapping) and ``hugepages = true`` (QEMU's anonymous
RAM, as before that default), so that both savings are measured side by side.

Targets (the issue's, on this 2-core machine): all N served, none failed with the default
boot timeout, all served within 4 s of the first lookup, >= 35 boots/s (with the default
``max_booting``); the budget's peak <= 20; no QEMU left after SIGTERM; every density instance
served and an idle RSS per instance (QEMU + the daemon's share) <= 24 MiB with the reduced
build and the default settings. Exit 1 if one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    ROOT,
    BenchError,
    ProcessGroup,
    cpu_seconds,
    free_port,
    jitlaunch_command,
    kvm_usable,
    loopback_block,
    machine_info,
    median,
    percentile,
    poll,
    require_tool,
    table,
    warn_if_busy,
    write_results,
)
from dnslib import DNSRecord

KERNEL = ROOT / "images" / "build" / "hello.elf"
MACHINE = "microvm,acpi=off,pic=off,pit=off,rtc=off"  # as in conf/default.toml
UNLIMITED = 100000
TARGET_SECONDS, TARGET_BOOTS = 4.0, 35.0
BUDGET = 20
FULL, REDUCED = "qemu-system-x86_64", "qemu-system-x86_64-microvm"
#: The issue's density target: idle RSS per instance (QEMU + the daemon's share), reduced build.
TARGET_IDLE_RSS_MIB = 24.0


def config(
    state: Path, dns_port: int, block: str, n: int, accel: str, host: str, qemu: str = "",
) -> str:
    out = [f"""
[daemon]
state_dir = "{state}"
drain_timeout = "1s"
[metrics]
listen = []
[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["jit.test"]
[dns.rrl]
rate = 0
{host}
"""]
    for i in range(n):
        out.append(f"""
[[service]]
name = "s{i:03d}"
front = ["{block}.{i + 1}"]
ports = [8080]
backend = "qemu"
idle_timeout = "10m"
[service.qemu]
kernel = "{KERNEL}"
machine = "{MACHINE}"
accel = "{accel}"
{qemu}""")
    return "".join(out)


def qemu_pids(daemon_pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == daemon_pid and b"qemu" in argv[0]:
            pids.append(int(entry))
    return pids


def marked_qemus(state: Path) -> list[int]:
    """QEMU processes whose command line names this run's state directory (leftovers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if st != "Z" and b"qemu" in cmd.split(b"\0")[0] and str(state).encode() in cmd:
            found.append(int(entry))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB, from smaps_rollup; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def get(host: str, port: int, deadline: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: storm\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return b" 200 " in data.split(b"\r\n", 1)[0]
    except OSError:
        return False


def lookup_all(dns: tuple[str, int], names: list[str], source: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for name in names:
            s.sendto(DNSRecord.question(f"{name}.jit.test").pack(), dns)


def start_daemon(
    procs: ProcessGroup, tag: str, jl: list[str], text: Callable[[Path], str],
) -> tuple[Any, Path]:
    """``jitlaunch run`` on the config ``text(state_dir)``, in a fresh state directory."""
    state = Path(tempfile.mkdtemp(prefix=f"storm-{tag}-"))
    cfgfile = state / "storm.toml"
    cfgfile.write_text(text(state))
    return procs.start(tag, [*jl, "run", "--config", str(cfgfile)]), state


def daemon_ready(procs: ProcessGroup, tag: str) -> bool:
    return "serving" in (procs.logdir / f"{tag}.log").read_text(errors="replace")


def storm_round(
    procs: ProcessGroup, jl: list[str], n: int, accel: str, max_booting: int, tag: str,
) -> dict[str, Any]:
    dns_port = free_port()
    block = loopback_block()
    host = f"[host]\nmax_booting = {max_booting}\nmax_instances = {max(n + 10, 50)}\n" \
           f"memory = {(n + 10) * 100}\n[host.wake]\nrate = 0\n"
    proc, state = start_daemon(procs, tag, jl, lambda st: config(st, dns_port, block, n, accel, host))
    pid = proc.pid
    poll(lambda: daemon_ready(procs, tag), 30, f"{tag}: the daemon to serve", procs=procs)
    names = [f"s{i:03d}" for i in range(n)]
    served: dict[str, float] = {}
    ok: dict[str, bool] = {}
    t0 = time.monotonic()
    deadline = t0 + 60

    def client(i: int) -> None:
        ok[names[i]] = get(f"{block}.{i + 1}", 8080, deadline)
        served[names[i]] = time.monotonic() - t0

    cpu_before = cpu_seconds(pid)
    lookup_all(("127.0.0.1", dns_port), names)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    peak_rss = 0
    while any(t.is_alive() for t in threads):
        time.sleep(0.05)
    all_served = time.monotonic() - t0
    for t in threads:
        t.join()
    procs.remember_children()
    daemon_cpu = cpu_seconds(pid) - cpu_before
    qemus = qemu_pids(pid)
    qemu_cpu = sum(cpu_seconds(q) for q in qemus)
    mems = [memory_kib(q) for q in qemus]
    daemon_rss, daemon_pss = memory_kib(pid)
    peak_rss = max((r for r, _ in mems), default=0)
    log = (procs.logdir / f"{tag}.log").read_text(errors="replace")
    boots = sorted(float(m) / 1000 for m in re.findall(r" ready in ([0-9.]+) ms", log))
    failed_boots = len(re.findall(r"failed to boot", log))
    # SIGTERM right after: how long until it has exited, and what is left.
    t1 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except Exception:
        pass
    exit_s = time.monotonic() - t1
    procs.procs = [p for p in procs.procs if p[1] is not proc]
    left = marked_qemus(state)
    times = sorted(served.values())
    good = sum(ok.values())
    qemu_pss = sum(p for _, p in mems)
    return {
        "max_booting": "unlimited" if max_booting >= UNLIMITED else max_booting,
        "services": n,
        "served": good,
        "failed_gets": n - good,
        "failed_boots": failed_boots,
        "all_served_s": round(all_served, 3),
        "boots_per_s": round(n / all_served, 1),
        "served_p50_s": round(percentile(times, 50), 3),
        "served_p99_s": round(percentile(times, 99), 3),
        "boot_p50_s": round(percentile(boots, 50), 3) if boots else None,
        "boot_p99_s": round(percentile(boots, 99), 3) if boots else None,
        "qemus": len(qemus),
        "daemon_cpu_ms_per_boot": round(daemon_cpu / n * 1000, 1),
        "qemu_cpu_ms_per_boot": round(qemu_cpu / max(1, len(qemus)) * 1000, 1),
        "daemon_rss_mib": round(daemon_rss / 1024, 1),
        "daemon_pss_mib": round(daemon_pss / 1024, 1),
        "qemu_rss_total_mib": round(sum(r for r, _ in mems) / 1024, 1),
        "qemu_pss_total_mib": round(qemu_pss / 1024, 1),
        "qemu_rss_max_mib": round(peak_rss / 1024, 1),
        "instances_per_gib_pss": round(len(qemus) / (qemu_pss / 1024 / 1024), 1) if qemu_pss else None,
        "sigterm_exit_s": round(exit_s, 2),
        "sigterm_exit_status": proc.returncode,
        "qemus_left": len(left),
    }


def budget_round(
    procs: ProcessGroup, jl: list[str], n: int, accel: str, seconds: float, many: bool, tag: str,
) -> dict[str, Any]:
    dns_port = free_port()
    block = loopback_block()
    host = f"[host]\nmax_instances = {BUDGET}\n"
    proc, state = start_daemon(procs, tag, jl, lambda st: config(st, dns_port, block, n, accel, host))
    pid = proc.pid
    poll(lambda: daemon_ready(procs, tag), 30, f"{tag}: the daemon to serve", procs=procs)
    names = [f"s{i:03d}" for i in range(n)]
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(qemu_pids(pid)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            if many:
                for i, name in enumerate(names):
                    lookup_all(("127.0.0.1", dns_port), [name], f"127.{1 + i // 250}.{i % 250}.9")
            else:
                lookup_all(("127.0.0.1", dns_port), names)
            sent += n
            time.sleep(0.05)
        time.sleep(2.0)  # the queue drains, evictions finish
    finally:
        stop.set()
        sampler.join()
    procs.remember_children()
    os.kill(pid, signal.SIGUSR1)
    line = poll(lambda: re.findall(r"host: .*admission: (.*)", (procs.logdir / f"{tag}.log")
                                   .read_text(errors="replace")), 10, "the status line")[-1]
    counts = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line)}
    os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=60)
    procs.procs = [p for p in procs.procs if p[1] is not proc]
    return {
        "sources": n if many else 1,
        "lookups_sent": sent,
        "peak_instances": peak,
        "admitted": counts.get("admitted", 0),
        "queued": counts.get("queued", 0),
        "evicted": counts.get("evicted", 0),
        "refused": sum(v for k, v in counts.items() if k.startswith("refused")),
        "wake_limited": counts.get("wake_limited", 0),
        "qemus_left": len(marked_qemus(state)),
    }


def wake_inside(dns_port: int, block: str, n: int, timeout: float) -> None:
    """Run inside the namespace (``--wake``): a lookup for every service at once, then a GET
    through each front, in a thread each; print how many got a 200, as JSON."""
    names = [f"s{i:03d}" for i in range(n)]
    deadline = time.monotonic() + timeout
    ok: dict[int, bool] = {}
    lookup_all(("127.0.0.1", dns_port), names)
    threads = [threading.Thread(target=lambda i=i: ok.__setitem__(i, get(f"{block}.{i + 1}", 8080,
                                                                         deadline)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"served": sum(ok.values())}))


class Namespace:
    """A network namespace of the bench's own, loopback up; deleted (with the bridge and taps
    the daemon made in it) by :meth:`close`, which the caller runs in ``finally``."""

    def __init__(self) -> None:
        self.name = f"jlstorm-{os.getpid()}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)
        self.prefix = ["ip", "netns", "exec", self.name]
        subprocess.run([*self.prefix, "ip", "link", "set", "lo", "up"], check=True, timeout=10)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=10)


def density_round(
    procs: ProcessGroup, jl: list[str], ns: Namespace, n: int, binary: str, hugepages: bool,
    settle: float, tag: str,
) -> dict[str, Any]:
    """N bridge services under KVM run by ``binary`` in ``ns``, woken, served, left idle for
    ``settle`` s; the per-instance memory of QEMU and of the daemon (its growth over N)."""
    dns_port = 5353  # the namespace's own loopback: nothing else listens there
    block = loopback_block()
    host = f"[host]\nmax_instances = {n + 10}\nmemory = {(n + 10) * 100}\n[host.wake]\nrate = 0\n"
    qemu = (f'network = "bridge"\nbinary = "{binary}"\nhugepages = {str(hugepages).lower()}\n'
            'subnet = "10.77.0.0/23"\n')
    proc, state = start_daemon(
        procs, tag, [*ns.prefix, *jl],
        lambda st: config(st, dns_port, block, n, "kvm", host, qemu))
    pid = proc.pid
    poll(lambda: daemon_ready(procs, tag), 30, f"{tag}: the daemon to serve", procs=procs)
    daemon_before = memory_kib(pid)
    t0 = time.monotonic()
    woke = subprocess.run(
        [*ns.prefix, sys.executable, __file__, "--wake", str(dns_port), block, str(n)],
        capture_output=True, text=True, timeout=120)
    if woke.returncode != 0:
        raise BenchError(f"{tag}: the wake inside the namespace failed: {woke.stderr[-2000:]}")
    served = json.loads(woke.stdout.strip().splitlines()[-1])["served"]
    all_served = time.monotonic() - t0
    time.sleep(settle)  # idle: nothing more to wait for, the instances just sit there
    procs.remember_children()
    qemus = qemu_pids(pid)
    mems = [memory_kib(q) for q in qemus]
    programs = {os.path.basename(os.readlink(f"/proc/{q}/exe")) for q in qemus}
    daemon_after = memory_kib(pid)
    log = (procs.logdir / f"{tag}.log").read_text(errors="replace")
    boot_lines = re.findall(r"QEMU pid \d+ \(([^,]+), (kvm|tcg)", log)
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    procs.procs = [p for p in procs.procs if p[1] is not proc]
    left = marked_qemus(state)
    k = max(1, len(qemus))
    q_rss = sum(r for r, _ in mems) / k / 1024
    q_pss = sum(p for _, p in mems) / k / 1024
    d_rss = (daemon_after[0] - daemon_before[0]) / n / 1024
    d_pss = (daemon_after[1] - daemon_before[1]) / n / 1024
    return {
        "binary": binary,
        "hugepages": hugepages,
        "services": n,
        "served": served,
        "qemus": len(qemus),
        "programs_running": sorted(programs),
        "boot_lines": sorted({f"{b}, {a}" for b, a in boot_lines}),
        "all_served_s": round(all_served, 2),
        "qemu_rss_mib": round(q_rss, 2),
        "qemu_pss_mib": round(q_pss, 2),
        "daemon_rss_mib": round(d_rss, 3),
        "daemon_pss_mib": round(d_pss, 3),
        "rss_per_instance_mib": round(q_rss + d_rss, 2),
        "pss_per_instance_mib": round(q_pss + d_pss, 2),
        "instances_per_gib_rss": round(1024 / (q_rss + d_rss), 1) if q_rss else None,
        "instances_per_gib_pss": round(1024 / (q_pss + d_pss), 1) if q_pss else None,
        "daemon_rss_before_mib": round(daemon_before[0] / 1024, 1),
        "daemon_rss_after_mib": round(daemon_after[0] / 1024, 1),
        "qemus_left": len(left),
    }


def density_missing() -> str | None:
    """Why the density rounds cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a network namespace, a bridge and taps)"
    for tool in ("ip", FULL, REDUCED):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not kvm_usable():
        return "needs a usable /dev/kvm (the reduced build runs with KVM only)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--accel", choices=("tcg", "kvm"), default="tcg")
    ap.add_argument("--max-booting", default="16,32", help="comma-separated values to try")
    ap.add_argument("--runs", type=int, default=1, help="rounds per setting (medians)")
    ap.add_argument("--flood-seconds", type=float, default=3.0)
    ap.add_argument("--no-budget", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--jitlaunch", help="command that runs jitlaunch (default: this venv's)")
    ap.add_argument("--density-services", type=int, default=100,
                    help="instances per density round (at most 500)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds the density instances idle before they are measured")
    ap.add_argument("--no-density", action="store_true")
    ap.add_argument("--no-storm", action="store_true", help="only the budget and density parts")
    ap.add_argument("--wake", nargs=3, metavar=("DNS_PORT", "BLOCK", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.wake:
        wake_inside(int(args.wake[0]), args.wake[1], int(args.wake[2]), 60)
        return 0
    if not 1 <= args.density_services <= 500:
        raise BenchError("--density-services must be from 1 to 500 (the bridge's /23)")
    require_tool("qemu-system-x86_64", apt="qemu-system-x86")
    if not KERNEL.exists():
        raise BenchError(f"{KERNEL} is missing: run make -C images")
    jl = args.jitlaunch.split() if args.jitlaunch else jitlaunch_command()
    load = warn_if_busy("storm")
    sys.path.insert(0, str(ROOT))
    from jitlaunch.config import HostConfig
    from jitlaunch.lifecycle.admission import derive_budget

    default = derive_budget(HostConfig(), "", len(os.sched_getaffinity(0))).max_booting
    settings = [UNLIMITED, *sorted({int(v) for v in args.max_booting.split(",")} | {default})]
    rounds: list[dict[str, Any]] = []
    budget: list[dict[str, Any]] = []
    density: list[dict[str, Any]] = []
    density_skipped = None if not args.no_density else "--no-density"
    if density_skipped is None:
        density_skipped = density_missing()
    logdir = Path(tempfile.mkdtemp(prefix="storm-logs-"))
    with ProcessGroup(logdir) as procs:
        for run in range(args.runs if not args.no_storm else 0):
            for k in settings:
                tag = f"mb{k if k < UNLIMITED else 'inf'}-{run}"
                r = storm_round(procs, jl, args.services, args.accel, k, tag)
                print(f"{tag}: {r['all_served_s']} s, {r['boots_per_s']} boots/s, "
                      f"{r['served']}/{r['services']} served, {r['failed_boots']} failed boots",
                      flush=True)
                rounds.append(r)
        if not args.no_budget:
            for many in (False, True):
                tag = f"budget-{'many' if many else 'one'}"
                b = budget_round(procs, jl, args.services, args.accel, args.flood_seconds, many, tag)
                print(f"{tag}: {b}", flush=True)
                budget.append(b)
        if density_skipped is None:
            ns = Namespace()
            try:
                for run in range(args.runs):
                    for binary in (FULL, REDUCED):
                        for huge in (False, True):
                            tag = f"density-{binary.rsplit('-', 1)[-1]}{'-huge' if huge else ''}-{run}"
                            d = density_round(procs, jl, ns, args.density_services, binary, huge,
                                              args.settle, tag)
                            print(f"{tag}: {d}", flush=True)
                            density.append(d)
            finally:
                procs.close()  # every daemon and QEMU gone before their namespace goes
                ns.close()

    text = []
    summary = []
    misses = []
    if rounds:
        rows = [["max_booting", "all served s", "boots/s", "served", "failed", "p50 s", "p99 s",
                 "boot p50", "boot p99", "CPU ms/boot", "daemon RSS", "QEMU RSS", "QEMU PSS",
                 "inst/GiB", "SIGTERM s", "left"]]
        for k in settings:
            rs = [r for r in rounds if r["max_booting"] == ("unlimited" if k >= UNLIMITED else k)]
            s = {key: median([r[key] for r in rs if r[key] is not None] or [0]) for key in rs[0]
                 if key != "max_booting"}
            s["max_booting"] = rs[0]["max_booting"]
            summary.append(s)
            rows.append([
                str(s["max_booting"]) + (" (default)" if k == default else ""),
                f"{s['all_served_s']:.2f}", f"{s['boots_per_s']:.1f}", f"{s['served']:.0f}",
                f"{s['failed_gets'] + s['failed_boots']:.0f}", f"{s['served_p50_s']:.2f}",
                f"{s['served_p99_s']:.2f}", f"{s['boot_p50_s']:.2f}", f"{s['boot_p99_s']:.2f}",
                f"{s['daemon_cpu_ms_per_boot']:.0f}+{s['qemu_cpu_ms_per_boot']:.0f}",
                f"{s['daemon_rss_mib']:.0f} MiB", f"{s['qemu_rss_total_mib']:.0f} MiB",
                f"{s['qemu_pss_total_mib']:.0f} MiB", f"{s['instances_per_gib_pss']:.1f}",
                f"{s['sigterm_exit_s']:.2f}", f"{s['qemus_left']:.0f}",
            ])
        best = max(summary, key=lambda s: s["boots_per_s"])
        chosen = next(s for s in summary if s["max_booting"] == default)
        text += [f"boot storm: {args.services} qemu services (bundled unikernel, {args.accel}, "
                 f"user networking, {FULL}), {args.runs} round(s) per setting; median per setting",
                 table(rows),
                 f"most boots/s: max_booting {best['max_booting']} ({best['boots_per_s']:.1f}/s); "
                 f"the default here is {default}"]
        if chosen["served"] < args.services or chosen["failed_gets"] or chosen["failed_boots"]:
            misses.append("not all served, or failures, with the default max_booting")
        if chosen["all_served_s"] > TARGET_SECONDS:
            misses.append(f"all served in {chosen['all_served_s']:.2f} s > {TARGET_SECONDS:g} s")
        if chosen["boots_per_s"] < TARGET_BOOTS:
            misses.append(f"{chosen['boots_per_s']:.1f} boots/s < {TARGET_BOOTS:g}")
    if budget:
        brows = [["sources", "lookups", "peak instances", "admitted", "queued", "evicted",
                  "refused", "wake-limited", "left"]]
        for b in budget:
            brows.append([str(b["sources"]), str(b["lookups_sent"]), str(b["peak_instances"]),
                          str(b["admitted"]), str(b["queued"]), str(b["evicted"]), str(b["refused"]),
                          str(b["wake_limited"]), str(b["qemus_left"])])
        text += [f"budget: [host] max_instances = {BUDGET}, wake limit default, "
                 f"{args.flood_seconds:g} s flood of lookups for all {args.services} names",
                 table(brows)]
    density_summary = []
    if density:
        drows = [["QEMU", "hugepages", "served", "QEMU RSS", "QEMU PSS", "daemon RSS",
                  "daemon PSS", "RSS/inst", "PSS/inst", "inst/GiB RSS", "inst/GiB PSS", "left"]]
        for binary in (FULL, REDUCED):
            for huge in (False, True):
                ds = [d for d in density if d["binary"] == binary and d["hugepages"] == huge]
                m = {key: median([d[key] for d in ds if d[key] is not None] or [0])
                     for key in ds[0] if isinstance(ds[0][key], int | float)
                     and not isinstance(ds[0][key], bool)}
                m.update(binary=binary, hugepages=huge)
                density_summary.append(m)
                drows.append([
                    binary, "true" if huge else "false (default)",
                    f"{m['served']:.0f}/{m['services']:.0f}",
                    f"{m['qemu_rss_mib']:.2f}", f"{m['qemu_pss_mib']:.2f}",
                    f"{m['daemon_rss_mib']:.2f}", f"{m['daemon_pss_mib']:.2f}",
                    f"{m['rss_per_instance_mib']:.2f}", f"{m['pss_per_instance_mib']:.2f}",
                    f"{m['instances_per_gib_rss']:.1f}", f"{m['instances_per_gib_pss']:.1f}",
                    f"{m['qemus_left']:.0f}",
                ])

        def per(binary: str, huge: bool, key: str) -> float:
            return float(next(m[key] for m in density_summary
                              if m["binary"] == binary and m["hugepages"] == huge))

        rss, pss = "rss_per_instance_mib", "pss_per_instance_mib"
        text += [f"density: {args.density_services} idle qemu services per round (bundled "
                 f"unikernel, KVM, bridge networking in a namespace of the bench's own, "
                 f"{args.settle:g} s idle), {args.runs} round(s) each; MiB per instance "
                 "(medians): QEMU's, the daemon's share (its growth over N), and their sum",
                 table(drows),
                 f"reduced/full per instance: RSS {per(REDUCED, False, rss) / per(FULL, False, rss):.2f}, "
                 f"PSS {per(REDUCED, False, pss) / per(FULL, False, pss):.2f}; hugepages = false "
                 f"saves {per(FULL, True, rss) - per(FULL, False, rss):.2f} MiB RSS and "
                 f"{per(FULL, True, pss) - per(FULL, False, pss):.2f} MiB PSS per instance with the "
                 f"full QEMU, {per(REDUCED, True, rss) - per(REDUCED, False, rss):.2f} and "
                 f"{per(REDUCED, True, pss) - per(REDUCED, False, pss):.2f} with the reduced build"]
        reduced = per(REDUCED, False, "rss_per_instance_mib")
        if reduced > TARGET_IDLE_RSS_MIB:
            misses.append(f"idle RSS per instance with the reduced build {reduced:.2f} MiB > "
                          f"{TARGET_IDLE_RSS_MIB:g}")
        if any(d["served"] < d["services"] or d["qemus"] != d["services"] for d in density):
            misses.append("density: not every instance served and running")
        if any(d["programs_running"] != [d["binary"]] for d in density):
            misses.append("density: an instance ran another program than the one configured")
    elif not args.no_density:
        text.append(f"density: not measured: {density_skipped}")
        misses.append(f"density not measured ({density_skipped})")
    if any(r["qemus_left"] for r in rounds) or any(b["qemus_left"] for b in budget) \
            or any(d["qemus_left"] for d in density):
        misses.append("QEMU processes left after SIGTERM")
    if any(b["peak_instances"] > BUDGET for b in budget):
        misses.append(f"more than {BUDGET} instances at once under the budget")
    text.append("targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    out = "\n".join(text)
    print(out)
    if not args.no_write:
        data = {"machine": machine_info(), "load_before": load, "args": vars(args),
                "default_max_booting": default, "rounds": rounds, "summary": summary,
                "budget": budget, "density": density, "density_summary": density_summary,
                "misses": misses}
        for p in write_results("storm", data, out):
            print(f"wrote {p}")
    return 1 if misses else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"storm: {exc}", file=sys.stderr)
        sys.exit(2)
