"""Metrics: the endpoint over real sockets under bad input, and every counter moving by
exactly what a real daemon did (real processes, real DNS, the real proxy); promtool checks
the exposition."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from jitlaunch.config import Endpoint
from jitlaunch.dns import stats

from .conftest import DEMO, PYTHON, config_text, http_get, load, qemus, query_udp, running, wait_until
from .helpers import Sample, fetch, get, scrape, scrape_text


def service(name: str, front: str, command: str = DEMO, extra: str = "", idle: str = "60") -> str:
    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [8080]
answer = "proxy"
idle_timeout = {idle}
retry_backoff = 60
{extra}
[service.process]
command = "{command}"
grace = "2s"
"""


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """Every sample that changed, by how much (process_* and the endpoint's own,
    jitlaunch_metrics_*, excepted)."""
    changed = {}
    for key in before.keys() | after.keys():
        if key[0].startswith(("process_", "jitlaunch_metrics_")):
            continue
        d = after.get(key, 0.0) - before.get(key, 0.0)
        if d:
            changed[key] = d
    return changed


def counters(changed: dict[Sample, float]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The changes of counters and histogram counts, in a readable form."""
    return {
        (name, tuple(sorted(labels))): v for (name, labels), v in changed.items()
        if name.endswith(("_total", "_count"))
    }


def L(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# ---- pure parts ------------------------------------------------------------------------------


def test_dns_stats_keys_are_bounded() -> None:
    from dnslib import DNSRecord

    assert stats.key_of(DNSRecord.question("a.jit.test", "AAAA").pack(), b"\0\0\x84\x03", True) == (
        "udp", "AAAA", "NXDOMAIN")
    assert stats.qtype_of(DNSRecord.question("a.b", "NAPTR").pack()) == "other"
    assert stats.qtype_of(b"\0" * 12 + b"\xc0\x0c\0\1") == "other"  # a pointer as the name
    assert stats.qtype_of(b"\0" * 12 + b"\x05ab") == "other"  # cut short
    assert stats.rcode_of(None) == "none"
    assert stats.rcode_of(b"\0\0\x80\x0b") == "other"


def test_metrics_config(tmp_path: Path) -> None:
    cfg = load(config_text(tmp_path, "", metrics=""))
    assert cfg.metrics.listen == (Endpoint("127.0.0.1", 9464),)
    assert cfg.metrics.timeout == 10 and cfg.metrics.max_connections == 16
    cfg = load(config_text(tmp_path, "", metrics='listen = []\ntimeout = "2s"\nmax_connections = 3'))
    assert cfg.metrics.listen == () and cfg.metrics.timeout == 2 and cfg.metrics.max_connections == 3
    with pytest.raises(Exception, match=r"metrics\.listen: expected ADDRESS:PORT"):
        load(config_text(tmp_path, "", metrics='listen = ["localhost"]'))
    with pytest.raises(Exception, match=r"metrics\.colour: unknown key"):
        load(config_text(tmp_path, "", metrics='colour = "red"'))


# ---- the endpoint ----------------------------------------------------------------------------


async def test_scrape_names_and_build_info(tmp_path: Path, block: str) -> None:
    async with running(load(config_text(tmp_path, service("hello", f"{block}.1")))) as d:
        text = await scrape_text(d)
        samples = await scrape(d)
    assert get(samples, "jitlaunch_build_info", version="0.1.0") == 1
    assert get(samples, "process_open_fds") > 0  # the process collector, on our registry
    assert get(samples, "jitlaunch_instances", service="hello", state="ready") == 0
    assert get(samples, "jitlaunch_wake_seconds_count", service="hello", path="cold") == 0
    assert 'le="0.001"' in text and 'le="10.0"' in text
    for line in text.splitlines():
        if line.startswith("# TYPE jitlaunch_"):
            _, _, name, kind = line.split()
            assert kind != "counter" or name.endswith("_total"), line
    assert "127." not in text and "source" not in text  # no address as a label


async def test_two_daemons_in_one_process_have_their_own_metrics(tmp_path: Path) -> None:
    from .conftest import fresh_block

    a = load(config_text(tmp_path / "a", service("one", f"{fresh_block()}.1")))
    b = load(config_text(tmp_path / "b", service("two", f"{fresh_block()}.1")))
    async with running(a) as da, running(b) as db:
        sa, sb = await scrape(da), await scrape(db)
    assert ("jitlaunch_services", frozenset()) in sa
    assert any(dict(k[1]).get("service") == "one" for k in sa)
    assert not any(dict(k[1]).get("service") == "one" for k in sb)


async def test_no_listen_no_endpoint(tmp_path: Path, block: str) -> None:
    async with running(load(config_text(tmp_path, service("h", f"{block}.1"), metrics="listen = []"))) as d:
        assert d.metrics_endpoints == []
        assert (await query_udp(("127.0.0.1", d.dns_endpoints[0].port), "h.jit.test")).header.rcode == 0
        assert all(n == [0] for n in d.dns.authority.queries.values())  # nobody reads them


async def test_an_address_in_use_is_logged_and_the_daemon_serves(
    tmp_path: Path, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(load(config_text(tmp_path / "a", service("h", f"{block}.1")))) as first:
        taken = first.metrics_endpoints[0]
        text = config_text(tmp_path / "b", service("h", f"{block}.2"), metrics=f'listen = ["{taken}"]')
        async with running(load(text)) as d:
            assert d.metrics_endpoints == []
            ep = d.dns_endpoints[0]
            assert (await query_udp((ep.host, ep.port), "h.jit.test")).header.rcode == 0
    assert f"cannot listen for metrics on {taken}" in caplog.text


async def test_bad_requests_get_errors_and_the_daemon_is_unaffected(tmp_path: Path, block: str) -> None:
    async with running(load(config_text(tmp_path, service("hello", f"{block}.1")))) as d:
        ep = d.metrics_endpoints[0]
        cases = {
            b"GET / HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
            b"GET /metricsx HTTP/1.1\r\n\r\n": b"HTTP/1.1 404 ",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n": b"HTTP/1.1 405 ",
            b"\x00\xff\x16\x03\x01garbage\r\n\r\n": b"HTTP/1.1 400 ",
            b"GET /metrics\r\n\r\n": b"HTTP/1.1 400 ",  # HTTP/0.9
            b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n": b"HTTP/1.1 400 ",
        }
        for request, status in cases.items():
            assert (await fetch(ep, request)).startswith(status), request[:40]
        head = await fetch(ep, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        # A client that sends garbage and goes away at once.
        for _ in range(20):
            stream = await trio.open_tcp_stream(ep.host, ep.port)
            await stream.send_all(b"\x01\x02\x03")
            await trio.aclose_forcefully(stream)
        samples = await scrape(d)
        assert get(samples, "jitlaunch_metrics_requests_total", outcome="404") == 2
        assert get(samples, "jitlaunch_metrics_requests_total", outcome="405") == 1
        assert get(samples, "jitlaunch_metrics_requests_total", outcome="error") == 0
        dns = d.dns_endpoints[0]
        assert (await query_udp((dns.host, dns.port), "hello.jit.test")).header.rcode == 0
        assert not d.stopping


async def test_a_slow_client_is_timed_out(tmp_path: Path, block: str) -> None:
    text = config_text(tmp_path, service("hello", f"{block}.1"), metrics=(
        'listen = ["127.0.0.1:0"]\ntimeout = "300ms"'))
    async with running(load(text)) as d:
        ep = d.metrics_endpoints[0]
        stream = await trio.open_tcp_stream(ep.host, ep.port)
        async with stream:
            start = trio.current_time()
            await stream.send_all(b"GET /met")
            with trio.fail_after(5):
                while await stream.receive_some(1024):
                    pass
            assert 0.25 < trio.current_time() - start < 3
        await wait_until(lambda: d.metrics.http["timeout"] == 1)
        assert (await scrape(d))


async def test_many_connections_are_capped_and_the_daemon_is_unaffected(
    tmp_path: Path, block: str
) -> None:
    text = config_text(tmp_path, service("hello", f"{block}.1"), metrics=(
        'listen = ["127.0.0.1:0"]\ntimeout = "2s"\nmax_connections = 4'))
    async with running(load(text)) as d:
        ep = d.metrics_endpoints[0]
        streams = [await trio.open_tcp_stream(ep.host, ep.port) for _ in range(12)]
        try:
            # Silent connections: each new one closes the oldest that has sent nothing.
            await wait_until(lambda: d.metrics.open == 4 and d.metrics.http["evicted"] == 8)
            dns = d.dns_endpoints[0]
            assert (await query_udp((dns.host, dns.port), "hello.jit.test")).header.rcode == 0
        finally:
            for s in streams:
                await trio.aclose_forcefully(s)
        await wait_until(lambda: d.metrics.open == 0)
        samples = await scrape(d)
        assert get(samples, "jitlaunch_metrics_requests_total", outcome="evicted") == 8
        assert get(samples, "jitlaunch_metrics_requests_total", outcome="refused") == 0


# ---- the counters move by exactly what happened --------------------------------------------------


async def test_cold_start_and_idle_stop_counted_exactly(tmp_path: Path, block: str) -> None:
    front = f"{block}.1"
    text = config_text(tmp_path, service("hello", front, idle='"300ms"'))
    async with running(load(text)) as d:
        rt = d.supervisor.services["hello"]
        s0 = await scrape(d)
        # A connection to the front starts the boot and is held until the instance is ready.
        reply = await http_get(front, 8080)
        assert b"200" in reply.split(b"\r\n", 1)[0]
        ep = d.dns_endpoints[0]
        assert (await query_udp((ep.host, ep.port), "hello.jit.test")).header.rcode == 0
        assert (await query_udp((ep.host, ep.port), "nope.jit.test", "MX")).header.rcode == 3
        await wait_until(lambda: rt.connections == 0)
        s1 = await scrape(d)
        assert counters(delta(s0, s1)) == {
            ("jitlaunch_boots_started_total", L(service="hello", backend="process")): 1,
            ("jitlaunch_boots_total", L(service="hello", backend="process", result="ready")): 1,
            ("jitlaunch_wake_seconds_count", L(service="hello", path="cold")): 1,
            ("jitlaunch_admission_total", L(outcome="admitted")): 1,
            ("jitlaunch_proxy_hold_seconds_count", L(service="hello")): 1,
            ("jitlaunch_proxy_connections_accepted_total", L(service="hello")): 1,
            ("jitlaunch_proxy_relays_ended_total", L(service="hello", outcome="done")): 1,
            ("jitlaunch_proxy_bytes_total", L(service="hello", direction="to_instance")):
                get(s1, "jitlaunch_proxy_bytes_total", service="hello", direction="to_instance"),
            ("jitlaunch_proxy_bytes_total", L(service="hello", direction="to_client")): len(reply),
            ("jitlaunch_dns_queries_total", L(transport="udp", qtype="A", rcode="NOERROR")): 1,
            ("jitlaunch_dns_queries_total", L(transport="udp", qtype="MX", rcode="NXDOMAIN")): 1,
        }
        assert get(s1, "jitlaunch_proxy_bytes_total", service="hello", direction="to_instance") > 30
        assert get(s1, "jitlaunch_instances", service="hello", state="ready") == 1
        wake = get(s1, "jitlaunch_wake_seconds_sum", service="hello", path="cold")
        inst_time = rt.instance.ready_at - rt.instance.started_at if rt.instance else -1
        assert wake == pytest.approx(inst_time)
        await wait_until(lambda: rt.idle_stops == 1 and rt.instance is None)
        s2 = await scrape(d)
        assert counters(delta(s1, s2)) == {
            ("jitlaunch_stops_total", L(service="hello", reason="idle", mode="destroy")): 1,
        }
        assert get(s2, "jitlaunch_instances", service="hello", state="ready") == 0
        # Stopped on request (the control socket's stop) is not idle.
        assert b"200" in (await http_get(front, 8080))[:20]
        inst = d.supervisor.stop("hello")
        assert inst is not None
        await inst.run.released.wait()
        s3 = await scrape(d)
        assert get(s3, "jitlaunch_stops_total", service="hello", reason="requested", mode="destroy") == 1
        assert get(s3, "jitlaunch_stops_total", service="hello", reason="idle", mode="destroy") == 1


async def test_failed_boot_timeout_and_proxy_drops_counted_exactly(tmp_path: Path, block: str) -> None:
    exits = f"{PYTHON} -c 'raise SystemExit(3)'"
    sleeps = f"{PYTHON} -c 'import time; time.sleep(30)'"
    text = config_text(tmp_path, service("bad", f"{block}.1", exits) + service(
        "slow", f"{block}.2", sleeps, extra='boot_timeout = "300ms"'))
    async with running(load(text)) as d:
        bad = d.supervisor.services["bad"]
        slow = d.supervisor.services["slow"]
        s0 = await scrape(d)
        # Held for a boot that fails: closed unserved (boot_failed); the next one: backoff.
        assert await http_get(f"{block}.1", 8080) == b""
        assert bad.boot_failures == 1
        assert await http_get(f"{block}.1", 8080) == b""
        ep = d.dns_endpoints[0]
        await query_udp((ep.host, ep.port), "slow.jit.test", "AAAA")
        await wait_until(lambda: slow.boot_failures == 1 and slow.instance is None, 10)
        s1 = await scrape(d)
        assert counters(delta(s0, s1)) == {
            ("jitlaunch_boots_started_total", L(service="bad", backend="process")): 1,
            ("jitlaunch_boots_total", L(service="bad", backend="process", result="failed")): 1,
            ("jitlaunch_boots_started_total", L(service="slow", backend="process")): 1,
            ("jitlaunch_boots_total", L(service="slow", backend="process", result="timeout")): 1,
            ("jitlaunch_admission_total", L(outcome="admitted")): 2,
            ("jitlaunch_proxy_connections_accepted_total", L(service="bad")): 2,
            ("jitlaunch_proxy_connections_closed_total", L(service="bad", reason="boot_failed")): 1,
            ("jitlaunch_proxy_connections_closed_total", L(service="bad", reason="backoff")): 1,
            ("jitlaunch_dns_queries_total", L(transport="udp", qtype="AAAA", rcode="NOERROR")): 1,
        }
        assert get(s1, "jitlaunch_backoff_failures", service="bad") == 1
        assert get(s1, "jitlaunch_instances", service="bad", state="failed") == 0  # released


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) missing")
async def test_promtool_accepts_a_scrape_after_every_path(tmp_path: Path, block: str) -> None:
    exits = f"{PYTHON} -c 'raise SystemExit(3)'"
    text = config_text(tmp_path, service("hello", f"{block}.1") + service("bad", f"{block}.2", exits),
                       dns="[dns.rrl]\nrate = 1\nslip = 2\nwindow = 1")
    async with running(load(text)) as d:
        assert b"200" in (await http_get(f"{block}.1", 8080))[:20]
        assert await http_get(f"{block}.2", 8080) == b""
        assert await http_get(f"{block}.2", 8080) == b""
        ep = d.dns_endpoints[0]
        for _ in range(4):
            with trio.move_on_after(0.5):
                await query_udp((ep.host, ep.port), "hello.jit.test")
        body = await scrape_text(d)
    assert "jitlaunch_dns_responses_limited_total{action=\"dropped\"}" in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- alert rules -------------------------------------------------------------------------------

RULES = Path(__file__).resolve().parent.parent / "conf" / "prometheus" / "jitlaunch-rules.yml"

# promtool's unit tests: series over time in, the alerts that must be firing out.
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="jitlaunch", instance="h:9464"}}'
        values: '1 1 0 0 0'
      - series: 'jitlaunch_boots_total{{job="jitlaunch", instance="h:9464", service="hello", backend="qemu", result="failed"}}'
        values: '0 1 2 3 3'
      - series: 'jitlaunch_boots_total{{job="jitlaunch", instance="h:9464", service="ok", backend="qemu", result="failed"}}'
        values: '0 0 1 1 1'
      - series: 'jitlaunch_proxy_connections_active{{job="jitlaunch", instance="h:9464", service="hello"}}'
        values: '90x10'
      - series: 'jitlaunch_proxy_max_connections{{job="jitlaunch", instance="h:9464"}}'
        values: '100x10'
      - series: 'jitlaunch_config_last_reload_successful{{job="jitlaunch", instance="h:9464"}}'
        values: '1 0x15'
    alert_rule_test:
      - eval_time: 1m
        alertname: JitlaunchDown
        exp_alerts: []
      - eval_time: 3m
        alertname: JitlaunchDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: jitlaunch, instance: "h:9464"}}
            exp_annotations:
              summary: "jitlaunch on h:9464 cannot be scraped"
              description: "The daemon (or its metrics endpoint) has been unreachable for 1 minute: no service on this host can be woken."
      - eval_time: 2m
        alertname: JitlaunchBootFailures
        exp_alerts: []
      - eval_time: 4m
        alertname: JitlaunchBootFailures
        exp_alerts:
          - exp_labels: {{severity: warning, job: jitlaunch, instance: "h:9464", service: hello}}
            exp_annotations:
              summary: "hello failed to boot 3 times in 10 minutes"
              description: "Boots of hello on h:9464 fail or time out; lookups get SERVFAIL (wait mode) or held connections are closed, and the service backs off. See the daemon's log and <state_dir>/logs/hello.log."
      - eval_time: 4m
        alertname: JitlaunchProxyNearConnectionLimit
        exp_alerts: []
      - eval_time: 6m
        alertname: JitlaunchProxyNearConnectionLimit
        exp_alerts:
          - exp_labels: {{severity: warning, job: jitlaunch, instance: "h:9464"}}
            exp_annotations:
              summary: "the proxy on h:9464 holds 90% of its max_connections"
              description: "Past proxy.max_connections new connections are closed at once (jitlaunch_proxy_connections_closed_total{{reason=\\"max_connections\\"}})."
      - eval_time: 10m
        alertname: JitlaunchConfigReloadRejected
        exp_alerts: []
      - eval_time: 11m
        alertname: JitlaunchConfigReloadRejected
        exp_alerts:
          - exp_labels: {{severity: warning, job: jitlaunch, instance: "h:9464"}}
            exp_annotations:
              summary: "jitlaunch on h:9464 rejected its last config reload"
              description: "The daemon still runs the config it had before: its config file does not parse, needs a restart for a key, or names something missing. `jitlaunch reload` prints why."
"""  # noqa: E501 - promtool compares whole annotations


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) missing")
def test_alert_rules_check_and_fire(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"SUCCESS: 9 rules found" in check.stdout
    tests = tmp_path / "rules-test.yml"
    tests.write_text(RULE_TESTS.format(rules=RULES))
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a real Prometheus -------------------------------------------------------------------------

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: jitlaunch
    static_configs:
      - targets: ["{target}"]
"""


async def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    """One instant query through Prometheus's HTTP API; the result vector."""
    import json
    from urllib.parse import quote

    reply = await fetch(
        Endpoint("127.0.0.1", port),
        f"GET /api/v1/query?query={quote(query)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    if b"Transfer-Encoding: chunked" in head:
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            chunks.append(rest[:n])
            rest = rest[n + 2 :]
        body = b"".join(chunks)
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def value(result: list[dict[str, object]]) -> float | None:
    if len(result) != 1:
        return None
    sample = result[0]["value"]
    assert isinstance(sample, list)
    return float(sample[1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus missing")
async def test_a_real_prometheus_reads_the_wakeup_and_boot_counters(tmp_path: Path, block: str) -> None:
    from jitlaunch.backends.base import free_port

    front = f"{block}.1"
    async with running(load(config_text(tmp_path / "state", service("hello", front)))) as d:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.format(rules=RULES, target=d.metrics_endpoints[0]))
        with open(tmp_path / "prometheus.log", "wb") as log:
            proc = await trio.lowlevel.open_process(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        try:
            # The cold boot and a few lookups happen while Prometheus finds its target.
            assert b"200" in (await http_get(front, 8080))[:20]
            ep = d.dns_endpoints[0]
            for _ in range(3):
                assert (await query_udp((ep.host, ep.port), "hello.jit.test")).header.rcode == 0
            # Prometheus listens before it is ready and answers 503 until then: wait for
            # /-/ready, so that every query below must succeed.
            with trio.fail_after(40):
                while True:
                    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                    try:
                        ready = await fetch(Endpoint("127.0.0.1", port),
                                            b"GET /-/ready HTTP/1.1\r\nHost: x\r\n"
                                            b"Connection: close\r\n\r\n")
                        if ready.startswith(b"HTTP/1.1 200"):
                            break
                    except OSError:  # not listening yet
                        pass
                    await trio.sleep(0.05)
            queries = {
                'jitlaunch_wake_seconds_count{job="jitlaunch", service="hello", path="cold"}': 1.0,
                'jitlaunch_boots_total{job="jitlaunch", service="hello", result="ready"}': 1.0,
                'jitlaunch_dns_queries_total{job="jitlaunch", transport="udp", qtype="A"}': 3.0,
                'up{job="jitlaunch"}': 1.0,
            }
            got: dict[str, float | None] = {}
            with trio.move_on_after(40):
                while got != queries:
                    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                    await trio.sleep(0.25)
                    got = {q: value(await prometheus_query(port, q)) for q in queries}
            assert got == queries, (tmp_path / "prometheus.log").read_text()[-2000:]
            # The rules loaded and evaluate: none of them fires on a healthy daemon.
            assert await prometheus_query(port, 'ALERTS{alertstate="firing"}') == []
        finally:
            proc.kill()
            with trio.CancelScope(shield=True), trio.fail_after(10):
                await proc.wait()


# ---- the DNS query log -------------------------------------------------------------------------


def test_query_log_is_rate_limited() -> None:
    import logging

    from jitlaunch.dns.querylog import QueryLog, qname_of, qtype_text

    now = [100.0]
    logger = logging.getLogger("test.querylog")
    logger.setLevel(logging.DEBUG)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addHandler(Keep())
    qlog = QueryLog(2, logger, clock=lambda: now[0])
    qlog.refresh()
    assert qlog.enabled
    from dnslib import DNSRecord

    wire = bytes(DNSRecord.question("a.jit.test", "TXT").pack())
    written = [qlog.query(wire, b"\0\0\x84\x00", "udp", "192.0.2.1", 0.0001) for _ in range(5)]
    assert written == [True, True, False, False, False]
    now[0] += 1.0
    assert qlog.query(wire, None, "tcp", "2001:db8::1", 0.002)
    assert lines == [
        "query udp 192.0.2.1 a.jit.test. TXT NOERROR 0.100 ms",
        "query udp 192.0.2.1 a.jit.test. TXT NOERROR 0.100 ms",
        "query tcp 2001:db8::1 a.jit.test. TXT none 2.000 ms (3 more queries not logged)",
    ]
    assert qlog.skipped_total == 3
    assert qname_of(b"\0" * 12 + b"\x03a.\xff\x00\x00\x01\x00\x01") == "a\\046\\255."
    assert qname_of(b"\0" * 12 + b"\x05ab") == "?"
    assert qtype_text(b"\0" * 12 + b"\x00\xff\xfe\x00\x01") == "TYPE65534"
    off = QueryLog(0, logger)
    off.refresh()
    assert not off.enabled


async def test_query_log_lines_over_udp_and_tcp(
    tmp_path: Path, block: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from .conftest import query_tcp

    caplog.set_level(logging.DEBUG, logger="jitlaunch.dns.queries")
    async with running(load(config_text(tmp_path, service("hello", f"{block}.1")))) as d:
        ep = d.dns_endpoints[0]
        await query_udp((ep.host, ep.port), "hello.jit.test")
        await query_tcp((ep.host, ep.port), [("nope.jit.test", "MX")])
    msgs = [r.getMessage() for r in caplog.records if r.name == "jitlaunch.dns.queries"]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("query udp 127.0.0.1 hello.jit.test. A NOERROR ")
    assert msgs[1].startswith("query tcp 127.0.0.1 nope.jit.test. MX NXDOMAIN ")


# ---- instance logs capped ----------------------------------------------------------------------

CHATTY = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
n = 0
while True:
    n += 1
    sys.stdout.write(f"line {n:08d} " + "x" * 200 + "\\n")
    if n % 50 == 0:
        sys.stdout.flush()
        time.sleep(0.01)
"""


def test_rotate_keeps_the_writer_appending(tmp_path: Path) -> None:
    import os

    from jitlaunch.logcap import rotate_if_large

    path = tmp_path / "svc.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, b"old " * 100)
        assert not rotate_if_large(path, 400)
        os.write(fd, b"more")
        assert rotate_if_large(path, 400)
        os.write(fd, b"new")
        assert path.read_bytes() == b"new"
        assert (tmp_path / "svc.log.1").read_bytes() == b"old " * 100 + b"more"
        assert not (tmp_path / "svc.log.1.tmp").exists()
    finally:
        os.close(fd)


@pytest.mark.slow
async def test_a_chatty_instance_cannot_grow_its_log_past_the_cap(tmp_path: Path, block: str) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    cap = 200_000
    command = f"{PYTHON} {script} {{address}} {{port}}"
    text = config_text(tmp_path / "state", service("chatty", f"{block}.1", command),
                       top=f"instance_log_max = {cap}")
    async with running(load(text)) as d:
        ep = d.dns_endpoints[0]
        await query_udp((ep.host, ep.port), "chatty.jit.test")
        logs = tmp_path / "state" / "logs"
        rt = d.supervisor.services["chatty"]
        await wait_until(lambda: (logs / "chatty.log.1").exists(), 20)
        first = (logs / "chatty.log.1").stat().st_mtime_ns
        await wait_until(lambda: (logs / "chatty.log.1").stat().st_mtime_ns != first, 20)
        sizes = []
        for _ in range(40):
            sizes.append((logs / "chatty.log").stat().st_size)
            await trio.sleep(0.05)
        assert rt.instance is not None and rt.instance.handle is not None and rt.instance.handle.alive()
    older = (logs / "chatty.log.1").read_bytes()
    assert len(older) > cap
    # One interval's writes (0.5 s; the writer makes about 1 MB/s) beyond the cap, with a
    # margin for a busy machine; unbounded, the log would pass 2 MB in these 2 s alone.
    assert max(sizes) < cap + 1_500_000, sizes
    assert min(sizes) < cap, sizes
    assert sorted(p.name for p in logs.iterdir()) == ["chatty.log", "chatty.log.1"]


# ---- every wake-up path, with real QEMU ---------------------------------------------------------


def qemu_service(name: str, front: str, stop: str, qemu: str = "") -> str:
    from .conftest import KERNEL

    return f"""
[[service]]
name = "{name}"
front = ["{front}"]
ports = [18080]
backend = "qemu"
answer = "proxy"
boot_timeout = "20s"
idle_timeout = "500ms"
max_instances = 2
stop = "{stop}"
[service.qemu]
kernel = "{KERNEL}"
guest_ports = [80]
accel = "tcg"
grace = "1s"
{qemu}
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) missing")
async def test_wake_paths_cold_pool_resume_restore_and_promtool(tmp_path: Path, block: str) -> None:
    from jitlaunch.lifecycle.state import State

    state = tmp_path
    text = config_text(state, qemu_service("uk", f"{block}.1", "pause", "pool = 1")
                       + qemu_service("sv", f"{block}.2", "save"))
    async with running(load(text)) as d:
        pool = d.backends["qemu"].pools["uk"]  # type: ignore[attr-defined]
        await wait_until(lambda: len(pool) == 1, 30)
        s0 = await scrape(d)
        assert get(s0, "jitlaunch_pool_size", service="uk") == 1
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")  # pool
        assert (await http_get(f"{block}.2", 18080)).startswith(b"HTTP/1.1 200")  # cold
        uk, sv = d.supervisor.services["uk"], d.supervisor.services["sv"]
        await wait_until(lambda: all(rt.instance is not None and rt.instance.state is State.SAVED
                                     for rt in (uk, sv)), 30)
        assert (await http_get(f"{block}.1", 18080)).startswith(b"HTTP/1.1 200")  # resume
        assert (await http_get(f"{block}.2", 18080)).startswith(b"HTTP/1.1 200")  # restore
        await wait_until(lambda: uk.connections == 0 and sv.connections == 0)
        s1 = await scrape(d)
        body = await scrape_text(d)
    wakes = {k: v for k, v in counters(delta(s0, s1)).items() if k[0] == "jitlaunch_wake_seconds_count"}
    assert wakes == {
        ("jitlaunch_wake_seconds_count", L(service="uk", path="pool")): 1,
        ("jitlaunch_wake_seconds_count", L(service="uk", path="resume")): 1,
        ("jitlaunch_wake_seconds_count", L(service="sv", path="cold")): 1,
        ("jitlaunch_wake_seconds_count", L(service="sv", path="restore")): 1,
    }
    # The resumed and restored instances may idle out again (500 ms) before the scrape.
    assert 1 <= get(s1, "jitlaunch_stops_total", service="uk", reason="idle", mode="pause") <= uk.idle_stops
    assert 1 <= get(s1, "jitlaunch_stops_total", service="sv", reason="idle", mode="save") <= sv.idle_stops
    assert get(s1, "jitlaunch_boots_total", service="uk", backend="qemu", result="ready") == 2
    assert get(s1, "jitlaunch_pool_target", service="uk") == 1
    result = subprocess.run(["promtool", "check", "metrics"], input=body.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    await wait_until(lambda: not qemus(state), 10)  # every QEMU stopped with the daemon


async def test_status_shows_the_same_numbers_as_the_metrics(tmp_path: Path, block: str) -> None:
    from jitlaunch.controlproto import status_report

    exits = f"{PYTHON} -c 'raise SystemExit(3)'"
    text = config_text(tmp_path, service("hello", f"{block}.1", idle='"300ms"')
                       + service("bad", f"{block}.2", exits))
    async with running(load(text)) as d:
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
        assert await http_get(f"{block}.2", 8080) == b""
        hello = d.supervisor.services["hello"]
        await wait_until(lambda: hello.idle_stops == 1)
        assert (await http_get(f"{block}.1", 8080)).startswith(b"HTTP/1.1 200")
        await wait_until(lambda: hello.connections == 0)  # the proxy's side has closed too
        samples = await scrape(d)
        report = status_report(d.supervisor.status(), d.config.path, trio.current_time())
    by_name = {s["name"]: s for s in report["services"]}
    for name, s in by_name.items():
        boots = {r: get(samples, "jitlaunch_boots_total", service=name, backend="process", result=r)
                 for r in ("ready", "failed", "timeout")}
        assert s["boots"] == get(samples, "jitlaunch_boots_started_total", service=name,
                                 backend="process")
        assert s["boot_failures"] == boots["failed"] + boots["timeout"]
        assert s["idle_stops"] == sum(v for (n, labels), v in samples.items()
                                      if n == "jitlaunch_stops_total"
                                      and ("service", name) in labels and ("reason", "idle") in labels)
        assert s["deaths"] == sum(v for (n, labels), v in samples.items()
                                  if n == "jitlaunch_stops_total" and ("service", name) in labels
                                  and ("reason", "died") in labels)
        assert s["connections"] == get(samples, "jitlaunch_proxy_connections_active", service=name)
        state = s["instance"]["state"] if s["instance"] else None
        for st in ("starting", "ready", "saved", "failed"):
            assert get(samples, "jitlaunch_instances", service=name, state=st) == (st == state)
    assert by_name["hello"]["boots"] == 2 and by_name["hello"]["idle_stops"] == 1
    assert by_name["bad"]["boot_failures"] == 1
    boot_time = by_name["hello"]["instance"]["boot_time"]
    wakes = get(samples, "jitlaunch_wake_seconds_sum", service="hello", path="cold")
    assert get(samples, "jitlaunch_wake_seconds_count", service="hello", path="cold") == 2
    assert 0 < boot_time <= wakes
