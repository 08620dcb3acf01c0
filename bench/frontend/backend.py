#!/usr/bin/env python3
"""The frontend benchmark's backend: bench/proxy/backend.py's source, sink and echo, each
after a preamble it skips, so that a router in front of it can pick it by name.

    python3 bench/frontend/backend.py --mode host --address 127.0.0.1 --port 9000

``--mode host``: the preamble is an HTTP/1.1 request head (up to its empty line);
``--mode sni``: one TLS record (a ClientHello, 5-byte header and its length). Then one
command byte and its arguments, as in bench/proxy/backend.py.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))

from backend import recv_exact, serve


def skip_preamble(conn: socket.socket, mode: str) -> None:
    if mode == "sni":
        (length,) = struct.unpack("!H", recv_exact(conn, 5)[3:5])
        recv_exact(conn, length)
        return
    seen = b""
    while True:  # peek for the end of the head, then take exactly the head
        data = conn.recv(4096, socket.MSG_PEEK)
        if not data or len(data) == len(seen):
            raise ConnectionError("no request head")
        seen = data
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            recv_exact(conn, end + 4)
            return


def handle(conn: socket.socket, mode: str) -> None:
    try:
        skip_preamble(conn, mode)
    except OSError:
        conn.close()
        return
    serve(conn)


def main() -> int:
    ap = argparse.ArgumentParser(description="frontend bench backend")
    ap.add_argument("--mode", choices=("host", "sni"), required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket(socket.AF_INET6 if ":" in args.address else socket.AF_INET)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.address, args.port))
    srv.listen(1024)
    try:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn, args.mode), daemon=True).start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
