"""What ``jitlaunch check`` checks beyond parsing, and the daemon logs at start.

:func:`host_findings` looks at this host without starting anything: the files and binaries
services need, the users they run as, /dev/kvm, the addresses and ports to bind. Each finding
is an *error* (the service or the daemon can never start as configured: a missing kernel
image, binary or user, a state directory others can write) or a *warning* (it may be fine at
run time: a port in use, perhaps by the running daemon itself; a privilege this check lacks
but the daemon may have).

:func:`deployment_warnings` is pure (a Config in, sentences out): a valid config that would
not work for clients elsewhere. When DNS listens on an address that is not loopback (a
wildcard counts: it takes public addresses too), the config is meant for remote resolvers,
and then:

* a nameserver inside one of our zones with no glue address (``dns.nameserver_addresses``
  unset and every listen address a wildcard) makes the delegation lame;
* a loopback glue address, front, or address handed over (``answer = "handoff"`` with
  instances in a loopback subnet) sends remote clients to an address they cannot reach.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import ipaddress
import os
import shutil
import socket
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.addresses import HOLD_MARGIN
from .backends.childenv import DEFAULT_PATH
from .config import Config, Endpoint, ServiceConfig
from .identity import Identity, UnknownIdentity, enter_problem, execute_problem, resolve
from .statedir import state_dir_problem

WILDCARDS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class Finding:
    """One problem on this host. ``error``: it can never work as configured (exit 2)."""

    error: bool
    message: str
    service: str | None = None
    key: str | None = None

    def text(self, path: str) -> str:
        """``FILE: service 'x': key: message``, the shape of a config error."""
        where = path
        if self.service is not None:
            where += f": service {self.service!r}"
        if self.key is not None:
            where += f": {self.key}"
        return f"{where}: {self.message}"


def host_findings(config: Config, *, ports: bool = True, state_dir: bool = True) -> list[Finding]:
    """Everything that can be checked here without starting anything (see the module's
    docstring), errors first. ``ports``: also try to bind every address the daemon would
    (the daemon itself skips that: its own binds say it at once); ``state_dir``: whether
    the daemon would refuse its state directory (statedir.py; the daemon says it itself)."""
    out: list[Finding] = []
    root = os.geteuid() == 0
    if state_dir and (problem := state_dir_problem(config.daemon.state_dir)) is not None:
        out.append(Finding(True, problem, key="daemon.state_dir"))
    group = config.daemon.control_group
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            out.append(Finding(True, f"group {group!r} does not exist on this host (the daemon "
                               "would stop at start)", key="daemon.control_group"))
    for svc in config.services:
        if svc.backend == "process":
            out += _process(svc, root)
        elif svc.backend == "qemu":
            out += _qemu(svc, root)
        elif svc.backend == "libvirt":
            out += _libvirt(svc)
        elif svc.backend == "podman":
            from .backends.podman.check import podman_problems

            out += [Finding(e, m, svc.name, k) for e, m, k in podman_problems(svc)]
        out += _proxy_protocol(svc)
    out += frontend_findings(config)
    if ports:
        running = running_daemon(config.daemon.state_dir)
        if running is None:
            out += _ports(config, root)
        else:
            out.append(Finding(False, f"a jitlaunch daemon{running} runs on the state directory "
                               f"{config.daemon.state_dir} and holds its addresses: the ports "
                               "are not checked"))
    return sorted(out, key=lambda f: not f.error)


def running_daemon(state_dir: Path) -> str | None:
    """`` (pid N)`` (or ``""`` when the pid cannot be read) when a daemon holds the state
    directory's lock (see daemon.lock_state_dir), else None. Opens nothing it would create
    and follows no symbolic link."""
    try:
        fd = os.open(state_dir / "jitlaunch.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        try:
            return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
        except (OSError, ValueError):
            return ""
    finally:
        os.close(fd)
    return None


def _identity(svc: ServiceConfig, settings: Any, section: str) -> tuple[Identity | None,
                                                                      list[Finding]]:
    user = getattr(settings, "user", None)
    if user is None:
        return None, []
    try:
        return resolve(user, getattr(settings, "group", None)), []
    except UnknownIdentity as exc:
        key = "group" if "group" in str(exc).split(" ", 1)[0] else "user"
        return None, [Finding(True, str(exc), svc.name, f"{section}.{key}")]


def _process(svc: ServiceConfig, root: bool) -> list[Finding]:
    settings = svc.settings
    out: list[Finding] = []
    ident, problems = _identity(svc, settings, "process")
    out += problems
    if settings.user is None and root:
        out.append(Finding(False, "not set: under a root daemon its instances run as root "
                           "(this check runs as root); set the user they should run as, or "
                           "user = \"root\" to say so", svc.name, "process.user"))
    elif settings.user is not None and not root and (ident is None or ident.uid != os.geteuid()):
        out.append(Finding(False, f"running instances as user {settings.user} needs a root daemon; "
                           f"this check runs as uid {os.geteuid()}", svc.name, "process.user"))
    directory = settings.directory
    if directory is not None:
        if not directory.is_dir():
            out.append(Finding(True, f"{directory} is not a directory", svc.name,
                               "process.directory"))
        elif ident is not None and (problem := enter_problem(directory, ident)):
            out.append(Finding(True, problem, svc.name, "process.directory"))
    if ident is not None and ident.uid != 0 and settings.subnet is not None:
        low = [p for p in svc.ports if p < _unprivileged_port_start()]
        if low:
            out.append(Finding(False, f"with a subnet, instances listen on the service's own "
                               f"ports, and as {ident} port {low[0]} needs "
                               "CAP_NET_BIND_SERVICE on the program (or a lower "
                               "net.ipv4.ip_unprivileged_port_start)", svc.name, "process.user"))
    word = settings.command[0]
    fields = {f for _, f, _, _ in string.Formatter().parse(word) if f is not None}
    if fields - {"python"}:
        return out  # the binary depends on the instance: nothing to check before it runs
    program = word.format(python=sys.executable)
    if "/" not in program:
        env = dict(settings.environment)
        search = env.get("PATH", DEFAULT_PATH)  # an instance's, never the daemon's
        found = shutil.which(program, path=search)
        if found is None:
            out.append(Finding(True, f"{program!r} is not found in PATH ({search})", svc.name,
                               "process.command"))
            return out
        path = Path(found)
    else:
        path = (directory or Path.cwd()) / program
    if problem := execute_problem(path, ident):
        out.append(Finding(True, problem, svc.name, "process.command"))
    return out


def _qemu(svc: ServiceConfig, root: bool) -> list[Finding]:
    settings = svc.settings
    ident, out = _identity(svc, settings, "qemu")
    if settings.user is not None and not root and (ident is None or ident.uid != os.geteuid()):
        out.append(Finding(False, f"running QEMU as user {settings.user} needs a root daemon; "
                           f"this check runs as uid {os.geteuid()}", svc.name, "qemu.user"))
    if not settings.kernel.is_file():
        out.append(Finding(True, f"kernel image {settings.kernel} does not exist", svc.name,
                           "qemu.kernel"))
    # binary = "auto": the program it picks on this host (KVM and the reduced build looked at now).
    from .backends.qemu.settings import REDUCED_BINARY, choose_binary, is_reduced, reduced_cannot
    from .backends.vm import kvm_usable

    accel = settings.accel if settings.accel != "auto" else "kvm" if kvm_usable() else "tcg"
    binary = choose_binary(settings, accel, shutil.which(REDUCED_BINARY) is not None)
    if shutil.which(binary) is None:
        out.append(Finding(True, f"QEMU binary {binary!r} is not found (or not executable)"
                           + ("" if "/" in binary else " in PATH"), svc.name, "qemu.binary"))
    if is_reduced(binary) and (why := reduced_cannot(accel, settings.network)):
        out.append(Finding(True, f"binary = {binary!r} is QEMU's reduced build, which {why}, "
                           'and /dev/kvm is not usable here; set binary = "auto" or '
                           '"qemu-system-x86_64"', svc.name, "qemu.binary"))
    if settings.accel == "kvm":
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            missing = exc.errno == errno.ENOENT
            out.append(Finding(
                missing or root, f"accel = \"kvm\" but /dev/kvm cannot be opened: "
                f"{exc.strerror}" + ("" if missing or root else
                                     f" (this check runs as uid {os.geteuid()})"),
                svc.name, "qemu.accel"))
    if settings.network == "bridge":
        if not os.path.exists("/dev/net/tun"):
            out.append(Finding(True, "bridge networking needs /dev/net/tun, which does not exist",
                               svc.name, "qemu.network"))
        elif not _net_admin():
            out.append(Finding(False, "bridge networking needs root or CAP_NET_ADMIN (to create "
                               f"{settings.bridge} and taps); this check runs without it",
                               svc.name, "qemu.network"))
    return out


def _libvirt(svc: ServiceConfig) -> list[Finding]:
    settings = svc.settings
    local = settings.uri.split("://", 1)[1].startswith("/")  # qemu:///system, no host
    out: list[Finding] = []
    if local and not settings.kernel.is_file():
        out.append(Finding(True, f"kernel image {settings.kernel} does not exist", svc.name,
                           "libvirt.kernel"))
    if settings.network == "bridge" and settings.local and not _net_admin():
        out.append(Finding(False, "bridge networking needs root or CAP_NET_ADMIN (to create "
                           f"{settings.bridge} and forget its addresses' neighbour entries; "
                           "libvirt makes the taps); this check runs without it", svc.name,
                           "libvirt.network"))
    if settings.network == "user" and not settings.local:
        out.append(Finding(False, 'network = "user" with a remote URI: QEMU forwards the '
                           "ports from 127.0.0.1 of the libvirt host, which this one cannot "
                           'reach; network = "bridge" gives each domain an address', svc.name,
                           "libvirt.network"))
    if settings.console == "file" and not settings.local:
        out.append(Finding(False, 'console = "file" with a remote URI: the console file is '
                           "written on the libvirt host, and READY is looked for in a file of "
                           'this one; console = "stream" reads it through libvirt', svc.name,
                           "libvirt.console"))
    return out


def _proxy_protocol(svc: ServiceConfig) -> list[Finding]:
    """A handed-over client reaches the instance directly and sends no PROXY header, which an
    instance that expects one refuses."""
    own = getattr(svc.settings, "subnet", None) is not None \
        or getattr(svc.settings, "network", None) == "bridge"
    if svc.proxy_protocol is None or svc.answer == "proxy" or not own:
        return []
    return [Finding(False, f'proxy_protocol = "{svc.proxy_protocol}" with answer = '
                    f'"{svc.answer}": once an instance is ready, clients are handed its own '
                    "address and connect without the header; set answer = \"proxy\"",
                    svc.name, "proxy_protocol")]


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _net_admin() -> bool:
    """True if this process has CAP_NET_ADMIN (12) in its effective set."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 12))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _ports(config: Config, root: bool) -> list[Finding]:
    wanted: list[tuple[str, str, int, socket.SocketKind, str | None]] = []
    for ep in config.dns.listen:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            wanted.append(("dns.listen", ep.host, ep.port, kind, None))
    for ep in config.metrics.listen:
        wanted.append(("metrics.listen", ep.host, ep.port, socket.SOCK_STREAM, None))
    for svc in config.services:
        for address in svc.front:
            for port in svc.ports:
                wanted.append(("front", address, port, socket.SOCK_STREAM, svc.name))
    out = []
    for key, host, port, kind, service in wanted:
        if port == 0:
            continue
        problem = bind_problem(host, port, kind)
        if problem is None:
            continue
        error, why = problem
        where = Endpoint(host, port)
        proto = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        out.append(Finding(error, f"cannot bind {where} ({proto}): {why}", service, key))
    return out


def bind_problem(host: str, port: int, kind: socket.SocketKind) -> tuple[bool, str] | None:
    """Bind ``host:port`` as the daemon would and let go at once: None if it works, else
    (is it an error, why). In use is a warning (perhaps the running daemon itself), as is a
    privileged port for a check that is not root; an address no interface has is an error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((host, port))
            if kind == socket.SOCK_STREAM:
                s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False, ("in use (by the running jitlaunch itself? else the daemon cannot "
                               "start)")
            if exc.errno == errno.EACCES:
                return False, ("permission denied (ports below 1024 need root, "
                               "CAP_NET_BIND_SERVICE or socket activation)")
            if exc.errno == errno.EADDRNOTAVAIL:
                return True, "no interface has this address"
            return True, exc.strerror or str(exc)
    return None


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def shared_subnet_warnings(config: Config) -> list[str]:
    """One sentence per subnet (process ``subnet``, or a bridge's) that several handed-over
    services draw their instances' addresses from: allowed, but an address one of them had
    is held from the others for its TTL plus a margin after its release (addresses.py), so
    the subnet needs the room."""
    users: dict[str, list[str]] = {}
    for svc in config.services:
        subnet = getattr(svc.settings, "subnet", None)
        if subnet is None or svc.answer == "proxy":
            continue
        if svc.backend != "process" and getattr(svc.settings, "network", "") != "bridge":
            continue
        where = str(subnet) if svc.backend == "process" else \
            f"{subnet} on bridge {svc.settings.bridge}"
        users.setdefault(where, []).append(svc.name)
    return [
        f"services {', '.join(repr(n) for n in names)} share {where}: an instance address one "
        f"of them had is held from the others for that service's ttl plus "
        f"{HOLD_MARGIN:g} s after its release (a client may still have it cached), so "
        f"the subnet needs room for that"
        for where, names in users.items() if len(names) > 1
    ]


def deployment_warnings(config: Config) -> list[str]:
    """One sentence per problem; empty when there is none (or DNS is on loopback only)."""
    dns = config.dns
    public = [e for e in dns.listen if not _loopback(e.host)]
    if not public:
        return []
    where = ", ".join(str(e) for e in public)
    out: list[str] = []
    inside = sorted({
        ns for z in dns.zones for ns in z.nameservers
        if any(ns == y.name or ns.endswith("." + y.name) for y in dns.zones)
    })
    if inside and not dns.nameserver_addresses:
        out.append(
            f"lame delegation: DNS listens on {where} but dns.nameserver_addresses is not set, "
            f"so the nameserver {inside[0]} (inside the zone) has no address to answer or to "
            "give the parent zone as glue; set it to this host's public address(es)"
        )
    elif dns.nameserver_glue:
        named = {ns for ns, _ in dns.nameserver_glue}
        for ns in inside:
            if ns not in named:
                out.append(
                    f"lame delegation: the nameserver {ns} (inside the zone) has no entry in "
                    "dns.nameserver_addresses, so it has no address to answer or to give the "
                    "parent zone as glue"
                )
    for address in dns.nameserver_addresses:
        if _loopback(address):
            out.append(
                f"dns.nameserver_addresses: {address} is a loopback address, but DNS listens "
                f"on {where}: resolvers elsewhere cannot reach the nameserver there"
            )
    for svc in config.services:
        for front in svc.front:
            if _loopback(front):
                out.append(
                    f"service {svc.name!r}: front {front} is a loopback address, but DNS "
                    f"listens on {where}: remote clients are sent where they cannot connect"
                )
        subnet = getattr(svc.settings, "subnet", None)
        if svc.answer != "proxy" and subnet is not None and subnet.is_loopback:
            out.append(
                f"service {svc.name!r}: answer {svc.answer!r} hands over its instances' "
                f"addresses in {subnet} (loopback) once they are ready, but DNS listens on "
                f"{where}: remote clients cannot reach them; set answer = \"proxy\""
            )
    return out


def frontend_findings(config: Config) -> list[Finding]:
    """Warnings about shared frontends (pure): one no service joins (it refuses every
    connection), and a route on the other protocol's well-known port (``sni`` on 80, ``host``
    on 443: clients would speak the other protocol to it)."""
    out = []
    joined = {f for s in config.services for f, _ in s.frontends}
    for fe in config.frontends:
        key = f"frontend {fe.name}"
        if fe.name not in joined:
            out.append(Finding(False, "no service joins this frontend (frontends = { "
                               f"{fe.name} = PORT }}): it refuses every connection", key=key))
        wrong, usual = (80, "HTTP") if fe.route == "sni" else (443, "TLS")
        for ep in fe.listen:
            if ep.port == wrong:
                out.append(Finding(False, f'route = "{fe.route}" on {ep}: clients speak {usual} '
                                   f"on port {wrong}", key=f"{key}.listen"))
    return out

