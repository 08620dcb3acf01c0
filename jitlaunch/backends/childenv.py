"""The environment a process the daemon starts (a process instance, QEMU) begins with: never
the daemon's own, which may carry its secrets (tokens, credentials), its systemd channel
(``NOTIFY_SOCKET``, ``LISTEN_FDS``) and its user's ``HOME``.

A child gets ``PATH`` (:data:`DEFAULT_PATH`, systemd's for services) and the host's locale
and time zone as the daemon has them (``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``); the caller
adds what is the child's own (its user's ``HOME``, ``USER``, ``LOGNAME``, a service's
``environment``, the instance marker).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: The ``PATH`` a child gets unless its service sets one (systemd's default for services).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables of the daemon's environment that describe the host, not the daemon: kept.
HOST_VARS = ("LANG", "LANGUAGE", "TZ")


def child_environment(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """A fresh environment for a child: ``PATH`` and the locale and time zone of ``source``
    (the daemon's environment by default), nothing else of it."""
    source = os.environ if source is None else source
    env = {"PATH": DEFAULT_PATH}
    env.update({k: v for k, v in source.items() if k in HOST_VARS or k.startswith("LC_")})
    return env
