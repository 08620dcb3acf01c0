"""``[[frontend]]`` and a service's ``frontends``: what parses, what DNS answers for a service
on shared frontends only, and the errors, each naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from jitlaunch.config.frontends import routes
from jitlaunch.config.model import Endpoint
from jitlaunch.errors import ConfigError

from .conftest import config_text, load

FRONTENDS = """
[[frontend]]
name = "web"
listen = ["192.0.2.10:80", "[2001:db8::10]:80"]
route = "host"

[[frontend]]
name = "tls"
listen = ["192.0.2.10:443"]
route = "sni"
default = "blog"
"""


def svc(name: str, extra: str = "", front: str = "", ports: str = "[8080, 8443]") -> str:
    return f"""
[[service]]
name = "{name}"
{front}
ports = {ports}
{extra}
[service.process]
command = "true"
"""


def parse(tmp_path: Path, services: str, frontends: str = FRONTENDS) -> object:
    return load(config_text(tmp_path, frontends + services))


def test_frontends_parse_and_services_join(tmp_path: Path) -> None:
    cfg = load(config_text(tmp_path, FRONTENDS
                           + svc("blog", "frontends = { web = 8080, tls = 8443 }")
                           + svc("shop", 'frontends = { web = 8080 }\nproxy_protocol = "v2"',
                                 front='front = ["127.0.0.7"]')))
    web, tls = cfg.frontends
    assert (web.name, web.route, web.default) == ("web", "host", None)
    assert web.listen == (Endpoint("192.0.2.10", 80), Endpoint("2001:db8::10", 80))
    assert (tls.route, tls.default) == ("sni", "blog")
    blog, shop = cfg.services
    assert blog.front == () and blog.frontends == (("web", 8080), ("tls", 8443))
    # DNS answers a service with no front of its own with its frontends' addresses.
    assert blog.shared_front == ("192.0.2.10", "2001:db8::10")
    assert (blog.front_v4, blog.front_v6) == (("192.0.2.10",), ("2001:db8::10",))
    # A service with its own front keeps answering with it.
    assert shop.front_v4 == ("127.0.0.7",) and shop.front_v6 == ()
    assert routes("web", cfg.services) == {
        "blog.jit.test": ("blog", 8080), "shop.jit.test": ("shop", 8080)}
    assert routes("tls", cfg.services) == {"blog.jit.test": ("blog", 8443)}


def test_extra_names_route_too(tmp_path: Path) -> None:
    cfg = load(config_text(tmp_path, FRONTENDS + svc(
        "blog", 'names = ["www.jit.test"]\nfrontends = { web = 8080, tls = 8443 }')))
    assert routes("web", cfg.services) == {
        "blog.jit.test": ("blog", 8080), "www.jit.test": ("blog", 8080)}


@pytest.mark.parametrize(("text", "words"), [
    (svc("blog", "frontends = { nope = 8080 }"),
     ["blog", "frontends.nope", "unknown frontend 'nope'", "tls, web"]),
    (svc("blog", "frontends = { web = 9999 }"),
     ["blog", "frontends.web", "port 9999 is not one of the service's ports (8080, 8443)"]),
    (svc("blog", "frontends = {}"), ["frontends", "at least one NAME = PORT"]),
    (svc("blog"), ["front", "frontends = { NAME = PORT }"]),
    (svc("shop", "frontends = { tls = 8443 }"),
     ["default 'blog' is not a service that joins frontend 'tls'"]),
])
def test_service_errors(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load(config_text(tmp_path, FRONTENDS + text))
    for w in words:
        assert w in str(err.value)


BAD_FRONTENDS = [
    ('[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:80"]\nroute = "tcp"',
     ["frontend[0].route", "host, sni"]),
    ('[[frontend]]\nname = "web"\nlisten = []\nroute = "host"',
     ["frontend[0].listen", "at least one"]),
    ('[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:80", "192.0.2.1:80"]\nroute = "host"',
     ["listed twice"]),
    ('[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:80"]\nroute = "host"\ndefault = "x"',
     ["frontend[0].default", 'only a route = "sni"']),
    ('[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:80"]\nroute = "host"\nlisen = 1',
     ["frontend[0].lisen", "unknown key"]),
    ('[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:80"]\nroute = "host"\n'
     '[[frontend]]\nname = "web"\nlisten = ["192.0.2.1:81"]\nroute = "host"',
     ["frontend 'web' is defined twice"]),
    ('[[frontend]]\nname = "a"\nlisten = ["192.0.2.1:80"]\nroute = "host"\n'
     '[[frontend]]\nname = "b"\nlisten = ["192.0.2.1:80"]\nroute = "sni"',
     ["frontend[1].listen", "192.0.2.1:80 is already where frontend 'a' listens"]),
    ('[[frontend]]\nname = "a"\nlisten = ["0.0.0.0:80"]\nroute = "host"',
     ["blog", "wildcard addresses only"]),
    ('[[frontend]]\nname = "a"\nlisten = ["127.0.0.7:8080"]\nroute = "host"',
     ["127.0.0.7:8080 is already the front of service 'shop'"]),
]


@pytest.mark.parametrize(("frontend", "words"), BAD_FRONTENDS)
def test_frontend_errors(tmp_path: Path, frontend: str, words: list[str]) -> None:
    services = (svc("blog", "frontends = { a = 8080 }") if "name = \"a\"" in frontend
                else "") + svc("shop", front='front = ["127.0.0.7"]', ports="[8080]")
    with pytest.raises(ConfigError) as err:
        load(config_text(tmp_path, frontend + "\n" + services))
    for w in words:
        assert w in str(err.value)


def test_a_name_twice_names_both_services(tmp_path: Path) -> None:
    """Services' names are unique in all, so the check per frontend is reached only through
    the global one; either way the message names both services."""
    with pytest.raises(ConfigError) as err:
        load(config_text(tmp_path, FRONTENDS
                         + svc("blog", 'frontends = { web = 8080, tls = 8443 }')
                         + svc("shop", 'names = ["blog.jit.test"]\nfrontends = { web = 8080 }')))
    assert "'blog.jit.test'" in str(err.value) and "'blog'" in str(err.value)
    assert "shop" in str(err.value)


def test_check_warns_about_frontends(tmp_path: Path) -> None:
    from jitlaunch.checks import frontend_findings

    frontends = """
[[frontend]]
name = "web"
listen = ["192.0.2.10:443"]
route = "host"

[[frontend]]
name = "tls"
listen = ["192.0.2.10:80", "192.0.2.10:8443"]
route = "sni"

[[frontend]]
name = "lonely"
listen = ["192.0.2.11:80"]
route = "host"
"""
    cfg = load(config_text(tmp_path, frontends + svc("blog", "frontends = { web = 8080, "
                                                             "tls = 8443 }")))
    found = {(f.key, f.message) for f in frontend_findings(cfg)}
    assert all(not f.error for f in frontend_findings(cfg))
    assert found == {
        ("frontend lonely", "no service joins this frontend (frontends = { lonely = PORT }): "
                            "it refuses every connection"),
        ("frontend web.listen", 'route = "host" on 192.0.2.10:443: clients speak TLS on port 443'),
        ("frontend tls.listen", 'route = "sni" on 192.0.2.10:80: clients speak HTTP on port 80'),
    }
