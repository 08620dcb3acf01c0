"""What marks a thing on the host (a cgroup, a tap, a libvirt domain) as one state
directory's: the directory's identity.

A daemon owns its state directory (it holds the directory's lock), so what carries the
directory's identity is its own to sweep after a crash, and nothing else is. The identity is
compared whole, never as a prefix: ``/srv/jl`` must not claim what ``/srv/jl:b`` or
``/srv/jl2`` made.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def state_id(state_dir: Path) -> str:
    """The identity of a state directory in names: 8 hex digits of a hash of its resolved
    path. Fixed length and hex only, so in a name such as ``jl-<id>-web`` it ends where the
    next separator starts, and one identity is never a prefix of another."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
