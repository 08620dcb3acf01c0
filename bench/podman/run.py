"""Container images as instances: DNS query to the first byte of the HTTP reply (Jitsu's
method) for a podman container cold, from pause and from a warm pool, side by side in the
same run with the process backend running the same server (the image's busybox httpd, run
on the host), the bundled unikernel under QEMU (TCG, or KVM where /dev/kvm works), and bare
``podman run`` to first byte with no jitlaunch (the floor); then the idle memory of one
container with its conmon and slirp4netns, and what is left after the daemon stops.

Run from the repository root, as root:  python3 bench/podman/run.py [--runs 10]

Targets (the issue's): resume from pause <= 60 ms (median); cold <= 2x bare podman run to
first byte (medians); nothing left behind (containers, conmon, slirp4netns). Exits 1 when one
is missed. Results: bench/results/podman.json and podman.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
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
    warn_if_busy,
    write_results,
)
from dnslib import DNSRecord

IMAGE = "localhost/jitlaunch-httpd:latest"
KERNEL = ROOT / "images" / "build" / "hello.elf"
WWW = ROOT / "images" / "containers"
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
IDLE = "150ms"
LABEL = "org.jitlaunch.state-dir"
TARGET_RESUME_MS = 60.0
TARGET_COLD_RATIO = 2.0
#: The options jitlaunch's containers get, for the bare floor (settings.run_argv).
BARE = ["--runtime", "runc", "--network", "slirp4netns:port_handler=slirp4netns",
        "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=512:512", "--read-only",
        "--pull", "never"]
CASES = ("pod-cold", "pod-pause", "pod-pool", "process", "unikernel")


def config(state: Path, dns_port: int, block: str, accel: str) -> str:
    out = [f"""
[metrics]
listen = []
[daemon]
state_dir = "{state}"
log_level = "info"
[dns]
listen = ["127.0.0.1:{dns_port}"]
zones = ["jit.test"]
[host.wake]
rate = 0  # one client wakes every case, many times over
[defaults]
boot_timeout = "20s"
idle_timeout = "{IDLE}"
max_instances = 2
"""]
    for n, (name, stop, extra) in enumerate((("pod-cold", "destroy", ""),
                                             ("pod-pause", "pause", ""),
                                             ("pod-pool", "destroy", "pool = 1")), start=1):
        out.append(f"""
[[service]]
name = "{name}"
backend = "podman"
front = ["{block}.{n}"]
ports = [8080]
stop = "{stop}"
[service.podman]
image = "{IMAGE}"
{extra}
""")
    out.append(f"""
[[service]]
name = "process"
front = ["{block}.4"]
ports = [8080]
[service.process]
command = "/bin/busybox httpd -f -p {{address}}:{{port}} -h {WWW}"

[[service]]
name = "unikernel"
backend = "qemu"
front = ["{block}.5"]
ports = [8080]
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "{accel}"
machine = "microvm,acpi=off,pic=off,pit=off,rtc=off"
""")
    return "".join(out)


def first_byte(addr: str, port: int, timeout: float = 30) -> float:
    with socket.create_connection((addr, port), timeout=timeout) as c:
        c.sendall(REQUEST)
        if not c.recv(1):
            raise BenchError(f"{addr}:{port}: closed without a reply")
        return time.perf_counter()


def one_request(dns: tuple[str, int], name: str) -> float:
    """DNS query, connect, GET, first byte: milliseconds."""
    q = DNSRecord.question(f"{name}.jit.test", "A").pack()
    t0 = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(30)
        u.sendto(q, dns)
        reply = DNSRecord.parse(u.recv(4096))
    if not reply.rr:
        raise BenchError(f"{name}: no answer ({reply.header.rcode})")
    return (first_byte(str(reply.rr[0].rdata), 8080) - t0) * 1000


def podman(*args: str) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"podman {args[0]}: {done.stderr.strip()}")
    return done.stdout.strip()


def containers(state: Path, service: str = "") -> list[tuple[str, str]]:
    """(name, status) of our containers, of ``service`` if given."""
    out = podman("ps", "--all", "--filter", f"label={LABEL}={state.resolve()}",
                 "--format", "{{.Names}} {{.Status}}")
    rows = [tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()]
    return [(n, s) for n, s in rows  # type: ignore[misc]
            if not service or f"-{service}-" in n]


def processes(marker: bytes) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
            if marker in cmd:
                found.append(int(entry))
    return found


def ready_for(case: str, state: Path) -> bool:
    """The case's instance is gone (cold), paused (pause) or pooled and paused (pool)."""
    if case == "pod-cold":
        return not containers(state, case)
    if case in ("pod-pause", "pod-pool"):
        found = containers(state, case)
        return len(found) == 1 and frozen_container(found[0][0])
    if case == "process":
        return not processes(str(WWW).encode() + b"\0")
    return not [p for p in processes(str(state).encode()) if b"qemu-system" in
                Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]]


def frozen_container(name: str) -> bool:
    """Whether the container's freezer cgroup says frozen (jitlaunch pauses a container
    through it: podman still calls it running)."""
    from jitlaunch.backends.podman.cli import freezer_of, frozen

    pid = int(podman("inspect", "--format", "{{.State.Pid}}", name) or 0)
    path = freezer_of(pid) if pid else None
    return path is not None and frozen(path)


def bare_run(tmp: Path) -> float:
    """``podman run`` started to the first HTTP byte through its published port: ms."""
    port = free_port()
    name = f"bench-bare-{os.getpid()}-{port}"
    t0 = time.perf_counter()
    subprocess.run(["podman", "run", "--detach", "--name", name, *BARE, "--publish",
                    f"127.0.0.1:{port}:8080/tcp", IMAGE], check=True, capture_output=True)
    try:
        def got() -> float | None:
            try:
                return first_byte("127.0.0.1", port, timeout=1)
            except (OSError, BenchError):
                return None

        t1 = poll(got, 30, "the bare container's first byte", interval=0.002)
    finally:
        subprocess.run(["podman", "rm", "--force", "--time", "0", name], capture_output=True,
                       check=False)
    return (t1 - t0) * 1000


def memory_of(pids: list[int]) -> tuple[float, float]:
    """RSS and PSS of ``pids`` together, MiB (smaps_rollup)."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                kb = int(rest.split()[0])
                rss, pss = (rss + kb, pss) if key == "Rss" else (rss, pss + kb)
    return rss / 1024, pss / 1024


def idle_memory(state: Path) -> dict[str, float]:
    """One ready, idle pod-pause container: its processes, its conmon, its slirp4netns."""
    ((name, _status),) = containers(state, "pod-pause")
    cid, pid, conmon = podman("inspect", "--format", "{{.Id}} {{.State.Pid}} {{.State.ConmonPid}}",
                              name).split()
    inner = [int(pid), *_children(int(pid))]
    slirp = [p for p in processes(f"/run/libpod/{cid}.net".encode())
             if b"slirp4netns" in Path(f"/proc/{p}/cmdline").read_bytes()]
    out = {}
    for what, pids in (("container", inner), ("conmon", [int(conmon)]), ("slirp4netns", slirp)):
        out[f"{what} RSS MiB"], out[f"{what} PSS MiB"] = memory_of(pids)
    out["total RSS MiB"] = sum(v for k, v in out.items() if k.endswith("RSS MiB"))
    out["total PSS MiB"] = sum(v for k, v in out.items() if k.endswith("PSS MiB")
                               and not k.startswith("total"))
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == pid:
                kids += [int(entry), *_children(int(entry))]
    return kids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = ap.parse_args()
    require_tool("podman", apt="podman")
    require_tool("runc", apt="runc")
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        raise MissingTool(f"{IMAGE} is missing: run images/containers/build")
    accel = "kvm" if kvm_usable() else "tcg"
    # /dev/kvm may be a nested software virtualizer (kvm_pvm), slower than TCG: say which.
    flavour = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                    if Path(f"/sys/module/{m}").exists()), None)
    if accel == "kvm" and flavour:
        accel = f"kvm ({flavour})"
    load = warn_if_busy("podman")
    res: dict[str, list[float]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-podman-") as tmp:
        state = Path(tmp) / "state"
        dns_port = free_port()
        conf = Path(tmp) / "jitlaunch.toml"
        conf.write_text(config(state, dns_port, loopback_block(), accel.split()[0]))
        dns = ("127.0.0.1", dns_port)
        try:
            mem, boots = measure(args, res, state, conf, dns, Path(tmp))
            left = containers(state) + [(str(p), "process") for p in
                                        processes(f"jitlaunch-{_state_id(state)}".encode())]
            if left:  # say how: the daemon's log
                log = (Path(tmp) / "jitlaunch.log").read_text(errors="replace")
                print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
        finally:
            # However the run ended (a failed request ends the group with SIGKILL, and a
            # killed daemon cannot remove its containers): none of ours stays.
            remove_ours(state)
    bare = [bare_run(Path(tmp)) for _ in range(args.runs)]
    return report(args, res, bare, mem, left, accel, load, boots)


def remove_ours(state: Path) -> None:
    names = [n for n, _ in containers(state)]
    if names:
        subprocess.run(["podman", "rm", "--force", "--ignore", "--time", "0", *names],
                       capture_output=True, check=False)


def measure(args: argparse.Namespace, res: dict[str, list[float]], state: Path, conf: Path,
            dns: tuple[str, int], tmp: Path) -> tuple[dict[str, float], list[float]]:
    """The daemon's runs of every case; the idle memory and the cold boots' times."""
    with ProcessGroup(tmp) as group:
        daemon = group.start("jitlaunch", [*jitlaunch_command(), "run", "--config", str(conf)])
        poll(lambda: _dns_up(dns), 30, "jitlaunch's DNS", procs=group)
        for case in ("pod-pause",):  # its first boot, so that later runs resume
            one_request(dns, case)
        for i in range(args.runs):
            for case in CASES:
                poll(lambda c=case: ready_for(c, state), 60, f"{case} to be ready to measure",
                     interval=0.005, procs=group)
                try:
                    res[case].append(one_request(dns, case))
                except (OSError, BenchError) as exc:
                    raise BenchError(f"{case}: {exc!r}\n{group.log_tail('jitlaunch', 200)}") \
                        from exc
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{c} {res[c][-1]:.1f} ms" for c in CASES), flush=True)
        one_request(dns, "pod-pause")
        mem = idle_memory(state)
        boots = [float(m) for m in re.findall(
            r"pod-cold#\d+ ready in ([0-9.]+) ms", (tmp / "jitlaunch.log").read_text())]
        group.stop(daemon, grace=30)
    return mem, boots


def _state_id(state: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from jitlaunch.backends.owner import state_id

    return state_id(state)


def _dns_up(dns: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(0.2)
        u.sendto(DNSRecord.question("jit.test", "SOA").pack(), dns)
        return bool(u.recv(4096))


def report(args: argparse.Namespace, res: dict[str, list[float]], bare: list[float],
           mem: dict[str, float], left: list[tuple[str, str]], accel: str,
           load: list[float], boots: list[float]) -> int:
    med = {c: median(v) for c, v in res.items()} | {"bare podman run": median(bare)}
    p90 = {c: percentile(sorted(v), 90) for c, v in res.items()} | {
        "bare podman run": percentile(sorted(bare), 90)}
    rows = [["case", "median ms", "p90 ms"]]
    rows += [[c, f"{med[c]:.1f}", f"{p90[c]:.1f}"] for c in med]
    ratio = med["pod-cold"] / med["bare podman run"]
    verdicts = [
        (med["pod-pause"] <= TARGET_RESUME_MS,
         f"resume from pause {med['pod-pause']:.1f} ms (target <= {TARGET_RESUME_MS:g} ms)"),
        (ratio <= TARGET_COLD_RATIO,
         f"cold {med['pod-cold']:.1f} ms = {ratio:.2f}x bare podman run "
         f"{med['bare podman run']:.1f} ms (target <= {TARGET_COLD_RATIO:g}x)"),
        (not left, f"left behind after the daemon stopped: {left or 'nothing'}"),
    ]
    text = "\n".join([
        f"Container images as instances: DNS query to first HTTP byte, {args.runs} runs, "
        f"medians; unikernel under {accel} (the process and bare rows are the floors)",
        "", table(rows), "",
        f"where a cold start goes: the daemon's boot (podman run returning, then the port "
        f"listening inside) {median(boots):.1f} ms median of {len(boots)}; bare podman run to "
        f"first byte {med['bare podman run']:.1f} ms; the rest of cold (DNS, the proxy's hold "
        f"and relay through slirp4netns) {med['pod-cold'] - median(boots):.1f} ms",
        "idle memory of one ready container (MiB): " + ", ".join(
            f"{k.replace(' MiB', '')} {v:.1f}" for k, v in mem.items()),
        "", *(f"{t}: {'PASS' if ok else 'FAIL'}" for ok, t in verdicts),
    ])
    print()
    print(text)
    if not args.no_write:
        data = {"benchmark": "podman", "machine": machine_info()
                | {"loadavg_1_5_15_at_start": load, "accel": accel},
                "settings": dict(vars(args)), "runs": res | {"bare podman run": bare},
                "median_ms": med, "p90_ms": p90, "idle_memory_mib": mem,
                "daemon_boot_ms": boots, "left": left, "pass": all(ok for ok, _ in verdicts)}
        out = write_results("podman", data, text)
        print(f"\nwrote {out[0]} and {out[1]}")
    return 0 if all(ok for ok, _ in verdicts) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"podman: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, MissingTool) else 1)
