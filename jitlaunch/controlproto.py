"""The control socket's protocol (version 1), without I/O but the client's one call.

One JSON object per line each way. A request is ``{"version": 1, "command": C}`` with C one
of :data:`COMMANDS`, and ``"service": NAME`` for ``start`` and ``stop``. A reply has
``"ok": true`` and the command's fields, or ``"ok": false``, a ``kind`` (``bad-request``,
``refused``, ``failed``, ``internal``) and an ``error`` message. :func:`parse_request` never
raises anything but BadRequest; :func:`format_status` turns a ``status`` reply into the
lines ``jitlaunch status`` prints.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Endpoint
from .errors import ConfigError, JitlaunchError
from .lifecycle.status import InstanceStatus, SupervisorStatus

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"
COMMANDS = ("status", "start", "stop", "reload")


class ControlError(JitlaunchError):
    """The control socket could not be reached, or the daemon's reply made no sense."""




@dataclass(frozen=True)
class Request:
    command: str
    service: str | None = None


class BadRequest(Exception):
    """A request line that is not a valid request; the message says why."""


def parse_request(line: bytes, services: Collection[str]) -> Request:
    """One request line into a Request; BadRequest (never anything else) if it is not one."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"not a JSON document: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("expected a JSON object such as {\"version\": 1, \"command\": \"status\"}")
    version = doc.get("version")
    if version is None:
        raise BadRequest("missing \"version\" (this daemon speaks version 1)")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise BadRequest(f"unsupported version {version!r} (this daemon speaks version 1)")
    command = doc.get("command")
    if command not in COMMANDS:
        raise BadRequest(f"unknown command {command!r} (expected one of {', '.join(COMMANDS)})")
    unknown = sorted(set(doc) - {"version", "command", "service"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    if command in ("status", "reload"):
        if "service" in doc:
            raise BadRequest(f"{command} takes no service")
        return Request(command)
    service = doc.get("service")
    if not isinstance(service, str):
        raise BadRequest(f"{command} needs \"service\": the name of a service")
    if service not in services:
        known = ", ".join(sorted(services)) or "none"
        raise BadRequest(f"unknown service {service[:64]!r} (services: {known})")
    return Request(command, service)


def error_reply(kind: str, message: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": False, "kind": kind, "error": message}


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": True, **fields}


def _age(now: float, then: float) -> float | None:
    return round(now - then, 3) if math.isfinite(then) else None


def describe_instance(inst: InstanceStatus, now: float) -> dict[str, Any]:
    boot = inst.boot_time
    return {
        "label": inst.label,
        "state": inst.shown,
        "pid": inst.pid,
        "address": inst.address,
        "uptime": _age(now, inst.started_at),
        "boot_time": round(boot, 3) if math.isfinite(boot) else None,
    }


def status_report(status: SupervisorStatus, config_path: object, now: float) -> dict[str, Any]:
    """The ``status`` reply: every service, its instance and its counters."""
    services = []
    for rt in status.services:
        svc = rt.config
        inst = rt.instance
        services.append({
            "name": svc.name,
            "backend": svc.backend,
            "answer": svc.answer,
            "names": list(svc.names),
            "fronts": [str(Endpoint(a, p)) for a in svc.front for p in svc.ports],
            "instance": describe_instance(inst, now) if inst is not None else None,
            "connections": rt.connections,
            "last_activity_age": _age(now, rt.last_activity),
            "last_failure": rt.last_error,
            "last_failure_age": _age(now, rt.last_error_at),
            "backoff": round(left, 3) if (left := rt.backing_off(now)) is not None else None,
            "boots": rt.boots,
            "boot_failures": rt.boot_failures,
            "deaths": rt.deaths,
            "idle_stops": rt.idle_stops,
            "removed": rt.removed,
        })
    return ok_reply(pid=os.getpid(), config=config_path, services=services)


# ---- the client -------------------------------------------------------------------------


def call(path: Path, request: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request, return the daemon's reply. Raises ControlError when the socket
    cannot be reached or the reply is not a reply."""
    line = json.dumps({"version": PROTOCOL_VERSION, **request}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except PermissionError:
        raise ControlError(
            f"permission denied on {path}: run as root or as a member of the daemon's "
            "control group (daemon.control_group)"
        ) from None
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is the daemon running?") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing listens on {path}: is the daemon running?") from None
    except TimeoutError:
        raise ControlError(f"no reply on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon on {path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"the daemon on {path} sent no valid reply ({data[:80]!r})")
    return reply


#: Where the packaged unit's daemon puts its control socket (RuntimeDirectory=jitlaunch).
SYSTEM_SOCKET = Path("/run/jitlaunch") / SOCKET_NAME


def client_socket(config_path: str | None, env: Mapping[str, str] | None = None,
                  system: Path = SYSTEM_SOCKET) -> Path:
    """The control socket a command-line client should use, the first that exists of: the
    one in the state directory of ``config_path`` (when a config is named and can be read),
    ``$RUNTIME_DIRECTORY/control.sock``, the system daemon's ``/run/jitlaunch/control.sock``;
    else the state directory's (of the built-in config when None), which the caller's
    connect then reports missing. A config that cannot be read is not needed when a runtime
    or system socket exists (a reload of a broken file is the daemon's to reject); else it
    raises ConfigError."""
    from .backends import SETTINGS
    from .config import load_config

    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    found = [p for p in ((Path(runtime) / SOCKET_NAME) if runtime else None, system)
             if p is not None and p.exists()]
    own: Path | None = None
    error: ConfigError | None = None
    if config_path is not None or not found:
        try:
            own = load_config(config_path, backends=SETTINGS).daemon.state_dir / SOCKET_NAME
        except ConfigError as exc:
            error = exc
    if own is not None and (own.exists() or not found):
        return own
    if found:
        return found[0]
    assert error is not None
    raise error


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.0f}h"


def format_status(reply: Mapping[str, Any]) -> str:
    """The ``status`` reply as a table for a person, one line per service."""
    head = ("SERVICE", "BACKEND", "STATE", "PID", "ADDRESS", "AGE", "IDLE", "BOOT", "CONNS",
            "LAST FAILURE")
    rows = [head]
    for svc in reply.get("services", []):
        inst = svc.get("instance") or {}
        failure = svc.get("last_failure")
        if failure:
            failure = f"{_seconds(svc.get('last_failure_age'))} ago: {failure}"
        name = str(svc.get("name")) + ("(removed)" if svc.get("removed") else "")
        rows.append((
            name, str(svc.get("backend")), inst.get("state", "stopped"),
            str(inst.get("pid") or "-"), inst.get("address") or "-", _seconds(inst.get("uptime")),
            _seconds(svc.get("last_activity_age")), _seconds(inst.get("boot_time")),
            str(svc.get("connections", 0)), failure or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)
