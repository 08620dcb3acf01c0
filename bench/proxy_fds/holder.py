#!/usr/bin/env python3
"""A backend for bench/proxy_fds: one thread, epoll, echoes whatever each connection sends
and holds any number of idle connections (up to its open file limit, raised to the hard one).

    python3 holder.py --address 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import resource
import selectors
import signal
import socket
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = selectors.EpollSelector()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.address, args.port))
    srv.listen(4096)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    print(f"holder listening on {args.address}:{args.port}", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is srv:
                while True:
                    try:
                        conn, _ = srv.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # EMFILE: leave the rest in the backlog
                        print(f"accept: {exc}", flush=True)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.send(data)  # the benchmark sends a byte at a time
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


if __name__ == "__main__":
    sys.exit(main())
