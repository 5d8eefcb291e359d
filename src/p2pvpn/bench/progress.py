"""A live progress line for benchmarks that run for tens of seconds.

On a terminal, one line is rewritten in place: the title, a bar when the
total is known, and what is happening ("fast: TCP 4.2 Gbit/s"). Elsewhere (a
log file, CI) the same information goes out as plain lines: every new step,
and an update at most every `PLAIN_INTERVAL` seconds, so a log shows progress
without thousands of lines.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["PLAIN_INTERVAL", "Progress"]

PLAIN_INTERVAL = 5.0
_BAR_WIDTH = 24


class Progress:
    """``with Progress("bench local", total=300) as progress: progress.step("raw")``.

    ``total`` is in whatever unit `update` counts (seconds, runs); None shows
    no bar and no percentage.
    """

    def __init__(
        self,
        title: str,
        total: float | None = None,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.title = title
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.done = 0.0
        self.detail = ""
        self._started = time.monotonic()
        self._last_plain = 0.0
        self._width = 0  # of the live line on screen, to blank its leftovers

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close("interrupted" if exc_type is not None else "done")

    def step(self, detail: str) -> None:
        """A new phase ("fast: starting clients"): always shown, also in plain mode."""
        self.detail = detail
        self._show(force=True)

    def update(self, done: float | None = None, detail: str | None = None) -> None:
        """Progress within a phase: ``done`` of ``total`` so far, and a new detail."""
        if done is not None:
            self.done = done
        if detail is not None:
            self.detail = detail
        self._show(force=False)

    def advance(self, amount: float, detail: str | None = None) -> None:
        self.update(self.done + amount, detail)

    def close(self, detail: str = "done") -> None:
        """End the line (live) or print the last one (plain)."""
        if self.total is not None and detail == "done":
            self.done = self.total
        self.detail = detail
        self._show(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        parts = [self.title]
        if self.total:
            fraction = min(max(self.done / self.total, 0.0), 1.0)
            filled = round(fraction * _BAR_WIDTH)
            parts.append(f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {fraction * 100:3.0f}%")
        parts.append(f"{elapsed:5.0f}s")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)

    def _show(self, *, force: bool) -> None:
        text = self.line()
        if self.live:
            padding = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{padding}")
            self._width = len(text)
        else:
            now = time.monotonic()
            if not force and now - self._last_plain < PLAIN_INTERVAL:
                return
            self._last_plain = now
            self.stream.write(text + "\n")
        self.stream.flush()
