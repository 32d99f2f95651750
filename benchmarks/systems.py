"""The systems under test: the bare pipeline in this process, and servers started as subprocesses.

Each server runs alone (this is a 2-core machine) and is stopped before the next one starts.
A server is ready when it prints its ready line; nothing here sleeps to wait for one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.loadgen import RequestRecord
from benchmarks.stats import Scenario
from benchmarks.workload import PROMPTS
from deployments.config import VariantConfig
from deployments.contracts import ImageTask
from deployments.models.cpu_threads import usable_cores

STARTUP_TIMEOUT_S = 240
SHUTDOWN_TIMEOUT_S = 60
ALL_THREADS_CONFIG = Path(__file__).parent / "configs" / "tiny-sd-all-threads.yaml"
# imagegen-serve as a single server, as its peers run: `imagegen serve` on its own Ray with the
# ingress listening on the port itself, without Serve's proxy in front (stages.ingress.direct),
# and the scheduler and the model replica in the ingress's process (scheduler.colocate,
# stages.ingress.colocate_models): one Serve replica.
SINGLE_SERVER = {
    "IMAGEGEN_STAGES__INGRESS__DIRECT": "true",
    "IMAGEGEN_SCHEDULER__COLOCATE": "true",
    "IMAGEGEN_STAGES__INGRESS__COLOCATE_MODELS": "true",
}


@dataclass(frozen=True)
class ServerSystem:
    """A server to benchmark: how to start it and the line it prints once it is serving."""

    name: str
    label: str
    command: list[str]
    ready_line: str
    env: dict[str, str] = field(default_factory=dict)
    torch_threads: int | None = None  # of each model worker, where fixed (None: every core)


def server_systems(port: int, storage_dir: Path) -> dict[str, ServerSystem]:
    """The peers and imagegen-serve, each on ``port`` when it runs (one at a time)."""
    from serve_app.config import load_config

    python = sys.executable
    weights = str(bare_weights_path())
    steps, guidance = _default_steps_and_guidance()
    naive_options = ["--weights", weights, "--port", str(port)]
    naive_options += ["--steps", str(steps), "--guidance-scale", str(guidance)]
    return {
        "naive": ServerSystem(
            name="naive",
            label="naive FastAPI (1 at a time)",
            command=[python, "-m", "benchmarks.peers.naive_fastapi", *naive_options],
            ready_line="Uvicorn running on",
        ),
        "litserve": ServerSystem(
            name="litserve",
            label="LitServe (batching)",
            command=[python, "-m", "benchmarks.peers.litserve_server", "--port", str(port)],
            ready_line="Swagger UI is available",
        ),
        "litserve-workers": ServerSystem(
            name="litserve-workers",
            label="LitServe, a one-thread worker per core",
            command=[
                *[python, "-m", "benchmarks.peers.litserve_server", "--port", str(port)],
                *["--workers", str(usable_cores())],
            ],
            ready_line="Swagger UI is available",
            torch_threads=1,
        ),
        "imagegen": ServerSystem(
            name="imagegen",
            label="imagegen-serve",
            command=[str(Path(python).with_name("imagegen")), "serve"],
            ready_line="imagegen-serve ready",
            env={
                "IMAGEGEN_PORT": str(port),
                "IMAGEGEN_STORAGE__URL": f"file://{storage_dir}",
                **SINGLE_SERVER,
            },
            torch_threads=fixed_threads(load_config().variants[0]),
        ),
        "imagegen-all-threads": ServerSystem(
            name="imagegen-all-threads",
            label="imagegen-serve, cpu_threads: all",
            command=[str(Path(python).with_name("imagegen")), "serve"],
            ready_line="imagegen-serve ready",
            env={
                "IMAGEGEN_PORT": str(port),
                "IMAGEGEN_STORAGE__URL": f"file://{storage_dir}",
                "IMAGEGEN_CONFIG": str(ALL_THREADS_CONFIG),
                **SINGLE_SERVER,
            },
        ),
    }


@dataclass
class RunningServer:
    system: ServerSystem
    base_url: str
    startup_s: float
    output: list[str]
    session: int  # the server's process session: it and every process it started


@contextmanager
def running_server(system: ServerSystem, port: int) -> Iterator[RunningServer]:
    """Start ``system``, wait for its ready line, yield its URL; stop it (and its children) after."""
    env = {**os.environ, **system.env, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    # Its own session, so stopping it reaches the workers it forks (LitServe, Ray) and nothing else.
    process = subprocess.Popen(
        system.command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    output: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keeps the pipe empty and signals the ready line (or the end of output)
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if system.ready_line in line:
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        ready.wait(STARTUP_TIMEOUT_S)
        if not any(system.ready_line in line for line in output):  # timed out, or exited first
            tail = "".join(output)[-3000:]
            raise RuntimeError(f"{system.name} did not start within {STARTUP_TIMEOUT_S}s:\n{tail}")
        startup_s = time.perf_counter() - started
        yield RunningServer(system, f"http://127.0.0.1:{port}", startup_s, output, process.pid)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind in its own session
    process.wait()


def bare_weights_path() -> Path:
    """The embedded default's diffusers directory (built on first use), as every system loads it."""
    from deployments.models.builtin import resolve_weights
    from serve_app.config import load_config

    config = load_config()
    return Path(resolve_weights(config.variants[0].weights, config.cache_dir))


def fixed_threads(variant: VariantConfig) -> int | None:
    """The torch threads ``variant`` runs on where it names a number (None: ``all``, ``auto``)."""
    return variant.cpu_threads if isinstance(variant.cpu_threads, int) else None


def single_process_variant() -> VariantConfig:
    """The benchmarked variant as one process runs it, the way the bare pipeline and the peers do:
    every pass on every core. How many replicas imagegen-serve runs, and on how many threads each,
    is its deployment (configs/tiny-sd.yaml), not the model's."""
    from serve_app.config import load_config

    return load_config().variants[0].model_copy(update={"cpu_threads": "all"})


def _default_steps_and_guidance() -> tuple[int, float]:
    """What imagegen-serve runs for a request that sets neither (quality 'auto' means medium)."""
    from serve_app.config import load_config

    variant = load_config().variants[0]
    return variant.steps.medium, variant.guidance_scale


class BarePipeline:
    """The embedded default's pipeline in this process, called through the family code the replica runs."""

    def __init__(self, threads: int | None = None) -> None:
        """With ``threads``, every pass runs on that many torch threads unless ``measure`` says
        otherwise (beside a noisy neighbour, 1 is the pipeline at its best)."""
        import torch

        from deployments.models.registry import load_family
        from serve_app.config import load_config

        self.variant = single_process_variant()
        self.family, _ = load_family(self.variant, load_config().cache_dir)
        if threads:
            torch.set_num_threads(threads)

    def measure(
        self,
        batch_sizes: Sequence[int],
        duration_s: float,
        size: str,
        min_calls: int = 3,
        threads: int | None = None,
    ) -> tuple[list[Scenario], list[RequestRecord]]:
        """Time forward passes: ``duration_s`` per batch size, at least ``min_calls`` each, after one
        warm-up call. Each call is one record of ``n = batch size`` images.

        With ``threads``, torch runs on that many threads (scenarios ``<threads>-thread-batch-<n>``),
        as in a Ray worker that Ray gave that many CPUs.
        """
        import torch

        default_threads = torch.get_num_threads()
        torch.set_num_threads(threads or default_threads)
        try:
            prefix = f"{threads}-thread-" if threads else ""
            scenarios, records = [], []
            for batch in batch_sizes:
                scenario = Scenario("bare", f"{prefix}batch-{batch}", "in-process", clients=batch)
                scenarios.append(scenario)
                records += self._time_calls(scenario.name, batch, duration_s, size, min_calls)
            return scenarios, records
        finally:
            torch.set_num_threads(default_threads)

    def _time_calls(
        self, scenario: str, batch: int, duration_s: float, size: str, min_calls: int
    ) -> list[RequestRecord]:
        self.family.generate(self.tasks(batch, size, -1))
        records: list[RequestRecord] = []
        origin = time.perf_counter()
        while len(records) < min_calls or time.perf_counter() - origin < duration_s:
            records.append(self.time_call(scenario, batch, size, len(records), origin))
        return records

    def time_call(
        self, scenario: str, batch: int, size: str, index: int, origin: float, threads: int | None = None
    ) -> RequestRecord:
        """One forward pass of ``batch`` images, timed: the record of call ``index`` of ``scenario``;
        on ``threads`` torch threads if given."""
        import torch

        tasks = self.tasks(batch, size, index)
        own_threads = torch.get_num_threads()
        torch.set_num_threads(threads or own_threads)
        try:
            start = time.perf_counter()
            self.family.generate(tasks)
            end = time.perf_counter()
        finally:
            torch.set_num_threads(own_threads)
        return RequestRecord(
            system="bare",
            scenario=scenario,
            index=index,
            endpoint="in-process",
            size=size,
            n=batch,
            stream=False,
            tier="none",
            scheduled_s=None,
            start_s=start - origin,
            end_s=end - origin,
            status=200,
            bytes=0,
            batch_sizes=[batch] * batch,
        )

    def tasks(self, batch: int, size: str, call: int) -> list[ImageTask]:
        """The ``batch`` image tasks of call ``call``: prompts in turn, a seed per image."""
        from deployments.models.registry import generation_tasks

        prompts = [
            (PROMPTS[(call + index) % len(PROMPTS)], (call + 1) * 1000 + index) for index in range(batch)
        ]
        return generation_tasks(self.variant, prompts, f"bare-{call}", size=size)
