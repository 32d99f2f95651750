"""The ingress's side of jobs: submit one to the scheduler, and answer about it (poll, cancel).

The scheduler holds job records and runs jobs (serve_app/job_lifecycle.py); the ingress stashes a
job's uploads in the store first, so the record holds keys, not bytes, and builds the client's
view of a job: its status, where it stands in the queue, and once it has succeeded, the usual
images response (stored images as URLs, or read back as base64).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from collections.abc import Awaitable
from typing import TypeVar

from deployments.call_timeouts import bounded, bounded_on_a_live_replica
from deployments.contracts import ImageRequest
from deployments.errors import APIError, UpstreamTimeoutError, unwrap_remote_error
from deployments.in_process import StageHandle
from deployments.storage import ObjectStore
from serve_app.admission_policy import work_request
from serve_app.answers import Accepted, Completed, Delivery, PlannedRequest, images_response
from serve_app.auth import Principal
from serve_app.config import CallTimeoutsConfig
from serve_app.errors import NotFoundError, error_info
from serve_app.job_lifecycle import JobSubmission, JobView
from serve_app.jobs import JobRecord, is_valid_job_id
from serve_app.protocol import ImageData, ImagesResponse, JobResponse
from serve_app.signed_files import SignedFiles

UPLOADS_PREFIX = "jobs/uploads"
T = TypeVar("T")


def check_job_id(job_id: str) -> None:
    """Ids we never issued are not looked up in the store."""
    if not is_valid_job_id(job_id):
        raise NotFoundError(f"No job with id {job_id!r}.", param="job_id", code="job_not_found")


def is_refusal(failure: BaseException) -> bool:
    """The scheduler answered no (a job it refused was never accepted); a timeout leaves that open."""
    error = unwrap_remote_error(failure)
    return isinstance(error, APIError) and not isinstance(error, UpstreamTimeoutError)


class JobClient:
    """Every call to the scheduler is bounded (serve_app/config.py `timeouts`): no caller waits forever."""

    def __init__(
        self,
        scheduler: StageHandle,
        store: ObjectStore,
        files: SignedFiles,
        timeouts: CallTimeoutsConfig,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.files = files
        self.timeouts = timeouts

    async def submit(self, planned: PlannedRequest, principal: Principal, delivery: Delivery) -> Accepted:
        """Hand a job to the scheduler (durable once this returns) and answer 202."""
        view = await self._submit(planned, principal, delivery)
        headers = {**view.rate_limit_headers, "location": f"/v1/images/jobs/{view.record.id}"}
        return Accepted(await self.job_response(view, delivery.base_url), headers)

    async def submit_and_wait(
        self, planned: PlannedRequest, principal: Principal, delivery: Delivery
    ) -> Completed:
        """An idempotent request: the job its key names (submitted now, or earlier), once finished."""
        view = await self._submit(planned, principal, delivery)
        headers = {**view.rate_limit_headers, "x-imagegen-job-id": view.record.id}
        # Asked again of the next scheduler if a rollout stops this one under the wait.
        job_id = view.record.id
        view = await bounded_on_a_live_replica(
            lambda: self.scheduler.wait.remote(principal.tenant, job_id), self.timeouts.job_wait_s, "The job"
        )
        job = await self.job_response(view, delivery.base_url)
        if job.result is None:
            raise view.record.failure
        return Completed(job.result, headers)

    async def _submit(self, planned: PlannedRequest, principal: Principal, delivery: Delivery) -> JobView:
        work = work_request(planned.request, principal.tier)
        if planned.request.images:  # uploads are written only for work the scheduler would take now
            await self._bounded(self.scheduler.check_admission.remote(work))
        submission = JobSubmission(
            work=work,
            request=await asyncio.to_thread(self._stash_uploads, planned.request),
            options=planned.options,
            quality=planned.fields.quality,
            idempotency_key=delivery.idempotency_key,
            body_sha256=delivery.body_sha256,
            webhook_url=delivery.webhook_url,
        )
        try:
            view: JobView = await self._bounded(self.scheduler.submit.remote(submission))
        except Exception as refused:
            if is_refusal(refused):  # the job does not exist: nothing will ever read its uploads
                await asyncio.to_thread(self._delete_uploads, submission.request)
            raise
        if view.record.id != planned.request.request_id:  # an Idempotency-Key named an earlier job
            await asyncio.to_thread(self._delete_uploads, submission.request)
        return view

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A short call to the scheduler, bounded by ``timeouts.scheduler_s``."""
        return await bounded(call, self.timeouts.scheduler_s, "The scheduler")

    def _stash_uploads(self, request: ImageRequest) -> ImageRequest:
        """Write a job's uploads to the store, so its record (and the scheduler) holds keys, not bytes."""
        if not request.images:
            return request
        prefix = f"{UPLOADS_PREFIX}/{request.request_id}"
        keys = []
        for index, data in enumerate(request.images):
            self.store.put(f"{prefix}/image-{index}", data)
            keys.append(f"{prefix}/image-{index}")
        mask_key = None
        if request.mask is not None:
            mask_key = f"{prefix}/mask"
            self.store.put(mask_key, request.mask)
        return dataclasses.replace(request, images=(), mask=None, input_keys=tuple(keys), mask_key=mask_key)

    def _delete_uploads(self, request: ImageRequest) -> None:
        """Delete uploads stashed for a job that will not run (best effort: they are not secret)."""
        for key in [*request.input_keys, *([request.mask_key] if request.mask_key else [])]:
            with contextlib.suppress(Exception):
                self.store.delete(key)

    async def get(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        check_job_id(job_id)
        view = await self._bounded(self.scheduler.get.remote(principal.tenant, job_id))
        return await self.job_response(view, base_url)

    async def cancel(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        check_job_id(job_id)
        view = await self._bounded(self.scheduler.cancel.remote(principal.tenant, job_id))
        return await self.job_response(view, base_url)

    async def job_response(self, view: JobView, base_url: str) -> JobResponse:
        record: JobRecord = view.record
        result = error = None
        if record.status == "succeeded":
            result = await self._job_result(record, base_url)
        elif record.status == "failed":
            error = error_info(record.failure)
        return JobResponse(
            id=record.id,
            status=record.status,
            created_at=int(record.created_at),
            completed_at=record.completed_at,
            queue_position=view.queue_position,
            eta_seconds=None if view.eta_s is None else round(view.eta_s, 2),
            result=result,
            error=error,
        )

    async def _job_result(self, record: JobRecord, base_url: str) -> ImagesResponse:
        request, options = record.image_request, record.encode_options
        if options.response_format == "url":
            data = [
                ImageData(
                    url=self.files.url(base_url, image.object_key),
                    revised_prompt=request.prompt,
                    seed=image.seed,
                )
                for image in record.images
            ]
        else:
            payloads = await asyncio.gather(
                *(asyncio.to_thread(self.store.get, image.object_key) for image in record.images)
            )
            data = [
                ImageData(
                    b64_json=base64.b64encode(payload).decode(),
                    revised_prompt=request.prompt,
                    seed=image.seed,
                )
                for image, payload in zip(record.images, payloads, strict=True)
            ]
        return images_response(request, options, record.quality, data)
