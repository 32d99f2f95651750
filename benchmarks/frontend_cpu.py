"""Where the service's CPU per image goes at saturation, process by process:
``python -m benchmarks.frontend_cpu``.

Starts ``imagegen serve`` (the benchmarks' tiny-sd config unless ``--config``; its ingress listens
itself, as in ``make bench``) in its own session, warms it up, then runs a closed loop of
``--clients`` (16) for ``--window`` seconds and reads each of the session's processes' CPU time from
``/proc`` around it: core-ms per image for every process (proxy, ingress, scheduler, the stages,
Ray's own), and their sum outside the forward passes (all but the model's compute threads), the
front end's cost (issue 13). A 1-client loop before it gives the unloaded latency.

On a slow or shared machine the model makes few images per second, so the part of that sum that
runs by the clock (Serve's controller, metrics, health checks, Ray's agents) weighs heavily per
image. A window with no requests (``--idle``) measures that part, and the report also gives the
front end's per-request work alone: its CPU at saturation less its idle CPU over the same time.

Compare settings or code side by side, interleaved (A B A B) so a busy minute on a shared machine
does not favour one of them: ``--env NAME=VALUE`` (repeatable) starts B with extra environment;
``--baseline DIR`` runs A from another checkout of the code (e.g. ``git archive main | tar -x -C
DIR``), B from this one.

    python -m benchmarks.frontend_cpu --window 30
    python -m benchmarks.frontend_cpu --baseline /tmp/main --repeat 2
    python -m benchmarks.frontend_cpu --env IMAGEGEN_STAGES__PREPROCESS__COLOCATE=false --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.idle_cpu import parse_env
from benchmarks.loadgen import RequestRecord, run_closed_loop, warm_up
from benchmarks.machine import MODEL_PASSES, ForeignLoadMeter, session_cpu
from benchmarks.run import free_port
from benchmarks.systems import SINGLE_SERVER, ServerSystem, running_server
from benchmarks.workload import RequestMix, iter_requests

RESULTS_DIR = Path(__file__).parent / "results" / "frontend_cpu"
TINY_SD_CONFIG = Path(__file__).parent / "configs" / "tiny-sd.yaml"
WARM_UP_BURSTS = (1, 2, 4, 8, 16)
TIMEOUT_S = 120.0
MIX = RequestMix(sizes={"64x64": 1.0}, endpoints={"generations": 1.0})


@dataclass(frozen=True)
class ProcessCost:
    label: str
    core_ms_per_image: float


@dataclass(frozen=True)
class SaturationRun:
    setting: str
    images: int
    images_per_s: float
    one_client_p50_ms: float | None
    total_core_ms_per_image: float
    outside_model_core_ms_per_image: float
    outside_model_idle_share: float  # of one core, with no requests
    per_request_core_ms_per_image: float  # outside the model, less the idle CPU over the same time
    processes: list[ProcessCost]
    foreign_load: str | None
    images_by_batch_size: dict[int, int]  # at saturation: how many images ran in batches of each size


def per_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between the two samples, summed per process label."""
    used: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        if pid in before:
            used[label] = used.get(label, 0.0) + seconds - before[pid][1]
    return used


@dataclass(frozen=True)
class Sample:
    one_client_p50_ms: float | None
    records: list[RequestRecord]
    span_s: float  # first send to last answer of the saturated loop
    used: dict[str, float]  # CPU seconds per process label over the saturated loop
    used_s: float  # the wall time those were read over
    idle: dict[str, float]  # share of one core per process label, with no requests


async def measure(
    base_url: str, session: int, clients: int, window_s: float, one_client_s: float, idle_s: float
) -> Sample:
    common: dict[str, Any] = {"system": "imagegen", "timeout_s": TIMEOUT_S}
    await warm_up(base_url, MIX, WARM_UP_BURSTS, **common)
    p50 = None
    if one_client_s > 0:
        records = await run_closed_loop(
            base_url,
            iter_requests(MIX, random.Random(1)),
            scenario="one",
            clients=1,
            duration_s=one_client_s,
            **common,
        )
        latencies = [record.latency_s for record in records if record.ok]
        p50 = statistics.median(latencies) * 1000 if latencies else None
    idle_before = session_cpu(session)
    await asyncio.sleep(idle_s)  # the measurement itself: a window with no requests
    idle = {
        label: seconds / idle_s for label, seconds in per_label(idle_before, session_cpu(session)).items()
    }
    started = time.monotonic()
    before = session_cpu(session)
    records = await run_closed_loop(
        base_url,
        iter_requests(MIX, random.Random(2)),
        scenario="saturated",
        clients=clients,
        duration_s=window_s,
        **common,
    )
    after = session_cpu(session)
    used_s = time.monotonic() - started
    ok = [record for record in records if record.ok]
    span = max(record.end_s for record in ok) - min(record.start_s for record in ok)
    return Sample(p50, ok, span, per_label(before, after), used_s, idle)


def saturation_run(
    config: str, setting: str, extra_env: dict[str, str], args: argparse.Namespace, storage: Path
) -> SaturationRun:
    port = free_port()
    env = {
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_STORAGE__URL": f"file://{storage}",
        "IMAGEGEN_CONFIG": config,
        # As `make bench` runs it; `--env IMAGEGEN_SCHEDULER__COLOCATE=false`: the scheduler apart,
        # and with `--env IMAGEGEN_STAGES__INGRESS__DIRECT=false` as well, behind the proxy.
        **SINGLE_SERVER,
    }
    env.update(extra_env)
    command = [sys.executable, "-m", "serve_app.cli", "serve"]
    system = ServerSystem("imagegen", "imagegen-serve", command, "imagegen-serve ready", env)
    print(f"[frontend-cpu] starting the service ({setting})", flush=True)
    with running_server(system, port) as server:
        meter = ForeignLoadMeter()
        meter.start(server.session)
        sample = asyncio.run(
            measure(server.base_url, server.session, args.clients, args.window, args.one_client, args.idle)
        )
        load = meter.stop()
    images = sum(record.images for record in sample.records)
    rows = sorted(
        (
            ProcessCost(label, seconds * 1000 / images)
            for label, seconds in sample.used.items()
            if seconds > 0
        ),
        key=lambda row: row.core_ms_per_image,
        reverse=True,
    )
    total = sum(row.core_ms_per_image for row in rows)
    outside = sum(row.core_ms_per_image for row in rows if MODEL_PASSES not in row.label)
    idle = sum(share for label, share in sample.idle.items() if MODEL_PASSES not in label)
    per_request = outside - idle * sample.used_s * 1000 / images
    return SaturationRun(
        setting,
        images,
        images / sample.span_s,
        sample.one_client_p50_ms,
        total,
        outside,
        idle,
        per_request,
        rows,
        load.describe() if load else None,
        dict(sorted(Counter(size for record in sample.records for size in record.batch_sizes).items())),
    )


def render(runs: Sequence[SaturationRun], clients: int) -> str:
    lines = ["# CPU per image at saturation, outside the forward passes", ""]
    lines.append(f"Closed loop of {clients} clients, tiny-sd 64x64; core-ms per image from /proc.")
    lines.append(
        "Outside the model: every process, less the model's compute threads (its forward passes); per "
        "request: less their idle CPU."
    )
    lines += [
        "",
        "| setting | img/s | 1-client p50 ms | outside model core-ms/img | per request | idle outside "
        "(% of a core) | all core-ms/img | images by batch size | others |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        p50 = f"{run.one_client_p50_ms:.0f}" if run.one_client_p50_ms is not None else "-"
        lines.append(
            f"| {run.setting} | {run.images_per_s:.2f} | {p50} | {run.outside_model_core_ms_per_image:.1f} "
            f"| {run.per_request_core_ms_per_image:.1f} | {run.outside_model_idle_share:.1%} "
            f"| {run.total_core_ms_per_image:.1f} "
            f"| {' '.join(f'{size}:{count}' for size, count in run.images_by_batch_size.items())} "
            f"| {run.foreign_load or 'n/a'} |"
        )
    for index, run in enumerate(runs, 1):
        lines += ["", f"## Run {index}: {run.setting} ({run.images} images)", ""]
        lines += ["| process | core-ms per image |", "|---|---|"]
        lines += [f"| {row.label} | {row.core_ms_per_image:.1f} |" for row in run.processes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontend_cpu", description=__doc__)
    parser.add_argument("--config", default=str(TINY_SD_CONFIG), help="service YAML (default: tiny-sd)")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients at saturation")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of the saturated loop")
    parser.add_argument(
        "--one-client", type=float, default=15.0, help="seconds of the 1-client loop (0: none)"
    )
    parser.add_argument("--idle", type=float, default=15.0, help="seconds with no requests, measured")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the compared run B")
    parser.add_argument("--baseline", type=Path, help="another checkout of the code, run as A")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (A B A B with --env or --baseline)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    settings: list[tuple[str, dict[str, str]]] = [("this checkout", {"PYTHONPATH": here})]
    if args.baseline:
        settings.insert(0, (f"baseline {args.baseline}", {"PYTHONPATH": str(args.baseline.resolve())}))
    if args.env:
        extra = parse_env(args.env)
        settings.append((" ".join(f"{k}={v}" for k, v in extra.items()), {"PYTHONPATH": here, **extra}))
    config = str(Path(args.config).resolve())
    runs: list[SaturationRun] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagegen-frontend-") as storage:
        for _ in range(args.repeat):
            for setting, extra_env in settings:
                # The server runs from a neutral folder, so PYTHONPATH alone picks the code.
                os.chdir(storage)
                runs.append(saturation_run(config, setting, extra_env, args, Path(storage)))
                outside = runs[-1].outside_model_core_ms_per_image
                print(f"[frontend-cpu] {setting}: {outside:.1f} core-ms/img outside the model", flush=True)
                report = render(runs, args.clients)  # after every run: a stopped comparison keeps its rows
                (args.out / "report.md").write_text(report)
                (args.out / "runs.json").write_text(
                    json.dumps([asdict(run) for run in runs], indent=2) + "\n"
                )
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
