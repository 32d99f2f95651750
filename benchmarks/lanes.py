"""Two one-thread lanes as threads of one process against two processes: ``python -m benchmarks.lanes``.

The model replica runs its side-by-side passes (``concurrent_passes``) on threads of one process,
each on its own view of the family; LitServe's one-thread workers are processes. This times the
bare pipeline's family code both ways, the two lanes passing at once, A B A B, and prints the
median pass: what a lane's pass pays for sharing its process (and its GIL) with the other lane.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from typing import Any

SIZE = "64x64"


def lane_passes(family: Any, bare: Any, batch: int, passes: int, lane: int) -> list[float]:
    """``passes`` timed passes of ``batch`` images on this thread, on one torch thread, after one
    untimed pass."""
    import torch

    torch.set_num_threads(1)
    tasks = bare.tasks(batch, SIZE, lane)
    family.generate(tasks)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        family.generate(tasks)
        times.append(time.perf_counter() - start)
    return times


def as_threads(batch: int, passes: int) -> list[float]:
    """Both lanes in this process: lane 0 on the loaded family, lane 1 on its lane view."""
    from benchmarks.systems import BarePipeline

    bare = BarePipeline()
    families = [bare.family]
    view = threading.Thread(target=lambda: families.append(bare.family.lane()))
    view.start()
    view.join()
    times: list[list[float]] = [[], []]

    def run(lane: int) -> None:
        times[lane] = lane_passes(families[lane], bare, batch, passes, lane)

    lanes = [threading.Thread(target=run, args=(lane,)) for lane in range(2)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    return times[0] + times[1]


def _process_lane(batch: int, passes: int, lane: int, start: Any, results: Any) -> None:
    from benchmarks.systems import BarePipeline

    bare = BarePipeline()
    start.wait()  # both loaded: they pass at once
    results.put(lane_passes(bare.family, bare, batch, passes, lane))


def as_processes(batch: int, passes: int) -> list[float]:
    """Each lane a process of its own, with its own copy of the weights."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = context.Queue()
    processes = [
        context.Process(target=_process_lane, args=(batch, passes, lane, start, results)) for lane in range(2)
    ]
    for process in processes:
        process.start()
    times = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return times[0] + times[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes", description=__doc__)
    parser.add_argument("--batch", type=int, default=4, help="images per pass (default 4)")
    parser.add_argument("--passes", type=int, default=6, help="timed passes per lane and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each both ways (A B A B)")
    args = parser.parse_args()
    for round_index in range(args.rounds):
        for name, run in (("threads of one process", as_threads), ("processes", as_processes)):
            median_ms = statistics.median(run(args.batch, args.passes)) * 1000
            print(
                f"round {round_index + 1}: two lanes as {name}: median pass {median_ms:.0f} ms "
                f"(batch {args.batch}, one torch thread each)",
                flush=True,
            )


if __name__ == "__main__":
    main()
