#!/usr/bin/env python3
"""DNS fuzz: a million mutated and random UDP datagrams and thousands of abusive TCP
connections against one running daemon, which must survive them all, unchanged in size.

Run from the repository root:  .venv/bin/python bench/dns_fuzz/run.py [--datagrams 1000000]

One ``jitlaunch run`` (its own state directory in a temporary directory, DNS on a free
loopback port, response rate limiting off: ``[dns.rrl] rate = 0``, so every datagram is
answered as it would be without RRL) serves zone ``fuzz.test`` with two services: ``hello``
(the demo HTTP responder, answer mode ``proxy``) and ``slow`` (answer mode ``wait``, a
command that never gets ready, boot timeout 2 s: lookups are held, then SERVFAIL).

1. Warm-up: 20,000 datagrams and 100 TCP connections of the kinds below, then the daemon's
   RSS is taken as the baseline (caches and allocator arenas at their working size).
2. At once, bounded by ``--time-limit``:
   * UDP: ``--datagrams`` datagrams from one socket, in batches of 256 or 200 KB, each ended
     by a sentinel query whose reply says the daemon has processed the whole batch (so its
     receive buffer does not overflow and every datagram is really processed; the kernel's
     drop count at the daemon's socket is reported): valid queries of many kinds (service, apex, glue,
     unknown and out-of-zone names; A, AAAA, ANY, SOA, NS, MX, TXT, AXFR, odd types and
     classes; EDNS with odd versions, payload sizes, flags and options; odd opcodes and
     header bits), the same mutated (bit flips, byte changes, insertions, deletions,
     truncation, trailing garbage, lying counts, label lengths of 64-255, compression
     pointers anywhere), and random bytes of random length (0 to 1,500, now and then up to
     65,000);
   * TCP: ``--tcp`` connections from 16 threads, from 8 loopback source addresses, each one
     kind picked at random: reset at once (SO_LINGER 0); queries then reset; queries then
     close without reading; half a query then reset; a stall (half a query, then silence
     until the server closes the connection, ``tcp_message_timeout``) or an abandoned stall
     (closed after up to 0.3 s); a garbage length prefix; random bytes; pipelining 2,000
     queries without reading (until the server gives up on us, or abandoned); pipelined
     queries read properly (every reply must match its query's ID).
   Every 50,000 datagrams a known query must get its exact answer.
3. The daemon must still answer right over UDP and TCP; after a settling pause (held answers
   time out, connections close) its RSS is taken again; then SIGTERM, and it must exit 0.

Fails (exit 1) if the daemon died or exited non-zero, logged a traceback (an internal error
is logged with one), answered a known query wrong, or its RSS grew by more than
``--max-growth-mib`` (10) MiB over the baseline; or if fewer datagrams or connections than
asked were sent within the time limit. Figures: bench/results/dns_fuzz.json and .txt.
"""

from __future__ import annotations

import argparse
import random
import shlex
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
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
    table,
    warn_if_busy,
    write_results,
)
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord, EDNSOption

ZONE = "fuzz.test"
BATCH = 256
#: A batch also stops at this many bytes as the kernel counts them (each datagram costs its
#: length plus about SKB_OVERHEAD), so it fits in the daemon's receive buffer (net.core.rmem_max
#: caps the 1 MiB it asks for, 416 KiB by default) and nothing is dropped unprocessed.
BATCH_BYTES = 200_000
SKB_OVERHEAD = 768
TCP_THREADS = 16
SOURCES = 8
PYTHON = sys.executable


def config(tmp: Path, port: int, front: str) -> str:
    demo = f"{PYTHON} -m jitlaunch.demo_http --address {{address}} --port {{port}} --name {{name}}"
    return f"""
[metrics]
listen = []  # the default port may be taken; this benchmark does not scrape

[daemon]
state_dir = "{tmp / 'state'}"
drain_timeout = "1s"

[dns]
listen = ["127.0.0.1:{port}"]
zones = ["{ZONE}"]

[dns.rrl]
rate = 0

[[service]]
name = "hello"
front = ["{front}.1"]
ports = [18080]
answer = "proxy"
idle_timeout = "5s"
[service.process]
command = "{demo}"

[[service]]
name = "slow"
front = ["{front}.2"]
ports = [18081]
answer = "wait"
boot_timeout = "2s"
retry_backoff = "1s"
retry_backoff_max = "2s"
[service.process]
command = "sleep 3600"
"""


# ---- what we send -----------------------------------------------------------------------------


NAMES = [
    ZONE, f"hello.{ZONE}", f"HeLLo.{ZONE}", f"slow.{ZONE}", f"ns.{ZONE}", f"nope.{ZONE}",
    f"a.b.c.hello.{ZONE}", "example.org", ".", "test", f"x{'y' * 62}.{ZONE}",
    ".".join(["a" * 63] * 3) + f".{ZONE}", f"hello.{ZONE}.evil.example",
]
TYPES = ["A", "AAAA", "ANY", "SOA", "NS", "MX", "TXT", "CNAME", "AXFR", "IXFR", "SRV", "CAA",
         "OPT", "HTTPS", "RRSIG", "TYPE65000"]


def corpus(rnd: random.Random, n: int = 2000) -> list[bytes]:
    """Valid (or nearly valid) queries of many kinds, built once."""
    out = []
    for _ in range(n):
        name = rnd.choice(NAMES)
        if rnd.random() < 0.3:
            name = f"r{rnd.getrandbits(32):x}.{ZONE}"
        qtype = rnd.choice(TYPES)
        q = DNSRecord.question(name, qtype.replace("TYPE65000", "A"))
        if qtype == "TYPE65000":
            q.q.qtype = 65000
        if rnd.random() < 0.1:
            q.q.qclass = rnd.choice([1, 3, 4, 254, 255, rnd.randrange(65536)])
        h = q.header
        h.rd = rnd.random() < 0.5
        if rnd.random() < 0.05:
            h.opcode = rnd.randrange(16)
        if rnd.random() < 0.05:
            h.aa, h.tc, h.ra, h.z = (rnd.random() < 0.5 for _ in range(4))
        if rnd.random() < 0.5:
            opts = []
            if rnd.random() < 0.3:
                opts.append(EDNSOption(rnd.choice([3, 8, 10, 12, 15, 65001]),
                                       rnd.randbytes(rnd.choice([0, 4, 8, 40]))))
            q.add_ar(EDNS0(udp_len=rnd.choice([0, 512, 1232, 4096, 65535]),
                           version=rnd.choice([0, 0, 0, 1, 255]),
                           flags="do" if rnd.random() < 0.3 else "", opts=opts))
        try:
            out.append(q.pack())
        except Exception:  # a name dnslib will not build: skip it
            continue
    return out


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    b = bytearray(wire)
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 8])):
        op = rnd.randrange(10)
        if op == 0 and b:  # flip a bit
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # replace a byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 2:  # insert bytes
            i = rnd.randrange(len(b) + 1)
            b[i:i] = rnd.randbytes(rnd.choice([1, 2, 4, 30]))
        elif op == 3 and b:  # delete bytes
            i = rnd.randrange(len(b))
            del b[i : i + rnd.choice([1, 2, 4, 30])]
        elif op == 4:  # truncate
            del b[rnd.randrange(len(b) + 1) :]
        elif op == 5:  # trailing garbage
            b += rnd.randbytes(rnd.choice([1, 10, 100, 1000]))
        elif op == 6 and len(b) >= 12:  # lie in the counts
            i = rnd.choice([4, 6, 8, 10])
            b[i : i + 2] = struct.pack("!H", rnd.choice([0, 1, 2, 255, 65535, rnd.randrange(65536)]))
        elif op == 7 and len(b) > 12:  # a label length of 64-255 in the question
            b[12] = rnd.randrange(64, 256)
        elif op == 8 and len(b) > 13:  # a compression pointer anywhere in the question
            i = rnd.randrange(12, len(b) - 1)
            b[i : i + 2] = struct.pack("!H", 0xC000 | rnd.choice([0, 2, 12, i, i + 2, rnd.randrange(0x4000)]))
        elif op == 9 and len(b) >= 4:  # header flags
            b[2] = rnd.randrange(256)
            b[3] = rnd.randrange(256)
    return bytes(b)


def datagram(rnd: random.Random, base: list[bytes]) -> bytes:
    r = rnd.random()
    if r < 0.3:
        return rnd.choice(base)
    if r < 0.9:
        return mutate(rnd, rnd.choice(base))
    if r < 0.999:
        return rnd.randbytes(rnd.choice([0, 1, 11, 12, 13, 17, 30, 100, 512, 1500]))
    return rnd.randbytes(rnd.randrange(1500, 65000))


# ---- checks -----------------------------------------------------------------------------------


def known_query(port: int, tcp: bool = False) -> str:
    """Ask ns.fuzz.test A; it must be NOERROR, authoritative, with exactly the glue address.
    Returns "ok", "timeout" (no reply in 2 s: over UDP, a loss) or what was wrong."""
    q = DNSRecord.question(f"ns.{ZONE}", "A")
    wire = q.pack()
    try:
        if tcp:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(struct.pack("!H", len(wire)) + wire)
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
                    chunk = s.recv(4096)
                    if not chunk:
                        return "the connection was closed without a reply"
                    data += chunk
                data = data[2:]
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(wire, ("127.0.0.1", port))
                while True:
                    data = s.recv(65535)
                    if data[:2] == wire[:2]:
                        break
        rec = DNSRecord.parse(data)
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    got = [(str(r.rdata), r.rtype) for r in rec.rr]
    if (rec.header.id == q.header.id and rec.header.rcode == RCODE.NOERROR and rec.header.aa == 1
            and got == [("127.0.0.1", QTYPE.A)]):
        return "ok"
    return f"a wrong answer: {rec}"


def known_query_ok(port: int, tcp: bool = False) -> bool:
    return known_query(port, tcp) == "ok"


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the daemon's UDP socket (its receive buffer was full)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}":
            return int(f[-1])
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# ---- the UDP fuzzer ---------------------------------------------------------------------------


class UdpFuzzer:
    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.rnd = random.Random(seed)
        self.base = corpus(self.rnd)
        self.counts: Counter[str] = Counter()
        self.bad_checks: list[str] = []
        self.check_timeouts = 0

    def run(self, n: int, deadline: float, check_every: int = 50_000) -> None:
        """Send ``n`` datagrams in batches. Each batch ends with a sentinel, the known query
        with the batch's number as its ID: the daemon answers a socket's datagrams in order,
        so once the sentinel's reply is back the whole batch has been processed, and the
        daemon's receive queue is empty when the next batch starts."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.connect(("127.0.0.1", self.port))
        sentinel = DNSRecord.question(f"ns.{ZONE}", "A").pack()
        sock.settimeout(5)
        sock.send(sentinel)
        while (template := sock.recv(65535))[:2] != sentinel[:2]:
            pass
        template = template[2:]
        sock.settimeout(2)
        sent = 0
        seq = 0
        next_check = check_every
        try:
            while sent < n and time.monotonic() < deadline:
                queued = 0
                for _ in range(min(BATCH, n - sent)):
                    if queued > BATCH_BYTES:
                        break
                    d = datagram(self.rnd, self.base)
                    queued += len(d) + SKB_OVERHEAD
                    try:
                        sock.send(d)
                    except OSError:  # ECONNREFUSED from an ICMP error: the daemon is gone?
                        self.counts["send errors"] += 1
                        continue
                    sent += 1
                    self.counts["bytes sent"] += len(d)
                seq = (seq + 1) & 0xFFFF
                ident = struct.pack("!H", seq)
                sock.send(ident + sentinel[2:])
                while True:
                    try:
                        data = sock.recv(65535)
                    except TimeoutError:
                        self.counts["sentinel timeouts"] += 1
                        break
                    except OSError:
                        self.counts["receive errors"] += 1
                        break
                    if data[:2] == ident and data[2:] == template:
                        break
                    self.counts["replies"] += 1
                if sent >= next_check:
                    next_check += check_every
                    # A UDP reply may be lost on a busy machine: up to three tries.
                    for _ in range(3):
                        status = known_query(self.port)
                        if status != "timeout":
                            break
                        self.check_timeouts += 1
                    if status != "ok":
                        self.bad_checks.append(status)
            # Late replies (held answers).
            sock.settimeout(0.2)
            while True:
                try:
                    sock.recv(65535)
                except OSError:
                    break
                self.counts["replies"] += 1
        finally:
            sock.close()
            self.counts["datagrams sent"] = sent


# ---- the TCP abuser ---------------------------------------------------------------------------


#: Kinds of TCP connection and their weights. The two that wait for the server to give up
#: on them take seconds each, so they are rarer.
TCP_KINDS = {
    "reset": 12, "queries_reset": 12, "queries_close": 12, "half_reset": 10, "stall": 3,
    "stall_abandoned": 10, "garbage_length": 10, "random_bytes": 10, "pipeline_no_read": 3,
    "pipeline_abandoned": 8, "pipeline_read": 10,
}


class TcpAbuser:
    def __init__(self, port: int, seed: int, sources: list[str], base: list[bytes]) -> None:
        self.port = port
        self.seed = seed
        self.sources = sources
        self.base = [b for b in base if len(b) >= 12]
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.done = 0
        self.bad_replies = 0
        self.errors: list[str] = []

    def note(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def run(self, n: int, deadline: float) -> None:
        todo = iter(range(n))
        todo_lock = threading.Lock()

        def worker(k: int) -> None:
            rnd = random.Random(self.seed * 1000 + k)
            while time.monotonic() < deadline:
                with todo_lock:
                    if next(todo, None) is None:
                        return
                kind = rnd.choices(list(TCP_KINDS), weights=list(TCP_KINDS.values()))[0]
                try:
                    self.one(rnd, kind, rnd.choice(self.sources))
                    self.note(f"tcp {kind}")
                except TimeoutError:
                    self.note(f"tcp {kind}")
                    with self.lock:
                        self.errors.append(f"a {kind} connection timed out waiting for the server")
                except OSError as exc:
                    # The server closing on us (a refused connection past a bound, a reset
                    # after its timeout) is its right.
                    self.note(f"tcp {kind}")
                    self.note(f"tcp closed by server ({type(exc).__name__})")
                with self.lock:
                    self.done += 1

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(TCP_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 30)

    def connect(self, source: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", self.port))
        return s

    def frames(self, rnd: random.Random, count: int) -> bytes:
        out = bytearray()
        for _ in range(count):
            q = rnd.choice(self.base)
            if rnd.random() < 0.3:
                q = mutate(rnd, q)
            out += struct.pack("!H", len(q)) + q
        return bytes(out)

    def one(self, rnd: random.Random, kind: str, source: str) -> None:
        s = self.connect(source)
        try:
            if kind == "reset":
                pass
            elif kind in ("queries_reset", "queries_close"):
                s.sendall(self.frames(rnd, rnd.choice([1, 5, 50])))
                if kind == "queries_close":
                    s.close()
                    return
            elif kind == "half_reset":
                f = self.frames(rnd, 1)
                s.sendall(f[: rnd.randrange(1, len(f))])
            elif kind in ("stall", "stall_abandoned"):
                f = self.frames(rnd, 1)
                s.sendall(f[: rnd.randrange(1, len(f))])
                if kind == "stall":  # the server must close within tcp_message_timeout (3 s)
                    t0 = time.monotonic()
                    s.settimeout(15)
                    try:
                        closed = s.recv(100) == b""
                    except ConnectionResetError:
                        closed = True
                    if not closed or time.monotonic() - t0 > 5:
                        with self.lock:
                            self.errors.append(f"a stalled connection was not closed in time "
                                               f"({time.monotonic() - t0:.1f} s)")
                else:
                    time.sleep(rnd.uniform(0, 0.3))
            elif kind == "garbage_length":
                length = rnd.choice([0, 1, 11, 12, 65535])
                s.sendall(struct.pack("!H", length) + rnd.randbytes(rnd.randrange(0, 200)))
            elif kind == "random_bytes":
                s.sendall(rnd.randbytes(rnd.randrange(1, 5000)))
            elif kind in ("pipeline_no_read", "pipeline_abandoned"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                payload = self.frames(rnd, 2000)
                s.settimeout(8 if kind == "pipeline_no_read" else 0.3)
                try:
                    s.sendall(payload)  # blocks once the server stops reading
                except TimeoutError:
                    pass
                if kind == "pipeline_no_read":
                    # Not reading, the server's sends block; it must give up on us.
                    s.settimeout(15)
                    time.sleep(4)
                    while s.recv(65536):
                        pass
            elif kind == "pipeline_read":
                count = rnd.choice([1, 3, 20])
                ids = set()
                wire = bytearray()
                for _ in range(count):
                    q = DNSRecord.question(rnd.choice(NAMES[:6]), rnd.choice(["A", "AAAA", "SOA"]))
                    ids.add(q.header.id)
                    p = q.pack()
                    wire += struct.pack("!H", len(p)) + p
                s.sendall(wire)
                buf = b""
                got = set()
                while got != ids:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while len(buf) >= 2 and len(buf) >= 2 + (m := struct.unpack_from("!H", buf)[0]):
                        got.add(struct.unpack_from("!H", buf, 2)[0])
                        buf = buf[2 + m :]
                if got != ids:
                    with self.lock:
                        self.bad_replies += 1
                s.close()
                return
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            s.close()


# ---- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datagrams", type=int, default=1_000_000)
    ap.add_argument("--tcp", type=int, default=5000)
    ap.add_argument("--time-limit", type=float, default=900, help="seconds for the main phase")
    ap.add_argument("--max-growth-mib", type=float, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--jitlaunch", help="command that runs the jitlaunch CLI")
    args = ap.parse_args()
    jl = shlex.split(args.jitlaunch) if args.jitlaunch else jitlaunch_command()
    load_start = warn_if_busy("dns_fuzz")
    block = loopback_block()
    sources = [f"{block}.{10 + i}" for i in range(SOURCES)]
    failures: list[str] = []
    figures: dict[str, Any] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-dns-fuzz-") as tmpname, ProcessGroup(
        Path(tmpname)
    ) as procs:
        tmp = Path(tmpname)
        try:
            port = free_port()
            cfg = tmp / "jitlaunch.toml"
            cfg.write_text(config(tmp, port, block))
            proc = procs.start("jitlaunch", [*jl, "run", "--config", str(cfg)], cwd=tmp)
            poll(lambda: known_query_ok(port), 30, "jitlaunch DNS to answer", procs=procs)
            rss_start = rss_kib(proc.pid)
            print(f"jitlaunch pid {proc.pid}: DNS 127.0.0.1:{port}, RSS {rss_start / 1024:.1f} MiB")

            # Warm-up.
            warm_udp = UdpFuzzer(port, args.seed + 1)
            warm_udp.run(20_000, time.monotonic() + 120)
            warm_tcp = TcpAbuser(port, args.seed + 1, sources, warm_udp.base)
            warm_tcp.run(100, time.monotonic() + 120)
            procs.check_alive()
            procs.remember_children()
            rss_base = rss_kib(proc.pid)
            print(f"after warm-up: RSS {rss_base / 1024:.1f} MiB")

            # The run.
            udp = UdpFuzzer(port, args.seed)
            tcp = TcpAbuser(port, args.seed, sources, udp.base)
            deadline = time.monotonic() + args.time_limit
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            tcp_thread = threading.Thread(target=tcp.run, args=(args.tcp, deadline), daemon=True)
            tcp_thread.start()
            # The daemon's RSS every 5 s: a plateau is a working set, a slope is a leak.
            samples: list[tuple[float, float]] = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(5):
                    try:
                        samples.append((round(time.monotonic() - t0), round(rss_kib(proc.pid) / 1024, 1)))
                    except (OSError, BenchError):
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            udp.run(args.datagrams, deadline)
            udp_elapsed = time.monotonic() - t0
            tcp_thread.join(max(0.0, deadline - time.monotonic()) + 60)
            elapsed = time.monotonic() - t0
            sampling.set()
            sampler.join()
            cpu = cpu_seconds(proc.pid) - cpu0
            kernel_drops = udp_drops(port)
            procs.check_alive()
            procs.remember_children()
            print(f"sent {udp.counts['datagrams sent']:,} datagrams in {udp_elapsed:.0f} s and "
                  f"{tcp.done:,} TCP connections in {elapsed:.0f} s")

            for transport, ok in (("UDP", known_query_ok(port)), ("TCP", known_query_ok(port, True))):
                if not ok:
                    failures.append(f"after the run, the known query over {transport} was answered wrong")
            # Settle: held answers time out, connections close, instances idle out.
            time.sleep(8)
            procs.check_alive()
            rss_end = rss_kib(proc.pid)
            growth = (rss_end - rss_base) / 1024
            print(f"after settling: RSS {rss_end / 1024:.1f} MiB ({growth:+.1f} MiB over the baseline)")

            procs.stop(proc, grace=30)
            exit_code = proc.returncode
            log = (tmp / "jitlaunch.log").read_text(errors="replace")
            tracebacks = log.count("Traceback")
            if exit_code != 0:
                failures.append(f"the daemon exited with status {exit_code} on SIGTERM")
            if tracebacks:
                first = log[log.index("Traceback") - 300 : log.index("Traceback") + 1500]
                failures.append(f"the daemon logged {tracebacks} traceback(s); the first:\n{first}")
            if growth > args.max_growth_mib:
                failures.append(f"RSS grew by {growth:.1f} MiB (limit {args.max_growth_mib:g})")
            if udp.bad_checks:
                failures.append(f"{len(udp.bad_checks)} known queries answered wrong or not at all "
                                f"during the run; the first: {udp.bad_checks[0]}")
            if tcp.bad_replies:
                failures.append(f"{tcp.bad_replies} pipelined TCP connections missed replies")
            failures += tcp.errors[:5]
            if udp.counts["datagrams sent"] < args.datagrams:
                failures.append(f"only {udp.counts['datagrams sent']:,} of {args.datagrams:,} "
                                f"datagrams sent within {args.time_limit:g} s")
            if tcp.done < args.tcp:
                failures.append(f"only {tcp.done:,} of {args.tcp:,} TCP connections within the limit")
            log_lines = [ln for ln in log.splitlines() if "more like it" in ln or "internal" in ln]
            figures = {
                "datagrams_sent": udp.counts["datagrams sent"],
                "udp_bytes_sent": udp.counts["bytes sent"],
                "udp_replies": udp.counts["replies"],
                "udp_sentinel_timeouts": udp.counts["sentinel timeouts"],
                "udp_no_reply": udp.counts["datagrams sent"] - udp.counts["replies"],
                "udp_send_errors": udp.counts["send errors"],
                "udp_seconds": round(udp_elapsed, 1),
                "udp_datagrams_per_s": round(udp.counts["datagrams sent"] / udp_elapsed),
                "tcp_connections": tcp.done,
                "tcp_kinds": {k[4:]: v for k, v in sorted(tcp.counts.items()) if k.startswith("tcp ")
                              and not k.startswith("tcp closed")},
                "tcp_closed_by_server": sum(v for k, v in tcp.counts.items() if k.startswith("tcp closed")),
                "seconds": round(elapsed, 1),
                "daemon_cpu_s": round(cpu, 1),
                "rss_start_mib": round(rss_start / 1024, 1),
                "rss_baseline_mib": round(rss_base / 1024, 1),
                "rss_end_mib": round(rss_end / 1024, 1),
                "rss_growth_mib": round(growth, 1),
                "rss_mib_every_5s": samples,
                "daemon_exit_code": exit_code,
                "tracebacks": tracebacks,
                "known_query_failures": udp.bad_checks,
                "known_query_udp_timeouts": udp.check_timeouts,
                "udp_kernel_drops": kernel_drops,
                "log_lines_rate_limited": log_lines[-10:],
            }
        except BenchError as exc:
            failures.append(str(exc))
            print(f"dns_fuzz: FAILED: {exc}", file=sys.stderr)

    passed = not failures
    rows = [["figure", "value"]]
    for key in ("datagrams_sent", "udp_replies", "udp_no_reply", "udp_kernel_drops",
                "known_query_udp_timeouts", "udp_datagrams_per_s",
                "tcp_connections", "tcp_closed_by_server", "seconds", "daemon_cpu_s",
                "rss_start_mib", "rss_baseline_mib", "rss_end_mib", "rss_growth_mib",
                "daemon_exit_code", "tracebacks"):
        if key in figures:
            v = figures[key]
            rows.append([key, f"{v:,}" if isinstance(v, int) else str(v)])
    text = "\n".join([
        "DNS fuzz: mutated and random UDP datagrams and abusive TCP connections against one "
        "jitlaunch daemon (RRL off)",
        f"{args.datagrams:,} datagrams and {args.tcp:,} TCP connections asked, seed {args.seed}, "
        f"time limit {args.time_limit:g} s; load average at start {load_start}",
        "",
        table(rows),
        "",
        "daemon RSS (MiB) every 5 s during the run: "
        + ", ".join(f"{r:g}" for _, r in figures.get("rss_mib_every_5s", [])),
        "",
        "TCP connections by kind: " + ", ".join(f"{k} {v}" for k, v in figures.get("tcp_kinds", {}).items()),
        "",
        ("PASSED: the daemon survived, answered right, exited 0, no traceback, RSS within "
         f"{args.max_growth_mib:g} MiB" if passed else "FAILED:\n" + "\n".join(f"- {f}" for f in failures)),
        f"total {time.monotonic() - t_start:.0f} s",
    ])
    print()
    print(text)
    if not args.no_write:
        data = {"machine": machine_info(), "args": vars(args), "figures": figures,
                "passed": passed, "failures": failures}
        jpath, tpath = write_results("dns_fuzz", data, text)
        print(f"\nwrote {jpath} and {tpath}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
