"""The benchmark's statistics: what `make bench` prints as met, below or unsure."""

from __future__ import annotations

import math

import pytest

from experiments.bench import interval, verdict


def test_the_steady_ratio_is_total_time_over_total_time_not_a_mean_of_ratios() -> None:
    # One chunk slowed tenfold: the throughput ratio is 2/11, the mean of ratios would say 0.55.
    ratio, half = interval([(1.0, 1.0), (1.0, 10.0)])
    assert ratio == pytest.approx(2 / 11)
    assert half > 0


def test_the_interval_shrinks_with_more_pairs_and_vanishes_without_spread() -> None:
    assert interval([(1.0, 2.0)] * 5) == (0.5, 0.0)
    noisy = [(1.0, 1.0 + 0.1 * (i % 3)) for i in range(9)]
    _, few = interval(noisy)
    _, many = interval(noisy * 4)
    assert 0 < many < few / 1.8  # four times the pairs: about half as wide
    assert interval([(1.0, 1.0)])[1] == math.inf


@pytest.mark.parametrize(
    ("mean", "half", "said"),
    [
        (0.97, 0.01, "met"),
        (0.95, 0.0, "met"),
        (0.93, 0.01, "below"),
        (0.945, 0.01, "unsure"),
        (0.96, 0.02, "unsure"),
    ],
)
def test_met_or_below_only_where_the_whole_interval_says_so(mean: float, half: float, said: str) -> None:
    assert verdict(mean, half, 0.95) == said
