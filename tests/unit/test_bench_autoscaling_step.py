"""The step-load benchmark's summary, from hand-built samples."""

from __future__ import annotations

from benchmarks.autoscaling_step import Answer, Phase, Sample, summarize

PHASES = [Phase("low", 10, 1), Phase("high", 10, 5), Phase("low", 10, 1)]


def sample(t: float, queued: int, replicas: int) -> Sample:
    return Sample(t, queued=queued, in_flight=4 * replicas, slots=16 * replicas, replicas=replicas)


def test_times_are_measured_from_each_step() -> None:
    samples = [
        sample(0, 0, 1),
        sample(10, 5, 1),
        sample(13, 20, 2),  # first new replica 3 s after the step up
        sample(15, 30, 3),
        sample(24, 0, 3),  # backlog drained 4 s after the step down
        sample(40, 0, 1),  # back at the minimum 20 s after the step down
    ]
    summary = summarize(PHASES, samples, [Answer(0, 1.0, 200), Answer(11, 3.0, 503)])
    assert summary["step_up_to_first_new_replica_s"] == 3
    assert summary["peak_replicas"] == 3
    assert summary["peak_backlog_images"] == 42
    assert summary["step_down_to_backlog_drained_s"] == 4
    assert summary["step_down_to_min_replicas_s"] == 20
    assert (summary["requests"], summary["non_200"]) == (2, 1)


def test_a_step_that_never_scaled_says_so() -> None:
    samples = [sample(0, 0, 1), sample(15, 50, 1), sample(25, 50, 1)]
    summary = summarize(PHASES, samples, [])
    assert summary["step_up_to_first_new_replica_s"] is None
    assert summary["step_down_to_backlog_drained_s"] is None
