"""The command line: ``jitlaunch run``, ``check``, ``probe``, and ``status``, ``start``,
``stop``, ``reload`` (which talk to a running daemon over its control socket, see control.py).

Exit status: 0 on success, 1 when the daemon or the probe fails at run time, 2 for bad input
(command line or configuration). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .backends import SETTINGS
from .config import Config, Endpoint, load_config
from .errors import ConfigError, JitlaunchError
from .fdlimit import raise_nofile_limit

log = logging.getLogger("jitlaunch")


def _fail(message: str, status: int) -> int:
    print(f"jitlaunch: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("status", "start", "stop", "reload"):
            status = _control(args)
        elif args.command == "check":
            status = _check(args.file, host=not args.config_only)
        elif args.command == "probe":
            from .probe import run_probe

            return run_probe(args)
        else:
            return _run(args.config, args.log_level)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (`jitlaunch status | head -1`): point stdout at
        # /dev/null so the flush at exit cannot fail again, and end as SIGPIPE would have.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: every command and option, each with its help text."""
    parser = argparse.ArgumentParser(
        prog="jitlaunch", description="Authoritative DNS that starts services on demand."
    )
    parser.add_argument("--version", action="version", version=f"jitlaunch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", metavar="FILE", help="config file (default: the built-in one)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="log at this level (default: daemon.log_level of the config)")

    check = sub.add_parser("check", help="validate a config file and print a summary")
    check.add_argument("file", metavar="FILE", help="the config file to check")
    check.add_argument("--config-only", action="store_true",
                       help="check the configuration only, not this host (files, users, "
                       "/dev/kvm, ports): for a config written for another machine")

    probe = sub.add_parser(
        "probe", help="resolve NAME, connect, send GET and print the DNS, connect and "
        "first-byte times"
    )
    probe.add_argument("name", metavar="NAME", help="the service name to look up")
    probe.add_argument("--server", required=True, metavar="HOST:PORT",
                       help="the DNS server to ask: an address ([ADDR]:PORT for IPv6) or a "
                       "host name, and its port")
    probe.add_argument("--port", type=int, default=8080,
                       help="TCP port to connect to (default 8080, as the default config serves)")
    probe.add_argument("--path", default="/", help="HTTP path to get (default /)")
    probe.add_argument("--timeout", type=float, default=10.0,
                       help="seconds each phase (DNS, connect, first byte) may take (default 10)")
    probe.add_argument("--tcp", action="store_true", help="ask over TCP instead of UDP")
    probe.add_argument("--ipv6", action="store_true", help="ask for AAAA instead of A")

    _add_control_commands(sub)
    return parser


def _add_control_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = (
        "the control socket (default: the first that exists of control.sock in the state "
        "directory of --config, in $RUNTIME_DIRECTORY, and /run/jitlaunch/control.sock)"
    )
    status = sub.add_parser("status", help="show the running daemon's services and instances")
    start = sub.add_parser("start", help="start a service's instance and wait until it is ready")
    stop = sub.add_parser("stop", help="stop a service's instance now, in its stop mode")
    reload = sub.add_parser(
        "reload", help="make the daemon re-read its config file (exit status 1 if it rejects it)")
    for command in (start, stop):
        command.add_argument("service", metavar="SERVICE", help="the service's name")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    for command in (status, start, stop, reload):
        command.add_argument("--socket", metavar="PATH", help=where)
        command.add_argument("--config", "-c", metavar="FILE",
                             help="the daemon's config file, to find its state directory (not "
                             "needed, and not read when it has an error, where a runtime or "
                             "system socket exists)")


def _control(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .controlproto import ControlError, call, client_socket, format_status

    try:
        path = Path(args.socket) if args.socket else client_socket(args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    request = {"command": args.command}
    if args.command not in ("status", "reload"):
        request["service"] = args.service
    try:
        reply = call(path, request)
    except ControlError as exc:
        return _fail(str(exc), 1)
    if not reply.get("ok"):
        return _fail(str(reply.get("error")), 2 if reply.get("kind") == "bad-request" else 1)
    if args.command == "status":
        print(json.dumps(reply, indent=2) if args.json else format_status(reply))
    elif args.command == "reload":
        print(f"reloaded: {reply.get('summary')}")
    elif args.command == "start":
        inst = reply.get("instance") or {}
        print(f"{inst.get('label')} {inst.get('state')}"
              + (f" at {inst['address']}" if inst.get("address") else ""))
    else:
        stopped = reply.get("stopped")
        print(f"{stopped} {reply.get('state')}" if stopped else f"{args.service}: no instance running")
    return 0


def _check(path: str, *, host: bool = True) -> int:
    try:
        config = load_config(path, backends=SETTINGS)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .checks import deployment_warnings, host_findings, shared_subnet_warnings

    findings = host_findings(config) if host else []
    errors = [f for f in findings if f.error]
    if not errors:
        print(summary(config))
    for f in findings:
        print(f"jitlaunch: {'error' if f.error else 'warning'}: {f.text(config.path)}",
              file=sys.stderr)
    for warning in shared_subnet_warnings(config) + deployment_warnings(config):
        print(f"jitlaunch: warning: {warning}", file=sys.stderr)
    return 2 if errors else 0


def summary(config: Config) -> str:
    """A human-readable summary of a valid configuration."""
    dns = config.dns
    lines = [
        f"{config.path}: OK",
        f"dns: {', '.join(str(e) for e in dns.listen)} (UDP and TCP), zones "
        f"{', '.join(z.name for z in dns.zones)}, ttl {dns.ttl} s, booting ttl {dns.booting_ttl} s",
        f"state: {config.daemon.state_dir}",
        _host_line(config),
        f"{len(config.services)} service(s):",
    ]
    for s in config.services:
        fronts = ", ".join(
            str(Endpoint(a, p)) for a in s.front for p in s.ports
        )
        lines.append(
            f"  {s.name}: {', '.join(s.names)} -> {fronts}; {s.backend} backend, answer "
            f"{s.answer}, idle {s.idle_timeout:g} s, boot {s.boot_timeout:g} s, stop {s.stop}, "
            f"max {s.max_instances}{', pinned' if s.pinned else ''}"
            f"{f', priority {s.priority}' if s.priority else ''}"
            f"{f', user {user}' if (user := getattr(s.settings, 'user', None)) is not None else ''}"
        )
    return "\n".join(lines)


def _host_line(config: Config) -> str:
    from .lifecycle.runtime import host_budget, read_host

    host = config.host
    budget = host_budget(host, *read_host())
    derived = [k for k in ("max_instances", "memory", "max_booting") if getattr(host, k) is None]
    wake = host.wake
    limit = (f"{wake.rate:g}/s, burst {wake.burst} per /{wake.ipv4_prefix} and "
             f"/{wake.ipv6_prefix}" if wake.rate else "off")
    return (f"host: {budget}{' (' + ', '.join(derived) + ' from this machine)' if derived else ''}"
            f"; queue {host.max_queued}, queue_timeout {host.queue_timeout:g} s; wake limit {limit}")


def _run(path: str | None, level: str | None) -> int:
    try:  # a regular file only: a FIFO would block here, and again at every reload
        config = load_config(path, backends=SETTINGS, regular_only=True)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    logging.basicConfig(
        level=getattr(logging, (level or config.daemon.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("jitlaunch %s starting with %s", __version__, config.path)
    from .checks import host_findings

    # What `jitlaunch check` says, once (the daemon refuses an unsafe state dir itself).
    for f in host_findings(config, ports=False, state_dir=False):
        (log.error if f.error else log.warning)("check: %s", f.text(config.path))
    raise_nofile_limit()
    try:
        trio.run(_serve, config)
    except (JitlaunchError, BaseExceptionGroup) as exc:
        error = _ours(exc)
        if error is None:
            raise
        return _fail(str(error), 1)
    return 0


def _ours(exc: BaseException) -> JitlaunchError | None:
    """Our own error inside a (possibly nested) exception group, if that is all it holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, JitlaunchError) else None


#: Every signal the daemon handles; none of them may end it with its instances orphaned.
#: SIGINT, SIGTERM: orderly stop (a second one: at once). SIGQUIT: stop at once. SIGHUP:
#: reload the config file (Daemon.reload). SIGUSR1: one status line per service. SIGUSR2:
#: logged and ignored.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
           signal.SIGUSR2)


async def _serve(config: Config) -> None:
    from .daemon import Daemon

    daemon = Daemon(config)
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        nursery.start_soon(daemon.reload_on_signal)
                    elif signum == signal.SIGUSR1:
                        for line in daemon.supervisor.status_lines():
                            log.info("status: %s", line)
                    elif signum == signal.SIGUSR2:
                        log.info("SIGUSR2: ignored")
                    elif daemon.stopping or signum == signal.SIGQUIT:
                        log.warning("%s%s: stopping every instance at once, then exiting", name,
                                    " again" if daemon.stopping else "")
                        nursery.cancel_scope.cancel()
                        return
                    else:
                        log.info("%s: draining open connections for up to %g s "
                                 "(daemon.drain_timeout), then stopping every instance and "
                                 "exiting; another %s stops at once", name,
                                 daemon.config.daemon.drain_timeout, name)
                        daemon.stop()

            nursery.start_soon(on_signals)
            await daemon.serve()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
