"""The qemu backend's settings (the service's ``[service.qemu]`` table), pure: no I/O beyond
reading the table, so that the config check never imports trio's process machinery."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ...config import Table
from ...identity import parse_user_group
from ..vm import CMDLINE_FIELDS, DEFAULT_CMDLINE, parse_bridge

STOP_MODES = ("destroy", "shutdown", "pause", "save")
MARKER = "jitlaunch"
#: The full QEMU, and the reduced build Debian's qemu-system-x86 ships beside it: KVM only
#: (no TCG) and no user networking (tap and bridge only), about half the full one's memory.
FULL_BINARY = "qemu-system-x86_64"
REDUCED_BINARY = "qemu-system-x86_64-microvm"

@dataclass(frozen=True)
class QemuSettings:
    kernel: Path
    binary: str
    machine: str
    memory: int
    cpus: int
    accel: str
    network: str
    guest_ports: tuple[int, ...]
    cmdline: str
    ready: str
    pool: int
    grace: float
    extra_args: tuple[str, ...]
    bridge: str
    subnet: ipaddress.IPv4Network
    hugepages: bool = False
    #: Who QEMU runs as once it has opened what it needs (``-runas``); None: the daemon's user.
    user: str | int | None = None
    group: str | int | None = None


def parse_settings(t: Table, base_dir: Path, ports: tuple[int, ...]) -> QemuSettings:
    kernel = t.string("kernel")
    guest_ports = t.ports("guest_ports", list(ports))
    if len(guest_ports) != len(ports):
        raise t.error(
            "guest_ports", f"expected {len(ports)} port number(s), one for each of the "
            f"service's ports {list(ports)}"
        )
    cmdline = t.string("cmdline", DEFAULT_CMDLINE)
    try:
        cmdline.format(**{f: "x" for f in CMDLINE_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise t.error(
            "cmdline", f"bad placeholder {exc} (allowed: "
            f"{', '.join('{' + f + '}' for f in CMDLINE_FIELDS)})"
        ) from None
    extra = t.raw("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise t.error("extra_args", "expected a list of strings (QEMU arguments)")
    bridge, subnet = parse_bridge(t)
    network = t.string("network", "user", choices=("user", "bridge"))
    accel = t.string("accel", "auto", choices=("auto", "kvm", "tcg"))
    binary = t.string("binary", "auto")
    if not binary:
        raise t.error("binary", f'expected "auto" or a QEMU program such as {FULL_BINARY!r}')
    if is_reduced(binary) and (why := reduced_cannot(accel, network)):
        raise t.error("binary", f"{binary!r} is QEMU's reduced build, which {why}; use "
                      f'binary = "auto" (the reduced build where it can run) or {FULL_BINARY!r}')
    user, group = parse_user_group(t)
    settings = QemuSettings(
        kernel=(base_dir / kernel).resolve(),
        binary=binary,
        machine=t.string("machine", "microvm"),
        memory=t.integer("memory", 16, low=2, high=1 << 20, unit="MiB"),
        cpus=t.integer("cpus", 1, low=1, high=256),
        accel=accel,
        network=network,
        guest_ports=tuple(guest_ports),
        cmdline=cmdline,
        ready=t.string("ready", "serial", choices=("serial", "tcp")),
        pool=t.integer("pool", 0, low=0, high=64),
        grace=t.duration("grace", 5, allow_zero=True),
        extra_args=tuple(extra),
        bridge=bridge,
        subnet=subnet,
        hugepages=t.boolean("hugepages", False),
        user=user,
        group=group,
    )
    t.done()
    return settings


def is_reduced(binary: str) -> bool:
    """Whether ``binary`` names QEMU's reduced build (by its program name)."""
    return os.path.basename(binary) == REDUCED_BINARY


def reduced_cannot(accel: str, network: str) -> str | None:
    """Why the reduced build cannot run an instance with this accelerator (``kvm``, ``tcg``;
    ``auto`` may be either, so it passes) and network mode, or None if it can."""
    if accel == "tcg":
        return "runs with KVM only (it has no TCG)"
    if network == "user":
        return 'has no user networking (only tap and bridge: network = "bridge")'
    return None


def choose_binary(settings: QemuSettings, accel: str, reduced_installed: bool) -> str:
    """The QEMU program for an instance of ``settings`` running with ``accel`` (``kvm`` or
    ``tcg``, already resolved). ``binary = "auto"`` takes the reduced build where it applies
    (KVM, bridge networking, a microvm machine, no ``extra_args``, which might name a device
    it lacks) and is installed, and the full QEMU otherwise; any other value is that program."""
    if settings.binary != "auto":
        return settings.binary
    fits = (accel == "kvm" and settings.network == "bridge" and not settings.extra_args
            and settings.machine.split(",", 1)[0] == "microvm")
    return REDUCED_BINARY if fits and reduced_installed else FULL_BINARY


def saved_meta(image: str, settings: QemuSettings, accel: str, mac: str, version: str) -> str:
    """The text kept beside a saved state (``<service>.image``): what it is valid for (the
    kernel image's id, a digest of the QEMU settings a restore must match, the accelerator,
    the version of the QEMU that saved it) and the guest's MAC, which the restored guest keeps."""
    return (f"image {image}\nqemu {_settings_digest(settings, accel)}\nversion {version}\n"
            f"mac {mac}\n")


def saved_mac(meta: str, image: str, settings: QemuSettings, accel: str, version: str) -> str | None:
    """The saved guest's MAC if the state described by ``meta`` can be restored with this
    kernel image, these settings and this accelerator by a QEMU of ``version`` (the first line
    of its ``--version``); else None. The program itself may differ: the full QEMU and its
    reduced build of one version restore each other's states (both ways checked with Debian's
    7.2 builds: the guest runs and serves); another version may not."""
    fields = dict(line.split(" ", 1) for line in meta.splitlines() if " " in line)
    if fields.get("image") != image or fields.get("qemu") != _settings_digest(settings, accel):
        return None
    if not version or fields.get("version") != version:
        return None
    return fields.get("mac")


def _settings_digest(settings: QemuSettings, accel: str) -> str:
    # Not the binary: the version stands for it (see saved_mac).
    kept = (settings.machine, settings.memory, settings.cpus, accel, settings.network,
            settings.guest_ports, settings.cmdline, settings.extra_args, settings.hugepages)
    return hashlib.sha256(repr(kept).encode()).hexdigest()[:32]
