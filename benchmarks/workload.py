"""What a benchmark sends and when: arrival schedules and request mixes, as pure functions.

Arrivals are drawn once from a seeded generator, so every system in one run gets exactly the same
requests at exactly the same offsets. A time-varying rate (step, ramp) is handled by time rescaling:
inter-arrival gaps are drawn with mean 1 in "operational time" (the integral of the rate) and mapped
back to wall-clock offsets, so burstiness and the rate schedule stay independent knobs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

Endpoint = Literal["generations", "edits", "variations"]
ENDPOINT_PATHS: dict[str, str] = {
    "generations": "/v1/images/generations",
    "edits": "/v1/images/edits",
    "variations": "/v1/images/variations",
}
PROMPTS = (
    "a lighthouse at dusk",
    "a red fox in fresh snow, watercolour",
    "an isometric city block at night with neon signs",
    "a bowl of ramen, studio photo",
    "a sailing boat on a calm lake, oil painting",
)


@dataclass(frozen=True)
class RateSchedule:
    """Offered load over time: piecewise-linear ``(time_s, requests_per_s)`` points.

    The rate is linear between consecutive points (two points at one time make a step) and holds
    its last value after the last point.
    """

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.points or self.points[0][0] != 0.0:
            raise ValueError("a rate schedule starts at time 0, e.g. RateSchedule.fixed(2.0)")
        times = [time for time, _ in self.points]
        if any(later < earlier for earlier, later in itertools.pairwise(times)):
            raise ValueError(f"schedule times must not decrease, got {times}")
        if any(rate < 0 for _, rate in self.points):
            raise ValueError("rates must be >= 0")

    @classmethod
    def fixed(cls, rate: float) -> RateSchedule:
        return cls(((0.0, rate),))

    @classmethod
    def step(cls, rates: Sequence[float], segment_s: float) -> RateSchedule:
        """``rates[i]`` for ``segment_s`` seconds each, one after another."""
        points: list[tuple[float, float]] = []
        for index, rate in enumerate(rates):
            points += [(index * segment_s, rate), ((index + 1) * segment_s, rate)]
        return cls(tuple(points))

    @classmethod
    def ramp(cls, start: float, end: float, duration_s: float) -> RateSchedule:
        """Linear from ``start`` to ``end`` requests/s over ``duration_s``."""
        return cls(((0.0, start), (duration_s, end)))

    def rate_at(self, time: float) -> float:
        for (t0, r0), (t1, r1) in itertools.pairwise(self.points):
            if t0 <= time < t1:
                return r0 + (r1 - r0) * (time - t0) / (t1 - t0)
        return self.points[-1][1] if time >= self.points[-1][0] else self.points[0][1]

    def expected_count(self, duration_s: float) -> float:
        """Requests expected in ``[0, duration_s)``: the integral of the rate."""
        total = 0.0
        for (t0, r0), (t1, r1) in itertools.pairwise(self.points):
            end = min(t1, duration_s)
            if end > t0:
                rate_at_end = r0 + (r1 - r0) * (end - t0) / (t1 - t0)
                total += (r0 + rate_at_end) / 2 * (end - t0)
        last_time, last_rate = self.points[-1]
        return total + last_rate * max(0.0, duration_s - last_time)

    def time_of(self, operational: float) -> float:
        """The wall-clock time at which the integral of the rate reaches ``operational``."""
        remaining = operational
        for (t0, r0), (t1, r1) in itertools.pairwise(self.points):
            length = t1 - t0
            if length <= 0:
                continue
            area = (r0 + r1) / 2 * length
            if remaining <= area:
                return t0 + _solve_linear_area(r0, (r1 - r0) / length, remaining)
            remaining -= area
        last_time, last_rate = self.points[-1]
        return last_time + remaining / last_rate if last_rate > 0 else math.inf


def _solve_linear_area(rate: float, slope: float, area: float) -> float:
    """Smallest x >= 0 with rate*x + slope*x^2/2 == area."""
    if abs(slope) < 1e-12:
        return area / rate if rate > 0 else math.inf
    discriminant = rate * rate + 2 * slope * area
    return (-rate + math.sqrt(max(discriminant, 0.0))) / slope


def arrival_offsets(
    schedule: RateSchedule,
    duration_s: float,
    *,
    burstiness: float = 1.0,
    rng: random.Random,
    max_requests: int | None = None,
) -> list[float]:
    """Arrival offsets in ``[0, duration_s)`` for an open loop.

    ``burstiness`` is the coefficient of variation of the gaps: 1 is a Poisson process, above 1
    gamma-distributed gaps arrive in bursts, 0 spaces arrivals evenly.
    """
    if burstiness < 0:
        raise ValueError("burstiness must be >= 0")
    offsets: list[float] = []
    operational = 0.0
    while max_requests is None or len(offsets) < max_requests:
        if burstiness == 0:
            gap = 1.0
        else:
            shape = 1.0 / burstiness**2
            gap = rng.gammavariate(shape, 1.0 / shape)
        operational += gap
        offset = schedule.time_of(operational)
        if offset >= duration_s:
            break
        offsets.append(offset)
    return offsets


def parse_weighted(spec: str) -> dict[str, float]:
    """``"64x64:3,128x128:1"`` -> ``{"64x64": 3.0, "128x128": 1.0}`` (a bare item weighs 1)."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        weights[name] = float(weight)
        if weights[name] < 0:
            raise ValueError(f"weight of {name!r} must be >= 0 in {spec!r}")
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"expected 'item:weight,...' with a positive total, got {spec!r}")
    return weights


@dataclass(frozen=True)
class Tier:
    """A class of client: the API key its requests carry and its share of the traffic."""

    name: str
    api_key: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Tier:
        """``"free=sk-free:3"`` -> Tier("free", "sk-free", 3.0)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"expected 'tier=api-key[:weight]', e.g. 'free=sk-free:3', got {spec!r}")
        key, _, weight = rest.partition(":")
        return cls(name, key, float(weight) if weight else 1.0)


@dataclass(frozen=True)
class RequestMix:
    """The kinds of requests a run sends and how often each appears."""

    sizes: dict[str, float]
    endpoints: dict[str, float]
    tiers: tuple[Tier, ...] = (Tier("default", "sk-bench"),)
    stream_fraction: float = 0.0
    partial_images: int = 2
    images_per_request: int = 1
    model: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.endpoints) - set(ENDPOINT_PATHS)
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; known: {sorted(ENDPOINT_PATHS)}")
        if not 0.0 <= self.stream_fraction <= 1.0:
            raise ValueError("stream_fraction must be within [0, 1]")


@dataclass(frozen=True)
class RequestSpec:
    """One request to send."""

    index: int
    endpoint: str
    size: str
    n: int
    stream: bool
    tier: str
    api_key: str
    prompt: str
    model: str | None = None
    partial_images: int = 0  # sent with streams


def _choose(weights: dict[str, float], rng: random.Random) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[name] for name in names])[0]


def iter_requests(mix: RequestMix, rng: random.Random) -> Iterator[RequestSpec]:
    """An endless stream of requests drawn from ``mix``; the same seed gives the same stream."""
    tiers = {tier.name: tier for tier in mix.tiers}
    tier_weights = {tier.name: tier.weight for tier in mix.tiers}
    for index in itertools.count():
        tier = tiers[_choose(tier_weights, rng)]
        yield RequestSpec(
            index=index,
            endpoint=_choose(mix.endpoints, rng),
            size=_choose(mix.sizes, rng),
            n=mix.images_per_request,
            stream=rng.random() < mix.stream_fraction,
            tier=tier.name,
            api_key=tier.api_key,
            prompt=rng.choice(PROMPTS),
            model=mix.model,
            partial_images=mix.partial_images,
        )


def build_requests(mix: RequestMix, count: int, rng: random.Random) -> list[RequestSpec]:
    """The first ``count`` requests of ``iter_requests(mix, rng)``."""
    return list(itertools.islice(iter_requests(mix, rng), count))
