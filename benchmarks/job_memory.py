"""Memory of the scheduler and of the whole service over many async jobs (issue 11).

Starts Ray and the service in this process (the embedded models, local storage in a temporary
directory), then submits async jobs on the smallest size with the fewest steps, at most
``--concurrency`` in flight (each client submits, then waits for its job's webhook). It records the
resident memory (RSS) of the scheduler's replica and the sum over every process of this Ray
cluster (the children of this process: GCS, raylet, Serve's controller and proxy, every replica)
before the first job, after the last, and once more after ``--job-memory-s`` has passed, when the
scheduler has forgotten the finished jobs. Stops after ``--jobs`` jobs or ``--max-seconds``,
whichever comes first, and says which.

    python -m benchmarks.job_memory --jobs 10000 --max-seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray
import uvicorn
from pydantic import SecretStr
from ray import serve
from ray._private import state as ray_state
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.run import RESULTS_DIR, free_port, git_commit, machine_description
from serve_app.app import build_app
from serve_app.config import AppConfig, load_config

APP_NAME = "imagegen-job-memory"
MIB = 1024 * 1024
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
BODY = {"model": "digits", "prompt": "7", "size": "64x64", "quality": "low"}  # the cheapest pass


def service_config(storage: Path, job_memory_s: float) -> AppConfig:
    config = load_config()
    return config.model_copy(
        update={
            "storage": config.storage.model_copy(
                update={"url": f"file://{storage}", "signing_key": SecretStr("bench")}
            ),
            "scheduler": config.scheduler.model_copy(
                update={"job_memory_s": job_memory_s, "webhook_allow_private": True}
            ),
            "auth": config.auth.model_copy(update={"webhook_secret": SecretStr("bench-webhooks")}),
            "tiers": {
                name: tier.model_copy(update={"requests_per_minute": 1_000_000, "cost_per_minute": 1e9})
                for name, tier in config.tiers.items()
            },
        }
    )


class WebhookReceiver:
    """Each job's webhook, received on loopback, so its client waits without polling (as a batch
    client of the jobs API would: 32 clients polling every quarter second cost the service more
    than the jobs did)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, asyncio.Future[str]] = {}
        self.port = free_port()

    def outcome(self, job_id: str) -> asyncio.Future[str]:
        """The job's final status; the webhook may come before its client asks."""
        return self.outcomes.setdefault(job_id, asyncio.get_running_loop().create_future())

    async def receive(self, request: Request) -> Response:
        event = await request.json()
        if event["status"] in FINAL_STATUSES and not (future := self.outcome(event["id"])).done():
            future.set_result(event["status"])
        return Response(status_code=204)

    def serve(self) -> uvicorn.Server:
        app = Starlette(routes=[Route("/", self.receive, methods=["POST"])])
        return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))


def scheduler_pid() -> int:
    wanted = f"ServeReplica:{APP_NAME}:Scheduler"
    actors = ray_state.actors(actor_state_name="ALIVE").values()
    return next(actor["Pid"] for actor in actors if actor["ActorClassName"] == wanted)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def service_rss_mib() -> float:
    """Every process of this Ray cluster: the children of this driver, recursively."""
    total = 0
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / MIB


def snapshot(label: str, done: int) -> dict[str, Any]:
    return {
        "label": label,
        "jobs": done,
        "scheduler_rss_mib": round(rss_mib(scheduler_pid()), 1),
        "service_rss_mib": round(service_rss_mib(), 1),
    }


async def run_jobs(
    base_url: str,
    jobs: int,
    concurrency: int,
    max_seconds: float,
    sample_s: float,
    rows: list[dict[str, Any]],
) -> tuple[int, int]:
    """Submit and follow jobs until ``jobs`` are done or time is up; (succeeded, other). Appends a
    memory snapshot to ``rows`` every ``sample_s`` meanwhile, so a plateau (or a leak) shows."""
    deadline = time.monotonic() + max_seconds
    counts = {"succeeded": 0, "other": 0, "started": 0}

    async def sample() -> None:
        while True:
            await asyncio.sleep(sample_s)  # a timer: memory is read at a fixed pace
            done = counts["succeeded"] + counts["other"]
            rows.append(await asyncio.to_thread(snapshot, "during", done))
            print(f"[job_memory] {rows[-1]}", flush=True)

    receiver = WebhookReceiver()
    body = {**BODY, "webhook_url": f"http://127.0.0.1:{receiver.port}/"}

    async def one_client(client: httpx.AsyncClient) -> None:
        while counts["started"] < jobs and time.monotonic() < deadline:
            counts["started"] += 1
            accepted = await client.post(
                "/v1/images/generations", json=body, headers={"prefer": "respond-async"}
            )
            if accepted.status_code != 202:
                counts["other"] += 1
                continue
            job_id = accepted.json()["id"]
            status = await receiver.outcome(job_id)
            del receiver.outcomes[job_id]
            counts["succeeded" if status == "succeeded" else "other"] += 1

    server = receiver.serve()
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)  # uvicorn has no started event
    sampler = asyncio.create_task(sample())
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(*(one_client(client) for _ in range(concurrency)))
    sampler.cancel()
    server.should_exit = True
    await serving
    return counts["succeeded"], counts["other"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--job-memory-s", type=float, default=60.0, help="scheduler.job_memory_s")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory snapshots")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "job_memory")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as storage:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(service_config(Path(storage), args.job_memory_s)), name=APP_NAME)
            base_url = f"http://127.0.0.1:{port}"
            httpx.post(f"{base_url}/v1/images/generations", json=BODY, timeout=300).raise_for_status()
            rows = [snapshot("before", 0)]
            started = time.monotonic()
            succeeded, other = asyncio.run(
                run_jobs(base_url, args.jobs, args.concurrency, args.max_seconds, args.sample_s, rows)
            )
            elapsed = time.monotonic() - started
            done = succeeded + other
            rows.append(snapshot("after the jobs", done))
            time.sleep(args.job_memory_s + 10)  # the scheduler forgets finished jobs by age
            rows.append(snapshot(f"after job_memory_s ({args.job_memory_s:.0f} s) more", done))
        finally:
            serve.shutdown()
            ray.shutdown()
    write_report(args, rows, succeeded, other, elapsed)


def write_report(
    args: argparse.Namespace, rows: list[dict[str, Any]], succeeded: int, other: int, elapsed: float
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    done = succeeded + other
    stopped = "all jobs done" if done >= args.jobs else f"stopped by --max-seconds {args.max_seconds:.0f}"
    ends = [row for row in rows if row["label"] != "during"]
    growth = ends[1]["scheduler_rss_mib"] - ends[0]["scheduler_rss_mib"]
    lines = [
        "# Memory over async jobs",
        "",
        f"`python -m benchmarks.job_memory --jobs {args.jobs} --concurrency {args.concurrency} "
        f"--max-seconds {args.max_seconds:.0f} --job-memory-s {args.job_memory_s:.0f}`",
        "",
        f"Commit {git_commit()}; {machine_description()}.",
        f"{done} jobs ({succeeded} succeeded, {other} not) in {elapsed:.0f} s ({stopped}); "
        f"`{json.dumps(BODY)}`, {args.concurrency} clients.",
        "",
        "| when | jobs | scheduler RSS (MiB) | whole service RSS (MiB) |",
        "|---|---:|---:|---:|",
        *(
            f"| {row['label']} | {row['jobs']} | {row['scheduler_rss_mib']} | {row['service_rss_mib']} |"
            for row in ends
        ),
        "",
        f"Every {args.sample_s:.0f} s during the run: see `memory.png` and `memory.json`.",
        "",
        "![memory](memory.png)",
        "",
        f"Scheduler growth over the jobs: {growth:+.1f} MiB "
        f"({1024 * growth / max(done, 1):.1f} KiB per job while finished jobs are still remembered).",
    ]
    during = [row for row in rows if row["label"] == "during"]
    settled = during[len(during) // 2 :]  # past start-up and the first job_memory_s
    if len(settled) >= 2 and settled[-1]["jobs"] > settled[0]["jobs"]:
        late_growth = settled[-1]["scheduler_rss_mib"] - settled[0]["scheduler_rss_mib"]
        late_jobs = settled[-1]["jobs"] - settled[0]["jobs"]
        lines.append(
            f"Over the second half of the run: {late_growth:+.1f} MiB over {late_jobs} jobs "
            f"({1024 * late_growth / late_jobs:.1f} KiB per job; at that rate {args.jobs} jobs would add "
            f"{late_growth * args.jobs / late_jobs:+.0f} MiB)."
        )
    elif done < args.jobs:
        lines.append(
            f"Extrapolated linearly to {args.jobs} jobs: {growth * args.jobs / max(done, 1):+.1f} MiB "
            "(whether the growth levels off once job_memory_s has passed is not shown by a run this short: "
            "RSS did not fall after the jobs were forgotten, and CPython rarely hands freed memory back "
            "to the system)."
        )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_memory(args.out / "memory.png", rows)
    print("\n".join(lines))


def plot_memory(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [row["jobs"] for row in rows]  # before, every sample, after the jobs, once forgotten
    figure, (scheduler, service) = plt.subplots(1, 2, figsize=(9, 3.5))
    scheduler.plot(jobs, [row["scheduler_rss_mib"] for row in rows], marker=".")
    scheduler.set(title="scheduler replica", xlabel="jobs done", ylabel="RSS (MiB)")
    service.plot(jobs, [row["service_rss_mib"] for row in rows], marker=".", color="tab:orange")
    service.set(title="whole service (every Ray process)", xlabel="jobs done", ylabel="RSS (MiB)")
    for axis in (scheduler, service):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    main()
