"""Arrival schedules and request mixes of the load generator: pure, seeded, exact where it can be."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from benchmarks.workload import (
    RateSchedule,
    RequestMix,
    Tier,
    arrival_offsets,
    build_requests,
    parse_weighted,
)


def test_fixed_rate_evenly_spaced_without_burstiness() -> None:
    offsets = arrival_offsets(RateSchedule.fixed(4.0), 1.0, burstiness=0.0, rng=random.Random(0))
    assert offsets == pytest.approx([0.25, 0.5, 0.75])


def test_step_schedule_changes_rate_per_segment() -> None:
    schedule = RateSchedule.step([2.0, 10.0], segment_s=1.0)
    offsets = arrival_offsets(schedule, 2.0, burstiness=0.0, rng=random.Random(0))
    assert sum(offset < 1.0 for offset in offsets) == 1  # 0.5
    assert sum(offset >= 1.0 for offset in offsets) == 10  # 1.0, 1.1, ..., 1.9 (1.0 is the 2nd unit)
    assert schedule.expected_count(2.0) == pytest.approx(12.0)


def test_ramp_schedule_integrates_linearly() -> None:
    schedule = RateSchedule.ramp(0.0, 10.0, duration_s=2.0)
    assert schedule.expected_count(2.0) == pytest.approx(10.0)
    assert schedule.time_of(2.5) == pytest.approx(1.0)  # area of the first second: 10 * 1 / 2 / 2
    assert schedule.rate_at(1.0) == pytest.approx(5.0)
    offsets = arrival_offsets(schedule, 2.0, burstiness=0.0, rng=random.Random(0))
    assert len(offsets) == 9  # operational times 1..9 fall before 2 s; the 10th lands on it
    assert offsets == sorted(offsets)


def test_poisson_arrivals_match_the_rate_and_are_reproducible() -> None:
    offsets = arrival_offsets(RateSchedule.fixed(50.0), 100.0, rng=random.Random(7))
    assert len(offsets) == pytest.approx(5000, rel=0.05)
    gaps = [later - earlier for earlier, later in itertools.pairwise(offsets)]
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.1)
    assert offsets == arrival_offsets(RateSchedule.fixed(50.0), 100.0, rng=random.Random(7))


def test_burstiness_is_the_coefficient_of_variation_of_gaps() -> None:
    offsets = arrival_offsets(RateSchedule.fixed(50.0), 100.0, burstiness=3.0, rng=random.Random(1))
    gaps = [later - earlier for earlier, later in itertools.pairwise(offsets)]
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(3.0, rel=0.2)
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.15)


def test_max_requests_bounds_the_arrivals() -> None:
    offsets = arrival_offsets(RateSchedule.fixed(100.0), 10.0, rng=random.Random(0), max_requests=5)
    assert len(offsets) == 5


@pytest.mark.parametrize("points", [((1.0, 2.0),), ((0.0, 1.0), (2.0, 1.0), (1.0, 3.0)), ((0.0, -1.0),), ()])
def test_bad_schedules_fail_early(points: tuple[tuple[float, float], ...]) -> None:
    with pytest.raises(ValueError):
        RateSchedule(points)


def test_weighted_specs_and_tiers_parse() -> None:
    assert parse_weighted("64x64:3,128x128") == {"64x64": 3.0, "128x128": 1.0}
    assert Tier.parse("free=sk-free:3") == Tier("free", "sk-free", 3.0)
    assert Tier.parse("paid=sk-paid") == Tier("paid", "sk-paid", 1.0)
    with pytest.raises(ValueError, match="tier=api-key"):
        Tier.parse("sk-only")
    with pytest.raises(ValueError):
        parse_weighted("64x64:0")


def test_request_mix_follows_its_weights_and_seed() -> None:
    mix = RequestMix(
        sizes={"64x64": 3.0, "128x128": 1.0},
        endpoints={"generations": 1.0, "edits": 1.0},
        tiers=(Tier("free", "sk-free", 1.0), Tier("paid", "sk-paid", 1.0)),
        stream_fraction=0.25,
    )
    requests = build_requests(mix, 4000, random.Random(3))
    assert requests == build_requests(mix, 4000, random.Random(3))
    assert [r.index for r in requests[:3]] == [0, 1, 2]
    assert sum(r.size == "64x64" for r in requests) / 4000 == pytest.approx(0.75, abs=0.03)
    assert sum(r.stream for r in requests) / 4000 == pytest.approx(0.25, abs=0.03)
    assert {(r.tier, r.api_key) for r in requests} == {("free", "sk-free"), ("paid", "sk-paid")}
    assert {r.endpoint for r in requests} == {"generations", "edits"}


def test_unknown_endpoint_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown endpoints"):
        RequestMix(sizes={"64x64": 1.0}, endpoints={"chat": 1.0})
