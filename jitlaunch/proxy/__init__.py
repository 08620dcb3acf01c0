"""The trio TCP proxy in front of every service: :mod:`.front` (listeners, admission, each
connection's course) and :mod:`.relay` (bytes both ways, pipes, timers)."""

from .front import Proxy

__all__ = ["Proxy"]
