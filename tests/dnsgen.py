"""A generator of varied DNS queries, well-formed and not, for the fuzz and NSD tests.

Names in and out of the test zone ``jit.test`` in mixed case, labels with dots and odd bytes,
long labels and names; types, classes, flags, opcodes; EDNS variants (payload sizes,
versions, DO, options, broken options, DNS cookies: client only, with a server cookie, of
lengths RFC 7873 forbids); malformed sections (no or two questions, records in
the answer and authority sections, OPTs in the wrong place, counts larger than the message,
bad compression pointers) and trailing bytes. Deterministic for a given ``random.Random``.
"""

from __future__ import annotations

import random
import struct

KNOWN = [
    "hello.jit.test", "a.b.jit.test", "b.jit.test", "six.jit.test", "many.jit.test", "jit.test",
    "ns.jit.test", "nope.jit.test", "x.hello.jit.test", "deep.x.y.jit.test", "slow.jit.test",
]
OUTSIDE = ["example.org", "test", "", "jit.test.example", "org", "xjit.test", "jit.tes"]
TYPES = [1] * 8 + [28] * 4 + [255] * 2 + [6, 2, 15, 16, 33, 65, 46, 252, 251, 41, 0, 250, 249,
                                          253, 65535, 5, 12, 99]
CLASSES = [1] * 16 + [255, 255, 3, 3, 4, 254, 0, 2, 65535]


def _label(text: str, rng: random.Random) -> bytes:
    raw = bytes(c ^ 0x20 if 0x61 <= c <= 0x7A and rng.random() < 0.3 else c for c in text.encode())
    return bytes([len(raw)]) + raw


def wire_name(text: str, rng: random.Random) -> bytes:
    return b"".join(_label(label, rng) for label in text.split(".") if label) + b"\0"


def random_name(rng: random.Random) -> bytes:
    kind = rng.random()
    apex = wire_name("jit.test", rng)
    if kind < 0.45:
        return wire_name(rng.choice(KNOWN), rng)
    if kind < 0.58:
        n = rng.randint(1, 20)
        label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(n))
        return _label(label, rng) + apex
    if kind < 0.66:  # odd bytes: any octet, including dots, zero, 0xff, Latin-1 capitals
        raw = bytes(rng.choice([0, 0x2E, 0xFF, 0xC9, 0x41, 0x7F, rng.randrange(256)])
                    for _ in range(rng.randint(1, 12)))
        return bytes([len(raw)]) + raw + apex
    if kind < 0.74:  # dots inside labels: not label boundaries
        text = rng.choice(["py.jit.test", "jit.test", "hello.jit", "a.b", "hello.jit.test"])
        rest = rng.choice([b"\0", apex])
        return _label(text, rng) + rest
    if kind < 0.84:
        return wire_name(rng.choice(OUTSIDE), rng)
    # Long names: near and over the limits of 63 and 255 octets.
    out = b""
    for _ in range(rng.randint(1, 5)):
        n = rng.choice([63, 62, 60, 64, 40])
        out += bytes([n]) + bytes(rng.choice(b"abcXYZ") for _ in range(n))
    return out + apex


def opt_record(rng: random.Random) -> bytes:
    payload = rng.choice([0, 100, 511, 512, 600, 1232, 1400, 4096, 65535])
    version = 0 if rng.random() < 0.85 else rng.choice([1, 2, 255])
    flags = (0x8000 if rng.random() < 0.4 else 0) | (rng.randrange(0x8000) if rng.random() < 0.1 else 0)
    ext = 0 if rng.random() < 0.95 else rng.randrange(256)
    rdata = b""
    choice = rng.random()
    if choice < 0.1:
        rdata = struct.pack("!HH", 10, 8) + rng.randbytes(8)  # a client cookie
    elif choice < 0.15:
        rdata = struct.pack("!HH", 12, 20) + bytes(20)  # padding
    elif choice < 0.2:
        rdata = struct.pack("!HH", 10, 9) + rng.randbytes(8)  # runs past the OPT's data
    elif choice < 0.22:
        rdata = b"\x00\x0a"
    elif choice < 0.28:  # a client cookie and a server cookie that is not the server's
        rdata = struct.pack("!HH", 10, 24) + rng.randbytes(8) + b"\x01\0\0\0" + rng.randbytes(12)
    elif choice < 0.31:  # a whole COOKIE option of a length RFC 7873 forbids
        n = rng.choice([0, 7, 9, 15, 41])
        rdata = struct.pack("!HH", 10, n) + rng.randbytes(n)
    owner = b"\0" if rng.random() < 0.95 else rng.choice([b"\xc0\x0c", b"\x01a\0"])
    return owner + struct.pack("!HHIH", 41, payload, (ext << 24) | (version << 16) | flags,
                               len(rdata)) + rdata


def a_record(rng: random.Random) -> bytes:
    return b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + rng.randbytes(4)


def random_query(rng: random.Random, ident: int) -> bytes:
    """One query with ID ``ident``; about a quarter of them malformed in some way."""
    flags = 0x0100 if rng.random() < 0.6 else 0
    if rng.random() < 0.1:
        flags |= rng.choice([0x0400, 0x0200, 0x0080, 0x0040, 0x0020, 0x0010, 0x07F0])
    if rng.random() < 0.08:
        flags |= rng.randint(1, 15) << 11
    if rng.random() < 0.02:
        flags |= rng.randint(1, 15)  # an RCODE in a query
    if rng.random() < 0.02:
        flags |= 0x8000  # a response: never answered
    question = random_name(rng) + struct.pack("!HH", rng.choice(TYPES), rng.choice(CLASSES))
    qd, an, ns, ar = 1, 0, 0, 0
    body = question
    if rng.random() < 0.4:
        body += opt_record(rng)
        ar = 1
    shape = rng.random()
    if shape < 0.03:
        qd, body = 0, body[len(question):]
    elif shape < 0.05:
        qd, body = 2, question + body
    elif shape < 0.07:
        an, body = 1, question + a_record(rng) + body[len(question):]
    elif shape < 0.09:
        ns, body = 1, question + opt_record(rng) + body[len(question):]
    elif shape < 0.11:
        ar, body = ar + 1, body + rng.choice([opt_record(rng), a_record(rng)])
    elif shape < 0.13:
        ar += 1  # a count larger than the message
    elif shape < 0.15:
        body = rng.choice([b"\xc0\x0c", b"\xc0\x03", b"\x03abc\xc0\x0c"]) + struct.pack("!HH", 1, 1)
    elif shape < 0.18:
        body += rng.randbytes(rng.randint(1, 30))  # trailing bytes
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar) + body


def tsig_record(rng: random.Random) -> bytes:
    """A TSIG record (RFC 8945 4.2), mostly well-formed: names in mixed case, compressed
    now and then; MACs of several sizes; other data; sometimes of the wrong class or TTL, or
    with a data length one off."""
    key = rng.choice([wire_name(rng.choice(["key.example", "tsig-key.jit.test", "k"]), rng),
                      b"\xc0\x0c"])
    algorithm = rng.choice([wire_name(rng.choice(["hmac-sha256", "hmac-sha1", "gss-tsig",
                                                  "hmac-md5.sig-alg.reg.int"]), rng), b"\xc0\x0c"])
    mac = rng.randbytes(rng.choice([0, 16, 20, 32, 64]))
    other = b"" if rng.random() < 0.8 else rng.randbytes(6)
    original_id = rng.randrange(65536)
    error = 0 if rng.random() < 0.9 else rng.choice([16, 17, 18])
    rdata = (algorithm + struct.pack("!HIH", rng.randrange(65536), rng.randrange(2**32),
                                     rng.choice([300, 0, 65535]))
             + struct.pack("!H", len(mac)) + mac + struct.pack("!HHH", original_id, error, len(other))
             + other)
    rclass = 255 if rng.random() < 0.93 else rng.choice([1, 254])
    ttl = 0 if rng.random() < 0.95 else 1
    length = len(rdata) + (0 if rng.random() < 0.93 else rng.choice([-1, 1]))
    return key + struct.pack("!HHIH", 250, rclass, ttl, length) + rdata + (
        rng.randbytes(1) if length > len(rdata) else b"")


def random_tsig_query(rng: random.Random, ident: int) -> bytes:
    """One query signed with a key nobody has (about one in six malformed in some way)."""
    flags = 0x0100 if rng.random() < 0.6 else 0
    if rng.random() < 0.1:
        flags |= rng.choice([0x0400, 0x0200, 0x0080, 0x0040, 0x0020, 0x0010])
    if rng.random() < 0.06:
        flags |= rng.choice([1, 2, 5]) << 11
    if rng.random() < 0.02:
        flags |= rng.randint(1, 15)
    question = random_name(rng) + struct.pack("!HH", rng.choice(TYPES), rng.choice(CLASSES))
    qd, ar = 1, 1
    opt = b""
    if rng.random() < 0.4:
        opt, ar = opt_record(rng), 2
    tsig = tsig_record(rng)
    body = question + opt + tsig
    shape = rng.random()
    if shape < 0.04:
        body, ar = question + tsig + opt_record(rng), ar + (0 if opt else 1)  # not the last
        if opt:
            body = question + tsig + opt
    elif shape < 0.06:
        body, ar = body + tsig_record(rng), ar + 1  # two
    elif shape < 0.08:
        qd, body = 0, opt + tsig
    elif shape < 0.1:
        body += rng.randbytes(rng.randint(1, 8))  # trailing bytes
    return struct.pack("!HHHHHH", ident, flags, qd, 0, 0, ar) + body
