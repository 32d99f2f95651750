"""The idle service's CPU, process by process: ``python -m benchmarks.idle_cpu``.

Starts ``imagegen serve`` (the embedded default unless ``--config``) in its own session, sends one
request so every stage has worked once, lets it settle, then reads each of the session's
processes' CPU time from ``/proc`` over a window with no requests. Writes a Markdown table and
JSON under ``benchmarks/results/idle/``. ``--env NAME=VALUE`` (repeatable) starts the service with
extra environment, to compare settings; ``--repeat`` alternates the plain and the ``--env`` run
(A B A B) so a busy minute on a shared machine does not favour one of them. ``--serve-floor N``
measures instead the smallest Serve service (benchmarks/serve_floor.py: N trivial deployments on
Ray as ``imagegen serve`` starts it), the floor under any service on the machine.

    python -m benchmarks.idle_cpu --window 60
    python -m benchmarks.idle_cpu --env RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1 --repeat 2
    python -m benchmarks.idle_cpu --serve-floor 1 --window 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import ForeignLoadMeter, ProcessCpu, measure_idle
from benchmarks.run import free_port
from benchmarks.serve_floor import READY_LINE
from benchmarks.systems import ServerSystem, running_server

RESULTS_DIR = Path(__file__).parent / "results" / "idle"
SETTLE_S = 20.0  # start-up work (compiles, first metrics pushes) ends well within this
IDLE_TARGET = 0.05  # of one core, for the whole service (issue 13)
Request = tuple[str, str, dict[str, Any] | None]  # method, path, JSON body: one to warm a service up


@dataclass(frozen=True)
class IdleRun:
    setting: str
    window_s: float
    total: float  # of one core
    processes: list[ProcessCpu]
    foreign_load: str | None


def idle_run(config: str | None, extra_env: dict[str, str], window_s: float, storage: Path) -> IdleRun:
    port = free_port()
    env = {"IMAGEGEN_PORT": str(port), "IMAGEGEN_STORAGE__URL": f"file://{storage}", **extra_env}
    if config:
        env["IMAGEGEN_CONFIG"] = config
    command = [sys.executable, "-m", "serve_app.cli", "serve"]
    system = ServerSystem("imagegen", "imagegen-serve", command, "imagegen-serve ready", env)
    setting = " ".join(f"{name}={value}" for name, value in extra_env.items()) or "as shipped"
    request = ("POST", "/v1/images/generations", {"prompt": "a handwritten 7"})
    return measured(system, port, setting, [request], window_s)


def floor_run(deployments: int, extra_env: dict[str, str], window_s: float) -> IdleRun:
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.serve_floor", "--deployments", str(deployments)]
    command += ["--port", str(port)]
    system = ServerSystem("serve-floor", "Ray Serve floor", command, READY_LINE, extra_env)
    setting = " ".join(
        [f"Ray Serve alone, {deployments} trivial deployment(s)"]
        + [f"{name}={value}" for name, value in extra_env.items()]
    )
    requests: list[Request] = [("GET", f"/{index}", None) for index in range(deployments)]
    return measured(system, port, setting, requests, window_s)


def measured(
    system: ServerSystem, port: int, setting: str, requests: list[Request], window_s: float
) -> IdleRun:
    """Start ``system``, send it ``requests`` so that everything has worked once, let it settle,
    then measure its processes' CPU over ``window_s`` with no requests."""
    print(f"[idle] starting the service ({setting})", flush=True)
    with running_server(system, port) as server:
        for method, path, body in requests:
            httpx.request(method, server.base_url + path, json=body, timeout=300).raise_for_status()
        time.sleep(SETTLE_S)  # let start-up work finish before the window opens
        meter = ForeignLoadMeter()
        meter.start(server.session)
        print(f"[idle] measuring {window_s:.0f}s with no requests", flush=True)
        total, processes = measure_idle(server.session, window_s)
        load = meter.stop()
    return IdleRun(setting, window_s, total, processes, load.describe() if load else None)


def render(runs: Sequence[IdleRun]) -> str:
    lines = ["# Idle CPU of the service", ""]
    lines.append(f"Target: under {IDLE_TARGET:.0%} of one core for the whole service.")
    lines.append("")
    lines.append("| setting | whole service (% of one core) | others on the machine |")
    lines.append("|---|---|---|")
    for run in runs:
        lines.append(f"| {run.setting} | {run.total:.1%} | {run.foreign_load or 'n/a'} |")
    for index, run in enumerate(runs, 1):
        lines += ["", f"## Run {index}: {run.setting} ({run.window_s:.0f} s window)", ""]
        lines += ["| process | % of one core |", "|---|---|"]
        lines += [f"| {row.label} | {row.share:.2%} |" for row in run.processes if row.share > 0]
    return "\n".join(lines) + "\n"


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle_cpu", description=__doc__)
    parser.add_argument("--config", help="service YAML (default: the embedded default)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured with no requests")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for a compared run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (A B A B with --env)")
    parser.add_argument(
        "--serve-floor", type=int, metavar="N", help="measure Ray Serve alone with N trivial deployments"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    settings = [{}, parse_env(args.env)] if args.env else [{}]
    runs: list[IdleRun] = []
    with tempfile.TemporaryDirectory(prefix="imagegen-idle-") as storage:
        for _ in range(args.repeat):
            for extra_env in settings:
                if args.serve_floor:
                    runs.append(floor_run(args.serve_floor, extra_env, args.window))
                else:
                    runs.append(idle_run(args.config, extra_env, args.window, Path(storage)))
                print(f"[idle] {runs[-1].setting}: {runs[-1].total:.1%} of one core", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(runs)
    (args.out / "report.md").write_text(report)
    (args.out / "runs.json").write_text(json.dumps([asdict(run) for run in runs], indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
