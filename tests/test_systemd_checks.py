"""``jitlaunch check``'s deployment warnings: a valid config that remote clients could not use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from jitlaunch.checks import deployment_warnings

from .conftest import ROOT, parse_config


def _config(listen: str, dns: str = "", service: str = "") -> str:
    return f"""
[daemon]
state_dir = "/nonexistent"
[dns]
listen = ["{listen}"]
zones = ["apps.example.org"]
{dns}
[[service]]
name = "py"
{service or 'front = ["192.0.2.10"]'}
ports = [80]
answer = "proxy"
[service.process]
command = "true"
subnet = "127.77.1.0/24"
"""


def test_loopback_only_is_quiet() -> None:
    text = _config("127.0.0.1:5353", service='front = ["127.77.0.1"]').replace(
        'answer = "proxy"', 'answer = "handoff"')
    assert deployment_warnings(parse_config(text)) == []


def test_a_wildcard_without_glue_is_a_lame_delegation() -> None:
    (warning,) = deployment_warnings(parse_config(_config("0.0.0.0:53")))
    assert warning.startswith("lame delegation: DNS listens on 0.0.0.0:53 but "
                              "dns.nameserver_addresses is not set")
    assert "ns.apps.example.org" in warning
    # A nameserver outside our zones needs no glue from us.
    outside = _config("0.0.0.0:53", dns='nameservers = ["ns1.provider.net"]')
    assert deployment_warnings(parse_config(outside)) == []
    assert deployment_warnings(parse_config(
        _config("0.0.0.0:53", dns='nameserver_addresses = ["192.0.2.10"]'))) == []


def test_loopback_addresses_handed_to_remote_clients() -> None:
    text = _config("192.0.2.10:53", dns='nameserver_addresses = ["127.0.0.1"]',
                   service='front = ["127.77.0.1"]').replace('answer = "proxy"', 'answer = "handoff"')
    warnings = deployment_warnings(parse_config(text))
    assert [w.split(":")[0] for w in warnings] == [
        "dns.nameserver_addresses", "service 'py'", "service 'py'"]
    assert "127.77.0.1 is a loopback address" in warnings[1]
    assert "127.77.1.0/24 (loopback)" in warnings[2] and 'set answer = "proxy"' in warnings[2]


def test_jitlaunch_check_prints_warnings_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(_config("0.0.0.0:53"))
    # --config-only: 192.0.2.10 is no address of this machine, which the host checks report.
    out = subprocess.run([sys.executable, "-m", "jitlaunch.cli", "check", "--config-only", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith(f"{path}: OK")
    assert out.stderr.startswith("jitlaunch: warning: lame delegation:")
    production = subprocess.run(
        [sys.executable, "-m", "jitlaunch.cli", "check", "--config-only",
         str(ROOT / "conf" / "production.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (production.returncode, production.stderr) == (0, "")
