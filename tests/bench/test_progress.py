"""The benchmarks' progress line: in place on a terminal, sparse plain lines elsewhere."""

import io

import pytest

from p2pvpn.bench import progress as progress_module
from p2pvpn.bench.progress import Progress


def test_live_line_is_rewritten_in_place_with_a_bar() -> None:
    stream = io.StringIO()
    with Progress("bench local", total=4, stream=stream, live=True) as progress:
        progress.step("raw: TCP")
        progress.advance(1, "raw: TCP 9.1 Gbit/s")
        progress.update(2)
    text = stream.getvalue()
    assert "\n" not in text.rstrip("\n")  # one line, rewritten with \r
    assert text.count("\r") == 4
    assert "[############............]  50%" in text
    assert text.rstrip().endswith("done")
    assert "100%" in text.rsplit("\r", 1)[1]


def test_a_shorter_live_line_blanks_what_the_longer_one_left() -> None:
    stream = io.StringIO()
    progress = Progress("crypto", stream=stream, live=True)
    progress.step("a long detail that takes room")
    progress.step("short")
    last = stream.getvalue().rsplit("\r", 1)[1]
    assert last.rstrip().endswith("short")
    assert len(last) >= len("crypto  a long detail that takes room")


def test_plain_mode_prints_every_step_and_throttles_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    progress = Progress("bench peer", total=10, stream=stream, live=False)
    progress.step("upload TCP")
    for _ in range(5):
        progress.advance(1)  # within PLAIN_INTERVAL: no new lines
    clock[0] += progress_module.PLAIN_INTERVAL
    progress.advance(1, "upload TCP 950 Mbit/s")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "upload TCP" in lines[0]
    assert "60%" in lines[1] and "950 Mbit/s" in lines[1]
    assert lines[2].endswith("done") and "100%" in lines[2]
    assert "\r" not in stream.getvalue()


def test_an_exception_closes_the_line_as_interrupted() -> None:
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("x", stream=stream, live=False):
        raise KeyboardInterrupt
    assert stream.getvalue().splitlines()[-1].endswith("interrupted")


def test_not_a_terminal_means_plain_lines() -> None:
    assert Progress("x", stream=io.StringIO()).live is False
