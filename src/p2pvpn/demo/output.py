"""What `p2pvpn demo` prints: step lines with a mark and a timing, and details."""

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from p2pvpn._format import format_seconds

__all__ = [
    "Console",
    "DemoError",
    "Step",
    "use_color",
]

_GREEN = "32"
_RED = "31"
_YELLOW = "33"
_BOLD = "1"
_DIM = "2"
DETAIL_INDENT = "     "


class DemoError(Exception):
    """A step failed; the message (and ``details``, e.g. a log's last lines) are for the user."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


def use_color(stream: TextIO, no_color: bool) -> bool:
    """Color only on a terminal, and never with ``--no-color`` or ``NO_COLOR`` set."""
    if no_color or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Step:
    """Handed to the body of `Console.step`: what to print when the step succeeds."""

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self.message: str | None = None
        self.warning: str | None = None
        self.details: list[str] = []
        self.started = time.monotonic()

    def done(self, message: str) -> None:
        self.message = message

    def warn(self, message: str) -> None:
        """Finish with a warning mark instead of ``[ok]`` (the demo goes on)."""
        self.warning = message

    def detail(self, line: str) -> None:
        self.details.append(line)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Console:
    """Line-oriented output: ``[ok] message (0.3 s)``, indented details, tables."""

    def __init__(self, stream: TextIO, *, color: bool) -> None:
        self.stream = stream
        self.color = color
        self._closed = False

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        if self._closed:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except OSError:
            # The reader went away (``p2pvpn demo | head``): the demo must still
            # clean up, so output stops instead of raising in the middle of it.
            self._closed = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())  # no error when Python flushes at exit
                os.close(devnull)

    def heading(self, text: str) -> None:
        self.line(self._paint(_BOLD, text))

    def detail(self, text: str) -> None:
        self.line(DETAIL_INDENT + text)

    def dim(self, text: str) -> None:
        self.line(self._paint(_DIM, DETAIL_INDENT + text))

    def _mark(self, mark: str, code: str, text: str, seconds: float | None) -> None:
        timing = f" ({format_seconds(seconds)})" if seconds is not None else ""
        self.line(f"{self._paint(code, mark)} {text}{timing}")

    def ok(self, text: str, seconds: float | None = None) -> None:
        self._mark("[ok]", _GREEN, text, seconds)

    def warn(self, text: str, seconds: float | None = None) -> None:
        self._mark("[!!]", _YELLOW, text, seconds)

    def fail(self, text: str, seconds: float | None = None) -> None:
        self._mark("[FAIL]", _RED, text, seconds)

    def interrupted(self, text: str, seconds: float | None = None) -> None:
        self._mark("[stopped]", _YELLOW, text, seconds)

    @contextlib.contextmanager
    def step(self, doing: str) -> Iterator[Step]:
        """One line when the body ends: ``[ok]``/``[!!]`` on success, ``[FAIL]`` on an error.

        The exception propagates; the caller cleans up.
        """
        step = Step(doing)
        try:
            yield step
        except DemoError as exc:
            self.fail(f"{doing}: {exc}", step.elapsed)
            for line in exc.details:
                self.detail(line)
            raise
        except Exception as exc:  # CommandError and the like: worded for the user too
            self.fail(f"{doing}: {exc}", step.elapsed)
            raise
        except BaseException:  # Ctrl-C, SIGTERM
            self.interrupted(doing, step.elapsed)
            raise
        if step.warning is not None:
            self.warn(step.warning, step.elapsed)
        else:
            self.ok(step.message or doing, step.elapsed)
        for line in step.details:
            self.detail(line)
