"""Statistics over request records: pure functions, no I/O, no clocks.

Definitions used throughout the reports:

- **latency**: from a request's scheduled arrival (open loop) or its send (closed loop) to the last
  byte of its answer; percentiles are over successful requests only.
- **throughput**: images from successful requests per second of the scenario's window, the time
  from its first arrival to its last answer (so an overloaded system's backlog counts against it).
- **goodput**: the same, counting only requests answered within the latency SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.loadgen import RequestRecord


@dataclass(frozen=True)
class Scenario:
    """How one batch of records was produced."""

    system: str
    name: str
    mode: str  # "open", "closed", "in-process", or "paired" / "in-turn" (not load points)
    clients: int | None = None  # closed loop
    offered_rps: float | None = None  # open loop: the scheduled arrival rate


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def window_s(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first arrival to the last answer (0 for no records)."""
    if not records:
        return 0.0
    first = min(r.scheduled_s if r.scheduled_s is not None else r.start_s for r in records)
    return max(r.end_s for r in records) - first


def images_per_second(
    runs: Sequence[Sequence[RequestRecord]], counted: Callable[[RequestRecord], bool]
) -> float:
    """Images of the ``counted`` successful requests per second of the runs' windows together."""
    window = sum(window_s(run) for run in runs)
    images = sum(record.images for run in runs for record in run if counted(record))
    return images / window if window > 0 else 0.0


def throughput(records: Sequence[RequestRecord]) -> float:
    """Images from successful requests per second of the window."""
    return images_per_second([records], lambda record: True)


def goodput(records: Sequence[RequestRecord], slo_s: float) -> float:
    """Images from successful requests answered within ``slo_s``, per second of the window."""
    return images_per_second([records], lambda record: record.latency_s <= slo_s)


def errors_by_status(records: Sequence[RequestRecord]) -> dict[int, int]:
    """Failed requests per status (0: no response), most frequent first."""
    return dict(Counter(r.status for r in records if not r.ok).most_common())


def batch_size_counts(records: Sequence[RequestRecord]) -> dict[int, int]:
    """How many images ran in a forward pass of each size, from the servers' batch-size headers."""
    counts = Counter(size for r in records if r.ok for size in r.batch_sizes)
    return dict(sorted(counts.items()))


def mean_batch_size(records: Sequence[RequestRecord]) -> float | None:
    """The batch size an average image ran in; None when the server did not say."""
    counts = batch_size_counts(records)
    images = sum(counts.values())
    return sum(size * count for size, count in counts.items()) / images if images else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarize(scenario: Scenario, records: Sequence[RequestRecord], slo_s: float) -> dict[str, Any]:
    """One report row for one scenario run once."""
    return summarize_runs(scenario, [records], slo_s)


def summarize_runs(
    scenario: Scenario, runs: Sequence[Sequence[RequestRecord]], slo_s: float
) -> dict[str, Any]:
    """One report row for a scenario run once per round (A B A B): latencies pooled, throughput
    over the sum of the runs' windows, and each round's throughput beside it."""
    records = [record for run in runs for record in run]
    latencies = [r.latency_s for r in records if r.ok]
    partials = [r.first_partial_s for r in records if r.ok and r.first_partial_s is not None]
    model_ms = [r.server_model_ms for r in records if r.ok and r.server_model_ms is not None]
    errors = errors_by_status(records)
    return {
        "system": scenario.system,
        "scenario": scenario.name,
        "mode": scenario.mode,
        "clients": scenario.clients,
        "offered_rps": scenario.offered_rps,
        "requests": len(records),
        "ok": len(latencies),
        "errors": " ".join(f"{status}:{count}" for status, count in errors.items()),
        "error_rate": (len(records) - len(latencies)) / len(records) if records else 0.0,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p95_ms": _ms(percentile(latencies, 95)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "mean_ms": _ms(sum(latencies) / len(latencies)) if latencies else None,
        "throughput_img_s": images_per_second(runs, lambda record: True),
        "goodput_img_s": images_per_second(runs, lambda record: record.latency_s <= slo_s),
        "slo_ms": slo_s * 1000,
        "first_partial_p50_ms": _ms(percentile(partials, 50)),
        "model_p50_ms": percentile(model_ms, 50),  # the server's own model time (Server-Timing), ms
        "mean_batch_size": mean_batch_size(records),
        "window_s": sum(window_s(run) for run in runs),
        "rounds": len(runs),
        "round_img_s": [throughput(run) for run in runs],
    }
