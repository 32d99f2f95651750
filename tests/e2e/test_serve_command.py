"""The service as the README starts it: `imagegen serve` (what `make serve` runs), then curl's request,
and Ctrl-C, which writes the generation log's buffered rows before it exits; behind Serve's proxy,
and as one server: the ingress listening itself (``stages.ingress.direct``) with the scheduler and
the model replica in its process (``scheduler.colocate``, ``stages.ingress.colocate_models``), as
the benchmarks run it."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pyarrow.compute as pc
import pytest
from PIL import Image

from deployments.config import StorageConfig
from deployments.storage import ObjectStore
from serve_app.log_report import read_generation_log
from tests.conftest import free_port

STARTUP_TIMEOUT_S = 180


@dataclass
class Served:
    base_url: str
    store: Path
    process: subprocess.Popen[str]
    direct: bool
    output: list[str] = field(default_factory=list)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit status (stopping twice is harmless)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module", params=[False, True], ids=["behind-the-proxy", "direct-ingress"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    direct: bool = request.param
    port = free_port()
    store = tmp_path_factory.mktemp("store")
    env = {
        **os.environ,
        "IMAGEGEN_PORT": str(port),
        "IMAGEGEN_STORAGE__URL": f"file://{store}",
        # Nothing is flushed by count or age while the tests run: only shutdown writes the log.
        "IMAGEGEN_STORAGE__LOG__FLUSH_ROWS": "10000",
        "IMAGEGEN_STORAGE__LOG__FLUSH_INTERVAL_S": "3600",
        "PYTHONUNBUFFERED": "1",
        "IMAGEGEN_STAGES__INGRESS__DIRECT": str(direct).lower(),
        "IMAGEGEN_SCHEDULER__COLOCATE": str(direct).lower(),
        "IMAGEGEN_STAGES__INGRESS__COLOCATE_MODELS": str(direct).lower(),
    }
    executable = Path(sys.executable).with_name("imagegen")
    process = subprocess.Popen(
        [str(executable), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = Served(f"http://127.0.0.1:{port}", store, process, direct)
    output = server.output
    ready = threading.Event()

    def drain() -> None:  # keeps the pipe empty and signals the ready line (or the end of output)
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "imagegen-serve ready" in line:
                ready.set()
        ready.set()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        assert ready.wait(STARTUP_TIMEOUT_S), f"not ready in {STARTUP_TIMEOUT_S}s:\n{''.join(output)[-3000:]}"
        assert process.poll() is None, f"imagegen serve exited:\n{''.join(output)[-3000:]}"
        yield server
    finally:
        returncode = server.stop()
        drainer.join(timeout=60)  # the output ends with the process
        assert process.stdout is not None
        process.stdout.close()
    assert returncode == 0, "".join(output)[-3000:]


def test_readme_curl_returns_a_png(served: Served) -> None:
    response = httpx.post(
        f"{served.base_url}/v1/images/generations",
        headers={"Content-Type": "application/json"},
        json={"prompt": "a lighthouse at dusk", "size": "64x64"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.format == "PNG" and image.size == (64, 64)
    assert httpx.get(f"{served.base_url}/readyz", timeout=30).json()["ready"] is True


def test_the_port_is_held_by_serves_proxy_or_by_the_direct_ingress_replica(served: Served) -> None:
    port = int(served.base_url.rsplit(":", 1)[1])
    listening = [
        connection.pid
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    ]
    assert len(listening) == 1 and listening[0] is not None, listening
    title = " ".join(psutil.Process(listening[0]).cmdline())  # Ray names its workers' processes
    assert title.startswith("ray::ServeReplica:imagegen:Ingress" if served.direct else "ray::ProxyActor"), (
        title
    )


def test_the_scheduler_and_model_are_replicas_of_their_own_or_live_in_the_ingress(served: Served) -> None:
    # This service's own processes (Ray's workers descend from the Ray that `imagegen serve` started),
    # by Ray's title less the method running now ("ray::ServeReplica:imagegen:Ingress.check_health").
    titles = []
    for process in psutil.Process(served.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a short-lived helper may be gone already
            titles.append((process.cmdline() or [""])[0].split(" ")[0].split(".")[0])
    replicas = sorted(title for title in titles if title.startswith("ray::ServeReplica:imagegen:"))
    apart = ["ModelReplica-digits", "ModelReplica-digits-ar", "Scheduler"]  # the embedded default's
    expected = ["Ingress"] + ([] if served.direct else apart)
    assert replicas == [f"ray::ServeReplica:imagegen:{name}" for name in expected], replicas


def test_a_stream_sends_previews_then_the_image(served: Served) -> None:
    body = {"prompt": "a handwritten 3", "stream": True, "partial_images": 2}
    with httpx.stream("POST", f"{served.base_url}/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.split(": ", 1)[1] for line in response.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "image_generation.completed" and set(events[:-1]) == {
        "image_generation.partial_image"
    }
    assert len(events) >= 2, events


def test_generation_log_is_written_at_shutdown(served: Served) -> None:
    response = httpx.post(
        f"{served.base_url}/v1/images/generations",
        json={"prompt": "logged at the end", "size": "64x64", "n": 2},
        headers={"x-request-id": "flushed-at-shutdown"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    # An Idempotency-Key makes it a job, which the scheduler runs and logs; the answer waits for it.
    job = httpx.post(
        f"{served.base_url}/v1/images/generations",
        json={"prompt": "a job logged at the end", "size": "64x64"},
        headers={"Idempotency-Key": "logged-job"},
        timeout=60,
    )
    assert job.status_code == 200, job.text
    job_id = job.headers["x-imagegen-job-id"]
    assert not list(served.store.rglob("*.parquet"))  # still buffered: no flush by count or age
    assert served.stop() == 0, "".join(served.output)[-3000:]
    table = read_generation_log(ObjectStore(StorageConfig(url=f"file://{served.store}")))
    ours = table.filter(pc.equal(table.column("request_id"), "flushed-at-shutdown"))
    assert ours.column("image_index").to_pylist() == [0, 1]
    assert set(ours.column("status").to_pylist()) == {"succeeded"}
    jobs = table.filter(pc.equal(table.column("request_id"), job_id))
    assert jobs.column("status").to_pylist() == ["succeeded"]
