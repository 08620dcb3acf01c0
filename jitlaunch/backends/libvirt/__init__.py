"""The libvirt backend: transient domains through libvirt-python (imported only when a
service uses this backend). See :mod:`.backend`; the domain XML is built in :mod:`.xml`
(pure), the connection, its worker threads and events are in :mod:`.conn`."""

from __future__ import annotations

from .settings import STOP_MODES, LibvirtSettings, parse_settings, parse_top

__all__ = ["STOP_MODES", "LibvirtSettings", "parse_settings", "parse_top"]
