"""jitlaunch: authoritative DNS that starts services on demand."""

__version__ = "0.1.0"
