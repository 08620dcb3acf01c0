"""A strict reader of DNS replies for tests: every section, names decompressed (also inside
NS and SOA data), so that replies from jitlaunch and from NSD can be compared as data.

It uses only :func:`jitlaunch.dns.wire.read_name` from the package (whose own tests pin it
down byte by byte); dnslib cannot be used here because it rejects labels that are not UTF-8.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from jitlaunch.dns.wire import read_name

_RR = struct.Struct("!HHIH")


@dataclass(frozen=True)
class Record:
    owner: bytes  # wire form, lower case
    rtype: int
    rclass: int
    ttl: int
    rdata: tuple[object, ...]


@dataclass(frozen=True)
class Reply:
    ident: int
    flags: int
    question: tuple[tuple[bytes, int, int], ...]  # name as sent (case kept), type, class
    answer: tuple[Record, ...]
    authority: tuple[Record, ...]
    additional: tuple[Record, ...]

    @property
    def rcode(self) -> int:
        opt = [r for r in self.additional if r.rtype == 41]
        high = opt[0].ttl >> 24 if opt else 0
        return (high << 4) | (self.flags & 0xF)

    @property
    def opt(self) -> Record | None:
        opt = [r for r in self.additional if r.rtype == 41]
        return opt[0] if opt else None


class ReplyError(Exception):
    pass


def _rdata(msg: bytes, rtype: int, start: int, end: int) -> tuple[object, ...]:
    if rtype in (2, 5, 12):  # NS, CNAME, PTR
        name, pos = read_name(msg, start)
        if pos != end:
            raise ReplyError("name in rdata does not fill it")
        return (name.lower(),)
    if rtype == 6:  # SOA
        mname, pos = read_name(msg, start)
        rname, pos = read_name(msg, pos)
        if pos + 20 != end:
            raise ReplyError("SOA rdata of the wrong length")
        return (mname.lower(), rname.lower(), *struct.unpack_from("!IIIII", msg, pos))
    if (rtype == 1 and end - start != 4) or (rtype == 28 and end - start != 16):
        raise ReplyError("address of the wrong length")
    return (msg[start:end],)


def parse_reply(msg: bytes) -> Reply:
    """Read a whole reply; ReplyError (or FormError) if anything is out of place, including
    bytes after the last record."""
    if len(msg) < 12:
        raise ReplyError("shorter than a header")
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    pos = 12
    question = []
    for _ in range(qd):
        name, pos = read_name(msg, pos)
        if pos + 4 > len(msg):
            raise ReplyError("question cut short")
        qtype, qclass = struct.unpack_from("!HH", msg, pos)
        pos += 4
        question.append((name, qtype, qclass))
    sections: list[list[Record]] = [[], [], []]
    for index, count in enumerate((an, ns, ar)):
        for _ in range(count):
            owner, pos = read_name(msg, pos)
            if pos + 10 > len(msg):
                raise ReplyError("record cut short")
            rtype, rclass, ttl, rdlength = _RR.unpack_from(msg, pos)
            pos += 10
            if pos + rdlength > len(msg):
                raise ReplyError("rdata cut short")
            sections[index].append(
                Record(owner.lower(), rtype, rclass, ttl, _rdata(msg, rtype, pos, pos + rdlength)))
            pos += rdlength
    if pos != len(msg):
        raise ReplyError(f"{len(msg) - pos} bytes after the last record")
    return Reply(ident, flags, tuple(question), tuple(sections[0]), tuple(sections[1]),
                 tuple(sections[2]))
