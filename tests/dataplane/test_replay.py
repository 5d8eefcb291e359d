"""The replay record on its own, with a clock the test moves."""

from __future__ import annotations

import pytest

from p2pvpn.dataplane.replay import ReplayWindow
from tests.clock import Clock


def test_an_iv_is_seen_again_within_the_window() -> None:
    clock = Clock()
    window = ReplayWindow(2.0, clock=clock)
    assert not window.seen(b"a" * 12)
    assert window.seen(b"a" * 12)
    assert not window.seen(b"b" * 12)
    clock.now += 1.9
    assert window.seen(b"a" * 12)


def test_an_iv_is_forgotten_after_one_and_a_half_windows() -> None:
    clock = Clock()
    window = ReplayWindow(2.0, clock=clock)
    window.seen(b"a" * 12)
    clock.now += 3.01
    assert not window.seen(b"a" * 12)
    # And the old buckets are gone, not only skipped.
    assert len(window) == 1


def test_a_full_bucket_records_no_more_but_refuses_nothing_fresh() -> None:
    clock = Clock()
    window = ReplayWindow(2.0, clock=clock, bucket_limit=3)
    ivs = [bytes([n]) * 12 for n in range(5)]
    assert [window.seen(iv) for iv in ivs] == [False] * 5
    assert [window.seen(iv) for iv in ivs] == [True, True, True, False, False]


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="-1"):
        ReplayWindow(-1)
