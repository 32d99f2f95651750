"""Step load against an autoscaled service: backlog, replicas and latency over time.

``python -m benchmarks.autoscaling_step`` starts a private Ray instance, deploys the embedded
model with an ``autoscaling:`` block (through the Serve config, as ``imagegen serve`` does), and
sends an open-loop step load: low, then high, then low again. Every half second it samples the
scheduler's backlog and slots and the variant's running replicas. It writes ``step_load.png``
and ``report.md`` with the times that matter: from the step up to the first new replica, to the
backlog draining, and from the step down back to the minimum.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

RESULTS_DIR = Path(__file__).parent / "results" / "autoscaling"
VARIANT = "tiny-sd"
SAMPLE_INTERVAL_S = 0.5
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_images_per_replica": 8,
    "upscale_delay_s": 2,
    "downscale_delay_s": 20,
}


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    requests_per_s: float


@dataclass(frozen=True)
class Sample:
    t: float
    queued: int
    in_flight: int
    slots: int
    replicas: int
    wanted: int  # replicas running or starting: what the policy has asked for


@dataclass(frozen=True)
class Answer:
    sent: float
    latency_s: float
    status: int


def write_config(directory: Path, port: int) -> Path:
    from serve_app.config import CONFIG_DIR, DEFAULT_CONFIG_PATH

    data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    variant = yaml.safe_load((CONFIG_DIR / "variants" / f"{VARIANT}.yaml").read_text())
    variant["resources"] = {
        key: value for key, value in variant["resources"].items() if key != "num_replicas"
    }
    variant["autoscaling"] = AUTOSCALING
    data.update(port=port, variants=[variant], storage={"url": f"file://{directory / 'store'}"})
    path = directory / "autoscaled.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sampler(samples: list[Sample], start: float, stop: threading.Event) -> None:
    from ray import serve
    from ray.serve.schema import ReplicaState

    from serve_app.deploy import APP_NAME
    from serve_app.scheduler import running_replicas

    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    while not stop.is_set():
        state = scheduler.stats.remote().result()["variants"][VARIANT]
        queued = sum(value for key, value in state.items() if key.startswith("queued_"))
        status = serve.status()
        replicas = running_replicas(status, APP_NAME, f"ModelReplica-{VARIANT}") or 0
        overview = status.applications[APP_NAME].deployments[f"ModelReplica-{VARIANT}"]
        wanted = replicas + overview.replica_states.get(ReplicaState.STARTING, 0)
        samples.append(
            Sample(time.monotonic() - start, queued, state["in_flight"], state["capacity"], replicas, wanted)
        )
        stop.wait(SAMPLE_INTERVAL_S)


async def step_load(base_url: str, phases: Sequence[Phase], start: float) -> list[Answer]:
    answers: list[Answer] = []
    body = {"model": VARIANT, "prompt": "a lighthouse", "size": "64x64", "quality": "low"}

    async def one(client: httpx.AsyncClient, scheduled: float) -> None:
        response = await client.post("/v1/images/generations", json=body)
        answers.append(Answer(scheduled - start, time.monotonic() - scheduled, response.status_code))

    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=900, limits=unlimited) as client:
        tasks = []
        phase_start = time.monotonic()
        for phase in phases:
            count = round(phase.duration_s * phase.requests_per_s)
            for index in range(count):
                scheduled = phase_start + index / phase.requests_per_s
                await asyncio.sleep(max(0.0, scheduled - time.monotonic()))  # open loop: on schedule
                tasks.append(asyncio.create_task(one(client, scheduled)))
            phase_start += phase.duration_s
        await asyncio.gather(*tasks)
    return answers


def first_time(samples: Sequence[Sample], after: float, condition: Any) -> float | None:
    return next((sample.t - after for sample in samples if sample.t >= after and condition(sample)), None)


def summarize(
    phases: Sequence[Phase], samples: Sequence[Sample], answers: Sequence[Answer]
) -> dict[str, Any]:
    step_up = phases[0].duration_s
    step_down = step_up + phases[1].duration_s
    start_replicas = samples[0].replicas
    peak = max(sample.replicas for sample in samples)
    peak_at = next(sample.t for sample in samples if sample.replicas == peak)
    back_to_min = first_time(samples, peak_at, lambda s: s.replicas == AUTOSCALING["min_replicas"])
    return {
        "step_up_to_scale_up_decision_s": first_time(samples, step_up, lambda s: s.wanted > start_replicas),
        "step_up_to_first_new_replica_running_s": first_time(
            samples, step_up, lambda s: s.replicas > start_replicas
        ),
        "peak_replicas": peak,
        "peak_backlog_images": max(sample.queued + sample.in_flight for sample in samples),
        "step_down_to_queue_empty_s": first_time(samples, step_down, lambda s: s.queued == 0),
        "step_down_to_back_at_min_replicas_s": (
            None if back_to_min is None or peak == start_replicas else peak_at + back_to_min - step_down
        ),
        "requests": len(answers),
        "non_200": sum(answer.status != 200 for answer in answers),
    }


def plot(path: Path, phases: Sequence[Phase], samples: Sequence[Sample], answers: Sequence[Answer]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (load, replicas, latency) = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    times = [sample.t for sample in samples]
    load.plot(times, [sample.queued for sample in samples], label="queued images")
    load.plot(times, [sample.in_flight for sample in samples], label="running images")
    load.set_ylabel("images")
    load.legend(loc="upper right")
    replicas.step(times, [sample.replicas for sample in samples], where="post", label="model replicas")
    replicas.step(times, [s.wanted for s in samples], where="post", ls=":", label="running + starting")
    replicas.step(times, [sample.slots / 16 for sample in samples], where="post", ls="--", label="slots / 16")
    replicas.set_ylabel("replicas")
    replicas.legend(loc="upper right")
    latency.scatter([a.sent for a in answers], [a.latency_s for a in answers], s=4)
    latency.set_ylabel("latency (s)")
    latency.set_xlabel("seconds since start of load (by send time)")
    edge = 0.0
    for phase in phases:
        for axis in (load, replicas, latency):
            axis.axvline(edge, color="grey", lw=0.5)
        load.annotate(f"{phase.name}: {phase.requests_per_s:g} req/s", (edge + 1, 0), fontsize=8)
        edge += phase.duration_s
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def format_value(value: float | None) -> str:
    """A summary number as the report shows it: seconds to a tenth, counts whole."""
    if value is None:
        return "not reached"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def render(phases: Sequence[Phase], summary: dict[str, Any], answers: Sequence[Answer]) -> str:
    latencies = sorted(answer.latency_s for answer in answers)
    lines = [
        "# Step load against an autoscaled service",
        "",
        "`python -m benchmarks.autoscaling_step` on this machine (2 shared cores, no GPU): the embedded",
        f"`{VARIANT}` model, autoscaling `{AUTOSCALING}`, 64x64 images at quality low.",
        "",
        "Phases: "
        + ", then ".join(f"{p.name} {p.requests_per_s:g} req/s for {p.duration_s:g} s" for p in phases),
        "",
        "| What | Value |",
        "|---|---|",
        *(f"| {key} | {format_value(value)} |" for key, value in summary.items()),
        f"| latency p50 / max (s) | {latencies[len(latencies) // 2]:.1f} / {latencies[-1]:.1f} |",
        "",
        "![step load](step_load.png)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=float, default=0.5, help="requests/s before and after the step")
    parser.add_argument("--high", type=float, default=6.0, help="requests/s during the step")
    parser.add_argument("--seconds", type=float, nargs=3, default=(30.0, 45.0, 60.0), help="phase lengths")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from benchmarks.run import free_port
    from serve_app.deploy import APP_NAME, deploy

    phases = [
        Phase("low", args.seconds[0], args.low),
        Phase("high", args.seconds[1], args.high),
        Phase("low", args.seconds[2], args.low),
    ]
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        config_path = write_config(Path(directory), port)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            deploy(config_path)
            while (app := serve.status().applications.get(APP_NAME)) is None or app.status != "RUNNING":
                time.sleep(1)  # waiting for the deployment, no deadline: a benchmark, watched
            samples: list[Sample] = []
            stop = threading.Event()
            start = time.monotonic()
            thread = threading.Thread(target=sampler, args=(samples, start, stop))
            thread.start()
            answers = asyncio.run(step_load(f"http://127.0.0.1:{port}", phases, start))
            while samples[-1].replicas > AUTOSCALING["min_replicas"]:
                time.sleep(SAMPLE_INTERVAL_S)
            stop.set()
            thread.join()
        finally:
            serve.shutdown()
            ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(phases, samples, answers)
    plot(args.out / "step_load.png", phases, samples, answers)
    (args.out / "report.md").write_text(render(phases, summary, answers))
    print(render(phases, summary, answers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
