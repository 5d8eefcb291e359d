"""p2pvpn._stats: percentiles of the benchmarks' samples."""

import pytest

from p2pvpn._stats import percentile


def test_percentiles_interpolate_between_samples() -> None:
    values = [float(value) for value in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(list(reversed(values)), 50) == pytest.approx(50.5)


def test_percentiles_stay_within_the_samples() -> None:
    assert percentile([3.0, 7.0], 1) == pytest.approx(3.04)
    assert percentile([3.0, 7.0], 99) == pytest.approx(6.96)


def test_few_samples() -> None:
    assert percentile([], 50) is None
    assert percentile([4], 99) == 4.0


@pytest.mark.parametrize("pct", [0, 100, -1])
def test_percentile_out_of_range(pct: int) -> None:
    with pytest.raises(ValueError, match=r"outside 1\.\.99"):
        percentile([1.0, 2.0], pct)
