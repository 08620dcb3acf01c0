#!/usr/bin/env python3
"""Shared frontends' cost: a backend reached directly, through a jitlaunch shared frontend,
through HAProxy routing the same way, and through the service's own jitlaunch front, in the
same run, for ``route = "host"`` and ``route = "sni"``.

Run from the repository root:  python3 bench/frontend/run.py [--runs 3] [--size-mib 256]

Every connection starts with a preamble the router reads (host: an HTTP/1.1 request head
naming the service; sni: a ClientHello from Python's TLS client naming it, in one record),
then bench/proxy/backend.py's protocol (source, sink, echo); bench/frontend/backend.py skips
the preamble. TLS is not terminated anywhere: what is measured is the routing and the relay.

* direct: the backend on 127.0.0.1, started here (one per mode).
* shared: ``jitlaunch run``: a ``host`` and an ``sni`` frontend; services ``h`` and ``s``
  (process backend, ``answer = "proxy"``) join them and have fronts of their own too.
* own: the same services through their own fronts (no routing: the proxy relays at once).
* haproxy: Debian's HAProxy, one thread (jitlaunch's event loop is one), TCP mode: ``host``
  by ``req.hdr(host)`` after ``tcp-request content accept if HTTP``, ``sni`` by
  ``req.ssl_sni``; passthrough both, as jitlaunch. In front of the direct backends.

Measured per path and mode, ``--runs`` times (medians quoted): connections per second (new
connection, preamble, one 64-byte echo, close; ``--threads`` clients for ``--seconds``);
per-connection latency (one at a time: connect, preamble and echo, first byte back; p50/p99;
split into the connect and the rest); bulk download (``--size-mib``). Targets: shared conn/s
>= 50 % of HAProxy's, throughput >= 80 %, added p50 over direct <= 2x HAProxy's. Also each
proxy's CPU µs per connection. Results: bench/results/frontend.json and frontend.txt.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

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
    percentile,
    poll,
    require_tool,
    table,
    warn_if_busy,
    write_results,
)

BACKEND = Path(__file__).resolve().parent / "backend.py"
TARGET_CONNS_PCT = 50.0
TARGET_THROUGHPUT_PCT = 80.0
TARGET_ADDED_P50_RATIO = 2.0
MSG = 64
TIMEOUT = 30.0
MODES = ("host", "sni")
PATHS = ("direct", "shared", "own", "haproxy")


def client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


PREAMBLE = {
    "host": b"GET / HTTP/1.1\r\nHost: h.jit.test\r\nUser-Agent: bench\r\n\r\n",
    "sni": client_hello("s.jit.test"),
}


def connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def one_connection(host: str, port: int, mode: str) -> tuple[float, float]:
    """A new connection, its preamble and one echo: (connect, rest) in µs."""
    clock = time.perf_counter_ns
    t0 = clock()
    with connect(host, port) as s:
        t1 = clock()
        s.sendall(PREAMBLE[mode] + b"E" + b"x" * MSG)
        if recv_exact(s, MSG) != b"x" * MSG:
            raise BenchError(f"wrong echo through {host}:{port}")
        t2 = clock()
    return (t1 - t0) / 1000, (t2 - t1) / 1000


def conns_per_second(host: str, port: int, mode: str, threads: int, seconds: float) -> float:
    counts = [0] * threads
    errors: list[BaseException] = []
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        try:
            while time.monotonic() < stop:
                one_connection(host, port, mode)
                counts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise BenchError(f"{host}:{port}: {errors[0]!r}")
    return sum(counts) / (time.monotonic() - t0)


def download(host: str, port: int, mode: str, size: int) -> float:
    """MB/s of ``size`` bytes from the backend's source, connect to last byte."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with connect(host, port) as s:
        s.sendall(PREAMBLE[mode] + b"S" + struct.pack("!Q", size))
        got = 0
        while got < size and (n := s.recv_into(buf, min(len(buf), size - got))):
            got += n
        elapsed = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"download through {host}:{port}: got {got} of {size} bytes")
    return size / elapsed / 1e6


def jitlaunch_config(tmp: Path, dns_port: int, block: str, ports: dict[str, int]) -> str:
    out = f"""# generated by bench/frontend/run.py
[metrics]
listen = []

[daemon]
state_dir = "{tmp / 'state'}"
drain_timeout = "2s"

[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["jit.test"]

[proxy]
max_connections = 4096
max_connections_per_source = 4096

[[frontend]]
name = "web"
listen = ["{block}.3:{ports['web']}"]
route = "host"

[[frontend]]
name = "tls"
listen = ["{block}.3:{ports['tls']}"]
route = "sni"
"""
    for name, mode, n, fe in (("h", "host", 1, "web"), ("s", "sni", 2, "tls")):
        out += f"""
[[service]]
name = "{name}"
front = ["{block}.{n}"]
ports = [9000]
frontends = {{ {fe} = 9000 }}
answer = "proxy"
idle_timeout = "30m"
boot_timeout = "20s"
[service.process]
command = "{{python}} {BACKEND} --mode {mode} --address {{address}} --port {{port}}"
"""
    return out


def haproxy_config(block: str, ports: dict[str, int], hb: int, sb: int) -> str:
    return f"""global
  maxconn 8192
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend web
  bind {block}.4:{ports['hweb']}
  tcp-request inspect-delay 5s
  tcp-request content accept if HTTP
  use_backend h if {{ req.hdr(host),field(1,:),lower -m str h.jit.test }}
frontend tls
  bind {block}.4:{ports['htls']}
  tcp-request inspect-delay 5s
  tcp-request content accept if {{ req.ssl_hello_type 1 }}
  use_backend s if {{ req.ssl_sni -i s.jit.test }}
backend h
  server b 127.0.0.1:{hb}
backend s
  server b 127.0.0.1:{sb}
"""


def start_all(procs: ProcessGroup, tmp: Path, jl: list[str], haproxy: str
              ) -> tuple[dict[tuple[str, str], tuple[str, int]], dict[str, int]]:
    """Every path's endpoint by (mode, path), and the proxies' pids."""
    hb, sb = free_port(), free_port()
    for mode, port in (("host", hb), ("sni", sb)):
        procs.start(f"backend-{mode}", [sys.executable, str(BACKEND), "--mode", mode,
                                        "--port", str(port)])
    block = loopback_block()
    ports = {k: free_port(f"{block}.1") for k in ("web", "tls", "hweb", "htls")}
    cfg = tmp / "jitlaunch.toml"
    cfg.write_text(jitlaunch_config(tmp, free_port(), block, ports))
    jproc = procs.start("jitlaunch", [*jl, "run", "--config", str(cfg)], cwd=tmp)
    (tmp / "haproxy.cfg").write_text(haproxy_config(block, ports, hb, sb))
    hproc = procs.start("haproxy", [haproxy, "-db", "-f", str(tmp / "haproxy.cfg")])
    where = {
        ("host", "direct"): ("127.0.0.1", hb), ("sni", "direct"): ("127.0.0.1", sb),
        ("host", "shared"): (f"{block}.3", ports["web"]),
        ("sni", "shared"): (f"{block}.3", ports["tls"]),
        ("host", "own"): (f"{block}.1", 9000), ("sni", "own"): (f"{block}.2", 9000),
        ("host", "haproxy"): (f"{block}.4", ports["hweb"]),
        ("sni", "haproxy"): (f"{block}.4", ports["htls"]),
    }
    for (mode, path), (host, port) in where.items():
        poll(lambda h=host, p=port, m=mode: _works(h, p, m), 30, f"{mode} {path}", 0.05, procs)
    procs.remember_children()
    return where, {"shared": jproc.pid, "own": jproc.pid, "haproxy": hproc.pid}


def _works(host: str, port: int, mode: str) -> bool:
    try:
        one_connection(host, port, mode)
    except (OSError, BenchError):
        return False
    return True


def measure(args: argparse.Namespace, where: dict[tuple[str, str], tuple[str, int]],
            pids: dict[str, int], procs: ProcessGroup) -> dict[tuple[str, str], dict[str, list]]:
    raw: dict[tuple[str, str], dict[str, list]] = {
        k: {"conns": [], "cpu_us_per_conn": [], "p50": [], "p99": [], "connect_p50": [],
            "rest_p50": [], "MBps": []} for k in where}
    for key in where:  # warm-up, not counted
        conns_per_second(*where[key], key[0], args.threads, 0.3)
    for i in range(args.runs):
        for mode in MODES:
            for path in PATHS:
                procs.check_alive()
                r, (host, port), pid = raw[(mode, path)], where[(mode, path)], pids.get(path)
                cpu0 = cpu_seconds(pid) if pid else 0.0
                rate = conns_per_second(host, port, mode, args.threads, args.seconds)
                r["conns"].append(rate)
                if pid:
                    r["cpu_us_per_conn"].append(
                        (cpu_seconds(pid) - cpu0) / (rate * args.seconds) * 1e6)
                samples = [one_connection(host, port, mode) for _ in range(args.latency)]
                total = sorted(a + b for a, b in samples)
                r["p50"].append(percentile(total, 50))
                r["p99"].append(percentile(total, 99))
                r["connect_p50"].append(percentile(sorted(a for a, _ in samples), 50))
                r["rest_p50"].append(percentile(sorted(b for _, b in samples), 50))
                r["MBps"].append(download(host, port, mode, args.size_mib << 20))
                print(f"run {i + 1}/{args.runs} {mode:4s} {path:7s}: {rate:7.0f} conn/s, "
                      f"p50 {r['p50'][-1]:6.0f} µs, p99 {r['p99'][-1]:6.0f} µs, "
                      f"{r['MBps'][-1]:6.0f} MB/s", flush=True)
    return raw


def report(args: argparse.Namespace, raw: dict[tuple[str, str], dict[str, list]],
           load_start: list[float]) -> int:
    med = {k: {m: (median(v) if v else None) for m, v in r.items()} for k, r in raw.items()}
    rows = [["mode", "path", "conn/s", "CPU µs/conn", "p50 µs", "p99 µs", "added p50 µs",
             "connect p50 µs", "rest p50 µs", "MB/s"]]
    verdicts, lines, ratios, where = [], [], {}, []
    for mode in MODES:
        direct = med[(mode, "direct")]["p50"]
        for path in PATHS:
            m = med[(mode, path)]
            cpu = m["cpu_us_per_conn"]
            rows.append([mode, path, f"{m['conns']:.0f}", f"{cpu:.0f}" if cpu else "-",
                         f"{m['p50']:.0f}", f"{m['p99']:.0f}", f"{m['p50'] - direct:.0f}",
                         f"{m['connect_p50']:.0f}", f"{m['rest_p50']:.0f}", f"{m['MBps']:.0f}"])
        s, h = med[(mode, "shared")], med[(mode, "haproxy")]
        conns_pct = 100 * s["conns"] / h["conns"]
        tp_pct = 100 * s["MBps"] / h["MBps"]
        added_s, added_h = s["p50"] - direct, h["p50"] - direct
        lat_ratio = added_s / added_h if added_h > 0 else float("inf")
        ratios[mode] = {"conns_pct_of_haproxy": conns_pct, "throughput_pct_of_haproxy": tp_pct,
                        "added_p50_us": added_s, "haproxy_added_p50_us": added_h,
                        "added_p50_ratio": lat_ratio}
        o, d = med[(mode, "own")], med[(mode, "direct")]
        where.append(
            f"{mode}: where the shared path's p50 goes, over direct: accept (the client's "
            f"connect) {s['connect_p50'] - d['connect_p50']:+.0f} µs; routing (shared - own) "
            f"{s['rest_p50'] - o['rest_p50']:+.0f} µs; the proxy's hop (own - direct: the "
            f"handler task, the connect to the instance, the relay to the first byte back) "
            f"{o['rest_p50'] - d['rest_p50']:+.0f} µs")
        for ok, text in (
            (conns_pct >= TARGET_CONNS_PCT, f"{mode}: conn/s {conns_pct:.0f} % of HAProxy's "
             f"(target >= {TARGET_CONNS_PCT:.0f} %)"),
            (tp_pct >= TARGET_THROUGHPUT_PCT, f"{mode}: throughput {tp_pct:.0f} % of HAProxy's "
             f"(target >= {TARGET_THROUGHPUT_PCT:.0f} %)"),
            (lat_ratio <= TARGET_ADDED_P50_RATIO, f"{mode}: added p50 {added_s:.0f} µs, "
             f"HAProxy's {added_h:.0f} µs: {lat_ratio:.2f}x (target <= "
             f"{TARGET_ADDED_P50_RATIO:.0f}x)"),
        ):
            verdicts.append(ok)
            lines.append(f"{text}: {'PASS' if ok else 'FAIL'}")
    text = "\n".join([
        f"Shared frontends: direct vs jitlaunch frontend vs own front vs HAProxy (1 thread, "
        f"TCP mode), {args.runs} runs, medians; {args.threads} client threads x "
        f"{args.seconds:g} s for conn/s, {args.latency} sequential connections for latency, "
        f"{args.size_mib} MiB download",
        "", table(rows), "", *where, "", *lines,
    ])
    print()
    print(text)
    data = {
        "benchmark": "frontend",
        "machine": machine_info() | {"loadavg_1_5_15_at_start": load_start},
        "settings": dict(vars(args)),
        "results": {f"{mode}/{path}": {"median": med[(mode, path)], "runs": raw[(mode, path)]}
                    for mode, path in raw},
        "ratios": ratios,
        "pass": all(verdicts),
    }
    if not args.no_write:
        out = write_results("frontend", data, text)
        print(f"\nwrote {out[0]} and {out[1]}")
    return 0 if all(verdicts) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions; medians quoted (3)")
    ap.add_argument("--seconds", type=float, default=2.0, help="conn/s run length (2)")
    ap.add_argument("--threads", type=int, default=4, help="conn/s client threads (4)")
    ap.add_argument("--latency", type=int, default=300, help="sequential connections (300)")
    ap.add_argument("--size-mib", type=int, default=256, help="download size (256)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    ap.add_argument("--jitlaunch", metavar="CMD", help="command that starts the daemon")
    args = ap.parse_args()
    try:
        haproxy = require_tool("haproxy", apt="haproxy")
        jl = shlex.split(args.jitlaunch) if args.jitlaunch else jitlaunch_command()
    except BenchError as exc:
        print(f"frontend: {exc}", file=sys.stderr)
        return 2
    load_start = warn_if_busy("frontend")
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmpname, ProcessGroup(
        Path(tmpname)
    ) as procs:
        try:
            where, pids = start_all(procs, Path(tmpname), jl, haproxy)
            raw = measure(args, where, pids, procs)
        except (BenchError, OSError) as exc:
            print(f"frontend: FAILED: {exc}", file=sys.stderr)
            return 1
    return report(args, raw, load_start)


if __name__ == "__main__":
    sys.exit(main())
