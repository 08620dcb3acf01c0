"""The retry backoff after failed boots: one pure function, used by the supervisor and by
the qemu backend's warm pool."""

from __future__ import annotations


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 for the first): ``base``
    doubling with each failure, never more than ``cap``. No failure, no wait."""
    if failures <= 0:
        return 0.0
    # 2 ** 1100 would overflow a float; past 64 doublings every sane base is over its cap.
    return min(base * 2.0 ** min(failures - 1, 64), cap)
