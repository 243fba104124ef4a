"""The benchmark's statistics: what `make bench` prints as met, below or unsure."""

from __future__ import annotations

import math

import pytest

from experiments.bench import interval, verdict


def test_the_steady_ratio_is_total_time_over_total_time_not_a_mean_of_ratios() -> None:
    # Half the chunks 1.5 times slower: throughput is 4/5 of hand's; a mean of ratios says 5/6.
    ratio, half, stalled = interval([(1.0, 1.0), (1.0, 1.5), (1.0, 1.0), (1.0, 1.5)])
    assert ratio == pytest.approx(4 / 5)
    assert half > 0 and stalled == 0


def test_a_chunk_the_machine_stalled_is_left_out_of_both_loops_totals() -> None:
    steady = [(1.0, 1.1)] * 9
    assert interval([*steady, (1.0, 30.0)]) == (*interval(steady)[:2], 1)
    assert interval([*steady, (30.0, 1.1)]) == (*interval(steady)[:2], 1)


def test_the_interval_shrinks_with_more_pairs_and_vanishes_without_spread() -> None:
    assert interval([(1.0, 2.0)] * 5) == (0.5, 0.0, 0)
    noisy = [(1.0, 1.0 + 0.1 * (i % 3)) for i in range(9)]
    _, few, _ = interval(noisy)
    _, many, _ = interval(noisy * 4)
    assert 0 < many < few / 1.8  # four times the pairs: about half as wide
    assert interval([(1.0, 1.0)])[1] == math.inf


@pytest.mark.parametrize(
    ("ratio", "half", "said"),
    [
        (0.97, 0.01, "met"),
        (0.95, 0.0, "met"),
        (0.93, 0.01, "below"),
        (0.945, 0.01, "unsure"),
        (0.96, 0.02, "unsure"),
    ],
)
def test_met_or_below_only_where_the_whole_interval_says_so(ratio: float, half: float, said: str) -> None:
    assert verdict(ratio, half, 0.95) == said
