"""The benchmark's statistics: what `make bench` prints as met, missed or unsure."""

from __future__ import annotations

import math

import pytest

from experiments.report.bench import Pair, interval, sampling_cost, verdict


def pairs(*times: tuple[float, float], sampled: bool = False) -> list[Pair]:
    return [Pair(h, p, sampled) for h, p in times]


def test_the_steady_ratio_is_total_time_over_total_time_not_a_mean_of_ratios() -> None:
    # Half the chunks 1.5 times slower: throughput is 4/5 of hand's; a mean of ratios says 5/6.
    ratio, half, stalled = interval(pairs((1.0, 1.0), (1.0, 1.5), (1.0, 1.0), (1.0, 1.5)))
    assert ratio == pytest.approx(4 / 5)
    assert half > 0 and stalled == 0


def test_a_chunk_the_machine_stalled_is_left_out_of_both_loops_totals() -> None:
    steady = pairs(*[(1.0, 1.1)] * 9)
    assert interval([*steady, *pairs((1.0, 30.0))]) == (*interval(steady)[:2], 1)
    assert interval([*steady, *pairs((30.0, 1.1))]) == (*interval(steady)[:2], 1)


def test_the_interval_shrinks_with_more_pairs_and_vanishes_without_spread() -> None:
    assert interval(pairs(*[(1.0, 2.0)] * 5)) == (0.5, 0.0, 0)
    noisy = pairs(*[(1.0, 1.0 + 0.1 * (i % 3)) for i in range(9)])
    _, few, _ = interval(noisy)
    _, many, _ = interval(noisy * 4)
    assert 0 < many < few / 1.8  # four times the pairs: about half as wide
    assert interval(pairs((1.0, 1.0)))[1] == math.inf


@pytest.mark.parametrize(
    ("ratio", "half", "said"),
    [
        (0.97, 0.01, "met"),
        (0.95, 0.0, "met"),
        (0.93, 0.01, "missed"),
        (0.945, 0.01, "unsure"),
        (0.96, 0.02, "unsure"),
    ],
)
def test_met_or_missed_only_where_the_whole_interval_says_so(ratio: float, half: float, said: str) -> None:
    assert verdict(ratio, half, 0.95) == said


def test_a_cost_target_is_a_ceiling_met_or_missed_by_the_whole_interval() -> None:
    assert verdict(0.005, 0.01, 0.02, at_most=True) == "met"
    assert verdict(0.035, 0.01, 0.02, at_most=True) == "missed"
    assert verdict(0.015, 0.01, 0.02, at_most=True) == "unsure"


def test_the_sampling_cost_is_the_sampled_chunks_extra_time_as_a_share_of_the_total() -> None:
    # Every 5th chunk holds a sample that adds 0.5 s to paralab's 1.2 s; the machine drifts, and
    # the hand chunk beside each drifts with it, so the drift cancels.
    drift = [1.0 + 0.05 * (i % 7) for i in range(50)]
    chunks = [Pair(d, 1.2 * d + (0.5 if i % 5 == 0 else 0.0), i % 5 == 0) for i, d in enumerate(drift)]
    cost, half = sampling_cost(chunks)
    total = sum(c.paralab for c in chunks)
    assert cost == pytest.approx(10 * 0.5 / total, rel=0.1)
    assert 0 < half < cost
    # The same with no extra on sampled steps: no cost, inside the interval.
    flat = [c._replace(paralab=1.2 * c.hand) for c in chunks]
    cost, half = sampling_cost(flat)
    assert abs(cost) <= half


def test_a_sampling_cost_needs_chunks_with_and_without_a_sample() -> None:
    assert sampling_cost(pairs((1.0, 1.1), (1.0, 1.2))) == (pytest.approx(math.nan, nan_ok=True), math.inf)
    cost, half = sampling_cost([*pairs((1.0, 1.1), (1.0, 1.2)), *pairs((1.0, 1.5), sampled=True)])
    assert math.isnan(cost) and half == math.inf
