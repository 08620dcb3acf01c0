"""Static records ([[dns.record]]): what the config accepts and refuses (each error names the
record and the key), answers over real sockets, a reload that changes them, and a CNAME to
a service that wakes it as a lookup of its own name does. Each type is compared with NSD
serving the same zone file in tests/test_dns_nsd.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from dnslib import DNSRecord

from jitlaunch.errors import ConfigError
from jitlaunch.lifecycle.state import State

from .conftest import DEMO, config_text, load, load_config, query_udp, running, wait_until
from .helpers import dns_server


def records(*tables: str) -> str:
    return "".join(f"[[dns.record]]\n{t}\n" for t in tables)


def web(block: str) -> str:
    return f"""
[[service]]
name = "web"
front = ["{block}.1"]
ports = [8080]
answer = "proxy"
[service.process]
command = "{DEMO}"
user = "root"
"""


@pytest.mark.parametrize(("table", "key", "words"), [
    ('name = "x.example.org"\ntype = "TXT"\ntext = "a"', "name", "not inside any of dns.zones"),
    ('name = "x..jit.test"\ntype = "TXT"\ntext = "a"', "name", "expected a DNS name"),
    ('name = "x.jit.test"\ntype = "SRV"\ntext = "a"', "type", "expected one of TXT, CAA"),
    ('name = "x.jit.test"\ntype = "TXT"\ntext = "' + "y" * 256 + '"', "text", "at most 255"),
    ('name = "x.jit.test"\ntype = "TXT"', "text", "missing"),
    ('name = "jit.test"\ntype = "CAA"\ntag = "is sue"\nvalue = "a"', "tag", "letters and digits"),
    ('name = "jit.test"\ntype = "MX"\nexchange = "m.example.org"', "preference", "missing"),
    ('name = "jit.test"\ntype = "MX"\npreference = 1\nexchange = "m.example.org"\nextra = 1',
     "extra", "unknown"),
    ('name = "jit.test"\ntype = "CNAME"\ntarget = "x.example.org"', "record[0]",
     "zone's apex"),
    ('name = "web.jit.test"\ntype = "CNAME"\ntarget = "x.example.org"', "record[0]",
     "service 'web'"),
    ('name = "w.jit.test"\ntype = "HTTPS"\npriority = 1\nparams = { no_default_alpn = true }',
     "no_default_alpn", "needs alpn"),
    ('name = "w.jit.test"\ntype = "HTTPS"\npriority = 0\ntarget = "web.jit.test"\n'
     'params = { port = 1 }', "params", "alias form"),
    ('name = "w.jit.test"\ntype = "SVCB"\npriority = 1\nparams = { ipv4hint = ["::1"] }',
     "ipv4hint", "IPv4"),
])
def test_a_bad_record_is_named(tmp_path: Path, table: str, key: str, words: str) -> None:
    text = config_text(tmp_path, web("127.0.0"), dns=records(table))
    with pytest.raises(ConfigError) as err:
        load(text)
    assert key in str(err.value) and words in str(err.value), str(err.value)


def test_a_cname_beside_other_records_and_a_repeated_record_are_refused(tmp_path: Path) -> None:
    cname = 'name = "w.jit.test"\ntype = "CNAME"\ntarget = "web.jit.test"'
    txt = 'name = "w.jit.test"\ntype = "TXT"\ntext = "t"'
    for tables, words in (((cname, txt), "only record"), ((txt, txt), "given twice")):
        with pytest.raises(ConfigError, match=words):
            load(config_text(tmp_path, web("127.0.0"), dns=records(*tables)))


def answers(reply: DNSRecord) -> list[str]:
    return sorted(f"{r.rtype} {r.rdata}" for r in reply.rr)


async def test_records_are_answered_and_a_reload_changes_them(tmp_path: Path, block: str) -> None:
    conf = tmp_path / "jl.toml"
    first = records('name = "_acme-challenge.jit.test"\ntype = "TXT"\ntext = "token-1"',
                    'name = "jit.test"\ntype = "CAA"\ntag = "issue"\nvalue = "letsencrypt.org"')
    conf.write_text(config_text(tmp_path / "state", web(block), dns=first))
    async with running(load_config(conf)) as d:
        server = dns_server(d)
        reply = await query_udp(server, "_acme-challenge.jit.test", "TXT")
        assert answers(reply) == ['16 "token-1"'] and reply.header.aa
        assert answers(await query_udp(server, "jit.test", "CAA")) == ['257 0 issue "letsencrypt.org"']
        second = records('name = "_acme-challenge.jit.test"\ntype = "TXT"\ntext = "token-2"',
                         'name = "jit.test"\ntype = "MX"\npreference = 10\nexchange = "m.example.org"')
        conf.write_text(config_text(tmp_path / "state", web(block), dns=second))
        result = await d.reload("test")
        assert result.ok, result.message
        assert answers(await query_udp(server, "_acme-challenge.jit.test", "TXT")) == ['16 "token-2"']
        assert answers(await query_udp(server, "jit.test", "MX")) == ["15 10 m.example.org."]
        gone = await query_udp(server, "jit.test", "CAA")
        assert gone.header.rcode == 0 and not gone.rr and gone.auth  # NODATA, with the SOA


async def test_a_cname_to_a_service_wakes_it(tmp_path: Path, block: str) -> None:
    cname = records('name = "www.jit.test"\ntype = "CNAME"\ntarget = "web.jit.test"')
    cfg = load(config_text(tmp_path / "state", web(block), dns=cname))
    async with running(cfg) as d:
        reply = await query_udp(dns_server(d), "www.jit.test", "A")
        assert answers(reply) == ["1 " + f"{block}.1", "5 web.jit.test."]
        await wait_until(lambda: (i := d.supervisor.services["web"].instance) is not None
                         and i.state is State.READY, timeout=15)
