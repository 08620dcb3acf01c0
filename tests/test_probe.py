"""``jitlaunch probe``: the default port is the default config's, a failure names its phase and
the address, IPv6 servers work, bad input exits 2, a closed pipe ends it quietly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from jitlaunch.probe import (
    DEFAULT_PORT,
    EXIT_BROKEN_PIPE,
    ProbeError,
    ProbeInputError,
    fetch,
    resolve,
    split_server,
)

from .conftest import DEMO, ROOT, config_text, load, running

PROBE = [sys.executable, "-m", "jitlaunch.cli", "probe"]


def test_the_default_port_is_the_default_configs() -> None:
    text = (ROOT / "conf" / "default.toml").read_text()
    assert DEFAULT_PORT == 8080 and text.count("ports = [8080]") == 3


def test_split_server() -> None:
    assert split_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert split_server("[::1]:5353") == ("::1", 5353)
    assert split_server("localhost:5353") in (("127.0.0.1", 5353), ("::1", 5353))
    for bad in ("127.0.0.1", "::1:5353", "[127.0.0.1]:53", "1.2.3.4:0", "a..b:53",
                "1.2.3.4:70000", "[::1]", ":53", "1.2.3.4:x", "1.2.3.4:\u00b2"):
        with pytest.raises(ProbeInputError, match="--server: expected ADDR:PORT"):
            split_server(bad)
    with pytest.raises(ProbeError, match=r"--server: cannot resolve 'no-such-host\.invalid'"):
        split_server("no-such-host.invalid:53")


@pytest.mark.parametrize(("args", "error"), [
    (["--server", "[::1]"], "--server: expected ADDR:PORT or HOST:PORT such as 127.0.0.1:5300, "
     "[::1]:5300 or localhost:5300, got '[::1]'"),
    (["--server", "127.0.0.1:53", "--port", "70000"],
     "--port: expected a port from 1 to 65535, got 70000"),
    (["--server", "127.0.0.1:53", "--timeout", "-1"],
     "--timeout: expected a number of seconds above 0, got -1"),
    (["--server", "127.0.0.1:53", "--timeout", "nan"],
     "--timeout: expected a number of seconds above 0, got nan"),
])
def test_bad_input_exits_2(args: list[str], error: str) -> None:
    res = subprocess.run([*PROBE, "x.jit.test", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert (res.returncode, res.stderr) == (2, f"jitlaunch: probe: {error}\n")


@pytest.mark.parametrize("name", ["a" * 64 + ".jit.test", "a..jit.test", ("a" * 60 + ".") * 5])
def test_a_name_that_is_not_a_domain_name_exits_2(name: str) -> None:
    res = subprocess.run([*PROBE, name, "--server", "127.0.0.1:53"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == (
        2, f"jitlaunch: probe: NAME: expected a domain name, got {name!r}\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_dns_phase_failures_name_the_server(host: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as silent:
        silent.bind((host, 0))
        port = silent.getsockname()[1]
        at = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        start = time.monotonic()
        with pytest.raises(ProbeError) as info:
            resolve("x.jit.test", (host, port), timeout=0.2)
        assert str(info.value) == f"DNS: no answer from {at} over UDP within 0.2 s"
        assert time.monotonic() - start < 5
    # Nothing listens there any more: refused at once, not after the timeout.
    start = time.monotonic()
    with pytest.raises(ProbeError) as info:
        resolve("x.jit.test", (host, port), timeout=30)
    assert str(info.value) == (f"DNS: {at} refused the query over UDP (nothing listens there?)")
    assert time.monotonic() - start < 5
    with pytest.raises(ProbeError) as info:
        resolve("x.jit.test", (host, port), tcp=True, timeout=30)
    assert str(info.value) == f"DNS: {at} refused the query over TCP (nothing listens there?)"


def test_a_reply_dripped_byte_by_byte_is_bounded_by_the_timeout() -> None:
    """The rest of the reply is one phase of ``timeout`` seconds, not ``timeout`` per recv:
    a server that sends a byte every 0.1 s must not hold the probe for its whole reply."""
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def drip() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.wait(0.1):
                    try:
                        conn.sendall(b"x")
                    except OSError:
                        return

        t = threading.Thread(target=drip)
        t.start()
        start = time.monotonic()
        try:
            with pytest.raises(ProbeError) as info:
                fetch("x.jit.test", "127.0.0.1", port, timeout=0.5)
            assert str(info.value) == (
                f"reply: 127.0.0.1:{port} did not finish its reply within 0.5 s")
            assert time.monotonic() - start < 3
        finally:
            stop.set()
            t.join(5)


def test_dns_replies_with_another_id_do_not_extend_the_timeout() -> None:
    stop = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer_wrongly() -> None:
            server.settimeout(5)
            query, client = server.recvfrom(512)
            wrong = bytes([query[0] ^ 0xFF]) + query[1:]
            while not stop.wait(0.1):
                server.sendto(wrong, client)

        t = threading.Thread(target=answer_wrongly)
        t.start()
        start = time.monotonic()
        try:
            with pytest.raises(ProbeError) as info:
                resolve("x.jit.test", ("127.0.0.1", port), timeout=0.5)
            assert str(info.value) == f"DNS: no answer from 127.0.0.1:{port} over UDP within 0.5 s"
            assert time.monotonic() - start < 3
        finally:
            stop.set()
            t.join(5)


def test_connect_and_first_byte_failures_name_the_address() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        held: list[socket.socket] = []

        def accept_and_hold() -> None:
            conn, _ = listener.accept()
            held.append(conn)

        t = threading.Thread(target=accept_and_hold)
        t.start()
        try:
            with pytest.raises(ProbeError) as info:
                fetch("x.jit.test", "127.0.0.1", port, timeout=0.2)
            assert str(info.value) == f"first byte: 127.0.0.1:{port} sent nothing within 0.2 s"
        finally:
            t.join(5)
            for conn in held:
                conn.close()
    with pytest.raises(ProbeError) as info:
        fetch("x.jit.test", "127.0.0.1", port, timeout=5)
    assert str(info.value) == f"connect: 127.0.0.1:{port} refused the connection"


async def test_probe_against_a_daemon(tmp_path: Path, block: str) -> None:
    """The daemon on IPv4 and IPv6: a probe with the default port gets the reply; another
    port is refused with the address named; a closed stdout ends it with 141, quietly."""
    services = f"""
[[service]]
name = "py"
front = ["{block}.1"]
ports = [8080]
answer = "proxy"
[service.process]
command = "{DEMO}"
"""
    text = config_text(tmp_path, services).replace(
        'listen = ["127.0.0.1:0"]\nzones', 'listen = ["127.0.0.1:0", "[::1]:0"]\nzones')
    async with running(load(text)) as d:
        v4, v6 = (f"{e}" for e in d.dns_endpoints)
        assert v6.startswith("[::1]:")
        for server, extra in ((v4, []), (v6, []), (v6, ["--tcp"])):
            res = await trio.run_process([*PROBE, "py.jit.test", "--server", server, *extra],
                                         cwd=ROOT, capture_stdout=True, capture_stderr=True,
                                         check=False)
            out = res.stdout.decode()
            assert res.returncode == 0, res.stderr.decode()
            assert out.startswith(f"py.jit.test -> {block}.1 (ttl ")
            assert f"{block}.1:8080" in out and "HTTP/1.1 200 OK" in out
        refused = await trio.run_process(
            [*PROBE, "py.jit.test", "--server", v4, "--port", "9"], cwd=ROOT,
            capture_stdout=True, capture_stderr=True, check=False)
        assert refused.returncode == 1
        assert refused.stderr.decode() == (
            f"jitlaunch: probe: connect: {block}.1:9 refused the connection\n")
        # stdout a pipe whose reader is gone (as after `| head -1`).
        r, w = os.pipe()
        os.close(r)
        try:
            closed = await trio.run_process(
                [*PROBE, "py.jit.test", "--server", v4], cwd=ROOT, stdout=w,
                capture_stderr=True, check=False)
        finally:
            os.close(w)
        assert (closed.returncode, closed.stderr) == (EXIT_BROKEN_PIPE, b"")


def test_every_command_and_option_has_help_text() -> None:
    import argparse

    from jitlaunch.cli import build_parser

    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subs
    helped = {c.dest: c.help for c in subs[0]._choices_actions}
    for name, command in subs[0].choices.items():
        assert helped.get(name), f"{name} has no help"
        for action in command._actions:
            assert action.help, f"jitlaunch {name} {'/'.join(action.option_strings) or action.dest}"
