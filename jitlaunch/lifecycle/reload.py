"""The reload plan: what changes between the running configuration and a new one. Pure.

:func:`plan_reload` compares two parsed configs and says what a reload would do; the daemon
applies it (daemon.py), or refuses the whole reload when :attr:`ReloadPlan.restart` is not
empty. The rules, which the README's configuration reference repeats key by key:

* Services are matched by name. A service is *added*, *removed*, *changed*
  (``ServiceConfig`` not equal) or *unchanged*. Unchanged services are not touched at all.
* A changed service's running instance carries on with the settings it was started with
  (its backend and backend settings, stop mode, health checks, boot timeout) until it stops
  (idle, ``jitlaunch stop``, died); the next instance uses the new ones. The service-level
  keys (names, answer, ttl, booting_ttl, front, idle_timeout, pinned, priority,
  retry_backoff, retry_backoff_max, max_instances) take effect at once. Exception: when
  ``backend`` or ``ports`` changed, the running instance cannot serve the new fronts, so it
  is *replaced*: stopped at once (reason ``reload``), and the next request starts a new one.
* Every other key takes effect at once, except the keys in :data:`RESTART_KEYS` and these
  service changes, which need what the daemon sets up only when it starts: a backend other
  than ``process`` that no running service uses yet; a warm pool (``pool`` > 0) on a service
  that is added, removed or changed; a qemu service on ``network = "bridge"`` when no qemu
  service used the bridge; a libvirt ``uri`` that no libvirt service used; dropping a front
  that systemd passed (socket activation: systemd would go on listening there, and nobody
  would accept). Each of them makes the reload fail with a message naming the key; the
  running config stays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..config import Config, ServiceConfig

#: Keys that only a restart changes: sockets bound and files set up once at start.
RESTART_KEYS = (
    "daemon.state_dir",  # the lock, the instances' files and logs live there
    "daemon.control_group",  # the control socket is chowned once
    "daemon.instance_log_max",  # the log-cap task runs with it
    "dns.listen",  # DNS sockets (maybe systemd's): rebinding would drop queries
    "metrics.listen",
)
#: Service keys whose change makes the running instance useless for the new fronts.
REPLACING_KEYS = ("backend", "ports")
#: ServiceConfig fields that are derived from others, never reported.
_DERIVED = ("extra_names",)


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Changed services, each with the keys that changed (``process.command``, ``ttl``).
    changed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Changed services whose running instance is stopped at once (see REPLACING_KEYS).
    replaced: tuple[str, ...] = ()
    #: Keys outside ``[[service]]`` that changed and take effect at once (``dns.zones``).
    at_once: tuple[str, ...] = ()
    #: Why the reload must be refused: one line per key that needs a restart.
    restart: tuple[str, ...] = ()
    #: Front ``(address, port)`` pairs to bind, and to close.
    fronts_added: tuple[tuple[str, int], ...] = ()
    fronts_removed: tuple[tuple[str, int], ...] = ()

    @property
    def rejected(self) -> bool:
        return bool(self.restart)

    @property
    def changed_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.changed)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.at_once)

    def error(self) -> str:
        """The refusal, one line: every key that needs a restart."""
        return "these keys change only with a restart: " + "; ".join(self.restart)

    def summary(self) -> str:
        """One line for the log, ``STATUS=`` and ``jitlaunch reload``."""
        if self.empty:
            return "no changes"
        parts = []
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed))
        for name, keys in self.changed:
            how = " (instance replaced)" if name in self.replaced else ""
            parts.append(f"changed {name}: {', '.join(keys)}{how}")
        if self.at_once:
            parts.append("changed " + ", ".join(self.at_once))
        return "; ".join(parts)


def diff(prefix: str, old: Any, new: Any) -> list[str]:
    """The dotted names of the fields that differ between two dataclass values (nested
    dataclasses are compared field by field, anything else as a whole)."""
    if old == new:
        return []
    if not (dataclasses.is_dataclass(old) and type(old) is type(new)):
        return [prefix.rstrip(".")]
    out: list[str] = []
    for f in dataclasses.fields(old):
        if f.name in _DERIVED:
            continue
        out += diff(f"{prefix}{f.name}.", getattr(old, f.name), getattr(new, f.name))
    return out


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _lookup(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _service_diff(old: ServiceConfig, new: ServiceConfig) -> tuple[str, ...]:
    keys = []
    for key in diff("", old, new):
        if key.startswith("settings.") or key == "settings":
            rest = key.removeprefix("settings").lstrip(".")
            key = f"{new.backend}.{rest}" if rest else f"{new.backend} settings"
        keys.append(key)
    return tuple(keys)


def _pool(svc: ServiceConfig) -> int:
    return int(getattr(svc.settings, "pool", 0) or 0)


def _service_restart(
    old: Config, name: str, before: ServiceConfig | None, after: ServiceConfig | None,
    running_backends: Collection[str],
) -> list[str]:
    """Why adding, removing or changing service ``name`` needs a restart (empty: it does not)."""
    why = []
    for svc in (before, after):
        if svc is not None and _pool(svc):
            what = "added" if before is None else "removed" if after is None else "changed"
            why.append(
                f"service {name!r}: {svc.backend}.pool = {_pool(svc)}: a service with a warm "
                f"pool cannot be {what} by a reload (the pool is set up at start)"
            )
            break
    if after is None:
        return why
    if after.backend != "process" and after.backend not in running_backends:
        why.append(
            f"service {name!r}: backend = {after.backend!r}: no running service uses the "
            f"{after.backend} backend yet, and it is set up at start"
        )
    olds = [s for s in old.services if s.backend == after.backend]
    if after.backend == "qemu" and getattr(after.settings, "network", "user") == "bridge" and \
            not any(getattr(s.settings, "network", "") == "bridge" for s in olds):
        why.append(
            f"service {name!r}: qemu.network = 'bridge': no running qemu service uses the "
            "bridge, which is set up at start"
        )
    if after.backend == "libvirt":
        uri = getattr(after.settings, "uri", None)
        if uri not in {getattr(s.settings, "uri", None) for s in olds}:
            why.append(
                f"service {name!r}: libvirt.uri = {uri!r}: no running libvirt service uses "
                "this connection, which is opened at start"
            )
    return why


def _fronts(config: Config) -> set[tuple[str, int]]:
    return {(a, p) for s in config.services for a in s.front for p in s.ports}


def plan_reload(
    old: Config, new: Config, running_backends: Collection[str] = (),
    passed_fronts: Collection[tuple[str, int]] = (),
) -> ReloadPlan:
    """What reloading from ``old`` (running) to ``new`` does. ``running_backends`` names the
    backends the daemon runs now, ``passed_fronts`` the front ``(address, port)`` pairs
    systemd passed. Never raises for a valid pair of configs; a reload that cannot be done
    has :attr:`ReloadPlan.restart` set."""
    restart: list[str] = []
    at_once: list[str] = []
    for table in ("daemon", "dns", "proxy", "metrics", "host"):
        for key in diff(f"{table}.", getattr(old, table), getattr(new, table)):
            if key in RESTART_KEYS:
                restart.append(
                    f"{key} ({_show(_lookup(old, key))} -> {_show(_lookup(new, key))})"
                )
            else:
                at_once.append(key)
    olds = {s.name: s for s in old.services}
    news = {s.name: s for s in new.services}
    added, removed, unchanged, replaced = [], [], [], []
    changed: list[tuple[str, tuple[str, ...]]] = []
    for name, svc in news.items():
        before = olds.get(name)
        if before is None:
            added.append(name)
            restart += _service_restart(old, name, None, svc, running_backends)
        elif before == svc:
            unchanged.append(name)
        else:
            keys = _service_diff(before, svc)
            changed.append((name, keys))
            restart += _service_restart(old, name, before, svc, running_backends)
            if any(k in REPLACING_KEYS for k in keys):
                replaced.append(name)
    for name, svc in olds.items():
        if name not in news:
            removed.append(name)
            restart += _service_restart(old, name, svc, None, running_backends)
    before_fronts, after_fronts = _fronts(old), _fronts(new)
    for addr, port in sorted((before_fronts - after_fronts) & set(passed_fronts)):
        owner = next(s.name for s in old.services if addr in s.front and port in s.ports)
        restart.append(
            f"service {owner!r}: front {addr} port {port} was passed by systemd (socket "
            "activation): dropping it needs a restart, with the socket unit changed too"
        )
    return ReloadPlan(
        added=tuple(added), removed=tuple(removed), changed=tuple(changed),
        unchanged=tuple(unchanged), replaced=tuple(replaced), at_once=tuple(at_once),
        restart=tuple(restart),
        fronts_added=tuple(sorted(after_fronts - before_fronts)),
        fronts_removed=tuple(sorted(before_fronts - after_fronts)),
    )


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``ok`` and a one-line summary, or not and why (the error)."""

    ok: bool
    message: str
    plan: ReloadPlan | None = None
