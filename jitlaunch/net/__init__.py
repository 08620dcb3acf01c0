"""Instance networking: QEMU user networking needs nothing here; bridge mode lives in bridge.py."""
