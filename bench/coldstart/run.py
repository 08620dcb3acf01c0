"""Cold start, Jitsu's own method: send the DNS query, connect to the answered address, send
``GET /``, and time to the first byte of the reply.

Run from the repository root: ``python3 bench/coldstart/run.py [--runs 50]``. For each
accelerator (KVM when /dev/kvm opens, and TCG) it measures, in one jitlaunch daemon:

* cold: no instance; the lookup boots the bundled unikernel (answer mode ``handoff``, the
  front address, the proxy holds the request);
* pool: a warm pool of one paused instance; the lookup resumes it;
* running: the instance is up;
* wait: answer mode ``wait`` (the DNS reply waits for READY), from cold;

and beside them, two floors with no jitlaunch involved:

* floor: QEMU started directly with a host port forward, timed from the process start to the
  first byte of an HTTP reply (the client retries connect+GET); "overhead" is cold minus floor;
* direct: connect+GET straight to the running instance's host port forward (no DNS, no
  proxy); "running overhead" is running minus direct. All of them medians.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    ROOT,
    BenchError,
    MissingTool,
    ProcessGroup,
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
    write_results,
)
from dnslib import DNSRecord

KERNEL = ROOT / "images" / "build" / "hello.elf"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
IDLE = "150ms"  # short, so that instances go away between cold runs
MACHINE = "microvm,acpi=off,pic=off,pit=off,rtc=off"  # as in conf/default.toml
TARGETS_KVM = {"cold": 40.0, "pool": 8.0, "running": 1.0, "overhead": 5.0}




def config(state: Path, dns_port: int, block: str, accels: list[str]) -> str:
    out = [f"""
[metrics]
listen = []  # the default port may be taken; this benchmark does not scrape

[daemon]
state_dir = "{state}"
log_level = "warning"
[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["jit.test"]
[defaults]
backend = "qemu"
boot_timeout = "20s"
"""]
    n = 0
    for accel in accels:
        for kind in ("cold", "pool", "running", "wait"):
            n += 1
            idle = '"10m"' if kind == "running" else f'"{IDLE}"'
            extra = 'answer = "wait"' if kind == "wait" else ""
            pool = "pool = 1" if kind == "pool" else ""
            out.append(f"""
[[service]]
name = "{kind}-{accel}"
front = ["{block}.{n}"]
ports = [8080]
idle_timeout = {idle}
max_instances = 2
{extra}
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "{accel}"
machine = "{MACHINE}"
{pool}
""")
    return "".join(out)


def _pool_ready(state: Path, service: str) -> bool:
    """The active instance is gone and the pool member has booted."""
    log = state / "logs" / f"{service}.pool.log"
    return len(qemu_pids(state, service)) == 1 and log.exists() and b"READY" in log.read_bytes()


def qemu_pids(state: Path, service: str) -> list[int]:
    """Live QEMU processes of ``service``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"jitlaunch:{service}:".encode() in b" ".join(
            argv
        ) and str(state).encode() in b" ".join(argv):
            out.append(int(entry))
    return out


def one_request(dns: tuple[str, int], name: str, port: int) -> float:
    """Jitsu's measurement: DNS query, connect, GET, first byte. Returns milliseconds."""
    q = DNSRecord.question(name, "A").pack()
    t0 = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(30)
        u.sendto(q, dns)
        reply = DNSRecord.parse(u.recv(4096))
    if not reply.rr:
        raise BenchError(f"{name}: no answer ({reply.header.rcode})")
    return (first_byte(str(reply.rr[0].rdata), port) - t0) * 1000


def direct_request(port: int) -> float:
    """connect, GET, first byte, straight to a QEMU host port forward. Milliseconds."""
    t0 = time.perf_counter()
    return (first_byte("127.0.0.1", port) - t0) * 1000


def first_byte(addr: str, port: int) -> float:
    """connect, send GET /, and return perf_counter() at the first byte of the reply."""
    with socket.create_connection((addr, port), timeout=30) as c:
        c.sendall(REQUEST)
        if not c.recv(1):
            raise BenchError(f"{addr}:{port}: connection closed without a reply")
        return time.perf_counter()


def forward_port(pid: int) -> int:
    """The host port of a QEMU's user-networking forward to guest port 80."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    for arg in argv:
        if m := re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:80\b", arg):
            return int(m.group(1))
    raise BenchError(f"QEMU pid {pid} has no forward to port 80")


def floor_run(accel: str, logdir: Path) -> float:
    """QEMU process start to the first byte of an HTTP reply, no jitlaunch."""
    port = free_port()
    argv = [
        "qemu-system-x86_64", "-M", MACHINE, "-accel", accel, "-nodefaults", "-no-user-config",
        "-display", "none", "-m", "16M", "-kernel", str(KERNEL), "-append",
        "ip=10.0.2.15/24 gw=10.0.2.2 port=80 name=floor", "-serial", "null",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80",
        "-device", "virtio-net-device,netdev=n0",
    ]
    with ProcessGroup(logdir) as group:
        t0 = time.perf_counter()
        group.start("floor", argv)

        def try_get() -> float | None:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(REQUEST)
                c.settimeout(0.2)
                if c.recv(1):
                    return time.perf_counter()
            return None

        t1 = poll(try_get, 30, "the floor QEMU's first HTTP byte", interval=0.001, procs=group)
    return (t1 - t0) * 1000


def stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"median": median(s), "p90": percentile(s, 90), "min": s[0], "max": s[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    require_tool("qemu-system-x86_64", apt="qemu-system-x86")
    if not KERNEL.exists():
        raise MissingTool(f"{KERNEL} is missing: run make -C images")
    accels = (["kvm"] if kvm_usable() else []) + ["tcg"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as tmp:
        state = Path(tmp)
        dns_port = free_port()
        block = loopback_block()
        conf = state / "jitlaunch.toml"
        conf.write_text(config(state, dns_port, block, accels))
        dns = ("127.0.0.1", dns_port)
        with ProcessGroup(state) as group:
            group.start("jitlaunch", [*jitlaunch_command(), "run", "--config", str(conf)])
            poll(lambda: _dns_up(dns), 30, "jitlaunch's DNS", procs=group)
            for accel in accels:
                res: dict[str, list[float]] = {}
                for kind in ("cold", "pool", "running", "wait"):
                    res[kind] = []
                    name = f"{kind}-{accel}"
                    if kind == "running":
                        one_request(dns, f"{name}.jit.test", 8080)  # boot it once
                    for _ in range(args.runs):
                        if kind in ("cold", "wait"):
                            poll(lambda n=name: not qemu_pids(state, n), 30, f"{name} to stop",
                                 interval=0.005, procs=group)
                        elif kind == "pool":
                            poll(lambda n=name: _pool_ready(state, n), 30,
                                 f"{name}'s pool to refill", interval=0.005, procs=group)
                            # READY is printed just before the daemon pauses the member and
                            # puts it in the pool: give that a moment.
                            time.sleep(0.05)
                        res[kind].append(one_request(dns, f"{name}.jit.test", 8080))
                    if kind == "running":
                        (pid,) = qemu_pids(state, name)
                        port = forward_port(pid)
                        res["direct"] = [direct_request(port) for _ in range(args.runs)]
                    group.check_alive()
                floor = [floor_run(accel, state) for _ in range(args.runs)]
                results[accel] = {k: stats(v) for k, v in res.items()}
                results[accel]["floor"] = stats(floor)
                med = {k: v["median"] for k, v in results[accel].items()}
                results[accel]["overhead"] = {"median": med["cold"] - med["floor"]}
                results[accel]["running overhead"] = {"median": med["running"] - med["direct"]}
    text = report(results, args.runs)
    print(text)
    write_results("coldstart", {"machine": machine_info(), "runs": args.runs, "results": results},
                  text)
    return 0


def _dns_up(dns: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(0.2)
        u.sendto(DNSRecord.question("jit.test", "SOA").pack(), dns)
        return bool(u.recv(4096))


def report(results: dict[str, dict[str, dict[str, float]]], runs: int) -> str:
    lines = [
        f"Cold start, DNS query to first HTTP byte (Jitsu's method), {runs} runs each, ms",
        f"bundled unikernel on QEMU -M {MACHINE} -m 16M, user networking, through "
        "jitlaunch's proxy",
        "",
    ]
    rows = [["case", *[f"{a} median" for a in results], *[f"{a} p90" for a in results]]]
    for kind in ("cold", "pool", "running", "wait", "floor", "direct"):
        rows.append([
            kind,
            *[f"{results[a][kind]['median']:.2f}" for a in results],
            *[f"{results[a][kind]['p90']:.2f}" for a in results],
        ])
    for kind in ("overhead", "running overhead"):
        rows.append([kind, *[f"{results[a][kind]['median']:.2f}" for a in results],
                     *["" for _ in results]])
    lines.append(table(rows))
    lines.append("")
    lines.append("floor = QEMU process start to first HTTP byte, no jitlaunch; "
                 "overhead = cold - floor (medians)")
    lines.append("direct = connect+GET to the running instance's port forward, no DNS, no proxy; "
                 "running overhead = running - direct (medians)")
    if "kvm" in results:
        for kind, target in TARGETS_KVM.items():
            got = results["kvm"][kind]["median"]
            verdict = "PASS" if got <= target else "FAIL"
            lines.append(f"kvm {kind} median {got:.2f} ms (target <= {target:g} ms): {verdict}")
    else:
        lines.append("/dev/kvm does not open here: no KVM figures, no verdict on the KVM targets")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"coldstart: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, MissingTool) else 1)
