#!/usr/bin/env python3
"""The proxy benchmark's backend: a small threaded TCP server (stdlib only).

    python3 bench/proxy/backend.py --address 127.0.0.1 --port 9000

Each connection starts with a one-byte command:

* ``S`` + 8-byte big-endian N: the server sends N bytes (source).
* ``R`` + 8-byte N: the server reads N bytes (sink), then sends back the count as 8 bytes.
* ``E``: echo: everything received is sent back at once, until EOF.

Nothing relies on half-closes (systemd-socket-proxyd closes both ways on the first EOF).
Every socket has TCP_NODELAY set. SIGTERM exits at once.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading

BLOCK = bytes(1 << 20)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return data


def serve(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmd = recv_exact(conn, 1)
        if cmd == b"S":
            (size,) = struct.unpack("!Q", recv_exact(conn, 8))
            view = memoryview(BLOCK)
            while size > 0:
                n = min(size, len(BLOCK))
                conn.sendall(view[:n])
                size -= n
            while conn.recv(65536):  # wait for the client to close
                pass
        elif cmd == b"R":
            (size,) = struct.unpack("!Q", recv_exact(conn, 8))
            buf = bytearray(1 << 20)
            total = 0
            while total < size and (n := conn.recv_into(buf, min(len(buf), size - total))):
                total += n
            conn.sendall(struct.pack("!Q", total))
        elif cmd == b"E":
            while data := conn.recv(65536):
                conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description="bench backend: source, sink and echo")
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.address, args.port))
    srv.listen(128)
    print(f"backend listening on {args.address}:{args.port}", flush=True)
    try:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
