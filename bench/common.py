"""Shared helpers for the benchmarks in bench/: child processes that are always killed,
polling with a deadline, free loopback ports and addresses, statistics and result files.

Only the standard library. Every benchmark is run from the repository root, e.g.
``python3 bench/dns_qps/run.py``; it imports this module by path, and importing it first
makes sure the benchmark runs under the repository's ``.venv`` (see :func:`use_repository_venv`),
where jitlaunch and its dependencies are.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV = ROOT / ".venv"
#: Set in the environment of a benchmark re-executed under the .venv (so it happens once).
REEXEC_MARK = "JITLAUNCH_BENCH_VENV"


def use_repository_venv() -> None:
    """Run the benchmark being started (``__main__``, a script in bench/) under the
    repository's ``.venv`` python, which ``scripts/setup`` makes: when another interpreter
    runs it (``python3 bench/dns_qps/run.py``), re-execute it there with the same arguments.
    Then (or without a .venv) check that what the script imports is importable, else exit 2
    naming what is missing and the command that fixes it. Nothing happens for anything else that
    imports this module (pytest, a script outside bench/)."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script is None or Path(script).resolve().parent.parent != ROOT / "bench":
        return
    python = VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if not in_venv and python.exists() and not os.environ.get(REEXEC_MARK):
        os.environ[REEXEC_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(python, [str(python), str(Path(script).resolve()), *sys.argv[1:]])
    missing = _missing_modules(Path(script))
    if missing:
        name = Path(script).parent.name
        hint = "" if in_venv else f", or run the benchmark with {python}"
        print(f"{name}: missing Python module(s) {', '.join(missing)} for {sys.executable}; "
              f"run scripts/setup (it makes {VENV} with jitlaunch and its dependencies, the "
              f"libvirt extra included){hint}", file=sys.stderr)
        sys.exit(2)


def _missing_modules(script: Path) -> list[str]:
    """The modules ``script`` imports (and jitlaunch, when it starts the daemon) that this
    interpreter cannot import."""
    text = script.read_text()
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    if "jitlaunch_command" in text and shutil.which("jitlaunch") is None:
        names.add("jitlaunch")
    names -= set(sys.stdlib_module_names) | {"common", "__future__"}
    # The repository's own packages (tests/) come from the checkout, once the script has put
    # it on sys.path; jitlaunch must be installed, with its dependencies.
    names = {n for n in names if n == "jitlaunch" or not (ROOT / n / "__init__.py").exists()}
    # A directory without __init__.py is a namespace package, not the module: bench/libvirt
    # is found as "libvirt" when libvirt-python is not installed.
    return sorted(n for n in names if getattr(importlib.util.find_spec(n), "origin", None) is None)


use_repository_venv()


class BenchError(Exception):
    """A benchmark cannot run (missing tool, server that never became ready...)."""


class MissingTool(BenchError):
    """A tool the benchmark needs is not installed: exit status 2 (see bench/README.md)."""


def require_tool(name: str, path: str | None = None, apt: str | None = None) -> str:
    """The full path of a tool, or BenchError with the package to install."""
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        pkg = apt or name
        raise MissingTool(
            f"required tool {name!r} not found (install it: apt-get install -y {pkg})"
        )
    return found


def jitlaunch_command() -> list[str]:
    """How to start the daemon: the `jitlaunch` script next to this interpreter, on PATH,
    or ``python -m jitlaunch.cli``."""
    here = Path(sys.executable).parent / "jitlaunch"
    if here.exists():
        return [str(here)]
    found = shutil.which("jitlaunch")
    if found:
        return [found]
    return [sys.executable, "-m", "jitlaunch.cli"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def kvm_usable() -> bool:
    """True when /dev/kvm opens for reading and writing (QEMU can use -accel kvm)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on ``host`` for both TCP and UDP right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise BenchError(f"no free port on {host}")


def loopback_block() -> str:
    """A random 127.x.y prefix (the caller appends .N), away from the ones the tests and the
    default configuration use (127.77.*, 127.100-199.*)."""
    return f"127.{random.randrange(210, 250)}.{random.randrange(1, 255)}"


def poll(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01,
    procs: ProcessGroup | None = None,
) -> Any:
    """Call ``predicate`` until it returns something truthy, with a deadline. Fails early
    if one of ``procs`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if procs is not None:
            procs.check_alive()
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc})" if last_exc else ""
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def cpu_seconds(pid: int, descendants: bool = False) -> float:
    """User plus system CPU time of ``pid`` (and, if asked, its live descendants) in seconds.

    Leave ``descendants`` off for jitlaunch: its descendants are the instances, whose work is
    the backend's, not the daemon's."""
    total = 0
    for p in [pid, *(_descendants(pid) if descendants else [])]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


class ProcessGroup:
    """Child processes started for one benchmark run, all stopped by :meth:`close` (use it as
    a context manager). Each child runs in its own session; at the end its whole process
    group gets SIGTERM, then SIGKILL after a grace period, and so does every descendant that
    left the group (jitlaunch starts its instances in sessions of their own)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.known: dict[int, set[int]] = {}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **kwargs,
            )
        finally:
            log.close()
        self.procs.append((name, proc))
        self.known[proc.pid] = set()
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with status {proc.returncode}; its log ends with:\n"
                    + self.log_tail(name)
                )

    def remember_children(self) -> None:
        """Note every current descendant, so that it is killed at the end even if its parent
        is gone by then."""
        for _, proc in self.procs:
            if proc.poll() is None:
                self.known[proc.pid].update(_descendants(proc.pid))

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """Stop one child (and its descendants) now."""
        kids = self.known.get(proc.pid, set())
        if proc.poll() is None:
            kids.update(_descendants(proc.pid))
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for sig_target in [proc.pid]:
            try:
                os.killpg(sig_target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception as exc:
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)
        self.procs.clear()


def write_results(name: str, data: dict[str, Any], text: str) -> tuple[Path, Path]:
    """Write bench/results/<name>.json and <name>.txt; return both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / f"{name}.json"
    tpath = RESULTS / f"{name}.txt"
    jpath.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tpath.write_text(text if text.endswith("\n") else text + "\n")
    return jpath, tpath


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure,
    so the results keep them (the run itself adds about 2)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def warn_if_busy(name: str) -> list[float]:
    """Print a warning if the machine is busy before the run; return the load averages."""
    load = loadavg()
    cpus = os.cpu_count() or 1
    if load and load[0] > 0.5 * cpus:
        print(f"{name}: warning: load average {load[0]:.2f} on {cpus} CPUs before the run; "
              "figures will be noisy", file=sys.stderr)
    return load


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    info["loadavg_1_5_15_at_end"] = loadavg()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "jitlaunch"],
            capture_output=True, text=True, timeout=5,
        )
        if dirty.returncode == 0:
            info["jitlaunch_tree_modified"] = [
                line[3:] for line in dirty.stdout.splitlines() if line.strip()
            ]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
