"""A forward pass under contention, on 2 and on 1 torch threads: ``python -m benchmarks.thread_contention``.

The bare pipeline (the family code the replica runs), batch 1, timed in three conditions: alone;
beside a Python thread that wants the GIL every 10 ms (what Ray's ``CoreWorker.CheckSignal`` does
in every Ray worker); and beside a process burning one core (a noisy neighbour). It shows what the
thread count costs in each, which is what ``cpu_threads: auto`` chooses between at run time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from benchmarks.machine import noisy_neighbour
from benchmarks.systems import BarePipeline


@contextmanager
def gil_ticker(period_s: float = 0.01) -> Iterator[None]:
    """A thread that takes the GIL every ``period_s``, as Ray's signal check does."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(period_s):  # each wake-up takes the GIL, as the signal check does
            pass

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pass_ms(bare: BarePipeline, threads: int, duration_s: float) -> float:
    _, records = bare.measure([1], duration_s, "64x64", threads=threads)
    return statistics.median(record.latency_s for record in records) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    bare = BarePipeline()
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "alone": nullcontext,
        "GIL ticker (10 ms)": gil_ticker,
        "neighbour burns 1 core": lambda: noisy_neighbour(1),
    }
    print(f"batch-1 pass p50 (ms), tiny-sd 64x64, {cores} cores, load {os.getloadavg()[0]:.2f}")
    print("| condition | " + " | ".join(f"{threads} thread(s)" for threads in (cores, 1)) + " |")
    print("|---|---|---|")
    for label, condition in conditions.items():
        with condition():
            row = [pass_ms(bare, threads, args.duration) for threads in (cores, 1)]
        print(f"| {label} | " + " | ".join(f"{ms:.0f}" for ms in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
