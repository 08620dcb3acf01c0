"""The reload plan (lifecycle/reload.py): pure comparisons of two parsed configs."""

from __future__ import annotations

from jitlaunch.config import Config
from jitlaunch.lifecycle.reload import RESTART_KEYS, plan_reload

from .conftest import parse_config

BASE = """
[daemon]
state_dir = "/tmp/jl-plan"
[dns]
listen = ["127.0.0.1:5353"]
zones = ["jit.test"]
"""


def service(name: str, port: int = 8080, extra: str = "", command: str = "demo {port}",
            backend: str = "process", settings: str = "") -> str:
    table = f'command = "{command}"' if backend == "process" else settings
    return f"""
[[service]]
name = "{name}"
front = ["127.77.0.1"]
ports = [{port}]
backend = "{backend}"
{extra}
[service.{backend}]
{table}
"""


def cfg(*parts: str, base: str = BASE) -> Config:
    return parse_config(base + "".join(parts), "/tmp/jl-plan/c.toml")


def test_identical_configs_change_nothing() -> None:
    old = cfg(service("a"), service("b", 8081))
    plan = plan_reload(old, cfg(service("a"), service("b", 8081)), {"process"})
    assert plan.unchanged == ("a", "b")
    assert (plan.added, plan.removed, plan.changed, plan.at_once, plan.restart) == ((),) * 5
    assert plan.empty and not plan.rejected and plan.summary() == "no changes"


def test_added_removed_changed_unchanged() -> None:
    old = cfg(service("a"), service("b", 8081), service("c", 8082))
    new = cfg(service("a"), service("b", 8081, command="other {port}", extra="ttl = 7"),
              service("d", 8083))
    plan = plan_reload(old, new, {"process"})
    assert plan.added == ("d",)
    assert plan.removed == ("c",)
    assert plan.changed == (("b", ("process.command", "ttl")),)
    assert plan.unchanged == ("a",)
    assert plan.replaced == ()
    assert plan.fronts_added == (("127.77.0.1", 8083),)
    assert plan.fronts_removed == (("127.77.0.1", 8082),)
    assert not plan.rejected
    assert plan.summary() == "added d; removed c; changed b: process.command, ttl"


def test_a_port_change_replaces_the_running_instance() -> None:
    plan = plan_reload(cfg(service("a")), cfg(service("a", 9090)), {"process"})
    assert plan.changed == (("a", ("ports",)),) and plan.replaced == ("a",)
    assert plan.fronts_added == (("127.77.0.1", 9090),)
    assert plan.fronts_removed == (("127.77.0.1", 8080),)
    assert "(instance replaced)" in plan.summary()


def test_dns_and_proxy_keys_apply_at_once() -> None:
    base2 = BASE.replace('zones = ["jit.test"]', 'zones = ["jit.test", "other.test"]\nttl = 5\n'
                         '[dns.soa]\nserial = 7\n[dns.rrl]\nrate = 10\n[proxy]\nmax_buffer = 10\n'
                         '[host]\nmax_queued = 3\n')
    plan = plan_reload(cfg(service("a")), cfg(service("a"), base=base2), {"process"})
    assert set(plan.at_once) == {"dns.zones", "dns.ttl", "dns.rrl.rate", "proxy.max_buffer",
                                 "host.max_queued"}
    # A new zone gives the service a new name, and dns.ttl is its ttl's default: a changed
    # service, no restart.
    assert plan.changed == (("a", ("names", "ttl")),)
    assert not plan.rejected


def test_a_front_passed_by_systemd_cannot_be_dropped() -> None:
    old = cfg(service("a"), service("b", 8081))
    passed = {("127.77.0.1", 8080)}
    plan = plan_reload(old, cfg(service("b", 8081)), {"process"}, passed)
    assert plan.restart == (
        "service 'a': front 127.77.0.1 port 8080 was passed by systemd (socket activation): "
        "dropping it needs a restart, with the socket unit changed too",)
    # Given to another service, it stays open: fine.
    assert not plan_reload(old, cfg(service("c"), service("b", 8081)), {"process"},
                           passed).rejected
    # A front the daemon bound itself may go.
    assert not plan_reload(old, cfg(service("a")), {"process"}, passed).rejected


def test_restart_only_keys_reject_the_reload_naming_each() -> None:
    base2 = BASE.replace("5353", "5354").replace("/tmp/jl-plan", "/tmp/jl-other") + \
        '[metrics]\nlisten = ["127.0.0.1:9999"]\n'
    plan = plan_reload(cfg(service("a")), cfg(service("a"), base=base2), {"process"})
    assert plan.rejected
    assert plan.restart == (
        "daemon.state_dir (/tmp/jl-plan -> /tmp/jl-other)",
        "dns.listen (127.0.0.1:5353 -> 127.0.0.1:5354)",
        "metrics.listen (127.0.0.1:9464 -> 127.0.0.1:9999)",
    )
    assert plan.error().startswith("these keys change only with a restart: daemon.state_dir")
    assert set(RESTART_KEYS) >= {"dns.listen", "daemon.state_dir", "metrics.listen"}


QEMU = 'kernel = "/bin/true"\n'


def test_backend_set_up_at_start_needs_a_restart() -> None:
    # The first qemu service: the qemu backend is not running.
    plan = plan_reload(cfg(service("a")), cfg(service("a"), service(
        "q", 8081, backend="qemu", settings=QEMU)), {"process"})
    assert plan.added == ("q",)
    assert plan.restart == ("service 'q': backend = 'qemu': no running service uses the qemu "
                            "backend yet, and it is set up at start",)
    # With the backend running, adding one without a pool is fine ...
    old = cfg(service("q", 8081, backend="qemu", settings=QEMU))
    plan = plan_reload(old, cfg(service("q", 8081, backend="qemu", settings=QEMU),
                                service("r", 8082, backend="qemu", settings=QEMU)), {"qemu"})
    assert plan.added == ("r",) and not plan.rejected
    # ... but not with a warm pool, nor a first bridge service.
    pooled = QEMU + "pool = 1\n"
    plan = plan_reload(old, cfg(service("q", 8081, backend="qemu", settings=pooled,
                                        extra="max_instances = 2")), {"qemu"})
    assert plan.rejected and "qemu.pool = 1" in plan.restart[0]
    bridged = QEMU + 'network = "bridge"\n'
    plan = plan_reload(old, cfg(service("q", 8081, backend="qemu", settings=bridged)), {"qemu"})
    assert plan.rejected and "qemu.network = 'bridge'" in plan.restart[0]
    # Removing a pooled service also needs a restart.
    plan = plan_reload(cfg(service("q", 8081, backend="qemu", settings=pooled,
                                   extra="max_instances = 2")), cfg(), {"qemu"})
    assert plan.removed == ("q",) and plan.rejected
    # A first process service is always fine: that backend is created on the fly.
    plan = plan_reload(cfg(), cfg(service("a")), ())
    assert plan.added == ("a",) and not plan.rejected
