"""`cpu_threads: auto`: the thread tuner's policy, and a replica that runs on what it learnt."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from deployments.config import BatchingConfig
from deployments.contracts import ImageTask
from deployments.model_replica import ReplicaStats
from deployments.models.cpu_threads import (
    ThreadTuner,
    cpu_thread_count,
    thread_candidates,
    usable_cores,
    work_units,
)
from tests.replica_loop import in_process_replica, make_task, replica_event_loop


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (16, (1, 2, 4, 8, 16))],
)
def test_candidates_are_powers_of_two_and_every_core(cores: int, expected: tuple[int, ...]) -> None:
    assert thread_candidates(cores) == expected


def test_auto_and_all_start_on_every_core_and_a_number_is_kept() -> None:
    assert cpu_thread_count("auto") == cpu_thread_count("all") == usable_cores()
    assert cpu_thread_count(3) == 3


def learn(
    tuner: ThreadTuner, batch_size: int, seconds_by_threads: dict[int, float], passes: int
) -> list[int]:
    """Run ``passes`` passes whose time depends on the threads only; the threads chosen, in order."""
    chosen = []
    for _ in range(passes):
        threads = tuner.choose(batch_size)
        tuner.record(batch_size, threads, seconds_by_threads[threads])
        chosen.append(threads)
    return chosen


def test_each_count_is_probed_then_the_fastest_runs_and_a_losing_probe_is_confirmed_soon() -> None:
    tuner = ThreadTuner((1, 2), explore_every=10, probe_every=4)
    chosen = learn(tuner, 1, {1: 0.15, 2: 0.12}, passes=16)
    # One thread lost on its probe alone (1.25 times two): confirmed once 4 x 1.25 passes' worth
    # ran on two threads; confirmed, it waits 10 x 1.25.
    assert chosen == [1, 2] + [2] * 4 + [1] + [2] * 9
    assert tuner.best() == {1: 2}


def test_a_probe_taken_in_a_burst_is_replaced_by_the_next_pass_not_blended_with_it() -> None:
    """The benchmark's warm-up: batch 8's probe on two threads ran beside a busy front end and lost;
    under steady load two threads take 0.11 against one thread's 0.20. Blended at smoothing 0.3, the
    slow probe kept batch 8 on one thread for three retries (some 75 passes)."""
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    tuner.record(8, 1, 0.20)
    tuner.record(8, 2, 0.30)  # the probe, inside the burst
    chosen = learn(tuner, 8, {1: 0.20, 2: 0.11}, passes=40)
    assert chosen[:7] == [1] * 6 + [2]  # retried once 4 x 1.5 passes' worth ran on one thread
    assert tuner.cost[8, 2] == pytest.approx(0.11)
    assert chosen[7:] == [2] * 33
    assert tuner.best() == {8: 2}


def test_a_probe_that_lost_by_far_is_not_hurried() -> None:
    """Beside a noisy neighbour a two-thread probe takes some 20-90 times one thread's pass: that is
    the machine, not a burst, and its retry waits explore_every (not probe_every) times as long."""
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    chosen = learn(tuner, 1, {1: 0.25, 2: 5.0}, passes=403)
    # 20 x 20 passes on one thread after the probe, not 4 x 20.
    assert [index for index, threads in enumerate(chosen) if threads == 2] == [1, 402]


def test_a_slower_count_is_retried_after_the_others_ran_its_cost_in_passes() -> None:
    tuner = ThreadTuner((1, 2), explore_every=5, probe_every=4)
    chosen = learn(tuner, 1, {1: 0.15, 2: 0.12}, passes=2 + 21)
    # One thread costs 1.25 times two: its probe is confirmed after 4 x 1.25 passes' worth (the
    # two-thread probe counts), then it is retried once 5 x 1.25 passes ran on two threads (after 7).
    assert [index for index, threads in enumerate(chosen[2:]) if threads == 1] == [4, 12, 20]
    assert tuner.best() == {1: 2}


@pytest.mark.parametrize("slowdown", [1.5, 10.0, 90.0])
def test_retrying_a_slower_count_costs_at_most_its_share_of_the_time(slowdown: float) -> None:
    """Beside a noisy neighbour two spinning OpenMP threads took up to 90 times one thread's time:
    the retries of two threads then add about one explore_every-th to the time, not 90 / 20."""
    tuner = ThreadTuner((1, 2), explore_every=20)
    seconds = {1: 0.1, 2: 0.1 * slowdown}
    chosen = learn(tuner, 1, seconds, passes=2000)
    on_best = chosen.count(1) * seconds[1]
    retrying = chosen.count(2) * seconds[2]
    assert chosen.count(2) > 1  # still retried: conditions may change back
    assert retrying <= on_best / 20 + 2 * seconds[2]  # one twentieth, give or take the probe and its retry


def test_a_change_of_conditions_moves_the_choice() -> None:
    """A busy neighbour makes two threads slower than one: the tuner moves after the first slow pass,
    and retries two threads less often as its estimate of their cost rises towards 0.40 s (the gap
    tends to 4 x 0.40 / 0.15 = 10.7 passes on one thread)."""
    tuner = ThreadTuner((1, 2), explore_every=4)
    learn(tuner, 1, {1: 0.15, 2: 0.12}, passes=10)
    assert tuner.best() == {1: 2}
    chosen = learn(tuner, 1, {1: 0.15, 2: 0.40}, passes=30)
    assert tuner.best() == {1: 1}
    assert [index for index, threads in enumerate(chosen) if threads == 2] == [0, 7, 16, 26]


def test_batch_sizes_are_tuned_apart() -> None:
    tuner = ThreadTuner((1, 2), explore_every=100)
    learn(tuner, 1, {1: 0.10, 2: 0.20}, passes=4)
    learn(tuner, 8, {1: 0.50, 2: 0.30}, passes=4)
    assert tuner.best() == {1: 1, 8: 2}


def test_a_count_far_slower_at_another_batch_size_is_not_tried_at_once() -> None:
    """Beside a noisy neighbour, what batch 1 learnt (two threads 50x slower) spares batch 8 its
    first two-thread pass; a count only somewhat slower elsewhere is still tried at once."""
    tuner = ThreadTuner((1, 2), explore_every=20)
    learn(tuner, 1, {1: 0.1, 2: 5.0}, passes=4)
    chosen = learn(tuner, 8, {1: 0.3, 2: 15.0}, passes=40)
    assert chosen == [1] * 40  # two threads wait for 20 x 50 passes' worth of one thread
    assert tuner.estimates(8)[2] == pytest.approx(15.0)  # 5.0 scaled by batch 8's one-thread cost

    quiet = ThreadTuner((1, 2), explore_every=20)
    learn(quiet, 1, {1: 0.1, 2: 0.2}, passes=4)
    assert learn(quiet, 8, {1: 0.5, 2: 0.3}, passes=3) == [1, 2, 2]


@pytest.mark.usefixtures("torch_threads_restored")
def test_run_sets_the_threads_and_learns_only_from_passes_that_finish() -> None:
    tuner = ThreadTuner((1, 2))
    seen: list[int] = []
    tasks = [make_task(0)]
    tuner.run(tasks, lambda: seen.append(torch.get_num_threads()))
    with pytest.raises(RuntimeError):
        tuner.run(tasks, lambda: (_ for _ in ()).throw(RuntimeError("a failed pass")))
    assert seen == [1]
    assert list(tuner.cost) == [(1, 1)]  # the failed pass on 2 threads left no time behind


@pytest.mark.usefixtures("torch_threads_restored")
def test_untrusted_passes_still_probe_every_count() -> None:
    """A replica with lanes where every pass has arrivals (8 clients): ignoring such passes left one
    thread untried, so chosen for every pass (make bench, 2026-12-01 21:00: 3.55 images/s)."""
    tuner = ThreadTuner((1, 2))
    seen: list[int] = []
    tasks = [make_task(0)]
    for _ in range(4):
        tuner.run(tasks, lambda: seen.append(torch.get_num_threads()), trusted=lambda: False)
    assert seen[:2] == [1, 2]
    assert tuner.provisional == {(1, 1), (1, 2)}


def test_a_trusted_pass_replaces_what_untrusted_ones_taught_and_is_not_moved_by_them() -> None:
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    tuner.record(8, 1, 0.20, trusted=False)
    tuner.record(8, 2, 0.30, trusted=False)  # two threads, slowed by the front end
    for _ in range(3):
        tuner.record(8, 1, 0.25, trusted=False)
    assert tuner.choose(8) == 1
    tuner.record(8, 1, 0.20)  # alone at last: one thread's time is now trusted
    assert tuner.cost[8, 1] == 0.20
    # Two threads' only sample is a disturbed probe: checked at once against the trusted best.
    assert tuner.choose(8) == 2
    tuner.record(8, 2, 0.11)
    assert tuner.best() == {8: 2}
    tuner.record(8, 2, 5.0, trusted=False)  # a burst does not move a trusted time
    assert tuner.cost[8, 2] == 0.11
    assert tuner.provisional == set()


def test_a_disturbed_probe_that_lost_by_far_is_not_checked_at_once() -> None:
    """Beside a noisy neighbour a two-thread pass takes 20-90 times one thread's."""
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    tuner.record(1, 1, 0.3, trusted=False)
    tuner.record(1, 2, 6.0, trusted=False)
    tuner.record(1, 1, 0.3)
    assert tuner.choose(1) == 1  # the choice is a pure function: once is enough


class TimedModel:
    """Passes that take ``seconds_per_unit[threads]`` per work unit of a fake clock, while other
    processes keep ``others_share`` of a core busy."""

    def __init__(self, seconds_per_unit: dict[int, float], others_share: float = 0.0) -> None:
        self.seconds_per_unit = seconds_per_unit
        self.others_share = others_share
        self.now = 0.0
        self.others_busy = 0.0
        self.passes: list[tuple[int, int]] = []  # (batch size, threads)

    def forward(self, tasks: Sequence[ImageTask]) -> None:
        threads = torch.get_num_threads()
        self.passes.append((len(tasks), threads))
        seconds = self.seconds_per_unit[threads] * work_units(tasks)
        self.now += seconds
        self.others_busy += self.others_share * seconds

    def calibrate(self, tuner: ThreadTuner, budget_s: float) -> None:
        tasks_for = lambda size: [make_task(index, steps=4) for index in range(size)]  # noqa: E731
        tuner.calibrate(
            (1, 8),
            tasks_for,
            self.forward,
            budget_s,
            clock=lambda: self.now,
            others_busy=lambda: self.others_busy,
        )


@pytest.mark.usefixtures("torch_threads_restored")
def test_calibration_times_each_count_so_that_no_request_pays_a_probe() -> None:
    """make bench 21:22: three lone 8-image requests a round, one of which probed one thread (1.8x
    slower): the batch-8 pass took 1.12x the bare pass in turn."""
    model = TimedModel({1: 0.05, 2: 0.03})
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    model.calibrate(tuner, budget_s=60)
    # Each count a probe and a timed pass, then one more timed pass each in reverse: A B B A.
    assert model.passes == [(size, threads) for size in (1, 8) for threads in (1, 1, 2, 2, 2, 1)]
    assert tuner.provisional == set()
    assert learn(tuner, 8, {1: 0.05, 2: 0.03}, passes=10) == [2] * 10
    assert learn(tuner, 1, {1: 0.05, 2: 0.03}, passes=10) == [2] * 10


@pytest.mark.usefixtures("torch_threads_restored")
def test_calibration_learns_the_timed_pass_not_the_probe() -> None:
    model = TimedModel({1: 0.05, 2: 0.03})
    tuner = ThreadTuner((1, 2))
    original = model.forward

    def first_pass_slow(tasks: Sequence[ImageTask]) -> None:
        original(tasks)
        if len(model.passes) == 1:
            model.now += 10.0  # one-off costs: the first pass ever loads kernels

    model.forward = first_pass_slow  # type: ignore[method-assign]
    model.calibrate(tuner, budget_s=60)
    assert tuner.cost[1, 1] == pytest.approx(0.05)


@pytest.mark.parametrize("slowed", [2, 3])
@pytest.mark.usefixtures("torch_threads_restored")
def test_calibration_learns_each_counts_fastest_timed_pass(slowed: int) -> None:
    """One start in four (2026-12-02 00:21) trusted one thread at batch 1 with no pass flagged: a
    two-thread pass stalls at its barriers when anything takes a core for a moment, so one slowed
    timed pass decided. A count now learns the fastest of its timed passes, taken A B B A."""
    model = TimedModel({1: 0.05, 2: 0.03})
    tuner = ThreadTuner((1, 2))
    original = model.forward

    def one_two_thread_timed_pass_slowed(tasks: Sequence[ImageTask]) -> None:
        original(tasks)
        if model.passes.count((1, 2)) == slowed:
            model.now += 0.1  # one core taken for a moment, too briefly to flag the pass

    model.forward = one_two_thread_timed_pass_slowed  # type: ignore[method-assign]
    model.calibrate(tuner, budget_s=60)
    assert tuner.cost[1, 2] == pytest.approx(0.03)
    assert tuner.best() == {1: 2, 8: 2}
    assert tuner.provisional == set()


@pytest.mark.usefixtures("torch_threads_restored")
def test_a_calibration_pass_other_processes_disturbed_is_checked_by_the_first_requests() -> None:
    """make bench 23:49: the service's other processes were still busy when the replica calibrated,
    and the batch-1 choice it trusted (one thread) held the whole 1-client round."""
    model = TimedModel({1: 0.05, 2: 0.08}, others_share=0.5)  # two threads stall beside them
    tuner = ThreadTuner((1, 2), explore_every=20, probe_every=4)
    model.calibrate(tuner, budget_s=60)
    assert tuner.provisional == {(1, 1), (1, 2), (8, 1), (8, 2)}
    # Quiet now: one thread runs first, and its trusted time sends the next pass to two threads.
    assert learn(tuner, 1, {1: 0.05, 2: 0.03}, passes=5) == [1, 2, 2, 2, 2]
    quiet = TimedModel({1: 0.05, 2: 0.03}, others_share=0.1)  # the idle service's own background
    calm = ThreadTuner((1, 2))
    quiet.calibrate(calm, budget_s=60)
    assert calm.provisional == set()


@pytest.mark.usefixtures("torch_threads_restored")
def test_calibration_starts_no_pass_that_would_end_past_its_budget() -> None:
    # Batch 1 costs 0.2 or 0.12 s a pass; a batch-8 pass, predicted at batch 1's best rate, 0.96 s.
    model = TimedModel({1: 0.05, 2: 0.03})
    tuner = ThreadTuner((1, 2))
    model.calibrate(tuner, budget_s=1.0)
    # Both timed rounds at batch 1 end at 0.96 s; a batch-8 pass (0.96 s at batch 1's best rate) at 1.92.
    assert model.passes == [(1, 1), (1, 1), (1, 2), (1, 2), (1, 2), (1, 1)]
    assert tuner.best() == {1: 2}
    short = TimedModel({1: 0.05, 2: 0.03})
    short.calibrate(ThreadTuner((1, 2)), budget_s=0.9)
    assert short.passes == [(1, 1), (1, 1), (1, 2), (1, 2)]  # the second round would end at 0.96 s
    lone = ThreadTuner((1, 2))
    TimedModel({1: 5.0, 2: 3.0}).calibrate(lone, budget_s=1.0)
    assert list(lone.cost) == [(1, 1)]  # the first pass always runs; it warms the kernels
    assert lone.passes == {(1, 1): 1}


@pytest.mark.usefixtures("torch_threads_restored")
def test_calibration_does_not_time_again_or_at_a_larger_batch_a_count_whose_probe_lost_by_far() -> None:
    """Beside a noisy neighbour a two-thread pass takes 20-90 times one thread's."""
    model = TimedModel({1: 0.05, 2: 2.0})
    tuner = ThreadTuner((1, 2))
    model.calibrate(tuner, budget_s=60)
    assert model.passes == [(1, 1), (1, 1), (1, 2), (8, 1), (8, 1)]  # one count left: nothing to compare
    assert tuner.best() == {1: 1, 8: 1}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    yield from replica_event_loop()


@pytest.mark.usefixtures("torch_threads_restored")
def test_an_auto_replica_tunes_its_passes(loop: asyncio.AbstractEventLoop) -> None:
    with tempfile.TemporaryDirectory() as storage:
        replicas = in_process_replica(loop, Path(storage), {"cpu_threads": "auto"})
        replica = next(replicas)

        async def two_passes() -> ReplicaStats:
            for index in range(len(thread_candidates(usable_cores()))):
                await replica.generate([make_task(index)])
            stats: ReplicaStats = await replica.stats()
            return stats

        stats = loop.run_until_complete(two_passes())
        replicas.close()
    assert stats.threads_by_batch.keys() == {1}
    assert stats.threads_by_batch[1] in thread_candidates(usable_cores())


@pytest.mark.usefixtures("torch_threads_restored")
def test_an_auto_replica_calibrates_before_its_first_request(loop: asyncio.AbstractEventLoop) -> None:
    batching = BatchingConfig(max_batch_size=3, batch_wait_timeout_s=0.002)
    with tempfile.TemporaryDirectory() as storage:
        changes = {"cpu_threads": "auto", "batching": batching, "thread_calibration_s": 15.0}
        replicas = in_process_replica(loop, Path(storage), changes)
        stats: ReplicaStats = loop.run_until_complete(next(replicas).stats())
        replicas.close()
    assert stats.received == 0
    assert stats.threads_by_batch.keys() == {1, 3}
