"""The libvirt backend beside the qemu backend, in one run of one jitlaunch daemon: DNS query
to the first byte of the HTTP reply (Jitsu's method) for the bundled unikernel, TCG on both
(this machine's /dev/kvm is slower than TCG), user networking, through the proxy:

* cold: no instance; the lookup boots one (stop = destroy between runs);
* pool: a warm pool of one suspended instance; the lookup resumes it;
* resume: the instance was paused when idle (stop = pause);
* restore: the instance was saved when idle (stop = save).

Run from the repository root as root: ``python3 bench/libvirt/run.py [--runs 10] [--console
stream]`` (``stream``: the libvirt services read their console through libvirt, as for a
remote host, and the results go to bench/results/libvirt-stream.*). It runs
a libvirtd of its own (tests/libvirtd.py: under scripts/subreaper, its configuration, state
and socket in a mount namespace, no cgroups) and stops it at the end. Targets: pool and
resume within 2x of the qemu backend's, cold within 10x.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    ROOT,
    BenchError,
    MissingTool,
    loopback_block,
    machine_info,
    median,
    percentile,
    table,
    write_results,
)
from dnslib import DNSRecord

from jitlaunch.backends import SETTINGS
from jitlaunch.config import parse_config, process_env
from jitlaunch.daemon import Daemon
from jitlaunch.lifecycle.state import State

sys.path.insert(0, str(ROOT))
from tests.libvirtd import PrivateLibvirtd, cgroup_dirs

KERNEL = ROOT / "images" / "build" / "hello.elf"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
KINDS = ("cold", "pool", "resume", "restore")
STOP = {"cold": "destroy", "pool": "destroy", "resume": "pause", "restore": "save"}
STEPS = ("lookup to create", "createXML", "to first console byte", "to READY")
#: With console = "stream": createXML (paused), the console opened and the domain resumed.
STREAM_STEPS = ("lookup to create", "createXML (paused)", "open console and resume",
                "to first console byte", "to READY")
TARGETS = {"cold": 10.0, "pool": 2.0, "resume": 2.0}  # libvirt / qemu, medians


def config(state: Path, block: str, uri: str, console: str = "file") -> str:
    out = [f"""
[metrics]
listen = []
[host.wake]
rate = 0  # the benchmark wakes its services back to back from one address
[daemon]
state_dir = "{state}"
log_level = "warning"
[dns]
listen = ["127.0.0.1:0"]
zones = ["jit.test"]
[defaults]
boot_timeout = "30s"
idle_timeout = "150ms"
"""]
    n = 0
    for backend in ("qemu", "libvirt"):
        for kind in KINDS:
            n += 1
            out.append(f"""
[[service]]
name = "{kind}-{backend}"
backend = "{backend}"
front = ["{block}.{n}"]
ports = [8080]
answer = "proxy"
max_instances = 2
stop = "{STOP[kind]}"
[service.{backend}]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "tcg"
{"pool = 1" if kind == "pool" else ""}
{f'uri = "{uri}"{chr(10)}console = "{console}"' if backend == "libvirt" else ""}
""")
    return "".join(out)


def one_request(dns: tuple[str, int], name: str, port: int) -> float:
    q = DNSRecord.question(name, "A").pack()
    t0 = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(30)
        u.sendto(q, dns)
        reply = DNSRecord.parse(u.recv(4096))
    if not reply.rr:
        raise BenchError(f"{name}: no answer ({reply.header.rcode})")
    with socket.create_connection((str(reply.rr[0].rdata), port), timeout=30) as c:
        c.sendall(REQUEST)
        if not c.recv(1):
            raise BenchError(f"{name}: closed without a reply")
    return (time.perf_counter() - t0) * 1000


async def until(pred, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(timeout) as scope:
        while not pred():
            await trio.sleep(0.005)
    if scope.cancelled_caught:
        raise BenchError(f"timed out waiting for {what}")


async def measure(state: Path, runs: int, uri: str, console: str = "file"
                  ) -> dict[str, dict[str, list[float]]]:
    cfg = parse_config(
        config(state, loopback_block(), uri, console), str(state / "bench.toml"),
        backends=SETTINGS,
        env=process_env(),
    )
    d = Daemon(cfg)
    out: dict[str, dict[str, list[float]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve)
        dns = (d.dns_endpoints[0].host, d.dns_endpoints[0].port)
        try:
            for backend in ("qemu", "libvirt"):
                out[backend] = {}
                for kind in KINDS:
                    name = f"{kind}-{backend}"
                    rt = d.supervisor.services[name]
                    pools = getattr(d.backends[backend], "pools", {})
                    if kind in ("resume", "restore"):
                        await trio.to_thread.run_sync(one_request, dns, f"{name}.jit.test", 8080)
                    values = []
                    for _ in range(runs):
                        if kind in ("cold", "pool"):
                            await until(lambda rt=rt: rt.instance is None, f"{name} to stop")
                        else:
                            await until(lambda rt=rt: rt.instance is not None
                                        and rt.instance.state is State.SAVED, f"{name} to idle")
                        if kind == "pool":
                            await until(lambda p=pools, n=name: len(p.get(n, [])) == 1,
                                        f"{name}'s pool")
                        t0 = trio.current_time()
                        values.append(await trio.to_thread.run_sync(
                            one_request, dns, f"{name}.jit.test", 8080))
                        handle = rt.instance.handle if rt.instance is not None else None
                        times = getattr(handle, "times", {})
                        keys = ["create", "created", *(["console"] if console == "stream" else []),
                                "first byte", "ready"]
                        if kind == "cold" and backend == "libvirt" and set(times) == set(keys):
                            steps = [t0, *(times[k] for k in keys)]
                            names = STREAM_STEPS if console == "stream" else STEPS
                            for step, a, b in zip(names, steps, steps[1:], strict=False):
                                out.setdefault("steps", {}).setdefault(step, []).append(
                                    (b - a) * 1000)
                        resumed = getattr(handle, "resumed", None)
                        if kind in ("pool", "resume") and backend == "libvirt" and resumed \
                                and getattr(handle, "wake", "") == kind:
                            call, rpc = resumed
                            split = out.setdefault(f"{kind} split", {})
                            split.setdefault("resume call", []).append(call * 1000)
                            split.setdefault("libvirt RPC", []).append(rpc * 1000)
                            split.setdefault("thread hop", []).append((call - rpc) * 1000)
                            split.setdefault("rest of the request", []).append(
                                values[-1] - call * 1000)
                    out[backend][kind] = values
        finally:
            d.stop()
    return out


def resume_rpc(root: Path, run_tmpfs: bool, pairs: int = 40) -> float:
    """The median of ``pairs`` virDomainResume calls (each after a suspend) straight from
    libvirt-python, in ms, on a libvirtd of its own whose /run is a tmpfs or this machine's
    disk: libvirtd rewrites the domain's status file in /run/libvirt/qemu, with fsync, on
    each state change."""
    import libvirt

    lvd = PrivateLibvirtd(root, run_tmpfs=run_tmpfs)
    try:
        lvd.start()
        conn = libvirt.open(lvd.uri)
        try:
            dom = conn.createXML(
                f"<domain type='qemu'><name>rpc</name><memory unit='MiB'>16</memory><os>"
                f"<type arch='x86_64' machine='microvm'>hvm</type><kernel>{KERNEL}</kernel>"
                "</os><devices><controller type='usb' model='none'/>"
                "<memballoon model='none'/></devices></domain>", 0)
            values = []
            for _ in range(pairs):
                dom.suspend()
                t = time.perf_counter()
                dom.resume()
                values.append((time.perf_counter() - t) * 1000)
            dom.destroy()
        finally:
            conn.close()
    finally:
        lvd.stop()
    return median(values)


def main() -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--console", choices=("file", "stream"), default="file",
                    help="the libvirt services' console setting (default file)")
    args = ap.parse_args()
    if not KERNEL.exists():
        raise MissingTool(f"{KERNEL} is missing: run make -C images")
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    cgroups = cgroup_dirs()
    with tempfile.TemporaryDirectory(prefix="bench-libvirt-") as tmp:
        # /run on a tmpfs, as on a usual host (here /run is on the root file system).
        lvd = PrivateLibvirtd(Path(tmp) / "libvirtd", run_tmpfs=True)
        try:
            lvd.start()
            (Path(tmp) / "state").mkdir()
            raw = trio.run(measure, Path(tmp) / "state", args.runs, lvd.uri, args.console)
        finally:
            lvd.stop()
        status_file = {where: resume_rpc(Path(tmp) / f"rpc-{where}", where == "tmpfs")
                       for where in ("tmpfs", "disk")}
    if cgroup_dirs() - cgroups:
        raise BenchError(f"libvirtd left cgroup directories: {sorted(cgroup_dirs() - cgroups)}")
    steps = raw.pop("steps", {})
    splits = {k: raw.pop(f"{k} split", {}) for k in ("pool", "resume")}
    results = {b: {k: {"median": median(v), "p90": percentile(sorted(v), 90)}
                   for k, v in kinds.items()} for b, kinds in raw.items()}
    rows = [["case", "qemu median", "libvirt median", "ratio", "qemu p90", "libvirt p90"]]
    ok = True
    verdicts = []
    for kind in KINDS:
        q, lv = results["qemu"][kind], results["libvirt"][kind]
        ratio = lv["median"] / q["median"]
        rows.append([kind, f"{q['median']:.2f}", f"{lv['median']:.2f}", f"{ratio:.2f}",
                     f"{q['p90']:.2f}", f"{lv['p90']:.2f}"])
        if kind in TARGETS:
            good = ratio <= TARGETS[kind]
            ok &= good
            verdicts.append(f"{kind}: libvirt/qemu {ratio:.2f} (target <= {TARGETS[kind]:g}): "
                            f"{'PASS' if good else 'FAIL'}")
    text = "\n".join([
        f"libvirt vs qemu backend, DNS query to first HTTP byte, {args.runs} runs each, ms, TCG, "
        f"user networking, through the proxy; libvirt console = {args.console}",
        "", table(rows), "",
        "where a libvirt cold start's time goes (medians, ms): " + ", ".join(
            f"{k} {median(v):.1f}" for k, v in steps.items()),
        "(createXML: libvirtd prepares and starts QEMU and waits for its monitor; " + (
            "the domain is created paused, its pty console opened through libvirt and the "
            "domain resumed, then the console's bytes come as they are written)"
            if args.console == "stream" else "the console is polled every 5 ms)"),
        *[f"where a libvirt {k}'s time goes (medians, ms): " + ", ".join(
            f"{step} {median(v):.2f}" for step, v in split.items()) for k, split in splits.items()],
        "(libvirt RPC: virDomainResume in the worker thread, i.e. libvirtd's QMP cont, its RESUME "
        "event and two rewrites of the domain's status file; thread hop: trio to the worker "
        "thread and back; rest: DNS, proxy and guest, as for qemu)",
        "libvirtd's /run is a tmpfs, as on a usual host; a bare virDomainResume (median of 40) "
        "takes " + " and ".join(f"{v:.2f} ms with /run on {k}" for k, v in status_file.items())
        + " (the fsync of its status file)", "", *verdicts])
    print(text)
    write_results("libvirt" if args.console == "file" else "libvirt-stream", {
        "machine": machine_info(), "runs": args.runs, "console": args.console,
        "results": results, "raw": raw, "libvirt cold steps": steps,
        "libvirt resume splits": splits, "bare resume RPC by /run": status_file}, text)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"libvirt: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, MissingTool) else 1)
