#!/usr/bin/env python3
"""DNS throughput: jitlaunch against NSD, same zone, same queries, same dnsperf settings.

Run from the repository root:  python3 bench/dns_qps/run.py [--duration 10] [--runs 3]

1. Start ``jitlaunch run`` on a loopback port with zone jit.test and one process-backend
   service ``hello`` (the demo HTTP responder, with ``subnet`` so that answers hand over the
   instance's own address), response rate limiting off (``[dns.rrl] rate = 0``, as NSD is
   measured). Make it ready: one lookup starts it, then poll until the answer carries an
   address in the subnet with TTL 30.
2. Start NSD (``nsd -d``, one server process, RRL off) on another loopback port serving the
   same zone, with hello.jit.test A set to that same address and TTL 30.
3. For each workload, run dnsperf (UDP) against each server, alternating, N times; take the
   median of queries per second, of average latency and of server CPU µs per query, and
   sum lost queries. Workloads:
   ``ready``: ``hello.jit.test A`` only (the cached answer for a ready service);
   ``random``: 1,000,000 distinct random names under jit.test (every answer NXDOMAIN, the
   "random subdomain" flood);
   ``mix``: half ``hello.jit.test A``, half random names, interleaved.

Targets: ready >= 25,000 q/s; random >= 40,000 q/s and >= 0.4 of NSD's; mix >= 40,000 q/s.
Results go to bench/results/dns_qps.json and bench/results/dns_qps.txt.

The cost of metrics, after that, on ``ready``: for each run a fresh daemon with metrics
(``[metrics] listen`` on a free port, scraped every second while dnsperf runs, as a harsh
Prometheus would) and a fresh one without (``listen = []``, which also turns off the counting
of DNS queries), in alternating order, each alone, each after a 1 s warm-up. (Two daemons
running side by side differed by 20-60 % whichever had metrics: the one started first was
faster.) Target: with metrics, the daemon's CPU time per query at most 5 % above that without
(the q/s ratio is quoted too, but on this shared machine q/s varies by 20 % and more from run
to run, NSD's too, so it cannot resolve 5 %). ``--legacy`` measures a tree from before
``[metrics]`` and ``[dns.rrl]`` existed: those tables are left out, and so is this phase.

Response rate limiting, last, for a large resolver behind one prefix: every query from one
source address (dnsperf ``-a``, in a /24 of loopback) for many names of the service, with RRL
on at its default (200 identical answers per second per prefix) against the same with RRL
off, each a fresh daemon alone, alternating, and against NSD with its own RRL on at the same
rate (``rrl-ratelimit: 200``). Workloads:
``resolver``: 50 names, paced at 100 queries per second each (5,000 q/s, ``-Q``), half the
rate (dnsperf catches up after a stall of the machine with a burst, which the other half
absorbs): no answer may be lost or limited;
``resolver_full``: 2,000 names unpaced (each name well under the rate at any q/s this machine
reaches): the cost of RRL, server-bound.
Targets: with RRL on, no reply limited (the daemon's own count) in either workload, none lost
in ``resolver``, and q/s at least 0.9 of RRL off in each.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BenchError,
    ProcessGroup,
    cpu_seconds,
    free_port,
    jitlaunch_command,
    loopback_block,
    machine_info,
    median,
    poll,
    require_tool,
    table,
    warn_if_busy,
    write_results,
)
from dnslib import QTYPE, DNSRecord

NAME = "hello.jit.test"
TTL = 30
#: Per workload: the least q/s for jitlaunch, the least ratio to NSD, and the response
#: codes dnsperf must see (nothing else).
TARGETS: dict[str, tuple[int, float, set[str]]] = {
    "ready": (25_000, 0.0, {"NOERROR"}),
    "random": (40_000, 0.4, {"NXDOMAIN"}),
    "mix": (40_000, 0.0, {"NOERROR", "NXDOMAIN"}),
}
RANDOM_NAMES = 1_000_000
#: CPU time per query with metrics on, at most this multiple of that with metrics off (ready).
TARGET_METRICS_CPU = 1.05
#: The RRL phase: per workload, its names and its pace (dnsperf -Q; None: --max-qps).
RRL_RATE = 200  # jitlaunch's default [dns.rrl] rate; NSD's rrl-ratelimit is set to it
RRL_WORKLOADS: dict[str, tuple[int, int | None]] = {
    "resolver": (50, 50 * 100),
    "resolver_full": (2000, None),
}
#: With RRL on, q/s at least this fraction of RRL off.
TARGET_RRL_QPS = 0.9


def resolver_names(workload: str) -> list[str]:
    count, _ = RRL_WORKLOADS[workload]
    prefix = "s" if workload == "resolver" else "r"
    return [f"{prefix}{i}.jit.test" for i in range(count)]


ALL_RESOLVER_NAMES = [n for w in RRL_WORKLOADS for n in resolver_names(w)]


def query(port: int, name: str = NAME, timeout: float = 0.5) -> DNSRecord | None:
    q = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(65535)
        except TimeoutError:
            return None
    rec = DNSRecord.parse(data)
    return rec if rec.header.id == q.header.id else None


def a_records(rec: DNSRecord | None) -> list[tuple[str, int]]:
    if rec is None:
        return []
    return [(str(rr.rdata), rr.ttl) for rr in rec.rr if rr.rtype == QTYPE.A]


def jitlaunch_config(
    tmp: Path, port: int, front: str, subnet: str, metrics: str = "", tag: str = "",
    legacy: bool = False, rrl: bool = False,
) -> str:
    """The daemon's config; ``rrl``: response rate limiting at its default, else off."""
    demo = "{python} -m jitlaunch.demo_http --address {address} --port {port} --name {name}"
    rrl_off = "[dns.rrl]" + chr(10) + "rate = 0  # off, as for NSD: all from 127.0.0.1" + chr(10)
    names = "" if legacy else "names = [" + ", ".join(f'"{n}"' for n in ALL_RESOLVER_NAMES) + "]"
    return f"""# generated by bench/dns_qps/run.py
[daemon]
state_dir = "{tmp / ('state' + tag)}"
drain_timeout = "2s"

{"" if legacy else f"[metrics]{chr(10)}listen = [{metrics}]{chr(10)}"}
[dns]
listen = ["127.0.0.1:{port}"]
zones = ["jit.test"]
ttl = {TTL}
booting_ttl = 1

{"" if legacy or rrl else rrl_off}
[[service]]
name = "hello"
{names}
front = ["{front}"]
ports = [8080]
answer = "handoff"
idle_timeout = "30m"
boot_timeout = "20s"
[service.process]
command = "{demo}"
subnet = "{subnet}"
"""


def nsd_files(tmp: Path, port: int, address: str, ratelimit: int = 0) -> Path:
    """NSD's zone and config; ``ratelimit``: its RRL (rrl-ratelimit), 0 for off."""
    zdir = tmp / ("nsd" if not ratelimit else "nsd-rrl")
    zdir.mkdir()
    resolver = "".join(f"{n.removesuffix('.jit.test')}  {TTL} IN A {address}\n"
                       for n in ALL_RESOLVER_NAMES)
    (zdir / "jit.test.zone").write_text(
        f"""$ORIGIN jit.test.
$TTL 300
@      IN SOA ns.jit.test. hostmaster.jit.test. 1 3600 600 86400 30
@      IN NS  ns.jit.test.
ns     IN A   127.0.0.1
hello  {TTL} IN A {address}
{resolver}"""
    )
    conf = zdir / "nsd.conf"
    conf.write_text(
        f"""server:
    ip-address: 127.0.0.1@{port}
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{zdir}"
    pidfile: "{zdir}/nsd.pid"
    xfrdfile: "{zdir}/xfrd.state"
    zonelistfile: "{zdir}/zone.list"
    database: ""
    logfile: "{zdir}/nsd.log"
    verbosity: 1
    hide-version: yes
    # Response rate limiting is on by default in Debian's build (200 q/s per /24):
    # it would throttle a benchmark that sends everything from 127.0.0.1 (except in the
    # RRL phase, where it is on at jitlaunch's rate, per /24 as jitlaunch's).
    rrl-ratelimit: {ratelimit}
    rrl-whitelist-ratelimit: 0
    rrl-slip: 2
    rrl-ipv4-prefix-length: 24
remote-control:
    control-enable: no
zone:
    name: "jit.test"
    zonefile: "jit.test.zone"
"""
    )
    return conf


_FIELDS = {
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "qps": r"Queries per second:\s+([\d.]+)",
    "avg_latency_s": r"Average Latency \(s\):\s+([\d.]+)",
    "min_latency_s": r"Average Latency \(s\):\s+[\d.]+ \(min ([\d.]+)",
    "max_latency_s": r"Average Latency \(s\):.*max ([\d.]+)\)",
    "latency_stddev_s": r"Latency StdDev \(s\):\s+([\d.]+)",
    "run_time_s": r"Run time \(s\):\s+([\d.]+)",
}


def dnsperf(tool: str, port: int, qfile: Path, args: argparse.Namespace,
            codes_expected: set[str], source: str | None = None,
            max_qps: int | None = None) -> dict[str, Any]:
    """One dnsperf run; ``source``: the address it sends from (-a), ``max_qps`` its pace."""
    argv = [
        tool, "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile),
        "-l", str(args.duration), "-c", str(args.clients), "-T", str(args.threads),
        "-q", str(args.outstanding), "-Q", str(max_qps or args.max_qps), "-t", "2",
        *(["-a", source] if source else []),
    ]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=args.duration + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"dnsperf did not finish: {' '.join(argv)}") from exc
    if out.returncode != 0:
        raise BenchError(f"dnsperf failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    result: dict[str, Any] = {}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, out.stdout)
        if not m:
            raise BenchError(f"cannot find {key!r} in dnsperf output:\n{out.stdout}")
        result[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    codes = re.search(r"Response codes:\s+(.*)", out.stdout)
    result["response_codes"] = codes.group(1).strip() if codes else ""
    seen = set(re.findall(r"([A-Z]+) \d+", result["response_codes"]))
    if seen != codes_expected:
        raise BenchError(f"unexpected response codes: {result['response_codes']} "
                         f"(expected {', '.join(sorted(codes_expected))})")
    return result


def query_files(tmp: Path, seed: int = 1) -> dict[str, Path]:
    """The query file of each workload (dnsperf loops over a file when it reaches the end)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    names = {"".join(rng.choices(letters, k=14)) for _ in range(RANDOM_NAMES + 1000)}
    unique = [f"{n}.jit.test A" for n in sorted(names)][:RANDOM_NAMES]
    rng.shuffle(unique)
    files = {"ready": tmp / "ready.txt", "random": tmp / "random.txt", "mix": tmp / "mix.txt"}
    files["ready"].write_text(f"{NAME} A\n")
    files["random"].write_text("\n".join(unique) + "\n")
    mixed = []
    for line in unique[: RANDOM_NAMES // 2]:
        mixed += [f"{NAME} A", line]
    files["mix"].write_text("\n".join(mixed) + "\n")
    for workload in RRL_WORKLOADS:
        files[workload] = tmp / f"{workload}.txt"
        files[workload].write_text("".join(f"{n} A\n" for n in resolver_names(workload)))
    return files


def limited_count(metrics_port: int) -> float:
    """jitlaunch_dns_responses_limited_total, slipped and dropped together, scraped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(float(v) for v in re.findall(
        r'^jitlaunch_dns_responses_limited_total\{[^}]*\} (\S+)$', body, re.M))


class Scraper(threading.Thread):
    """Scrapes a metrics endpoint every ``interval`` seconds while :attr:`on` is set."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.on = threading.Event()
        self.done = threading.Event()
        self.scrapes = 0
        self.failures = 0
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self.done.is_set():
            if self.on.wait(0.1):
                t = time.monotonic()
                try:
                    with urllib.request.urlopen(self.url, timeout=5) as r:
                        body = r.read()
                    if b"jitlaunch_dns_queries_total" not in body:
                        self.failures += 1
                    self.scrapes += 1
                    self.seconds.append(time.monotonic() - t)
                except OSError:
                    self.failures += 1
                self.done.wait(max(0.0, self.interval - (time.monotonic() - t)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per dnsperf run (10)")
    ap.add_argument("--runs", type=int, default=3, help="runs per server; medians are quoted (3)")
    ap.add_argument("--clients", type=int, default=4, help="dnsperf -c (4)")
    ap.add_argument("--threads", type=int, default=1, help="dnsperf -T (1)")
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (100)")
    ap.add_argument("--max-qps", type=int, default=200_000, help="dnsperf -Q (200000)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    ap.add_argument("--jitlaunch", metavar="CMD",
                    help="command that starts the daemon (default: jitlaunch on PATH); e.g. "
                    "'python3 -m jitlaunch.cli' with PYTHONPATH set to compare another tree "
                    "(it runs in a temporary directory, so the repository's copy is not on sys.path)")
    ap.add_argument("--workloads", nargs="+", choices=[*TARGETS, *RRL_WORKLOADS],
                    default=[*TARGETS, *RRL_WORKLOADS], help="which workloads (all)")
    ap.add_argument("--legacy", action="store_true",
                    help="a tree from before [metrics] and [dns.rrl]: leave them out of the "
                    "config and measure no second daemon")
    args = ap.parse_args()
    if not 1 <= args.duration <= 60 or not 1 <= args.runs <= 9:
        ap.error("--duration must be 1..60 and --runs 1..9")

    try:
        perf = require_tool("dnsperf")
        nsd = require_tool("nsd", "/usr/sbin/nsd")
        jl = shlex.split(args.jitlaunch) if args.jitlaunch else jitlaunch_command()
    except BenchError as exc:
        print(f"dns_qps: {exc}", file=sys.stderr)
        return 2

    load_start = warn_if_busy("dns_qps")
    block = loopback_block()
    front = f"{block}.1"
    subnet = f"{block.rsplit('.', 1)[0]}.{int(block.rsplit('.', 1)[1]) ^ 1}.0/24"
    net = ipaddress.ip_network(subnet)

    front_m = f"{block}.2"
    subnet_m = f"{block.rsplit('.', 1)[0]}.{int(block.rsplit('.', 1)[1]) ^ 2}.0/24"
    net_m = ipaddress.ip_network(subnet_m)

    servers = ["jitlaunch", "nsd"]
    main_workloads = [w for w in args.workloads if w in TARGETS]
    rrl_workloads = [] if args.legacy else [w for w in args.workloads if w in RRL_WORKLOADS]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {server: [] for server in servers} for w in main_workloads}
    #: The RRL phase: jitlaunch with RRL on and off (fresh daemons), NSD with RRL on.
    rrl_servers = ["jitlaunch_rrl", "jitlaunch_rrl_off", "nsd_rrl"]
    rrl_results: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {server: [] for server in rrl_servers} for w in rrl_workloads}
    source = f"{block}.77"  # the resolver's address, in a /24 of its own
    #: The cost of metrics (ready): fresh daemons with and without, and their scrapers.
    cost: dict[str, list[dict[str, Any]]] = {"metrics_on": [], "metrics_off": []}
    scrapers: list[Scraper] = []
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmpname, ProcessGroup(
        Path(tmpname)
    ) as procs:
        tmp = Path(tmpname)
        try:
            # --- jitlaunch -------------------------------------------------------------
            jport, mport = free_port(), free_port()
            cfg = tmp / "jitlaunch.toml"
            cfg.write_text(jitlaunch_config(tmp, jport, front, subnet, f'"127.0.0.1:{mport}"',
                                            legacy=args.legacy))
            t0 = time.monotonic()
            jproc = procs.start("jitlaunch", [*jl, "run", "--config", str(cfg)], cwd=tmp)
            poll(lambda: query(jport) is not None, 30, "jitlaunch DNS to answer", procs=procs)

            def instance_ready(port: int = jport, net: Any = net) -> str | None:
                recs = a_records(query(port))
                for addr, ttl in recs:
                    if ipaddress.ip_address(addr) in net and ttl == TTL:
                        return addr
                return None

            address = poll(instance_ready, 30, "the hello instance to be ready", 0.05, procs)
            procs.remember_children()
            print(f"jitlaunch: DNS 127.0.0.1:{jport}, {NAME} -> {address} (TTL {TTL}) "
                  f"after {time.monotonic() - t0:.2f} s"
                  + ("" if args.legacy else f"; metrics on 127.0.0.1:{mport}"))
            ports = {"jitlaunch": (jport, jproc.pid)}

            # --- NSD ---------------------------------------------------------------------
            nport = free_port()
            conf = nsd_files(tmp, nport, address)
            nproc = procs.start("nsd", [nsd, "-d", "-c", str(conf)])
            poll(lambda: a_records(query(nport)) == [(address, TTL)], 30,
                 "NSD to answer", procs=procs)
            procs.remember_children()
            print(f"nsd: DNS 127.0.0.1:{nport}, {NAME} -> {address} (TTL {TTL})")
            ports["nsd"] = (nport, nproc.pid)

            qfiles = query_files(tmp)
            # Warm-up (not counted): one short run each.
            short = argparse.Namespace(**{**vars(args), "duration": 1})
            for port, _ in ports.values():
                dnsperf(perf, port, qfiles["ready"], short, TARGETS["ready"][2])
            for workload in main_workloads:
                for i in range(args.runs):
                    # Alternate which jitlaunch goes first, so neither always follows NSD.
                    pair = [s for s in servers if s != "nsd"]
                    for server in [*(pair if i % 2 == 0 else pair[::-1]), "nsd"]:
                        port, pid = ports[server]
                        procs.check_alive()
                        # NSD answers in a child process; jitlaunch's children are instances.
                        tree = server == "nsd"
                        cpu0 = cpu_seconds(pid, tree)
                        r = dnsperf(perf, port, qfiles[workload], args, TARGETS[workload][2])
                        r["server_cpu_s"] = cpu_seconds(pid, tree) - cpu0
                        r["server_cpu_us_per_query"] = (
                            r["server_cpu_s"] / max(1, r["completed"]) * 1e6)
                        results[workload][server].append(r)
                        print(f"{workload:6s} run {i + 1}/{args.runs} {server:10s}: "
                              f"{r['qps']:10.0f} q/s, avg latency "
                              f"{r['avg_latency_s'] * 1e6:7.0f} µs, lost {r['lost']}, "
                              f"server CPU {r['server_cpu_us_per_query']:.1f} µs/query",
                              flush=True)
            # Still answering the instance address afterwards?
            if instance_ready() != address:
                raise BenchError("jitlaunch no longer hands over the instance address")
            rss_kib = rss(jproc.pid)

            # --- the cost of metrics: fresh daemons, each alone, alternating -----------------
            for i in range(0 if args.legacy else args.runs):
                for on in ((True, False) if i % 2 == 0 else (False, True)):
                    name = "metrics_on" if on else "metrics_off"
                    port, mport = free_port(), free_port()
                    mcfg = tmp / f"{name}-{i}.toml"
                    mcfg.write_text(jitlaunch_config(
                        tmp, port, front_m, subnet_m, f'"127.0.0.1:{mport}"' if on else "",
                        f"-{name}-{i}"))
                    proc = procs.start(f"{name}-{i}", [*jl, "run", "--config", str(mcfg)], cwd=tmp)
                    poll(lambda port=port: query(port) is not None, 30, f"{name} DNS to answer",
                         procs=procs)
                    poll(lambda port=port: instance_ready(port, net_m), 30,
                         f"{name}'s instance to be ready", 0.05, procs)
                    procs.remember_children()
                    scraper = None
                    if on:
                        scraper = Scraper(mport)
                        scraper.start()
                        scrapers.append(scraper)
                    try:
                        dnsperf(perf, port, qfiles["ready"], short, TARGETS["ready"][2])
                        cpu0 = cpu_seconds(proc.pid, False)
                        if scraper is not None:
                            scraper.on.set()
                        r = dnsperf(perf, port, qfiles["ready"], args, TARGETS["ready"][2])
                    finally:
                        if scraper is not None:
                            scraper.done.set()
                    r["server_cpu_s"] = cpu_seconds(proc.pid, False) - cpu0
                    r["server_cpu_us_per_query"] = r["server_cpu_s"] / max(1, r["completed"]) * 1e6
                    cost[name].append(r)
                    print(f"ready  run {i + 1}/{args.runs} {name:11s}: {r['qps']:10.0f} q/s, "
                          f"avg latency {r['avg_latency_s'] * 1e6:7.0f} µs, "
                          f"server CPU {r['server_cpu_us_per_query']:.1f} µs/query", flush=True)
                    procs.stop(proc)
                    procs.procs = [(n, p) for n, p in procs.procs if p is not proc]

            # --- response rate limiting: a resolver behind one prefix ------------------------
            if rrl_workloads:
                rport = free_port()
                rconf = nsd_files(tmp, rport, address, ratelimit=RRL_RATE)
                rproc = procs.start("nsd-rrl", [nsd, "-d", "-c", str(rconf)])
                poll(lambda: a_records(query(rport)) == [(address, TTL)], 30,
                     "NSD (RRL on) to answer", procs=procs)
                procs.remember_children()
            for i in range(args.runs if rrl_workloads else 0):
                for on in ((True, False) if i % 2 == 0 else (False, True)):
                    name = "jitlaunch_rrl" if on else "jitlaunch_rrl_off"
                    port, mport = free_port(), free_port()
                    rcfg = tmp / f"{name}-{i}.toml"
                    rcfg.write_text(jitlaunch_config(
                        tmp, port, front_m, subnet_m, f'"127.0.0.1:{mport}"', f"-{name}-{i}",
                        rrl=on))
                    proc = procs.start(f"{name}-{i}", [*jl, "run", "--config", str(rcfg)], cwd=tmp)
                    poll(lambda port=port: query(port) is not None, 30, f"{name} DNS to answer",
                         procs=procs)
                    poll(lambda port=port: instance_ready(port, net_m), 30,
                         f"{name}'s instance to be ready", 0.05, procs)
                    procs.remember_children()
                    dnsperf(perf, port, qfiles["resolver_full"], short, {"NOERROR"}, source)
                    for workload in rrl_workloads:
                        limited0 = limited_count(mport)
                        cpu0 = cpu_seconds(proc.pid, False)
                        r = dnsperf(perf, port, qfiles[workload], args, {"NOERROR"}, source,
                                    RRL_WORKLOADS[workload][1])
                        r["server_cpu_s"] = cpu_seconds(proc.pid, False) - cpu0
                        r["server_cpu_us_per_query"] = (
                            r["server_cpu_s"] / max(1, r["completed"]) * 1e6)
                        r["limited"] = int(limited_count(mport) - limited0)
                        rrl_results[workload][name].append(r)
                        print(f"{workload:13s} run {i + 1}/{args.runs} {name:17s}: "
                              f"{r['qps']:9.0f} q/s, avg latency "
                              f"{r['avg_latency_s'] * 1e6:6.0f} µs, lost {r['lost']}, "
                              f"limited {r['limited']}, "
                              f"server CPU {r['server_cpu_us_per_query']:.1f} µs/query", flush=True)
                    procs.stop(proc)
                    procs.procs = [(n, p) for n, p in procs.procs if p is not proc]
                for workload in rrl_workloads:
                    procs.check_alive()
                    cpu0 = cpu_seconds(rproc.pid, True)
                    r = dnsperf(perf, rport, qfiles[workload], args, {"NOERROR"}, source,
                                RRL_WORKLOADS[workload][1])
                    r["server_cpu_s"] = cpu_seconds(rproc.pid, True) - cpu0
                    r["server_cpu_us_per_query"] = r["server_cpu_s"] / max(1, r["completed"]) * 1e6
                    rrl_results[workload]["nsd_rrl"].append(r)
                    print(f"{workload:13s} run {i + 1}/{args.runs} {'nsd_rrl':17s}: "
                          f"{r['qps']:9.0f} q/s, avg latency {r['avg_latency_s'] * 1e6:6.0f} µs, "
                          f"lost {r['lost']}, server CPU {r['server_cpu_us_per_query']:.1f} "
                          f"µs/query", flush=True)
        except BenchError as exc:
            print(f"dns_qps: FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for sc in scrapers:
                sc.done.set()

    summary: dict[str, dict[str, Any]] = {}
    verdicts = []
    rows = [["workload", "server", "q/s (median)", "avg latency µs", "CPU µs/query",
             "lost / sent", "runs q/s"]]
    for workload in main_workloads:
        summary[workload] = {}
        for server, runs in results[workload].items():
            summary[workload][server] = {
                "qps_median": median([r["qps"] for r in runs]),
                "avg_latency_us_median": median([r["avg_latency_s"] * 1e6 for r in runs]),
                "server_cpu_us_per_query_median": median(
                    [r["server_cpu_us_per_query"] for r in runs]),
                "lost_total": sum(r["lost"] for r in runs),
                "sent_total": sum(r["sent"] for r in runs),
                "runs": runs,
            }
            s = summary[workload][server]
            rows.append([
                workload, server, f"{s['qps_median']:.0f}", f"{s['avg_latency_us_median']:.0f}",
                f"{s['server_cpu_us_per_query_median']:.1f}",
                f"{s['lost_total']} / {s['sent_total']}",
                " ".join(f"{r['qps']:.0f}" for r in s["runs"]),
            ])
        jq = summary[workload]["jitlaunch"]["qps_median"]
        nq = summary[workload]["nsd"]["qps_median"]
        ratio = jq / nq if nq else 0.0
        least_qps, least_ratio, _ = TARGETS[workload]
        ok = jq >= least_qps and ratio >= least_ratio
        summary[workload]["ratio_jitlaunch_over_nsd"] = ratio
        wanted = f">= {least_qps} q/s" + (f" and >= {least_ratio:g} of NSD" if least_ratio else "")
        line = (f"{workload:6s}: {jq:6.0f} q/s, {ratio:.3f} of NSD; target {wanted}: "
                f"{'PASS' if ok else 'FAIL'}")
        summary[workload]["pass"] = ok
        verdicts.append(line)
    metrics_summary: dict[str, Any] | None = None
    if cost["metrics_on"] and cost["metrics_off"]:
        on_q = median([r["qps"] for r in cost["metrics_on"]])
        off_q = median([r["qps"] for r in cost["metrics_off"]])
        cpu_on = median([r["server_cpu_us_per_query"] for r in cost["metrics_on"]])
        cpu_off = median([r["server_cpu_us_per_query"] for r in cost["metrics_off"]])
        n_scrapes = sum(sc.scrapes for sc in scrapers)
        n_failed = sum(sc.failures for sc in scrapers)
        scrape_s = [t for sc in scrapers for t in sc.seconds] or [0.0]
        metrics_ok = (cpu_off > 0 and cpu_on / cpu_off <= TARGET_METRICS_CPU and n_scrapes > 0
                      and n_failed == 0)
        metrics_summary = {
            "qps_median_on_off": [on_q, off_q], "cpu_us_per_query_median_on_off": [cpu_on, cpu_off],
            "ratio_qps_on_over_off": on_q / off_q if off_q else 0.0,
            "ratio_cpu_on_over_off": cpu_on / cpu_off if cpu_off else 0.0,
            "scrapes": {"count": n_scrapes, "failed": n_failed, "median_s": median(scrape_s)},
            "runs": cost, "pass": metrics_ok,
        }
        verdicts.append(
            f"metrics (ready, a fresh daemon each, on/off alternating; on: scraped every 1 s, "
            f"{n_scrapes} scrapes, {n_failed} failed, median {median(scrape_s) * 1000:.1f} ms; "
            f"off: [metrics] listen = []): q/s {on_q:.0f} / {off_q:.0f} = "
            f"{on_q / off_q if off_q else 0:.3f}, CPU µs/query {cpu_on:.2f} / {cpu_off:.2f} = "
            f"{cpu_on / cpu_off if cpu_off else 0:.3f}; target CPU on/off <= {TARGET_METRICS_CPU}: "
            f"{'PASS' if metrics_ok else 'FAIL'}")
    rrl_summary: dict[str, dict[str, Any]] = {}
    rrl_rows = [["workload", "server", "q/s (median)", "avg latency µs", "CPU µs/query",
                 "lost / sent", "limited", "runs q/s"]]
    for workload in rrl_workloads:
        rrl_summary[workload] = {}
        for server, runs in rrl_results[workload].items():
            s = rrl_summary[workload][server] = {
                "qps_median": median([r["qps"] for r in runs]),
                "avg_latency_us_median": median([r["avg_latency_s"] * 1e6 for r in runs]),
                "server_cpu_us_per_query_median": median(
                    [r["server_cpu_us_per_query"] for r in runs]),
                "lost_total": sum(r["lost"] for r in runs),
                "sent_total": sum(r["sent"] for r in runs),
                "limited_total": sum(r.get("limited", 0) for r in runs),
                "runs": runs,
            }
            rrl_rows.append([
                workload, server, f"{s['qps_median']:.0f}", f"{s['avg_latency_us_median']:.0f}",
                f"{s['server_cpu_us_per_query_median']:.1f}",
                f"{s['lost_total']} / {s['sent_total']}",
                "-" if server == "nsd_rrl" else str(s["limited_total"]),
                " ".join(f"{r['qps']:.0f}" for r in runs),
            ])
        on, off = rrl_summary[workload]["jitlaunch_rrl"], rrl_summary[workload]["jitlaunch_rrl_off"]
        nsd_on = rrl_summary[workload]["nsd_rrl"]
        ratio = on["qps_median"] / off["qps_median"] if off["qps_median"] else 0.0
        cpu_ratio = (on["server_cpu_us_per_query_median"] / off["server_cpu_us_per_query_median"]
                     if off["server_cpu_us_per_query_median"] else 0.0)
        paced = RRL_WORKLOADS[workload][1] is not None
        ok = (on["limited_total"] == 0 and ratio >= TARGET_RRL_QPS
              and (not paced or on["lost_total"] == 0))
        rrl_summary[workload].update({"ratio_qps_on_over_off": ratio,
                                      "ratio_cpu_on_over_off": cpu_ratio, "pass": ok})
        names, pace = RRL_WORKLOADS[workload]
        verdicts.append(
            f"{workload} ({names} names from {source}, "
            f"{f'{pace} q/s' if pace else 'unpaced'}): RRL on {on['qps_median']:.0f} q/s, "
            f"lost {on['lost_total']}, limited {on['limited_total']}; RRL off "
            f"{off['qps_median']:.0f} q/s; on/off q/s {ratio:.3f}, CPU µs/query "
            f"{cpu_ratio:.3f}; NSD RRL on {nsd_on['qps_median']:.0f} q/s, lost "
            f"{nsd_on['lost_total']}; target none limited"
            f"{', none lost' if paced else ''}, q/s on/off >= {TARGET_RRL_QPS}: "
            f"{'PASS' if ok else 'FAIL'}")
    passed = all(summary[w]["pass"] for w in main_workloads) and (
        metrics_summary is None or metrics_summary["pass"]) and all(
        rrl_summary[w]["pass"] for w in rrl_workloads)
    settings = (f"dnsperf -l {args.duration} -c {args.clients} -T {args.threads} "
                f"-q {args.outstanding} -Q {args.max_qps} -t 2 (UDP); ready: '{NAME} A'; "
                f"random: {RANDOM_NAMES:,} distinct names under jit.test; mix: half each")
    scrapes = ""
    text = "\n".join([
        f"DNS throughput, jitlaunch vs NSD (1 server process), {args.runs} runs of "
        f"{args.duration} s each per workload, medians; RRL off on both",
        settings,
        "",
        table(rows),
        "",
        *([f"Response rate limiting at {RRL_RATE}/s per prefix (jitlaunch: fresh daemons, RRL "
           f"on and off alternating; NSD: rrl-ratelimit {RRL_RATE}), all from {source}:",
           table(rrl_rows), ""] if rrl_workloads else []),
        *verdicts,
        *([scrapes] if scrapes else []),
        f"jitlaunch RSS after the runs: {rss_kib / 1024:.0f} MiB",
    ])
    print()
    print(text)
    data = {
        "benchmark": "dns_qps",
        "machine": machine_info() | {"loadavg_1_5_15_at_start": load_start},
        "settings": {**vars(args), "nsd_server_count": 1, "dnsperf": settings,
                     "random_names": RANDOM_NAMES},
        "workloads": summary,
        "targets": {w: {"qps": t[0], "ratio_to_nsd": t[1]} for w, t in TARGETS.items()}
        | {"metrics_cpu_ratio_ready": TARGET_METRICS_CPU, "rrl_qps_ratio_on_off": TARGET_RRL_QPS},
        "metrics_cost": metrics_summary,
        "rrl": rrl_summary,
        "jitlaunch_rss_kib": rss_kib,
        "pass": passed,
    }
    if not args.no_write:
        paths = write_results("dns_qps", data, text)
        print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0 if passed else 1


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
