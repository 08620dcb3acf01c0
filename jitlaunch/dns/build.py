"""DNS replies at the wire level: small builders over bytes. No I/O, no dnslib.

:class:`SoaTemplate` holds a zone's SOA record as bytes: every NXDOMAIN and NODATA of the
zone is the query's own question plus the template's bytes for that question's length.
:func:`add_option` puts an option (the reply's COOKIE) into a reply's OPT afterwards, within
the reply's size limit. The constants and the parsing are :mod:`.wire`'s.
"""

from __future__ import annotations

import socket
import struct

from .wire import (
    _RR_FIXED,
    _U16,
    CLASS_ANY,
    CLASS_IN,
    HEADER,
    OPCODE_MASK,
    QR,
    RD,
    SERVFAIL,
    TC,
    TSIG_BADKEY,
    TYPE_A,
    TYPE_AAAA,
    TYPE_OPT,
    TYPE_SOA,
    TYPE_TSIG,
    Tsig,
    read_name,
)


def header(ident: int, flags: int, qd: int = 0, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return HEADER.pack(ident, flags, qd, an, ns, ar)


def opt_record(payload: int, ext_rcode: int = 0, flags: int = 0) -> bytes:
    """An OPT record (RFC 6891 6.1.2): root owner, version 0, no options."""
    return b"\0" + _RR_FIXED.pack(TYPE_OPT, payload, (ext_rcode << 24) | flags, 0)


def add_option(reply: bytes, option: bytes, limit: int) -> bytes:
    """``reply`` with ``option`` (code, length and data) in its OPT, which is its last record
    and has no data yet (as every reply we build with an OPT has it); ``reply`` as it is
    without such an OPT. When that makes a reply longer than ``limit`` (a UDP reply's bound),
    it is cut to the header, the question and the OPT with the option, TC set (RFC 6891 7:
    the OPT is kept; as for any reply too large). A NOTAUTH reply to a signed query (no
    question, an empty OPT, then the TSIG record, which stays last: RFC 8945 5.3.2) gets the
    option in that OPT, within ``limit``."""
    if (len(reply) > 23 and reply[4:12] == b"\0\0\0\0\0\0\0\x02"
            and reply[12:15] == b"\0\0\x29" and reply[21:23] == b"\0\0"):
        if len(reply) + len(option) > limit:
            return reply
        return reply[:21] + _U16.pack(len(option)) + option + reply[23:]
    if len(reply) < 23 or reply[-11:-8] != b"\0\0\x29" or reply[-2:] != b"\0\0" \
            or reply[10:12] == b"\0\0":
        return reply
    opt = reply[-11:-2] + _U16.pack(len(option)) + option
    if len(reply) + len(option) <= limit:
        return reply[:-11] + opt
    end = 12
    if reply[5]:  # the question, as echoed: uncompressed
        end = read_name(reply, 12)[1] + 4
    ident, flags, qd = struct.unpack_from("!HHH", reply)
    return HEADER.pack(ident, flags | TC, qd, 0, 0, 1) + reply[12:end] + opt


def tsig_badkey(tsig: Tsig) -> bytes:
    """The unsigned TSIG record of a reply to a query signed with a key we do not know (RFC
    8945 5.2.1, 5.3.2): the query's key and algorithm names, time signed, fudge and original
    ID, no MAC, error BADKEY and no other data (4.2: only BADTIME has any)."""
    rdata = (tsig.algorithm + tsig.time_fudge + b"\0\0"
             + struct.pack("!HHH", tsig.original_id, TSIG_BADKEY, 0))
    return rr(tsig.key, TYPE_TSIG, 0, rdata, CLASS_ANY)


def servfail_for(wire: bytes) -> bytes:
    """A header-only SERVFAIL for a message of at least 12 bytes. Cannot fail."""
    ident, flags = struct.unpack_from("!HH", wire)
    return HEADER.pack(ident, QR | (flags & (OPCODE_MASK | RD)) | SERVFAIL, 0, 0, 0, 0)


def name_to_wire(name: str) -> bytes:
    """A configured name (dotted text, no escapes, no final dot) in wire form."""
    out = bytearray()
    for label in name.split("."):
        if label:
            raw = label.encode()
            out.append(len(raw))
            out += raw
    out.append(0)
    return bytes(out)


def suffixes(name: bytes) -> list[tuple[int, bytes]]:
    """Every suffix of a wire-form name at a label boundary, with its offset, longest first."""
    out = []
    pos = 0
    while name[pos]:
        out.append((pos, name[pos:]))
        pos += 1 + name[pos]
    out.append((pos, name[pos:]))
    return out


class Compressor:
    """Writes names with compression pointers to names written before (RFC 1035 4.1.4).

    Suffixes are matched case-insensitively, so a pointer may point to the question's own
    spelling of a name (as NSD does too)."""

    def __init__(self) -> None:
        self.known: dict[bytes, int] = {}

    def note(self, name: bytes, offset: int) -> None:
        """Remember every suffix of ``name``, written uncompressed at ``offset``."""
        for pos, suffix in suffixes(name):
            if suffix != b"\0" and offset + pos < 0x4000:
                self.known.setdefault(suffix.lower(), offset + pos)

    def write(self, name: bytes, offset: int) -> bytes:
        """``name`` as written at ``offset``: its labels up to the longest known suffix."""
        for pos, suffix in suffixes(name):
            if suffix == b"\0":
                break
            target = self.known.get(suffix.lower())
            if target is not None:
                for i, _ in suffixes(name[:pos] + b"\0")[:-1]:
                    if offset + i < 0x4000:
                        self.known.setdefault(name[i:].lower(), offset + i)
                return name[:pos] + _U16.pack(0xC000 | target)
        self.note(name, offset)
        return name


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    return owner + _RR_FIXED.pack(rtype, rclass, ttl, len(rdata)) + rdata


def address_rdata(address: str) -> tuple[int, bytes]:
    """The type (A or AAAA) and rdata of an IP address in text form."""
    if ":" in address:
        return TYPE_AAAA, socket.inet_pton(socket.AF_INET6, address)
    return TYPE_A, socket.inet_pton(socket.AF_INET, address)


def pointer(offset: int) -> bytes:
    return _U16.pack(0xC000 | offset)


class SoaTemplate:
    """A zone's SOA record as bytes, for the answer at the apex and for the authority
    section of negative answers (RFC 2308 3).

    A negative answer's SOA record depends on the question only through the length of its
    name: the record's owner and the names in it point to the zone's apex inside the
    question, whose offset is fixed by that length. So each length's bytes are made once and
    every NXDOMAIN and NODATA of the zone is the query's question plus those bytes.
    """

    def __init__(self, apex: bytes, mname: bytes, rname: bytes,
                 times: tuple[int, int, int, int, int], negative_ttl: int) -> None:
        self.apex = apex
        self._mname = mname
        self._rname = rname
        self._times = struct.pack("!IIIII", *times)
        self.negative_ttl = negative_ttl
        self._negative: dict[int, bytes] = {}

    def record(self, comp: Compressor, offset: int, ttl: int) -> bytes:
        """The SOA record written at ``offset``, compressed against ``comp``'s names."""
        owner = comp.write(self.apex, offset)
        pos = offset + len(owner) + 10
        mname = comp.write(self._mname, pos)
        rname = comp.write(self._rname, pos + len(mname))
        return rr(owner, TYPE_SOA, ttl, mname + rname + self._times)

    def negative(self, qname_len: int) -> bytes:
        """The SOA record that follows a question whose name (in this zone) is ``qname_len``
        octets long, with the negative TTL."""
        record = self._negative.get(qname_len)
        if record is None:
            comp = Compressor()
            comp.known[self.apex] = 12 + qname_len - len(self.apex)
            record = self.record(comp, 12 + qname_len + 4, self.negative_ttl)
            self._negative[qname_len] = record
        return record
