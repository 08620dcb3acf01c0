"""Every kind of configuration error produces a message naming the file, service and key."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitlaunch import config
from jitlaunch.backends import SETTINGS
from jitlaunch.config import Config, ParseEnv, Table
from jitlaunch.errors import ConfigError

from .conftest import load_config, parse_config

BASE = """
[dns]
zones = ["jit.test"]
"""

SERVICE = """
[[service]]
name = "hello"
front = ["127.77.0.1"]
ports = [8080]
[service.process]
command = "demo --port {port}"
"""


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "conf.toml")
    return str(info.value)


def test_valid_config_round_trip() -> None:
    cfg = parse_config(BASE + SERVICE, "conf.toml")
    svc = cfg.service("hello")
    assert svc.names == ("hello.jit.test",)
    assert svc.answer == "handoff" and svc.stop == "destroy" and svc.backend == "process"
    assert svc.idle_timeout == 300 and svc.boot_timeout == 10
    assert svc.settings.command == ("demo", "--port", "{port}")
    assert cfg.dns.zones[0].nameservers == ("ns.jit.test",)
    assert cfg.dns.nameserver_addresses == ("127.0.0.1",)


def test_dns_limits_and_rrl() -> None:
    dns = parse_config(BASE, "c.toml").dns
    assert (dns.tcp_message_timeout, dns.max_tcp_connections_per_source) == (3, 32)
    assert (dns.max_held, dns.max_held_per_connection) == (1024, 16)
    rrl = dns.rrl
    assert (rrl.rate, rrl.slip, rrl.window, rrl.ipv4_prefix, rrl.ipv6_prefix, rrl.exempt) == (
        200, 2, 15, 24, 56, ())
    text = BASE + 'tcp_message_timeout = "500ms"\n[dns.rrl]\nrate = 0\nexempt = ["10.1.2.3/8", "::1"]\n'
    dns = parse_config(text, "c.toml").dns
    assert dns.tcp_message_timeout == 0.5
    assert dns.rrl.rate == 0 and dns.rrl.exempt == ("10.0.0.0/8", "::1/128")
    # NXDOMAIN and error rates: as `rate` unless set (None), 0 for not limited.
    assert (rrl.nxdomain_rate, rrl.error_rate) == (None, None)
    rrl = parse_config(BASE + "[dns.rrl]\nnxdomain_rate = 50\nerror_rate = 0\n", "c.toml").dns.rrl
    assert (rrl.rate, rrl.nxdomain_rate, rrl.error_rate) == (200, 50, 0)
    with pytest.raises(ConfigError, match=r"c.toml: dns.rrl.error_rate: expected an integer from 0"):
        parse_config(BASE + "[dns.rrl]\nerror_rate = -5\n", "c.toml")
    with pytest.raises(ConfigError, match=r"dns.rrl.nxdomains_rate: unknown key .*'nxdomain_rate'"):
        parse_config(BASE + "[dns.rrl]\nnxdomains_rate = 5\n", "c.toml")


def test_defaults_table_and_durations() -> None:
    cfg = parse_config(
        BASE + '[defaults]\nidle_timeout = "5m"\nboot_timeout = "250ms"\nanswer = "wait"\n' + SERVICE,
        "c.toml",
    )
    svc = cfg.service("hello")
    assert svc.idle_timeout == 300 and svc.boot_timeout == 0.25 and svc.answer == "wait"
    cfg = parse_config(BASE + SERVICE.replace('ports', 'idle_timeout = "never"\nports'), "c.toml")
    assert cfg.service("hello").idle_timeout == math.inf


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dns\n", "conf.toml: not valid TOML: "),
        ("[dns]\nzones = []\n", "conf.toml: dns.zones: expected at least one zone name"),
        ("", "conf.toml: dns.zones: missing (expected a list of zone names)"),
        ('[dns]\nzones = ["jit..test"]\n', "conf.toml: dns.zones: expected a DNS name such as"),
        (BASE + 'listen = ["localhost:53"]\n', "conf.toml: dns.listen: expected ADDRESS:PORT"),
        (BASE + 'listen = ["127.0.0.1:99999"]\n', "conf.toml: dns.listen: port must be from 0 to 65535"),
        (BASE + "ttl = -1\n", "conf.toml: dns.ttl: expected seconds as an integer from 0 to"),
        (BASE + 'ttl = "30"\n',
         "conf.toml: dns.ttl: expected seconds as an integer, got a string ('30')"),
        (BASE + "colour = 1\n", "conf.toml: dns.colour: unknown key"),
        (BASE + "[dns.soa]\nserial = 1.5\n", "conf.toml: dns.soa.serial: expected an integer, got a number"),
        (BASE + "[surprise]\n", "conf.toml: surprise: unknown table (the tables are [daemon], "
         "[dns], [proxy], [metrics], [host], [defaults], [[service]] and [[frontend]])"),
        (BASE + "[dns.rrl]\nrate = -1\n", "conf.toml: dns.rrl.rate: expected an integer from 0 to"),
        (BASE + "[dns.rrl]\nipv4_prefix = 33\n",
         "conf.toml: dns.rrl.ipv4_prefix: expected an integer from 0 to 32"),
        (BASE + '[dns.rrl]\nexempt = ["10.0.0.0/33"]\n',
         "conf.toml: dns.rrl.exempt: expected a network such as '192.0.2.0/24'"),
        (BASE + "[dns.rrl]\nburst = 5\n", "conf.toml: dns.rrl.burst: unknown key"),
        (BASE + "max_held_per_connection = 0\n",
         "conf.toml: dns.max_held_per_connection: expected an integer from 1"),
        (BASE + "[daemon]\nstate_dir = 3\n", "conf.toml: daemon.state_dir: expected a path"),
        (BASE + '[daemon]\nstate_dir = ""\n',
         "conf.toml: daemon.state_dir: expected a path, got a string ('')"),
        (BASE + "[proxy]\nmax_buffer = 0\n",
         "conf.toml: proxy.max_buffer: expected bytes as an integer from 1"),
        (BASE + "[defaults]\nbogus = 1\n", "conf.toml: defaults.bogus: unknown key (allowed: backend"),
        (BASE + "[defaults]\nidle_timeout = -5\n",
         "conf.toml: defaults.idle_timeout: expected a positive duration, got an integer (-5)"),
        ("service = 3\n" + BASE, "conf.toml: service: expected [[service]] tables"),
    ],
)
def test_global_errors(text: str, expected: str) -> None:
    if "[defaults]" in text:
        text += SERVICE
    assert error(text).startswith(expected)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("name = \"hello\"", "name = 5"), "service[0].name: missing or not a string"),
        (("name = \"hello\"", "name = \"he llo\""), "service 'he llo': name: expected a DNS label"),
        (("ports = [8080]", "ports = [0]"), "service 'hello': ports: expected a list of port numbers"),
        (("ports = [8080]", "ports = []"), "service 'hello': ports: expected a list of port numbers"),
        (("front = [\"127.77.0.1\"]", "front = [\"nowhere\"]"),
         "service 'hello': front: expected an IPv4 or IPv6 address, got 'nowhere'"),
        (("front = [\"127.77.0.1\"]", "front = []"), "service 'hello': front: expected at least one"),
        (("front = [\"127.77.0.1\"]\n", ""), "service 'hello': front: expected at least one address"),
        (("ports = [8080]", "ports = [8080]\nanswer = \"eventually\""),
         "service 'hello': answer: expected one of handoff, proxy, wait, got 'eventually'"),
        (("ports = [8080]", "ports = [8080]\nstop = \"pause\""),
         "service 'hello': stop: the process backend supports destroy, shutdown, not 'pause'"),
        (("ports = [8080]", "ports = [8080]\nbackend = \"xen\""),
         "service 'hello': backend: unknown backend 'xen'"),
        (("ports = [8080]", "ports = [8080]\nboot_timeout = \"soon\""),
         "service 'hello': boot_timeout: expected a duration such as 30"),
        (("ports = [8080]", "ports = [8080]\nmax_instances = 0"),
         "service 'hello': max_instances: expected an integer from 1 to 10000, got 0"),
        (("ports = [8080]", "ports = [8080]\nnames = [\"other.zone\"]"),
         "service 'hello': names: 'other.zone' is not inside any configured zone"),
        (("ports = [8080]", "ports = [8080]\nnames = [\"jit.test\"]"),
         "service 'hello': names: 'jit.test' is a zone apex"),
        (("ports = [8080]", "ports = [8080]\ncolour = \"red\""), "service 'hello': colour: unknown key"),
        (("ports = [8080]", "ports = [8080]\nretry_backoff = 10\nretry_backoff_max = 1"),
         "service 'hello': retry_backoff_max: must not be smaller than retry_backoff"),
        (("command = \"demo --port {port}\"", "command = \"demo {colour}\""),
         "service 'hello': process.command: unknown placeholder {colour}"),
        (("command = \"demo --port {port}\"", "command = \"demo 'unclosed\""),
         "service 'hello': process.command: cannot split the command line"),
        (("command = \"demo --port {port}\"", "command = \"\""),
         "service 'hello': process.command: expected a command line"),
        (("command = \"demo --port {port}\"", "command = \"demo\"\nsubnet = \"10.0.0.300/24\""),
         "service 'hello': process.subnet: expected a network such as"),
        (("command = \"demo --port {port}\"", "command = \"demo\"\nshell = true"),
         "service 'hello': process.shell: unknown key"),
        (("[service.process]\ncommand = \"demo --port {port}\"", ""),
         "service 'hello': process.command: missing (expected a string)"),
        (("[service.process]", "[service.qemu]"),
         "service 'hello': qemu: settings for the qemu backend, but backend is 'process'"),
    ],
)
def test_service_errors(change: tuple[str, str], expected: str) -> None:
    text = BASE + SERVICE.replace(*change)
    assert error(text) == f"conf.toml: {expected}" or error(text).startswith(f"conf.toml: {expected}")


def test_duplicates_across_services() -> None:
    two = BASE + SERVICE + SERVICE.replace("127.77.0.1", "127.77.0.2")
    assert error(two) == "conf.toml: service 'hello': defined twice, at line 5 and at line 12"
    other = SERVICE.replace('"hello"', '"other"')
    assert error(BASE + SERVICE + other) == (
        "conf.toml: service 'other': front: 127.77.0.1 port 8080 is already the front of "
        "service 'hello'"
    )
    alias = other.replace("127.77.0.1", "127.77.0.2").replace("ports", 'names = ["hello.jit.test"]\nports')
    assert error(BASE + SERVICE + alias) == (
        "conf.toml: service 'other': names: name 'hello.jit.test' is already used by service 'hello'"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert str(info.value).startswith(f"{tmp_path / 'missing.toml'}: cannot read the file: ")


def test_default_config_is_valid() -> None:
    cfg = load_config(None)
    assert {s.name for s in cfg.services} >= {"hello"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitlaunch.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE + SERVICE)
    ok = run_cli("check", "--config-only", str(good))  # no program `demo` here
    assert ok.returncode == 0
    assert ok.stdout.startswith(f"{good}: OK\n")
    assert "hello: hello.jit.test -> 127.77.0.1:8080; process backend, answer handoff" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + SERVICE.replace("8080", "80800"))
    res = run_cli("check", str(bad))
    assert res.returncode == 2
    assert res.stderr == (
        f"jitlaunch: error: {bad}: service 'hello': ports: expected a list of port numbers "
        "(1 to 65535), got a list ([80800])\n"
    )
    assert "Traceback" not in res.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dns\n")
    res = run_cli("run", "--config", str(bad))
    assert res.returncode == 2 and "not valid TOML" in res.stderr and "Traceback" not in res.stderr


def test_bad_command_line_exits_2() -> None:
    res = run_cli("probe", "hello.jit.test")
    assert res.returncode == 2 and "--server" in res.stderr


def test_qemu_settings_errors() -> None:
    qemu = SERVICE.replace("[service.process]", 'backend = "qemu"\n[service.qemu]').replace(
        'command = "demo --port {port}"', 'kernel = "k.elf"')
    assert error(BASE + qemu.replace('kernel = "k.elf"', 'kernel = "k.elf"\npool = 1')) == (
        "conf.toml: service 'hello': max_instances: must be more than the warm pool (1): pooled "
        "instances count against it, and one must be left to run; set it to at least 2"
    )
    assert error(BASE + qemu.replace('kernel = "k.elf"', 'kernel = "k.elf"\nguest_ports = [1, 2]')) \
        == ("conf.toml: service 'hello': qemu.guest_ports: expected 1 port number(s), one for each "
            "of the service's ports [8080]")
    assert error(BASE + qemu.replace('kernel = "k.elf"', 'kernel = "k.elf"\naccel = "xen"')) == (
        "conf.toml: service 'hello': qemu.accel: expected one of auto, kvm, tcg, got 'xen'")
    assert error(BASE + qemu.replace('kernel = "k.elf"', 'kernel = "k.elf"\ncmdline = "{ipaddr}"'))\
        .startswith("conf.toml: service 'hello': qemu.cmdline: bad placeholder 'ipaddr'")
    assert error(BASE + qemu.replace('kernel = "k.elf"', '')) == (
        "conf.toml: service 'hello': qemu.kernel: missing (expected a string)")
    cfg = parse_config(BASE + qemu.replace("ports = [8080]", "ports = [8080]\nstop = \"save\""), "/x/c.toml")
    assert cfg.service("hello").settings.kernel == Path("/x/k.elf")


# ---- the package's shape: one-way imports, pure parsing, value equality ----------------------


def test_importing_config_does_not_import_the_backends() -> None:
    code = (
        "import sys, jitlaunch.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('jitlaunch.backends')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "[]\n"


def env(**kw: object) -> ParseEnv:
    fields: dict[str, object] = {"is_root": False, "home": Path("/home/u"), "cwd": Path("/w")}
    fields.update(kw)
    return ParseEnv(**fields)  # type: ignore[arg-type]


def pure(text: str, environment: ParseEnv, path: str = "c.toml") -> Config:
    return config.parse_config(text, path, backends=SETTINGS, env=environment)


def test_state_dir_comes_from_the_environment_given() -> None:
    assert pure(BASE, env()).daemon.state_dir == Path("/home/u/.local/state/jitlaunch")
    assert pure(BASE, env(xdg_state_home="/x")).daemon.state_dir == Path("/x/jitlaunch")
    assert pure(BASE, env(is_root=True)).daemon.state_dir == Path("/var/lib/jitlaunch")
    systemd = env(is_root=True, state_directory="/var/lib/jl:/var/lib/other")
    assert pure(BASE, systemd).daemon.state_dir == Path("/var/lib/jl")
    # A state_dir in the file wins, relative to the file's directory (under env.cwd).
    text = BASE + '[daemon]\nstate_dir = "st"\n'
    assert pure(text, systemd, "conf/c.toml").daemon.state_dir == Path("/w/conf/st")
    assert pure(text, systemd, "/etc/jl/c.toml").daemon.state_dir == Path("/etc/jl/st")
    assert pure(text, systemd, "<text>").daemon.state_dir == Path("/w/st")


def test_parsing_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/nowhere")
    monkeypatch.setenv("XDG_STATE_HOME", "/nowhere")
    monkeypatch.setenv("HOME", "/nowhere")
    assert pure(BASE, env()).daemon.state_dir == Path("/home/u/.local/state/jitlaunch")


def test_backends_are_passed_in() -> None:
    class Only:
        stop_modes = ("destroy",)

        def parse_settings(self, table: Table, base_dir: Path, ports: tuple[int, ...]) -> object:
            return ("only", table.string("x"), base_dir, ports)

    text = BASE + SERVICE.replace("[service.process]", 'backend = "only"\n[service.only]').replace(
        'command = "demo --port {port}"', 'x = "y"')
    cfg = config.parse_config(text, "/etc/c.toml", backends={"only": Only()}, env=env())
    assert cfg.service("hello").settings == ("only", "y", Path("/etc"), (8080,))
    with pytest.raises(ConfigError) as info:
        config.parse_config(
            text.replace('"only"', '"qemu"'), "c.toml", backends={"only": Only()}, env=env())
    assert str(info.value) == "c.toml: service 'hello': backend: unknown backend 'qemu'"


def test_the_same_text_parses_to_equal_configs() -> None:
    """Reload compares configs with ==: every part, backend settings included, compares by
    value; and a changed setting makes the service unequal."""
    vm = '[[service]]\nname = "{}"\nfront = ["{}"]\nports = [80]\nbackend = "{}"\n'
    qemu = vm.format("vm", "127.77.0.2", "qemu") + 'max_instances = 2\n[service.qemu]\n' \
        'kernel = "k.elf"\npool = 1\n'
    libvirt = vm.format("lv", "127.77.0.3", "libvirt") + '[service.libvirt]\nkernel = "k.elf"\n'
    text = BASE + '[dns.rrl]\nexempt = ["10.0.0.0/8"]\n' + SERVICE + qemu + libvirt
    a, b = parse_config(text, "/x/c.toml"), parse_config(text, "/x/c.toml")
    assert a is not b and a == b and hash(a.dns) == hash(b.dns)
    assert [s.settings for s in a.services] == [s.settings for s in b.services]
    changed = parse_config(text.replace("demo --port", "demo2 --port"), "/x/c.toml")
    assert changed.service("hello") != a.service("hello")
    assert changed.service("vm") == a.service("vm")


# ---- messages that name the mistake -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A typo'd table is named before anything it should have held is missing.
        ('[dnss]\nzones = ["jit.test"]\n', "dnss: unknown table (did you mean [dns]?)"),
        (BASE + "[proxi]\nmax_buffer = 1\n", "proxi: unknown table (did you mean [proxy]?)"),
        (BASE + '[[services]]\nname = "a"\n', "services: unknown table (did you mean [[service]]?)"),
        (BASE + '[libvrt]\nuri = "test:///default"\n',
         "libvrt: unknown table (did you mean [libvirt]?)"),
        ('zones = ["jit.test"]\n' + BASE,
         "zones: unknown key (keys belong in a table: [daemon], [dns], [proxy], [metrics], "
         "[host], [defaults], [[service]], [[frontend]])"),
        # A typo'd key: the missing key points at it; an unknown key names the close one.
        ('[dns]\nzone = ["jit.test"]\n',
         "dns.zones: missing (expected a list of zone names); is 'dns.zone' a typo?"),
        (BASE + "max_tcp_conections = 3\n",
         "dns.max_tcp_conections: unknown key (did you mean 'max_tcp_connections'?)"),
        (BASE + "[host]\nmax_instance = 3\n",
         "host.max_instance: unknown key (did you mean 'max_instances'?)"),
        # A string where a list is expected is a type error that shows the fix.
        ('[dns]\nzones = "jit.test"\n',
         "dns.zones: expected a list of zone names, got a string ('jit.test'); "
         'write zones = ["jit.test"]'),
        (BASE + 'listen = "127.0.0.1:53"\n',
         "dns.listen: expected a list of ADDRESS:PORT strings, got a string ('127.0.0.1:53'); "
         'write listen = ["127.0.0.1:53"]'),
        (BASE + 'nameservers = "ns1.jit.test"\n',
         "dns.nameservers: expected a list of DNS names, got a string ('ns1.jit.test')"),
        (BASE + 'nameserver_addresses = "192.0.2.1"\n',
         "dns.nameserver_addresses: expected a list of addresses, got a string ('192.0.2.1')"),
        (BASE + '[dns.rrl]\nexempt = "10.0.0.0/8"\n',
         "dns.rrl.exempt: expected a list of networks, got a string ('10.0.0.0/8')"),
        (BASE + '[metrics]\nlisten = "127.0.0.1:9464"\n',
         "metrics.listen: expected a list of ADDRESS:PORT strings, got a string"),
        (BASE + "zones = { a = 1 }\n", "not valid TOML"),  # TOML itself refuses the repeat
        ('[dns]\nzones = { a = "jit.test" }\n',
         "dns.zones: expected a list of zone names, got a table ({'a': 'jit.test'})"),
        # The same thing listed twice is named.
        ('[dns]\nzones = ["jit.test", "JIT.test."]\n', "dns.zones: 'jit.test' is listed twice"),
        (BASE + 'nameservers = ["ns.jit.test", "ns.jit.test"]\n',
         "dns.nameservers: 'ns.jit.test' is listed twice"),
        (BASE + 'nameserver_addresses = ["::1", "0::1"]\n',
         "dns.nameserver_addresses: '::1' is listed twice"),
        (BASE + 'listen = ["127.0.0.1:53", "127.0.0.1:53"]\n',
         "dns.listen: '127.0.0.1:53' is listed twice"),
        # [defaults] values are checked even when no service reads them.
        (BASE + '[defaults]\nidle_timeout = { s = 1 }\n',
         "defaults.idle_timeout: expected a duration such as 30"),
        (BASE + '[defaults]\nbackend = "xen"\n', "defaults.backend: unknown backend 'xen'"),
        (BASE + '[defaults]\nanswer = ["proxy"]\n',
         "defaults.answer: expected a string, got a list (['proxy'])"),
    ],
)
def test_messages_name_the_mistake(text: str, expected: str) -> None:
    assert error(text).startswith(f"conf.toml: {expected}")


def test_listen_may_repeat_port_zero() -> None:
    dns = parse_config(BASE + 'listen = ["127.0.0.1:0", "127.0.0.1:0"]\n', "c.toml").dns
    assert len(dns.listen) == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("front = [\"127.77.0.1\"]", "front = \"127.77.0.1\""),
         "front: expected a list of addresses, got a string ('127.77.0.1'); "
         'write front = ["127.77.0.1"]'),
        (("ports = [8080]", "ports = 8080"),
         "ports: expected a list of port numbers, got an integer (8080); write ports = [8080]"),
        (("ports = [8080]", "ports = [8080]\nnames = \"www.jit.test\""),
         "names: expected a list of DNS names, got a string ('www.jit.test'); "
         'write names = ["www.jit.test"]'),
        (("ports = [8080]", "ports = [8080]\nidle_timout = 3"),
         "idle_timout: unknown key (did you mean 'idle_timeout'?)"),
        (("front = [\"127.77.0.1\"]", "front = [\"127.77.0.1\", \"127.77.0.1\"]"),
         "front: '127.77.0.1' is listed twice"),
        (("ports = [8080]", "ports = [8080, 8080]"), "ports: '8080' is listed twice"),
        (("ports = [8080]", "ports = [8080]\nnames = [\"www.jit.test\", \"WWW.jit.test\"]"),
         "names: 'WWW.jit.test' is listed twice"),
        (("ports = [8080]", "ports = [8080]\nnames = [\"hello.jit.test\"]"),
         "names: 'hello.jit.test' is already the service's own name"),
        (("command = \"demo --port {port}\"", "command = \"demo\"\ncomand = \"x\""),
         "process.comand: unknown key (did you mean 'command'?)"),
    ],
)
def test_service_messages_name_the_mistake(change: tuple[str, str], expected: str) -> None:
    assert error(BASE + SERVICE.replace(*change)) == f"conf.toml: service 'hello': {expected}"


def test_a_service_defined_twice_is_named_with_both_places() -> None:
    other = SERVICE.replace('"hello"', '"other"').replace("127.77.0.1", "127.77.0.3")
    again = SERVICE.replace("127.77.0.1", "127.77.0.2").replace('"hello"', '"HELLO"')
    text = BASE + SERVICE + other + again
    assert error(text) == "conf.toml: service 'hello': defined twice, at line 5 and at line 19"
    # Without a [[service]] header per service (an inline array), by their order.
    inline = (
        'service = [\n'
        '  { name = "a", front = ["127.77.0.1"], ports = [1], process = { command = "x" } },\n'
        '  { name = "a", front = ["127.77.0.2"], ports = [1], process = { command = "x" } },\n'
        ']\n'
    ) + BASE
    assert error(inline) == (
        "conf.toml: service 'a': defined twice, at [[service]] number 1 and at [[service]] number 2"
    )


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
def test_guest_ports_is_a_list_of_numbers(backend: str) -> None:
    vm = SERVICE.replace("[service.process]", f'backend = "{backend}"\n[service.{backend}]').replace(
        'command = "demo --port {port}"', 'kernel = "k.elf"')
    where = f"conf.toml: service 'hello': {backend}.guest_ports"
    assert error(BASE + vm + "guest_ports = 80\n") == (
        f"{where}: expected a list of port numbers, got an integer (80); write guest_ports = [80]")
    assert error(BASE + vm + "guest_ports = [true]\n") == (
        f"{where}: expected a list of port numbers (1 to 65535), got a list ([True])")
    cfg = parse_config(BASE + vm + "guest_ports = [80]\n", "/x/c.toml")
    assert cfg.service("hello").settings.guest_ports == (80,)


def test_missing_ports_says_missing() -> None:
    assert error(BASE + SERVICE.replace("ports = [8080]\n", "")) == (
        "conf.toml: service 'hello': ports: missing (expected a list of port numbers)")


# ---- any TOML: a Config or a ConfigError, never anything else --------------------------------

_VALID: dict[str, Any] = {
    "daemon": {"state_dir": "st", "drain_timeout": "2s", "log_level": "info"},
    "dns": {
        "listen": ["127.0.0.1:5353"], "zones": ["jit.test"], "nameservers": ["ns.jit.test"],
        "soa": {"serial": 3}, "rrl": {"rate": 10, "exempt": ["10.0.0.0/8"]},
    },
    "proxy": {"max_buffer": 4096, "idle_timeout": "10m"},
    "metrics": {"listen": ["127.0.0.1:0"]},
    "host": {"max_instances": 5, "wake": {"rate": 2.5}},
    "defaults": {"idle_timeout": "5m", "answer": "proxy"},
    "service": [
        {"name": "a", "front": ["127.77.0.1"], "ports": [8080], "names": ["www.jit.test"],
         "process": {"command": "demo --port {port}"}},
        {"name": "b", "front": ["127.77.0.2"], "ports": [80], "backend": "qemu",
         "max_instances": 2, "qemu": {"kernel": "k.elf", "pool": 1, "guest_ports": [80]}},
    ],
}

_scalars = (
    st.text(max_size=12) | st.sampled_from(["", "never", "30s", "jit.test", "127.0.0.1", "qemu"])
    | st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, 65535, 65536, -1])
    | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path] if path else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _leaves(v, (*path, i))
    return out


def _toml_doc(doc: dict[str, Any]) -> str:
    return "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items())


def test_the_base_of_the_random_configs_is_valid() -> None:
    cfg = parse_config(_toml_doc(_VALID), "/x/c.toml")
    assert [s.name for s in cfg.services] == ["a", "b"] and cfg.daemon.state_dir == Path("/x/st")


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_toml_gives_a_config_or_a_config_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(_VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_leaves(doc)))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.append(data.draw(_values))
    try:
        parse_config(_toml_doc(doc), "/x/c.toml")
    except ConfigError:
        pass
