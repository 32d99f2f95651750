"""A wedged model on real Ray Serve: its replica's worker process is stopped (SIGSTOP), as a hung
driver or a frozen GPU would leave it. Serve's health check must replace it, and the work it held
must be retried on the replacement or failed cleanly: the job ends, the synchronous request gets
an answer (200, or OpenAI's 503/504), nothing hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from ray import serve
from ray._private import state as ray_state

from serve_app.app import build_app
from serve_app.config import AppConfig, CallTimeoutsConfig
from tests.integration.conftest import RunningService

APP_NAME = "imagegen-wedged"
ROUTE = "/wedged"
MODEL_ACTOR = f"ServeReplica:{APP_NAME}:ModelReplica-tiny-sd"
DEADLINE_S = 300.0
SMALL = {"prompt": "a small square", "size": "64x64"}


@pytest.fixture(scope="module")
def wedged(service: RunningService) -> Iterator[str]:
    variant = service.config.variants[0]
    resources = variant.resources.model_copy(
        update={"health_check_period_s": 1.0, "health_check_timeout_s": 3.0}
    )
    config: AppConfig = service.config.model_copy(
        update={
            "variants": [variant.model_copy(update={"resources": resources})],
            "timeouts": CallTimeoutsConfig(pipeline_s=120.0),
        }
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield f"{service.base_url}{ROUTE}"
    finally:
        serve.delete(APP_NAME)


def model_replicas() -> dict[str, int]:
    """The live ModelReplica actors of this test's app, by actor id: their PIDs.

    Read from the GCS of the test's own cluster through its driver (other clusters may run on the
    machine; the state API would need a dashboard and could pick another cluster's).
    """
    actors = ray_state.actors(actor_state_name="ALIVE").values()
    return {actor["ActorID"]: actor["Pid"] for actor in actors if actor["ActorClassName"] == MODEL_ACTOR}


def is_openai_error(response: httpx.Response) -> bool:
    error = response.json().get("error", {})
    return isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def test_a_stopped_model_process_is_replaced_and_its_work_retried_or_failed_cleanly(wedged: str) -> None:
    with httpx.Client(base_url=wedged, timeout=DEADLINE_S) as client:
        assert client.post("/v1/images/generations", json=SMALL).status_code == 200
        before = model_replicas()
        assert len(before) == 1
        ((old_actor, pid),) = before.items()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            job = client.post(
                "/v1/images/generations", json=SMALL, headers={"prefer": "respond-async"}
            ).json()
            with ThreadPoolExecutor(1) as pool:
                sync = pool.submit(client.post, "/v1/images/generations", json=SMALL)
                finished = wait_for_job(client, job["id"])
                answer = sync.result(timeout=DEADLINE_S)
            assert finished["status"] in ("succeeded", "failed")
            if finished["status"] == "failed":
                assert finished["error"]["type"] and finished["error"]["message"]
            assert answer.status_code in (200, 503, 504)
            if answer.status_code != 200:
                assert is_openai_error(answer)
            replacement = wait_for_replacement(old_actor)
            assert client.post("/v1/images/generations", json=SMALL).status_code == 200
            print(  # for the closing note: not asserted
                f"\nwedged model: SIGSTOP to a healthy replacement serving again: "
                f"{time.monotonic() - stopped_at:.1f}s (replacement pid {replacement})"
            )
        finally:
            with contextlib.suppress(ProcessLookupError):  # Serve has usually killed it already
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job: dict[str, Any] = client.get(f"/v1/images/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck {job['status']}"
        time.sleep(0.2)  # polling, as a client of the jobs API does


def wait_for_replacement(old_actor: str) -> int:
    """The PID of the replica Serve started in place of ``old_actor``."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        replicas = model_replicas()
        if replicas and old_actor not in replicas:
            return next(iter(replicas.values()))
        assert time.monotonic() < deadline, f"the stopped replica was never replaced: {replicas}"
        time.sleep(0.5)  # polling Ray's actor table: Serve has no replacement event
