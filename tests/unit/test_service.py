"""The service layer without HTTP or Ray: each kind of request takes its own path.

`ImageService` gets typed requests, as the routes hand them over. Below it, the scheduler is a
plain stand-in for the deployment handle that grants slots at once and runs jobs through the
real `JobLifecycle`, and the stage chain fakes one pass (tests/job_harness.py): the boundaries
these tests are about are the service's own choices of path, headers and errors.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import InvalidRequestError
from serve_app.admission_policy import WorkRequest
from serve_app.answers import Accepted, Completed, Delivery
from serve_app.auth import Principal
from serve_app.config import AppConfig
from serve_app.jobs import body_digest
from serve_app.protocol import ImageGenerationRequest
from serve_app.scheduler import Grant, Release
from serve_app.service import ImageService
from serve_app.uploads import GenerationBody
from tests.job_harness import DEADLINE_S, FakeStages, JobHarness, scheduler_config

PRINCIPAL = Principal("local", "paid")


class Remote:
    """A deployment method as a handle exposes it: ``.remote(...)`` runs it as a task."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def remote(self, *args: Any) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.method(*args))


class SchedulerStandIn:
    """The scheduler's handle: slots granted at once (and counted back), jobs in a JobLifecycle."""

    def __init__(self, harness: JobHarness) -> None:
        self.harness = harness
        self.granted: list[str] = []
        self.released: list[tuple[str, int]] = []
        self.release_arrived = asyncio.Event()  # the service sends a release without awaiting it
        self.acquire = Remote(self._acquire)
        self.release_all = Remote(self._release_all)
        self.submit = Remote(harness.jobs.submit)
        self.wait = Remote(harness.jobs.wait)
        self.get = Remote(harness.jobs.get)
        self.cancel = Remote(harness.jobs.cancel)

    async def _acquire(self, work: WorkRequest, released: list[Release]) -> Grant:
        await self._release_all(released)
        self.granted.append(work.ticket_id)
        return Grant(work.ticket_id, 0.0, False, {"x-ratelimit-limit-requests": "600"})

    async def _release_all(self, releases: list[Release]) -> None:
        self.released.extend(releases)
        if releases:
            self.release_arrived.set()


def service_for(config: AppConfig, stages: FakeStages) -> tuple[ImageService, SchedulerStandIn]:
    scheduler = SchedulerStandIn(JobHarness(config, stages))
    return ImageService(config, stages, scheduler), scheduler  # type: ignore[arg-type]


def generation(**fields: Any) -> GenerationBody:
    request = ImageGenerationRequest(prompt="a lighthouse", size="64x64", **fields)
    return GenerationBody(request, body_digest(request.model_dump(mode="json", exclude_unset=True)))


def test_a_synchronous_request_holds_its_slots_only_while_the_chain_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        stages = FakeStages()
        service, scheduler = service_for(scheduler_config(tmp_path), stages)
        outcome = await service.generate(generation(n=2), PRINCIPAL, "req_1", Delivery("http://test/"))
        assert isinstance(outcome, Completed) and len(outcome.response.data) == 2
        assert outcome.headers["x-ratelimit-limit-requests"] == "600"
        assert outcome.headers["x-imagegen-batch-size"] == "1,1"
        await asyncio.wait_for(scheduler.release_arrived.wait(), timeout=5)
        assert scheduler.released == [(scheduler.granted[0], 2)] and stages.runs == 1

    asyncio.run(scenario())


def test_a_failed_chain_gives_its_slots_back_and_raises(tmp_path: Path) -> None:
    async def scenario() -> None:
        stages = FakeStages(failures=1, failure=InvalidRequestError("bad", param="prompt"))
        service, scheduler = service_for(scheduler_config(tmp_path), stages)
        with pytest.raises(InvalidRequestError):
            await service.generate(generation(), PRINCIPAL, "req_1", Delivery("http://test/"))
        await asyncio.wait_for(scheduler.release_arrived.wait(), timeout=5)
        assert scheduler.released == [(scheduler.granted[0], 0)]

    asyncio.run(scenario())


def test_respond_async_is_a_job_answered_with_202(tmp_path: Path) -> None:
    async def scenario() -> None:
        stages = FakeStages()
        service, scheduler = service_for(scheduler_config(tmp_path), stages)
        delivery = Delivery("http://test/", prefer="respond-async")
        outcome = await service.generate(generation(response_format="url"), PRINCIPAL, "req_1", delivery)
        assert isinstance(outcome, Accepted) and outcome.job.id.startswith("job_")
        assert outcome.headers["location"] == f"/v1/images/jobs/{outcome.job.id}"
        assert not scheduler.granted  # a job never asks for slots itself
        done = await asyncio.wait_for(scheduler.harness.jobs.wait("local", outcome.job.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        polled = await service.jobs.get(PRINCIPAL, outcome.job.id, "http://test/")
        assert polled.result is not None and polled.result.data[0].url is not None

    asyncio.run(scenario())


def test_an_idempotency_key_runs_once_and_answers_the_repeat_with_the_same_images(tmp_path: Path) -> None:
    async def scenario() -> None:
        stages = FakeStages()
        service, scheduler = service_for(scheduler_config(tmp_path), stages)
        delivery = Delivery("http://test/", idempotency_key="order-42")
        body = generation(seed=7, response_format="url")
        first = await service.generate(body, PRINCIPAL, "req_1", delivery)
        repeat = await service.generate(body, PRINCIPAL, "req_2", delivery)
        assert isinstance(first, Completed) and isinstance(repeat, Completed)
        assert first.headers["x-imagegen-job-id"] == repeat.headers["x-imagegen-job-id"]
        urls = [
            [item.url.split("?")[0] for item in done.response.data if item.url] for done in (first, repeat)
        ]
        assert urls[0] == urls[1] and len(urls[0]) == 1 and stages.runs == 1
        assert not scheduler.granted  # it ran as a job

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("fields", "delivery", "param"),
    [
        ({"stream": True}, Delivery("http://test/", idempotency_key="k"), "stream"),
        ({"webhook_url": "https://example.com/hook"}, Delivery("http://test/"), "webhook_url"),
        ({}, Delivery("http://test/", idempotency_key=""), "Idempotency-Key"),
    ],
)
def test_paths_that_cannot_combine_are_a_400_naming_the_field(
    tmp_path: Path, fields: dict[str, Any], delivery: Delivery, param: str
) -> None:
    async def scenario() -> None:
        service, scheduler = service_for(scheduler_config(tmp_path), FakeStages())
        with pytest.raises(InvalidRequestError) as refused:
            await service.generate(generation(**fields), PRINCIPAL, "req_1", delivery)
        assert refused.value.param == param and not scheduler.granted

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("delivery", "path"),
    [
        (Delivery("u"), "sync"),
        (Delivery("u", stream=True), "streamed"),
        (Delivery("u", prefer="wait=5, respond-async"), "async_job"),
        (Delivery("u", prefer="respond-async", idempotency_key="k"), "async_job"),
        (Delivery("u", idempotency_key="k"), "idempotent"),
    ],
)
def test_each_request_takes_one_documented_path(delivery: Delivery, path: str) -> None:
    assert delivery.path == path
