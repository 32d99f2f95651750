"""Torch threads for forward passes on a CPU: fixed, or chosen by measurement (``cpu_threads: auto``).

On a small CPU the best thread count depends on what else runs there. Alone, a pass on every
core is fastest; beside a busy front end (or a noisy neighbour) one OpenMP thread of the pass is
preempted now and then and every other thread waits for it at the next barrier, so fewer threads
can finish sooner. ``auto`` measures instead of guessing: each batch size tries every candidate
count, then runs on the count whose recent passes took the least time per unit of work, and
retries the others now and then so a change of conditions is noticed.

A count's first pass at a batch size is only a probe: it pays that shape's one-off costs, and at
start-up it often runs inside a burst that keeps the front end busy on the same cores. After the
benchmark's warm-up bursts, the embedded default's two-thread probe lost to one thread at batch 8
in every start, at some of batch sizes 3-7 in most, and in one start of five at batch 1. Blended
into later passes at ``smoothing`` 0.3, such a probe takes three retries, some 75 passes, to
overturn: that start's whole 1-client round ran on one thread (3.1 images/s, where starts on two
threads made 5.0). So a count's second pass replaces its probe rather than blending with it, and a
count that lost on its probe alone, by less than ``far_slower``, is retried after ``probe_every``
(not ``explore_every``) of its passes' worth. A probe that lost by more is not hurried: beside a
noisy neighbour a two-thread pass at batch 1 took 6.4 s instead of 0.3, and confirming it at a
quarter of the time held up the requests behind it.

Retries are paid for in time, not counted in passes: a count whose passes cost k times the best
one's is retried after ``explore_every * k`` passes on the others, so retrying each slower count
costs at most one ``explore_every``-th of the time. That matters beside a noisy neighbour: a pass
on two OpenMP threads with one core taken by another process spins at every barrier and took 50-90
times as long as on one thread (``benchmarks/thread_contention.py``); retrying it every 20th pass
would have tripled the mean pass time, while the budget keeps it near the one-thread pass. For the
same reason a batch size's first try of a count is skipped when the nearest batch size measured on
every count found it over ``far_slower`` times the best: the count is then retried on the budget.

A caller may say a pass is not to be trusted (a replica with lanes: a request arrived during it,
so the front end took cores from it). Such a pass teaches only where nothing trusted is known: its
time is *provisional*, the first trusted pass on that count replaces it, and a count whose only
sample is a provisional probe is checked once at once against a trusted best. Ignoring such passes
altogether left a count that only ever ran disturbed untried, so chosen for every pass: at 8
clients, where every pass had arrivals, `make bench` (2026-12-01 21:00) ran all of them on one
thread (3.55 images/s, against 5.93 at 19:01).

Before its first request a replica calibrates (:meth:`ThreadTuner.calibrate`): batch 1, then the
largest batch, each on every count, a probe and then two timed passes (A B B A), within a budget of
seconds; each count learns its fastest timed pass. So
the counts a lone request or a full batch runs on are known before the service takes requests, and
a request never pays a probe. Learning from requests alone, `make bench` (2026-12-01 21:22) sent
three lone 8-image requests a round and one of them probed one thread at batch 8: its passes took
1.12 times the bare pass timed in turn. A count whose probe took ``far_slower`` times the best
is not timed again, nor tried at the larger batch (beside a noisy neighbour a two-thread probe
takes seconds); and no pass starts that the passes so far say would end past the budget, so on a
large model calibration stops at the first pass, which still warms the kernels. A pass during
which other processes kept a quarter of a core busy teaches only provisionally, as a disturbed
probe, to be checked by the first lone requests: `make bench` (2026-12-01 23:49) started the
replica while the service's other processes were still busy, and the batch-1 choice its
calibration trusted (one thread) held the whole 1-client round (the pass 1.14 times the bare one).
A slowing under that share still moves a two-thread pass, which waits at every barrier for a
thread that lost its core for a moment: with one timed pass a count, one start in four (2026-12-02
00:21) trusted one thread at batch 1 with no pass flagged. Its fastest of two, taken in turn with
the other count's, is what the count can do.

The price: float sums split over another number of threads may round differently, so on some
models (the embedded ``digits``) the same seed can differ by one level in a few pixels between
passes on different counts. That is why ``auto`` is opt-in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import torch

from deployments.contracts import ImageTask

T = TypeVar("T")

CpuThreads = int | Literal["all", "auto"]


DISTURBED_SHARE = 0.25
"""A calibration pass during which other processes kept this share of a core busy (or more) is not
trusted: at start-up the service's other replicas are often still loading. The idle service's own
background is about a tenth of a core."""


def others_busy_s() -> float:
    """CPU seconds the machine's cores have been busy (or stolen) for other processes than this one,
    since boot (/proc/stat; 0 where there is none, so every pass looks undisturbed)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields)
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy - time.process_time()


def usable_cores() -> int:
    """Every core this process may run on (Ray itself gives a worker floor(num_cpus))."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_thread_count(requested: CpuThreads) -> int:
    """The threads a pass starts with: ``all`` and ``auto`` start on every usable core."""
    return usable_cores() if requested in ("all", "auto") else int(requested)


def set_pass_threads(count: int) -> None:
    """This thread's torch threads for its next passes, set only when they change (setting them
    also clears this thread's cache of oneDNN kernels)."""
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def thread_candidates(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself."""
    counts = {cores}
    count = 1
    while count < cores:
        counts.add(count)
        count *= 2
    return tuple(sorted(counts))


def work_units(tasks: Sequence[ImageTask]) -> float:
    """What a pass costs, roughly: steps times pixels, summed over its images (in 64x64 units)."""
    return sum(task.steps * task.width * task.height for task in tasks) / 4096


@dataclass
class ThreadTuner:
    """Per batch size, the thread count whose passes take least time per unit of work (a pure
    policy: the caller times the passes and sets the threads)."""

    candidates: tuple[int, ...]
    explore_every: int = 20
    """A slower count is retried once the others have run this many of its passes' worth."""
    smoothing: float = 0.3
    cost: dict[tuple[int, int], float] = field(default_factory=dict)
    """(batch size, threads) -> smoothed seconds per work unit."""
    passes_since: dict[tuple[int, int], int] = field(default_factory=dict)
    """(batch size, threads) -> passes of that batch size on other counts since it last ran."""
    far_slower: float = 3.0
    """A count another batch size found this many times slower than its best is not tried at once."""
    probe_every: int = 4
    """A count that lost by less than ``far_slower`` on its probe alone is retried once the others
    have run this many of its passes' worth (confirming it costs at most a quarter of the time)."""
    passes: dict[tuple[int, int], int] = field(default_factory=dict)
    """(batch size, threads) -> passes timed on that count."""
    provisional: set[tuple[int, int]] = field(default_factory=set)
    """(batch size, threads) whose cost comes only from passes the caller did not trust."""
    timed_rounds: int = 2
    """Calibration: the passes timed on each count after its probe (none for a count whose probe
    lost by ``far_slower``)."""

    def estimates(self, batch_size: int) -> dict[int, float]:
        """Seconds per work unit of ``batch_size`` on each count: measured, or else borrowed from the
        nearest batch size measured on every count where it found the count far slower (scaled by
        the counts both measured); counts with neither are left out, to be tried."""
        own = {t: self.cost[batch_size, t] for t in self.candidates if (batch_size, t) in self.cost}
        sizes = {size for size, _ in self.cost}
        complete = [size for size in sizes if all((size, t) in self.cost for t in self.candidates)]
        if len(own) == len(self.candidates) or not complete:
            return own
        nearest = min(complete, key=lambda size: (abs(size - batch_size), size))
        theirs = {t: self.cost[nearest, t] for t in self.candidates}
        scale = sum(own[t] / theirs[t] for t in own) / len(own) if own else 1.0
        fastest = min(theirs.values())
        far = {t: scale * cost for t, cost in theirs.items() if cost > self.far_slower * fastest}
        return {**far, **own}

    def choose(self, batch_size: int) -> int:
        estimate = self.estimates(batch_size)
        untried = [threads for threads in self.candidates if threads not in estimate]
        if untried:
            return untried[0]
        best, *slower = sorted(self.candidates, key=estimate.__getitem__)
        # The longest-waiting of the counts whose retry the time budget now pays for, if any.
        due = [
            threads
            for threads in slower
            if self.passes_since.get((batch_size, threads), 0)
            >= self._retry_after(batch_size, threads, estimate[threads] / estimate[best], best)
        ]
        return max(due, key=lambda threads: self.passes_since.get((batch_size, threads), 0), default=best)

    def _retry_after(self, batch_size: int, threads: int, slowdown: float, best: int) -> float:
        """Passes on the other counts before ``threads`` (``slowdown`` times ``best``) runs again."""
        key = (batch_size, threads)
        # A burst can make a probe lose by a little; losing by far_slower is the machine, not noise.
        confirm_soon = self.passes.get(key) == 1 and slowdown < self.far_slower
        if confirm_soon and key in self.provisional and (batch_size, best) not in self.provisional:
            return 0  # a disturbed probe against a trusted best: check it now
        return (self.probe_every if confirm_soon else self.explore_every) * slowdown

    def record(self, batch_size: int, threads: int, seconds_per_unit: float, trusted: bool = True) -> None:
        """One pass's time; an untrusted one counts only where no trusted pass has (provisionally)."""
        key = (batch_size, threads)
        for other in self.candidates:
            waited = (batch_size, other)
            self.passes_since[waited] = 0 if other == threads else self.passes_since.get(waited, 0) + 1
        if not trusted and key in self.cost and key not in self.provisional:
            return
        if trusted and key in self.provisional:
            self.provisional.discard(key)
            self.passes[key] = 0  # the first trusted pass replaces what untrusted ones taught
        elif not trusted:
            self.provisional.add(key)
        self.passes[key] = self.passes.get(key, 0) + 1
        if self.passes[key] <= 2:  # the probe, or the pass that replaces it
            self.cost[key] = seconds_per_unit
        else:
            self.cost[key] += self.smoothing * (seconds_per_unit - self.cost[key])

    def calibrate(
        self,
        batch_sizes: Sequence[int],
        tasks_for: Callable[[int], Sequence[ImageTask]],
        forward_pass: Callable[[Sequence[ImageTask]], object],
        budget_s: float,
        clock: Callable[[], float] = time.perf_counter,
        others_busy: Callable[[], float] = others_busy_s,
    ) -> None:
        """Time ``batch_sizes`` in order on every count, a probe and then ``timed_rounds`` passes
        whose times count, by running ``forward_pass(tasks_for(size))`` on this thread; within
        ``budget_s``, except that the first pass always runs. A count learns its fastest timed pass
        that other processes left alone (under `DISTURBED_SHARE`) as trusted: a disturbance only
        ever slows a pass. With none, it learns its fastest pass as a provisional probe."""
        deadline = clock() + budget_s
        for batch_size in batch_sizes:
            timed, in_budget = self._calibrate_batch_size(
                tasks_for(batch_size), forward_pass, deadline, clock, others_busy
            )
            for threads, (probe, *counted) in timed.items():
                key = (batch_size, threads)
                trusted = [cost for cost, disturbed in counted if not disturbed]
                self.cost[key] = min(trusted or [cost for cost, _ in counted] or [probe[0]])
                self.passes[key] = 2 if trusted else 1  # 1: the next pass replaces it
                if not trusted and (counted or probe[1]):
                    self.provisional.add(key)
            if not in_budget:
                return

    def _calibrate_batch_size(
        self,
        tasks: Sequence[ImageTask],
        forward_pass: Callable[[Sequence[ImageTask]], object],
        deadline: float,
        clock: Callable[[], float],
        others_busy: Callable[[], float],
    ) -> tuple[dict[int, list[tuple[float, bool]]], bool]:
        """One batch size's passes: threads -> seconds per unit of its probe and then of each
        timed pass, and whether other processes disturbed it; and False when a pass was left out
        for the budget. Each count runs a probe and a timed pass in turn, then the counts compared
        run ``timed_rounds - 1`` more rounds in alternating order, so their timed passes run
        A B B A and a drift of the machine's speed favours neither. A count whose probe took
        ``far_slower`` times the best pass is not timed after its probe (beside a noisy neighbour a
        two-thread probe takes seconds)."""
        timed: dict[int, list[tuple[float, bool]]] = {}
        units = work_units(tasks)
        far = self.estimates(len(tasks))  # before any pass of its own: what smaller batches found far slower
        counts = [t for t in self.candidates if t not in far]

        def time_pass(threads: int) -> bool:
            """One pass on ``threads``, unless the passes so far say it would end past the deadline."""
            seen = [cost for cost, _ in timed.get(threads, [])]
            seen = seen or [cost for times in timed.values() for cost, _ in times] or list(self.cost.values())
            if seen and clock() + units * min(seen) > deadline:
                return False
            set_pass_threads(threads)
            started, others_before = clock(), others_busy()
            forward_pass(tasks)
            seconds = clock() - started
            disturbed = others_busy() - others_before >= DISTURBED_SHARE * seconds
            timed.setdefault(threads, []).append((seconds / units, disturbed))
            return True

        for threads in counts:  # a probe, then a timed pass unless the probe alone lost by far
            for _ in range(2):
                if not time_pass(threads):
                    return timed, False
                if timed[threads][-1][0] > self.far_slower * min(times[-1][0] for times in timed.values()):
                    break
        compared = [threads for threads in counts if len(timed[threads]) == 2]
        for round_number in range(self.timed_rounds - 1) if len(compared) > 1 else ():
            # A round runs whole or not at all: a count with one pass more would have a better minimum.
            if clock() + units * sum(min(cost for cost, _ in timed[t]) for t in compared) > deadline:
                return timed, False
            for threads in compared[::-1] if round_number % 2 == 0 else compared:  # A B | B A | A B
                if not time_pass(threads):
                    return timed, False
        return timed, True

    def best(self) -> dict[int, int]:
        """The count each measured batch size runs on now (safe to call from another thread)."""
        cost = dict(list(self.cost.items()))  # one C-level copy: the pass thread may be writing
        return {
            size: min((t for s, t in cost if s == size), key=lambda threads: cost[size, threads])
            for size in sorted({size for size, _ in cost})
        }

    def run(
        self,
        tasks: Sequence[ImageTask],
        forward_pass: Callable[[], T],
        trusted: Callable[[], bool] | None = None,
    ) -> T:
        """Run ``forward_pass`` over ``tasks`` on the chosen threads and learn from its time (on
        the thread that runs every pass; a pass that raises teaches nothing, and one for which
        ``trusted``, asked once it ends, says no is :meth:`record`ed as untrusted)."""
        threads = self.choose(len(tasks))
        set_pass_threads(threads)
        started = time.perf_counter()
        result = forward_pass()
        seconds_per_unit = (time.perf_counter() - started) / work_units(tasks)
        self.record(len(tasks), threads, seconds_per_unit, trusted=trusted is None or trusted())
        return result
