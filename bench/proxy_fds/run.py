#!/usr/bin/env python3
"""Many idle connections through one front: descriptors and memory per connection, and the
connection cap, for jitlaunch's proxy beside systemd-socket-proxyd in the same run.

Run from the repository root:  python3 bench/proxy_fds/run.py [--connections 6000]

The backend is bench/proxy_fds/holder.py (one thread, epoll: echoes, holds any number of
connections). Both proxies run with the open file limit this script has (the soft limit
raised to the hard one; 20000 on these machines).

* jitlaunch: ``jitlaunch run`` with one process-backend service (``answer = "proxy"``,
  every ``[proxy]`` limit at its default, so ``max_connections`` is derived from the fd
  limit) whose command starts its own holder. Made ready by one echo first.
* systemd-socket-proxyd, under ``systemd-socket-activate``, in front of a second holder, with
  ``--connections-max`` just above ``--connections``.

For each: ``--connections`` connections are opened (for socket-proxyd, as many as it serves
before one fails: at 6 descriptors each it runs out of them first) (from ``--sources`` loopback addresses in
turn, so that jitlaunch's per-source cap, max_connections / 8, is not what stops them), each
sends a byte and gets it back (held and served), and all are held open. Measured: the
proxy's descriptors and RSS before and while they are held, per connection. Then, for
jitlaunch only: connections are added up to its ``max_connections`` (read from its log), one
more must be refused (closed at once), the daemon must still be alive, and after ten
connections close a new one must be served.

Targets: jitlaunch holds and serves all ``--connections`` (at least 6,000), at most 3
descriptors per connection, refuses the one past the cap and lives. Results:
bench/results/proxy_fds.json and proxy_fds.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import socket
import sys
import tempfile
import time
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
    poll,
    require_tool,
    table,
    warn_if_busy,
    write_results,
)

HOLDER = Path(__file__).resolve().parent / "holder.py"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
TARGET_CONNECTIONS = 6000
TARGET_FDS_PER_CONNECTION = 3.0
TIMEOUT = 10.0
BATCH = 250


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def settled(pid: int, seconds: float = 0.5) -> int:
    """The fd count once it has not changed for ``seconds`` (connections just closed are
    still being torn down for a moment)."""
    last, since = fd_count(pid), time.monotonic()
    deadline = since + 15
    while time.monotonic() - since < seconds and time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def hold(
    host: str, port: int, count: int, sources: list[str], start: int = 0, partial: bool = False
) -> list[socket.socket]:
    """Open ``count`` connections, each sends one byte and gets it back; return them open.
    On a failure, raise BenchError, or with ``partial`` return those served so far."""
    served: list[socket.socket] = []
    group: list[socket.socket] = []
    try:
        for first in range(0, count, BATCH):
            group = []
            for i in range(first, min(count, first + BATCH)):
                s = socket.socket()
                group.append(s)
                s.settimeout(TIMEOUT)
                s.bind((sources[(start + i) % len(sources)], 0))
                s.connect((host, port))
            for s in group:
                s.sendall(b"p")
            for s in group:
                if s.recv(1) != b"p":
                    raise BenchError("closed unserved")
                served.append(s)
            group = []
    except (OSError, BenchError) as exc:
        for s in group:
            s.close()
        if partial:
            print(f"  stopped after {len(served)} served connections: {exc}", flush=True)
            return served
        for s in served:
            s.close()
        raise BenchError(f"after {len(served)} connections through {host}:{port}: {exc}") from exc
    return served


def refused(host: str, port: int, source: str) -> bool:
    """True if a new connection is closed at once (before its first byte is answered)."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        s.connect((host, port))
        try:
            s.sendall(b"p")
            return s.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def measure(
    name: str, pid: int, host: str, port: int, count: int, sources: list[str], partial: bool
) -> tuple[dict[str, Any], list[socket.socket]]:
    fds0, rss0, cpu0 = settled(pid), rss_kib(pid), cpu_seconds(pid)
    t0 = time.monotonic()
    held = hold(host, port, count, sources, partial=partial)
    if not held:
        raise BenchError(f"{name}: not one connection served")
    took = time.monotonic() - t0
    fds1, rss1 = settled(pid), rss_kib(pid)
    result = {
        "connections": len(held),
        "fds_before": fds0,
        "fds_held": fds1,
        "fds_per_connection": (fds1 - fds0) / len(held),
        "rss_kib_before": rss0,
        "rss_kib_held": rss1,
        "rss_kib_per_connection": (rss1 - rss0) / len(held),
        "open_seconds": took,
        "cpu_seconds_opening": cpu_seconds(pid) - cpu0,
    }
    print(f"{name}: {len(held)} connections held and served in {took:.1f} s; fds "
          f"{fds0} -> {fds1} ({result['fds_per_connection']:.2f} per connection), RSS "
          f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
          f"({result['rss_kib_per_connection']:.1f} KiB per connection)", flush=True)
    return result, held


def jitlaunch_config(tmp: Path, dns_port: int, front: str, port: int) -> str:
    command = f"{{python}} {HOLDER} --address {{address}} --port {{port}}"
    return f"""# generated by bench/proxy_fds/run.py
[metrics]
listen = []  # the default port may be taken; this benchmark does not scrape

[daemon]
state_dir = "{tmp / 'state'}"
drain_timeout = "2s"

[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["jit.test"]

[[service]]
name = "fds"
front = ["{front}"]
ports = [{port}]
answer = "proxy"
idle_timeout = "30m"
boot_timeout = "20s"
[service.process]
command = "{command}"
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=TARGET_CONNECTIONS,
                    help=f"idle connections held through each proxy ({TARGET_CONNECTIONS})")
    ap.add_argument("--sources", type=int, default=16, help="client source addresses (16)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip systemd-socket-proxyd")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    ap.add_argument("--jitlaunch", metavar="CMD", help="command that starts the daemon")
    args = ap.parse_args()
    if not 1 <= args.connections <= 9000 or not 1 <= args.sources <= 250:
        ap.error("--connections must be 1..9000, --sources 1..250")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        activate = require_tool("systemd-socket-activate", apt="systemd")
        proxyd = require_tool("systemd-socket-proxyd", PROXYD, apt="systemd")
        jl = shlex.split(args.jitlaunch) if args.jitlaunch else jitlaunch_command()
    except BenchError as exc:
        print(f"proxy_fds: {exc}", file=sys.stderr)
        return 2

    load_start = warn_if_busy("proxy_fds")
    block = loopback_block()
    sources = [f"{block}.{10 + i}" for i in range(args.sources)]
    results: dict[str, Any] = {}
    cap: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-fds-") as tmpname, ProcessGroup(
        Path(tmpname)
    ) as procs:
        tmp = Path(tmpname)
        try:
            front, fport = f"{block}.1", 9000
            cfg = tmp / "jitlaunch.toml"
            cfg.write_text(jitlaunch_config(tmp, free_port(), front, fport))
            jproc = procs.start("jitlaunch", [*jl, "run", "--config", str(cfg)], cwd=tmp)
            poll(lambda: hold(front, fport, 1, sources) and True, 30,
                 "the jitlaunch instance behind the proxy", 0.1, procs)
            procs.remember_children()
            log = (tmp / "jitlaunch.log").read_text()
            m = re.search(r"at most (\d+) connections, (\d+) per source \(open file limit (\d+)\)",
                          log)
            if not m:
                raise BenchError("jitlaunch did not log its connection caps")
            max_conn, per_source, fd_limit = (int(g) for g in m.groups())
            print(f"jitlaunch: max_connections {max_conn}, {per_source} per source, fd limit "
                  f"{fd_limit}", flush=True)
            if args.connections > max_conn:
                raise BenchError(f"--connections {args.connections} is above jitlaunch's cap "
                                 f"of {max_conn}")
            results["jitlaunch"], held = measure(
                "jitlaunch", jproc.pid, front, fport, args.connections, sources, False)
            try:
                more = hold(front, fport, max_conn - len(held), sources, start=len(held))
                held += more
                procs.check_alive()
                past = refused(front, fport, sources[0])
                alive = jproc.poll() is None
                for s in held[:10]:
                    s.close()
                del held[:10]
                time.sleep(0.2)  # the proxy notices the closes (no fixed wait is measured)
                served_after = len(hold(front, fport, 1, [f"{block}.250"])) == 1
                cap = {
                    "max_connections": max_conn, "per_source": per_source,
                    "fd_limit": fd_limit, "held_at_cap": len(held) + 10,
                    "refused_past_cap": past, "alive": alive,
                    "served_after_closes": served_after,
                    "fds_at_cap": fd_count(jproc.pid),
                }
                print(f"jitlaunch at its cap: {len(held) + 10} held ({cap['fds_at_cap']} fds), "
                      f"one more refused: {past}, daemon alive: {alive}, served again after "
                      f"10 closed: {served_after}", flush=True)
            finally:
                for s in held:
                    s.close()

            if args.baseline:
                bport = free_port()
                procs.start("holder", [sys.executable, str(HOLDER), "--port", str(bport)])
                poll(lambda: hold("127.0.0.1", bport, 1, ["127.0.0.1"]) and True, 15,
                     "the holder", 0.1, procs)
                sport = free_port()
                sproc = procs.start("socket-proxyd", [
                    activate, "-l", f"127.0.0.1:{sport}", proxyd,
                    f"--connections-max={args.connections + 16}", f"127.0.0.1:{bport}",
                ])
                poll(lambda: hold("127.0.0.1", sport, 1, sources) and True, 15,
                     "systemd-socket-proxyd", 0.1, procs)
                results["socket-proxyd"], held = measure(
                    "socket-proxyd", sproc.pid, "127.0.0.1", sport, args.connections, sources, True)
                for s in held:
                    s.close()
        except (BenchError, OSError) as exc:
            print(f"proxy_fds: FAILED: {exc}", file=sys.stderr)
            return 1

    j = results["jitlaunch"]
    ok_count = j["connections"] >= max(args.connections, TARGET_CONNECTIONS)
    ok_fds = j["fds_per_connection"] <= TARGET_FDS_PER_CONNECTION
    ok_cap = bool(cap.get("refused_past_cap") and cap.get("alive") and cap.get("served_after_closes"))
    rows = [["proxy", "held", "fds before", "fds held", "fds/conn", "RSS MiB before",
             "RSS MiB held", "KiB/conn", "open s"]]
    for name, r in results.items():
        rows.append([
            name, str(r["connections"]), str(r["fds_before"]), str(r["fds_held"]),
            f"{r['fds_per_connection']:.2f}", f"{r['rss_kib_before'] / 1024:.1f}",
            f"{r['rss_kib_held'] / 1024:.1f}", f"{r['rss_kib_per_connection']:.1f}",
            f"{r['open_seconds']:.1f}",
        ])
    text = "\n".join([
        f"Idle connections through one front: {args.connections} held (each served one echo), "
        f"from {args.sources} source addresses; open file limit {hard}",
        "",
        table(rows),
        "",
        f"jitlaunch cap: max_connections {cap.get('max_connections')} "
        f"({cap.get('per_source')} per source); {cap.get('held_at_cap')} held at the cap "
        f"({cap.get('fds_at_cap')} fds); one more refused: {cap.get('refused_past_cap')}; "
        f"daemon alive: {cap.get('alive')}; served after 10 closed: "
        f"{cap.get('served_after_closes')}",
        f"jitlaunch held >= {TARGET_CONNECTIONS}: {'PASS' if ok_count else 'FAIL'}; "
        f"fds per connection <= {TARGET_FDS_PER_CONNECTION:g}: {'PASS' if ok_fds else 'FAIL'}; "
        f"refused past the cap and lives: {'PASS' if ok_cap else 'FAIL'}",
    ])
    print()
    print(text)
    data = {
        "benchmark": "proxy_fds",
        "machine": machine_info() | {"loadavg_1_5_15_at_start": load_start,
                                     "nofile_soft_hard_before": [soft, hard]},
        "settings": vars(args),
        "results": results,
        "jitlaunch_cap": cap,
        "targets": {"connections": TARGET_CONNECTIONS,
                    "fds_per_connection": TARGET_FDS_PER_CONNECTION},
        "pass": {"connections": ok_count, "fds": ok_fds, "cap": ok_cap},
    }
    if not args.no_write:
        out = write_results("proxy_fds", data, text)
        print(f"\nwrote {out[0]} and {out[1]}")
    return 0 if ok_count and ok_fds and ok_cap else 1


if __name__ == "__main__":
    sys.exit(main())
