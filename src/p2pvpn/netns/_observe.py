"""What a running p2pvpn network shows: peer state changes in client logs, process resources."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from p2pvpn.netns._process import Process

__all__ = ["Resources", "Transition", "first_change", "process_resources", "state_changes"]

_TRANSITION = re.compile(
    r"^(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: peer (?P<peer>[\d.]+): "
    r"(?P<old>[A-Z]+) -> (?P<new>[A-Z]+) \((?P<reason>.*)\)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Transition:
    when: float  # wall clock, seconds
    peer: str
    old: str
    new: str
    reason: str


def _log_time(text: str) -> float:
    parsed = datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")
    return parsed.timestamp()  # the clients log local time, as this process sees it


def state_changes(process: Process | None, peer: str | None = None) -> list[Transition]:
    """The ``peer X: OLD -> NEW (reason)`` lines of a client's log, oldest first."""
    if process is None:
        return []
    changes = [
        Transition(_log_time(m["when"]), m["peer"], m["old"], m["new"], m["reason"])
        for m in _TRANSITION.finditer(process.log_text())
    ]
    return [c for c in changes if peer is None or c.peer == peer]


def first_change(
    process: Process | None,
    peer: str,
    *,
    after: float,
    old: str | None = None,
    new: str | None = None,
) -> Transition | None:
    for change in state_changes(process, peer):
        if change.when < after:
            continue
        if (old is None or change.old == old) and (new is None or change.new == new):
            return change
    return None


@dataclass(frozen=True)
class Resources:
    rss_kib: int
    fds: int
    threads: int


def process_resources(pid: int) -> Resources | None:
    """RSS, open fd count and thread count of ``pid`` from /proc (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields.get("VmRSS", "0 kB").split()[0])
    return Resources(rss_kib=rss, fds=fds, threads=int(fields["Threads"]))
