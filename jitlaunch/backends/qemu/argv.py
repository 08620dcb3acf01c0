"""QEMU's command line for one instance, pure: every value comes in as an argument."""

from __future__ import annotations

import shlex
from pathlib import Path

from .settings import MARKER, QemuSettings


def qemu_opt(value: str) -> str:
    """``value`` as one value in a QEMU option list, where a comma is written twice."""
    return value.replace(",", ",,")


def user_netdev(host_ports: dict[int, int], guest_ports: dict[int, int]) -> str:
    """A ``-netdev`` value for user networking forwarding 127.0.0.1:``host_ports[front]`` to
    the guest's ``guest_ports[front]`` for each front port."""
    fwd = [f"hostfwd=tcp:127.0.0.1:{host_ports[front]}-:{guest_ports[front]}" for front in host_ports]
    return ",".join(["user", "id=n0", *fwd])


def tap_netdev(tap: str) -> str:
    return f"tap,id=n0,ifname={tap},script=no,downscript=no"


def build_argv(
    settings: QemuSettings, *, binary: str, accel: str, cmdline: str, qmp_path: Path,
    pidfile: Path, service: str, number: int, netdev: str, mac: str, incoming: Path | None = None,
    runas: str | None = None,
) -> list[str]:
    """The argv of QEMU (``binary``) for one instance: microvm (or ``settings.machine``), the
    kernel booted directly with ``cmdline``, the serial console on stdio, QMP on
    ``qmp_path``, our marker in ``-name`` (the leftover sweep looks for it with ``pidfile``),
    one virtio-net device with ``mac`` on ``netdev``, ``-incoming`` from a saved state, and
    ``-runas`` (a user name, or ``uid:gid``) to drop to once everything is open.

    Guest RAM: unless ``settings.hugepages``, a private mapping of a memfd
    (``memory-backend-memfd,share=off``) instead of QEMU's anonymous memory. QEMU asks for
    transparent huge pages on guest RAM (MADV_HUGEPAGE), so with THP at ``madvise`` or
    ``always`` the first touch of a guest page brings in 2 MiB; a private file mapping is
    never backed by them, so a guest costs the 4 KiB pages it touches (the bundled image:
    ~0.2 MiB instead of 2 MiB)."""
    argv = [
        binary, "-M", settings.machine, "-accel", accel, "-nodefaults",
        "-no-user-config", "-display", "none", "-m", f"{settings.memory}M",
        "-smp", str(settings.cpus), "-kernel", str(settings.kernel), "-append", cmdline,
        "-serial", "stdio", "-qmp", f"unix:{qemu_opt(str(qmp_path))},server=on,wait=off",
        "-name", f"{MARKER}:{service}:{number}", "-pidfile", str(pidfile),
        "-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,mac={mac}",
    ]
    if not settings.hugepages:
        argv += ["-object", f"memory-backend-memfd,id=jl-ram,size={settings.memory}M,share=off",
                 "-machine", "memory-backend=jl-ram"]
    argv += settings.extra_args
    if runas is not None:
        argv += ["-runas", runas]
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    return argv
