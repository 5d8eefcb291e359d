"""Percentiles of measured samples, for the benchmark reports."""

import statistics
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(values: Sequence[float], pct: int) -> float | None:
    """The ``pct``-th percentile (1..99) of ``values``; None when there are none.

    Interpolated between the two nearest samples (`statistics.quantiles`, inclusive
    method: the samples are the whole run, so the result stays within min..max).
    """
    if not 1 <= pct <= 99:
        raise ValueError(f"percentile {pct} is outside 1..99")
    if len(values) < 2:
        # statistics.quantiles needs two samples (before Python 3.13).
        return float(values[0]) if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]
