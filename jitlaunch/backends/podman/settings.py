"""A podman service's settings (``[service.podman]``) and the ``podman run`` command line
built from them: pure, no I/O.

Every container is made with ``podman run --detach`` under a name and labels that carry the
state directory's identity (:func:`container_name`, :data:`LABEL_STATE_DIR`), in a network
namespace of its own: with user-mode networking (slirp4netns) and its ports published on
127.0.0.1, or (``network = "bridge"``) with only loopback, to which the backend adds a veth
onto jitlaunch's own bridge. Nothing is added to the host's firewall, and no interface but
our bridge and veths (podman's default network, netavark, would add both).
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from pathlib import Path

from ...config import Table
from ..vm import parse_bridge

#: The labels a container of ours carries: the state directory (resolved, compared whole),
#: the service and the instance number.
LABEL_STATE_DIR = "org.jitlaunch.state-dir"
LABEL_SERVICE = "org.jitlaunch.service"
#: The soft and hard RLIMIT_NOFILE and RLIMIT_NPROC a container gets unless ``options`` set
#: them: podman's defaults need CAP_SYS_RESOURCE to raise, which a hardened unit lacks.
DEFAULT_NOFILE = 1024
DEFAULT_NPROC = 512
RUNTIMES = ("runc", "crun", "runsc")
DEFAULT_SUBNET = ipaddress.IPv4Network("10.77.0.0/24")


@dataclass(frozen=True)
class PodmanSettings:
    image: str
    #: The ports the container listens on, one for each of the service's ``ports``.
    container_ports: tuple[int, ...] = ()
    #: The command and its arguments; empty: the image's own.
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: MiB (``--memory``); None: no limit (the host budget counts PODMAN_OVERHEAD only).
    memory: int | None = None
    cpus: float | None = None
    user: str | None = None
    read_only: bool = True
    runtime: str = "runc"
    #: A line of the container's output that says it is ready; None: a listening port.
    ready_log: str | None = None
    options: tuple[str, ...] = ()
    network: str = "user"
    #: Bridge networking (``network = "bridge"``): a veth from the container onto this
    #: bridge, an address of this subnet.
    bridge: str = "jl0"
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
    grace: float = 5.0
    pool: int = 0
    #: The ``podman`` program.
    binary: str = "podman"


def parse_settings(t: Table, base_dir: Path, ports: tuple[int, ...]) -> PodmanSettings:
    image = t.string("image")
    if not image or image.startswith("-") or any(c.isspace() for c in image):
        raise t.error("image", f"expected an image name such as 'localhost/web:1', got {image!r}")
    command: tuple[str, ...] = ()
    raw = t.raw("command")
    if isinstance(raw, str):
        try:
            command = tuple(shlex.split(raw))
        except ValueError as exc:
            raise t.error("command", f"cannot split the command line: {exc}") from None
    elif raw is not None:
        command = tuple(t.strings("command", what="strings (the command and its arguments)"))
    env = t.raw("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise t.error("env", "expected a table of strings (NAME = \"value\")")
    for key in env:
        if not key or "=" in key:
            raise t.error("env", f"expected variable names without '=', got {key!r}")
    cpus = t.raw("cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int | float)
                             or not 0 < cpus <= 1024):
        raise t.error("cpus", f"expected a number of CPUs such as 0.5 or 2, got {cpus!r}")
    ready = t.string("ready", "tcp")
    if ready != "tcp" and not (ready.startswith("log:") and ready[4:]):
        raise t.error("ready", f'expected "tcp" or "log:TEXT" (a line of output), got {ready!r}')
    options = t.raw("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise t.error("options", "expected a list of strings (podman run options)")
    inner = t.ports("container_ports", list(ports))
    if len(inner) != len(ports):
        raise t.error("container_ports", f"expected one port for each of the service's ports "
                      f"({len(ports)}), got {len(inner)}")
    bridge, subnet = parse_bridge(t)
    settings = PodmanSettings(
        image=image,
        bridge=bridge,
        subnet=subnet,
        container_ports=inner,
        command=command,
        env=tuple(sorted(env.items())),
        memory=(t.integer("memory", low=6, high=1 << 20, unit="MiB")
                if t.has("memory") else None),
        cpus=float(cpus) if cpus is not None else None,
        user=t.string("user") if t.has("user") else None,
        read_only=t.boolean("read_only", True),
        runtime=t.string("runtime", "runc", choices=RUNTIMES),
        ready_log=ready[4:] if ready != "tcp" else None,
        options=tuple(options),
        network=t.string("network", "user", choices=("user", "bridge")),
        grace=t.duration("grace", 5, allow_zero=True),
        pool=t.integer("pool", 0, low=0, high=64),
        binary=t.string("binary", "podman"),
    )
    t.done()
    return settings


def container_name(state_id: str, service: str, number: int, serial: int) -> str:
    """``jitlaunch-<state id>-<service>-<n>-<serial>``: unique among our containers (the
    serial counts this daemon's starts), and ours by its labels, not by its name."""
    return f"jitlaunch-{state_id}-{service}-{number}-{serial}"


def run_argv(
    settings: PodmanSettings, *, name: str, state_dir: Path, service: str,
    publish: dict[int, int], log_path: Path,
) -> list[str]:
    """``podman run`` for one container: ``publish`` maps each of the service's ports to the
    host port on 127.0.0.1 where the matching container port is published (user networking;
    empty for a bridge)."""
    s = settings
    argv = [
        s.binary, "run", "--detach", "--name", name,
        "--label", f"{LABEL_STATE_DIR}={state_dir}",
        "--label", f"{LABEL_SERVICE}={service}",
        "--runtime", s.runtime,
        # bridge: no network but loopback; the backend adds a veth onto its bridge.
        "--network", ("slirp4netns:port_handler=slirp4netns" if s.network == "user"
                      else "none"),
        "--log-driver", "k8s-file", "--log-opt", f"path={log_path}",
        "--ulimit", f"nofile={DEFAULT_NOFILE}:{DEFAULT_NOFILE}",
        "--ulimit", f"nproc={DEFAULT_NPROC}:{DEFAULT_NPROC}",
        "--stop-timeout", str(max(0, round(s.grace))),
        "--pull", "never",
    ]
    if publish:  # (none with a bridge)
        for inner, outer in zip(s.container_ports, publish.values(), strict=True):
            argv += ["--publish", f"127.0.0.1:{outer}:{inner}/tcp"]
    if s.read_only:
        argv.append("--read-only")
    if s.memory is not None:
        argv += ["--memory", f"{s.memory}m", "--memory-swap", f"{s.memory}m"]
    if s.cpus is not None:
        argv += ["--cpus", f"{s.cpus:g}"]
    if s.user is not None:
        argv += ["--user", s.user]
    for key, value in s.env:
        argv += ["--env", f"{key}={value}"]
    argv += list(s.options)
    argv.append(s.image)
    argv += list(s.command)
    return argv
