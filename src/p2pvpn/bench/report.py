"""The result of one `p2pvpn bench` command: a table for people, JSON for comparing machines.

Every command builds a `Report`; the CLI prints its ``text``, writes
`Report.to_json` with ``--json`` and hands the same dict to
`p2pvpn.bench.plot.plot_report` with ``--plot``. The JSON carries the machine
facts, so files from several routers can be compared side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pvpn._files import write_atomically

__all__ = ["REPORT_FORMAT", "Bar", "BenchError", "Report", "Series"]

REPORT_FORMAT = 1
"""The ``p2pvpn_bench`` field of the JSON: bumped when a field changes meaning."""


class BenchError(Exception):
    """A benchmark could not run; the message says why and what to do about it."""


@dataclass
class Series:
    """A quantity over time, e.g. the throughput of one TCP run per interval."""

    label: str  # "fast TCP", "upload TCP"
    unit: str  # "Mbit/s"
    points: list[tuple[float, float]] = field(default_factory=list)  # (seconds from start, value)


@dataclass
class Bar:
    """One figure of the final comparison, e.g. the fast variant's TCP throughput."""

    group: str  # what is compared: "TCP Mbit/s", "seal 1400 B Gbit/s"
    label: str  # who: "fast", "compiled batch"
    value: float | None  # None: the variant did not run or failed
    unit: str


@dataclass
class Report:
    command: str  # "crypto" | "local" | "peer"
    machine: dict[str, Any]
    options: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    series: list[Series] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    text: str = ""  # the table(s) printed at the end
    ok: bool = True  # False: some measurement failed (the exit status is 1)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def finish(self, text: str, *, ok: bool = True) -> Report:
        self.text, self.ok, self.finished = text, ok, time.time()
        return self

    def to_json(self) -> dict[str, Any]:
        finished = self.finished if self.finished is not None else time.time()
        return {
            "p2pvpn_bench": REPORT_FORMAT,
            "command": self.command,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "elapsed_seconds": round(finished - self.started, 3),
            "ok": self.ok,
            "machine": self.machine,
            "options": self.options,
            "results": self.results,
            "series": [asdict(series) for series in self.series],
            "bars": [asdict(bar) for bar in self.bars],
        }

    def write_json(self, path: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, default=str) + "\n"
        try:
            write_atomically(path, text, mode=0o644)
        except OSError as exc:
            raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from exc
