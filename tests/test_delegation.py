"""A delegation tried by a real recursive resolver, as the production docs describe it.

In network namespaces the test creates (joined by a bridge inside a namespace of their own;
nothing of the host's network is touched): NSD serves the parent zone ``example.test`` and
delegates ``apps.example.test`` to two jitlaunch hosts, ns1 and ns2 (NS records and glue),
each its own daemon with its own instances; Unbound resolves through the delegation for a
client in a third namespace, which runs ``curl`` against a service name:

* a cold lookup through the resolver boots the service and ``curl`` is served;
* with one host's daemon stopped, the client is still served by the other;
* answers rate-limited with a slip (TC) are retried by Unbound over TCP and resolved.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import PYTHON

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("nsd") is None and not Path("/usr/sbin/nsd").exists(),
                       reason="nsd is not installed (scripts/setup installs it)"),
    pytest.mark.skipif(shutil.which("unbound") is None and not Path("/usr/sbin/unbound").exists(),
                       reason="unbound is not installed (scripts/setup installs it)"),
]

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
NET = "10.53.0"
PARENT, RESOLVER, CLIENT, HOST1, HOST2 = (f"{NET}.{n}" for n in (1, 2, 3, 11, 12))
ZONE = "apps.example.test"

PARENT_ZONE = f"""$TTL 300
example.test.   IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30
example.test.   IN NS  ns.example.test.
ns.example.test. IN A  {PARENT}
{ZONE}.          IN NS  ns1.{ZONE}.
{ZONE}.          IN NS  ns2.{ZONE}.
ns1.{ZONE}.      IN A   {HOST1}
ns2.{ZONE}.      IN A   {HOST2}
"""


def _sh(*argv: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=check)


class Lab:
    """Six network namespaces on one bridge (in a namespace of its own), and the processes
    started in them; :meth:`close` kills those and deletes the namespaces on every path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, role: str) -> str:
        return f"jld{self.tag}{role}"

    def build(self) -> None:
        switch = self.ns("sw")
        self._add(switch)
        self.run(switch, "ip", "link", "add", "br0", "type", "bridge")
        self.run(switch, "ip", "link", "set", "br0", "up")
        for role, address in (("p", PARENT), ("r", RESOLVER), ("c", CLIENT), ("h1", HOST1),
                              ("h2", HOST2)):
            name = self.ns(role)
            self._add(name)
            # The veth is made inside the switch namespace and one end moved: never on the host.
            self.run(switch, "ip", "link", "add", f"v{role}", "type", "veth", "peer", "name",
                     "eth0", "netns", name)
            self.run(switch, "ip", "link", "set", f"v{role}", "master", "br0", "up")
            self.run(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            self.run(name, "ip", "link", "set", "eth0", "up")
            self.run(name, "ip", "link", "set", "lo", "up")

    def _add(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self.names.append(name)

    def run(self, ns: str, *argv: str, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh("ip", "netns", "exec", ns, *argv, timeout=timeout, check=check)

    def start(self, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for name in self.names:
            pids = _sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", name, check=False)


def _nsd_conf(d: Path) -> str:
    return f"""server:
    ip-address: {PARENT}@53
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{d}"
    pidfile: "{d}/nsd.pid"
    xfrdfile: "{d}/xfrd.state"
    zonelistfile: "{d}/zone.list"
    database: ""
    logfile: "{d}/nsd.log"
    rrl-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "example.test"
    zonefile: "example.test.zone"
"""


def _unbound_conf(d: Path) -> str:
    # Iterator only (no DNSSEC validation: the test zones are unsigned and have no DS);
    # example.test is a stub zone pointing at the parent's NSD, standing for the root path.
    return f"""server:
    interface: {RESOLVER}
    port: 53
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: ""
    use-syslog: no
    verbosity: 1
    do-ip6: no
    access-control: {NET}.0/24 allow
    module-config: "iterator"
    qname-minimisation: no
    cache-max-ttl: 2
    cache-max-negative-ttl: 1
    infra-host-ttl: 10
    # Unbound serves the special-use .test (RFC 6761) locally by default: not here.
    local-zone: "test." nodefault
stub-zone:
    name: "example.test"
    stub-addr: {PARENT}
remote-control:
    control-enable: no
"""


def _jitlaunch_conf(state: Path, host: str, rrl: str) -> str:
    return f"""
[daemon]
state_dir = "{state}"
drain_timeout = "1s"

[metrics]
listen = ["127.0.0.1:9464"]

[dns]
listen = ["{host}:53"]
zones = ["{ZONE}"]
nameservers = ["ns1.{ZONE}", "ns2.{ZONE}"]
nameserver_addresses = {{ "ns1.{ZONE}" = ["{HOST1}"], "ns2.{ZONE}" = ["{HOST2}"] }}
ttl = 1
booting_ttl = 1

[dns.rrl]
{rrl}

[defaults]
answer = "proxy"
idle_timeout = "60s"

[[service]]
name = "web"
front = ["{host}"]
ports = [8080]
[service.process]
command = "{PYTHON} -m jitlaunch.demo_http --address {{address}} --port {{port}} --name {{name}}"

[[service]]
name = "other"
front = ["{host}"]
ports = [8081]
[service.process]
command = "{PYTHON} -m jitlaunch.demo_http --address {{address}} --port {{port}} --name {{name}}"
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def _poll(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


def _curl(lab: Lab, url: str, resolv: Path) -> subprocess.CompletedProcess[str]:
    """curl in the client's namespace, resolving through Unbound (its own resolv.conf,
    bound over /etc/resolv.conf in a private mount namespace)."""
    return lab.run(lab.ns("c"), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount --bind "{resolv}" /etc/resolv.conf && exec curl -s -m 25 "$0"', url,
                   timeout=40, check=False)


def _metric(lab: Lab, ns: str, name: str, label: str) -> float:
    """The sum of the samples of ``name`` that carry ``label`` (``key="value"``)."""
    text = lab.run(ns, "curl", "-s", "-m", "5", "http://127.0.0.1:9464/metrics").stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


def test_two_hosts_behind_a_real_resolver(lab: Lab, tmp_path: Path) -> None:
    parent = tmp_path / "nsd"
    parent.mkdir()
    (parent / "example.test.zone").write_text(PARENT_ZONE)
    (parent / "nsd.conf").write_text(_nsd_conf(parent))
    lab.start(lab.ns("p"), [NSD, "-d", "-c", str(parent / "nsd.conf")], tmp_path / "nsd.out")
    resolver = tmp_path / "unbound"
    resolver.mkdir()
    (resolver / "unbound.conf").write_text(_unbound_conf(resolver))
    lab.start(lab.ns("r"), [UNBOUND, "-d", "-c", str(resolver / "unbound.conf")],
              tmp_path / "unbound.out")
    # Every limited response is sent truncated (slip 1), at a rate the test's queries exceed.
    rrl = {"h1": "rate = 0", "h2": "rate = 1\nslip = 1"}
    daemons = {}
    for role, host in (("h1", HOST1), ("h2", HOST2)):
        conf = tmp_path / f"{role}.toml"
        conf.write_text(_jitlaunch_conf(tmp_path / f"state-{role}", host, rrl[role]))
        daemons[role] = lab.start(lab.ns(role), [PYTHON, "-m", "jitlaunch.cli", "run",
                                                 "--config", str(conf)], tmp_path / f"{role}.log")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {RESOLVER}\noptions timeout:5 attempts:2\n")

    def answers(ns: str, server: str, name: str) -> bool:
        out = lab.run(ns, "dig", "+short", "+time=2", "+tries=1", f"@{server}", name,
                      check=False).stdout.split()
        return bool(out) and not out[0].startswith(";")

    for ns, host in ((lab.ns("h1"), HOST1), (lab.ns("h2"), HOST2)):
        _poll(f"{ns} answering", lambda ns=ns, at=host: answers(ns, at, f"ns1.{ZONE}"))
    _poll("NSD answering", lambda: answers(lab.ns("p"), PARENT, "ns.example.test"))
    _poll("Unbound answering", lambda: answers(lab.ns("c"), RESOLVER, "ns.example.test"))

    # A cold lookup through the delegation: whichever host Unbound asks boots web.
    got = _curl(lab, f"http://web.{ZONE}:8080/", resolv)
    assert "web" in got.stdout, (got.stdout, got.stderr, _logs(tmp_path))

    # ns1 goes away: Unbound finds ns2, which serves another cold service.
    daemons["h1"].send_signal(signal.SIGTERM)
    daemons["h1"].wait(20)
    got = _curl(lab, f"http://other.{ZONE}:8081/", resolv)
    assert "other" in got.stdout, (got.stdout, got.stderr, _logs(tmp_path))
    assert f"{HOST2}" in lab.run(lab.ns("c"), "dig", "+short", f"@{RESOLVER}",
                                 f"other.{ZONE}").stdout

    # ns2 limits at 1 response per second with slip 1: Unbound gets TC, asks again over TCP,
    # and every name still resolves (NXDOMAIN included: the zone's own identity).
    names = [f"web.{ZONE}", f"other.{ZONE}"] + [f"nx{i}.{ZONE}" for i in range(8)]
    for i in range(3):
        for name in names:
            out = lab.run(lab.ns("c"), "dig", "+time=5", "+tries=1", f"@{RESOLVER}",
                          f"{name}", check=False).stdout
            status = "NXDOMAIN" if name.startswith("nx") else "NOERROR"
            assert f"status: {status}" in out, (i, name, out, _logs(tmp_path))
    h2 = lab.ns("h2")
    assert _metric(lab, h2, "jitlaunch_dns_responses_limited_total", 'action="slipped"') > 0
    assert _metric(lab, h2, "jitlaunch_dns_queries_total", 'transport="tcp"') > 0


def _logs(tmp: Path) -> str:
    out = []
    for name in ("h1.log", "h2.log", "unbound.out"):
        with contextlib.suppress(OSError):
            out.append(f"--- {name}\n" + (tmp / name).read_text(errors="replace")[-2000:])
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
