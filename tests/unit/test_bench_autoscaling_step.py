"""The step-load benchmark's summary, from hand-built samples."""

from __future__ import annotations

from benchmarks.autoscaling_step import Answer, Phase, Sample, summarize

PHASES = [Phase("low", 10, 1), Phase("high", 10, 5), Phase("low", 10, 1)]


def sample(t: float, queued: int, replicas: int, wanted: int | None = None) -> Sample:
    in_flight, slots = 4 * replicas, 16 * replicas
    return Sample(t, queued, in_flight, slots, replicas, wanted if wanted is not None else replicas)


def test_times_are_measured_from_each_step() -> None:
    samples = [
        sample(0, 0, 1),
        sample(10, 5, 1),
        sample(11, 10, 1, wanted=3),  # the policy asks 1 s after the step up
        sample(13, 20, 2),  # first new replica running 3 s after the step up
        sample(15, 30, 3),
        sample(24, 0, 3),  # queue empty 4 s after the step down
        sample(30, 0, 2),
        sample(40, 0, 1),  # back at the minimum 20 s after the step down
    ]
    summary = summarize(PHASES, samples, [Answer(0, 1.0, 200), Answer(11, 3.0, 503)])
    assert summary["step_up_to_scale_up_decision_s"] == 1
    assert summary["step_up_to_first_new_replica_running_s"] == 3
    assert summary["peak_replicas"] == 3
    assert summary["peak_backlog_images"] == 42
    assert summary["step_down_to_queue_empty_s"] == 4
    assert summary["step_down_to_back_at_min_replicas_s"] == 20
    assert (summary["requests"], summary["non_200"]) == (2, 1)


def test_a_step_that_never_scaled_says_so() -> None:
    samples = [sample(0, 0, 1), sample(15, 50, 1), sample(25, 50, 1)]
    summary = summarize(PHASES, samples, [])
    assert summary["step_up_to_first_new_replica_running_s"] is None
    assert summary["step_down_to_queue_empty_s"] is None
    assert summary["step_down_to_back_at_min_replicas_s"] is None
