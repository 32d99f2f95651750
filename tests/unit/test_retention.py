"""Retention of job records and idempotency keys in a real file:// store, with a chosen "now"."""

from __future__ import annotations

from pathlib import Path

from deployments.config import StorageConfig
from deployments.contracts import EncodeOptions, ImageRequest
from deployments.storage import ObjectStore
from serve_app.config import SchedulerConfig
from serve_app.jobs import JobImage, JobRecord, JobStore, new_record
from serve_app.retention import RetentionPolicy, sweep

HOUR = 3600.0
POLICY = RetentionPolicy.from_config(SchedulerConfig())  # 7 days for jobs, 24 h for idempotency keys


def record(jobs: JobStore, job_id: str, status: str, key: str | None = None) -> JobRecord:
    request = ImageRequest(job_id, "acme", "tiny-sd", "generate", "p", None, 1, 64, 64, 4, 5.0, 7)
    made = new_record(
        request,
        EncodeOptions(),
        tier="paid",
        quality="medium",
        idempotency_key=key,
        body_sha256="d",
        webhook_url=None,
    )
    made.status = status  # type: ignore[assignment]
    made.images = [JobImage(object_key=f"acme/2026/01/01/{job_id}.png", seed=7, byte_count=3)]
    jobs.store.put(made.images[0].object_key, b"png")
    jobs.save(made)
    if key is not None:
        jobs.remember_idempotency_key("acme", key, job_id)
    return made


def test_expired_jobs_and_keys_leave_the_store_and_nothing_else_does(tmp_path: Path) -> None:
    jobs = JobStore(ObjectStore(StorageConfig(url=f"file://{tmp_path}")))
    finished = record(jobs, "job_finished", "succeeded", key="k-old")
    record(jobs, "job_running", "running", key="k-running")
    now = finished.completed_at or 0.0

    assert sweep(jobs, POLICY, now + 23 * HOUR) == sweep(jobs, POLICY, now)  # nothing due: nothing deleted
    assert jobs.job_for_idempotency_key("acme", "k-old") == "job_finished"

    result = sweep(jobs, POLICY, now + 25 * HOUR)
    assert (result.keys_deleted, result.jobs_deleted) == (2, 0)  # keys go after 24 h, records stay
    assert jobs.job_for_idempotency_key("acme", "k-old") is None
    assert jobs.load("job_finished") is not None

    result = sweep(jobs, POLICY, now + 8 * 24 * HOUR)
    assert result.jobs_deleted == 1
    assert jobs.load("job_finished") is None
    images = " ".join(jobs.store.list_keys("acme"))
    assert "job_finished" not in images and "job_running" in images  # a job's images go with it
    assert jobs.load("job_running") is not None  # a job that has not finished is never pruned
