"""``--plot FILE.png`` (being built: issue 14)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2pvpn.bench.report import BenchError

__all__ = ["plot_report"]


def plot_report(report: dict[str, Any], path: Path) -> None:
    raise BenchError("not built yet")
