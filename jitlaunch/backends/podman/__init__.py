"""The podman backend: a container image as an instance (:mod:`.backend`)."""

from __future__ import annotations

from .backend import STOP_MODES, PodmanBackend, PodmanHandle
from .settings import PodmanSettings, parse_settings

__all__ = ["STOP_MODES", "PodmanBackend", "PodmanHandle", "PodmanSettings", "parse_settings"]
