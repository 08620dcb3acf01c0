"""The DNS answer tests' zone, their fake supervisor, and a tiny encoder of expected bytes,
independent of jitlaunch's own (shared by the answer and the cookie tests)."""

from __future__ import annotations

import struct

from jitlaunch.dns.answer import Catalog, Response, respond
from jitlaunch.lifecycle.answers import ServiceSnapshot
from jitlaunch.lifecycle.state import State

from .conftest import parse_config

MANY = ", ".join(f'"127.78.0.{i}"' for i in range(1, 41))


CONFIG = parse_config(
    f"""
[dns]
zones = ["jit.test"]
[[service]]
name = "hello"
names = ["a.b.jit.test"]
front = ["127.77.0.1"]
ports = [80]
[service.process]
command = "x"
[[service]]
name = "six"
front = ["127.77.0.2", "fd00::2"]
ports = [80]
[service.process]
command = "x"
[[service]]
name = "slow"
front = ["127.77.0.3"]
ports = [80]
answer = "wait"
[service.process]
command = "x"
[[service]]
name = "many"
front = [{MANY}]
ports = [80]
[service.process]
command = "x"
[[service]]
name = "v6"
front = ["fd00::6"]
ports = [80]
[service.process]
command = "x"
""",
    "t.toml",
)


CATALOG = Catalog(CONFIG.dns, CONFIG.services)


STATE = {
    "hello": ServiceSnapshot(State.READY, "127.77.1.5"),  # handed over, TTL 30
    "six": ServiceSnapshot(State.STARTING),  # the fronts, booting TTL 1
    "slow": ServiceSnapshot(State.STARTING),  # wait mode: held
    "many": ServiceSnapshot(State.STARTING),
    "v6": ServiceSnapshot(State.STARTING),
}


NOW = 1000.0


def snapshot(name: str) -> ServiceSnapshot:
    return STATE[name]


def run(wire: bytes, udp: bool = True) -> Response:
    return respond(wire, CATALOG, snapshot, NOW, udp=udp)


def name(text: str) -> bytes:
    out = b""
    for label in text.split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(ident: int, flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def question(qname: str, qtype: int, qclass: int = 1) -> bytes:
    return name(qname) + struct.pack("!HH", qtype, qclass)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def ptr(offset: int) -> bytes:
    return struct.pack("!H", 0xC000 | offset)


def soa_rdata(apex: bytes) -> bytes:
    # ns.jit.test. hostmaster.jit.test. 1 3600 600 86400 30, compressed against the apex.
    return b"\x02ns" + apex + b"\x0ahostmaster" + apex + struct.pack("!IIIII", 1, 3600, 600, 86400, 30)


QR, AA, TC, RD = 0x8000, 0x0400, 0x0200, 0x0100


def opt(payload: int, version: int = 0, do: bool = False) -> bytes:
    ttl = (version << 16) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", 41, payload, ttl, 0)


class FakeSupervisor:
    generation = 0

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.proven: list[bool] = []

    def request(self, name: str, source: str | None = None, *, proven: bool = True) -> object:
        self.requests.append(name)
        self.proven.append(proven)
        return self  # something is starting (None: refused)

    def snapshot(self, name: str) -> ServiceSnapshot:
        return STATE[name]

    async def acquire(self, name: str, *, proven: bool = True) -> None:
        raise AssertionError("not used")
