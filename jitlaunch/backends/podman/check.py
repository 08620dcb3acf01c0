"""What ``jitlaunch check`` (and the daemon at start) finds wrong on this host for a podman
service, without starting anything: podman or the runtime missing, crun where the cgroups
are hybrid (it refuses them), the image not in podman's store, CRIU unusable for
``stop = "save"``. Blocking: a few short podman and criu calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ...config import ServiceConfig
from .settings import PodmanSettings

#: (error, message, key): an error means the service can never start as configured.
Problem = tuple[bool, str, str]
#: Where a hybrid host mounts cgroup2 beside the v1 controllers.
HYBRID_MARK = Path("/sys/fs/cgroup/unified")


def podman_problems(svc: ServiceConfig) -> list[Problem]:
    s: PodmanSettings = svc.settings
    out: list[Problem] = []
    podman = shutil.which(s.binary)
    if podman is None:
        return [(True, f"{s.binary!r} is not installed (apt install podman)", "podman.binary")]
    if shutil.which(s.runtime) is None:
        out.append((True, f"the runtime {s.runtime!r} is not installed (apt install "
                    f"{s.runtime})", "podman.runtime"))
    elif s.runtime == "crun" and HYBRID_MARK.is_dir():
        out.append((True, "crun refuses this host's hybrid cgroups (v1 controllers, cgroup2 at "
                    f"{HYBRID_MARK}); use runtime = \"runc\"", "podman.runtime"))
    try:
        found = subprocess.run([podman, "image", "exists", s.image], capture_output=True,
                               timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        out.append((False, f"cannot ask podman whether the image exists: {exc}", "podman.image"))
    else:
        if not found:
            out.append((True, f"image {s.image!r} is not in podman's store (podman load -i "
                        "FILE, podman pull on a host that reaches a registry, or "
                        "images/containers/build for the bundled one)", "podman.image"))
    if svc.stop == "save" and (why := criu_problem_now()) is not None:
        out.append((False, f'stop = "save" cannot checkpoint here ({why}): idle instances '
                    "will be paused instead", "stop"))
    return out


def criu_problem_now() -> str | None:
    """:func:`.backend.criu_problem`, blocking."""
    criu = shutil.which("criu")
    if criu is None:
        return "CRIU is not installed (apt install criu)"
    try:
        done = subprocess.run([criu, "check"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"criu check failed: {exc}"
    if done.returncode == 0:
        return None
    text = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
    return f"criu check failed: {text[-1] if text else f'status {done.returncode}'}"
