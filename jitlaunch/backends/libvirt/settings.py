"""The libvirt backend's settings (the service's ``[service.libvirt]`` table, with defaults
from the global ``[libvirt]`` table), pure."""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ...config import Table
from ..vm import CMDLINE_FIELDS, DEFAULT_CMDLINE, parse_bridge

STOP_MODES = ("destroy", "shutdown", "pause", "save")
CONSOLE_MODES = ("file", "stream")
DEFAULT_URI = "qemu:///system"
#: The placeholders a user's domain XML template may use (``${name}``, string.Template).
TEMPLATE_FIELDS = ("name", "memory", "cpus", "kernel", "cmdline", "mac", "console", "domain_type",
                   "bridge")


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str
    kernel: Path
    memory: int
    cpus: int
    accel: str
    guest_ports: tuple[int, ...]
    cmdline: str
    grace: float
    pool: int
    template: str | None
    template_path: Path | None
    network: str
    bridge: str
    subnet: ipaddress.IPv4Network
    #: How READY is read: ``file`` (the serial console in a file of ours, read here) or
    #: ``stream`` (a pty console read through libvirt, which works for a remote host too).
    console: str = "file"

    @property
    def local(self) -> bool:
        """The libvirt host is this one (no host in the URI, or a loopback one): a bridge
        of ours is made here; a remote host's bridge is its own."""
        return is_local(self.uri)


def is_local(uri: str) -> bool:
    host = urlsplit(uri).hostname
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uri(t: Table) -> str:
    uri = t.string("uri", DEFAULT_URI)
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^\s]*", uri):
        raise t.error("uri", f"expected a libvirt URI such as {DEFAULT_URI}, got {uri!r}")
    return uri


def parse_top(t: Table) -> dict[str, str]:
    """The global ``[libvirt]`` table: ``uri``, the connection of every libvirt service
    whose own table names none."""
    top = {"uri": _uri(t)} if t.has("uri") else {}
    t.done()
    return top


def parse_settings(t: Table, base_dir: Path, ports: tuple[int, ...]) -> LibvirtSettings:
    uri = _uri(t)
    kernel = t.string("kernel")
    guest_ports = t.ports("guest_ports", list(ports))
    if len(guest_ports) != len(ports):
        raise t.error("guest_ports", f"expected {len(ports)} port number(s), one for each of "
                      f"the service's ports {list(ports)}")
    cmdline = t.string("cmdline", DEFAULT_CMDLINE)
    try:
        cmdline.format(**{f: "x" for f in CMDLINE_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise t.error("cmdline", f"bad placeholder {exc} (allowed: "
                      f"{', '.join('{' + f + '}' for f in CMDLINE_FIELDS)})") from None
    template_path: Path | None = None
    template: str | None = None
    if "template" in t.data:
        template_path = (base_dir / t.string("template")).resolve()
        try:
            template = template_path.read_text()
        except OSError as exc:
            raise t.error("template", f"cannot read {template_path}: {exc.strerror or exc}") \
                from None
        try:
            string.Template(template).substitute({f: "x" for f in TEMPLATE_FIELDS})
        except (KeyError, ValueError) as exc:
            raise t.error("template", f"bad placeholder {exc} (allowed: "
                          f"{', '.join('${' + f + '}' for f in TEMPLATE_FIELDS)})") from None
    bridge, subnet = parse_bridge(t)
    settings = LibvirtSettings(
        uri=uri,
        kernel=(base_dir / kernel).resolve(),
        memory=t.integer("memory", 16, low=2, high=1 << 20, unit="MiB"),
        cpus=t.integer("cpus", 1, low=1, high=256),
        accel=t.string("accel", "auto", choices=("auto", "kvm", "tcg")),
        guest_ports=tuple(guest_ports),
        cmdline=cmdline,
        grace=t.duration("grace", 5, allow_zero=True),
        pool=t.integer("pool", 0, low=0, high=64),
        template=template,
        template_path=template_path,
        network=t.string("network", "user", choices=("user", "bridge")),
        bridge=bridge,
        subnet=subnet,
        console=t.string("console", "file" if is_local(uri) else "stream",
                         choices=CONSOLE_MODES),
    )
    t.done()
    return settings
