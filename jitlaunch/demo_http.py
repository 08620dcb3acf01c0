"""A tiny HTTP/1.1 responder for the default configuration's demo services.

``python -m jitlaunch.demo_http --address 127.77.1.1 --port 8080 --name hello`` serves
``GET /`` (a page naming the instance), ``/health`` (200) and 404 for anything else.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jitlaunch-demo-http")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="demo")
    args = parser.parse_args(argv)
    started = time.time()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "jitlaunch-demo"

        def do_GET(self) -> None:
            if self.path == "/":
                body = (
                    f"<!doctype html><title>{args.name}</title>\n"
                    f"<h1>Hello from {args.name}</h1>\n"
                    f"<p>pid {os.getpid()}, up {time.time() - started:.1f} s, "
                    f"listening on {args.address}:{args.port}</p>\n"
                ).encode()
                self._reply(200, "text/html; charset=utf-8", body)
            elif self.path == "/health":
                self._reply(200, "text/plain", b"ok\n")
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % a}\n")

    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((args.address, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{args.name}: listening on {args.address}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
