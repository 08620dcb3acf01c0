"""What a DNS query is counted as: transport, query type and response code, from bounded sets.

Pure and cheap: the reply cache keeps the key next to each entry, so a cached answer costs one
counter increment. Query types outside :data:`QTYPES` are ``other``; a query whose question
cannot be read is ``other`` too. A query that gets no reply (shorter than a header, or a
response) has the rcode ``none``.
"""

from __future__ import annotations

#: The query types counted by name; every other one is ``other``.
QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 251: "IXFR", 252: "AXFR",
    255: "ANY", 257: "CAA",
}
#: Response codes by name (RFC 1035, 2136); the others (never sent by us) are ``other``.
RCODES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    9: "NOTAUTH",
}

#: A counter key: ``(transport, qtype, rcode)``.
Key = tuple[str, str, str]


def qtype_of(wire: bytes) -> str:
    """The first question's type, by name from :data:`QTYPES`, else ``other``."""
    pos = 12
    end = len(wire)
    while pos < end:
        length = wire[pos]
        if length == 0:
            break
        if length & 0xC0:  # a pointer or a reserved label type: not a plain question name
            return "other"
        pos += length + 1
    if pos + 3 > end:
        return "other"
    return QTYPES.get((wire[pos + 1] << 8) | wire[pos + 2], "other")


def rcode_of(reply: bytes | None) -> str:
    """The reply's header RCODE by name, ``none`` without a reply."""
    if reply is None or len(reply) < 4:
        return "none"
    return RCODES.get(reply[3] & 0x0F, "other")


def key_of(wire: bytes, reply: bytes | None, udp: bool) -> Key:
    """The counter key for ``wire`` answered with ``reply``."""
    return ("udp" if udp else "tcp", qtype_of(wire), rcode_of(reply))
