"""Backends by name. Each backend module exposes ``STOP_MODES`` and ``parse_settings`` (cheap,
no heavy imports) and a Backend class; heavy dependencies (libvirt) are imported lazily."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from ..config import Config, SettingsParser, Table
from .base import Backend, Handle, probe_tcp

__all__ = ["SETTINGS", "Backend", "Handle", "create_backends", "probe_tcp"]

_MODULES = {
    "process": "jitlaunch.backends.process",
    "qemu": "jitlaunch.backends.qemu",
    "libvirt": "jitlaunch.backends.libvirt",
    "podman": "jitlaunch.backends.podman",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


@dataclass(frozen=True)
class _Settings:
    """A backend's settings parser (:class:`~jitlaunch.config.SettingsParser`), importing the
    backend module only when first used."""

    name: str

    @property
    def stop_modes(self) -> tuple[str, ...]:
        modes: tuple[str, ...] = _module(self.name).STOP_MODES
        return modes

    def parse_settings(self, table: Table, base_dir: Path, ports: tuple[int, ...]) -> Any:
        return _module(self.name).parse_settings(table, base_dir, ports)

    def parse_top(self, table: Table) -> Mapping[str, Any] | None:
        """The global ``[<backend>]`` table's defaults, None if the backend has none."""
        parse = getattr(_module(self.name), "parse_top", None)
        return None if parse is None else parse(table)


#: The settings parsers by backend name, for :func:`jitlaunch.config.parse_config`.
SETTINGS: Mapping[str, SettingsParser] = MappingProxyType({n: _Settings(n) for n in _MODULES})


def create_backends(config: Config) -> dict[str, Backend]:
    """One backend object for each backend the configuration uses."""
    from .process import ProcessBackend

    backends: dict[str, Backend] = {}
    used = {s.backend for s in config.services}
    if "process" in used:
        backends["process"] = ProcessBackend(config.daemon.state_dir)
    if "qemu" in used:
        from .qemu import QemuBackend

        qemu_services = [s for s in config.services if s.backend == "qemu"]
        backends["qemu"] = QemuBackend(config.daemon.state_dir, qemu_services)
    if "libvirt" in used:
        from .libvirt.backend import LibvirtBackend

        libvirt_services = [s for s in config.services if s.backend == "libvirt"]
        backends["libvirt"] = LibvirtBackend(config.daemon.state_dir, libvirt_services)
    if "podman" in used:
        from .podman import PodmanBackend

        podman_services = [s for s in config.services if s.backend == "podman"]
        backends["podman"] = PodmanBackend(config.daemon.state_dir, podman_services)
    return backends
