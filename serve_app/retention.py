"""Retention: finished jobs and idempotency keys leave the object store once their time is up.

The rules, checked by one sweep every ``retention_sweep_interval_s``:

1. An idempotency key is kept ``idempotency_retention_s`` (24 h by default, as Stripe does) after
   its job was created; a key whose job record is gone goes too.
2. A finished job's record, and the images it made, are kept ``job_retention_s`` after it ended
   (7 days by default: longer than any URL the job returned can live). A job that has not
   finished is never pruned.

The scheduler's memory is bounded separately (``job_memory_s``); uploads stashed for a job are
deleted when the job ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.config import SchedulerConfig
from serve_app.jobs import IDEMPOTENCY, RECORDS, JobRecord, JobStore

logger = logging.getLogger("imagegen.retention")


@dataclass(frozen=True)
class RetentionPolicy:
    job_retention_s: float
    idempotency_retention_s: float

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> RetentionPolicy:
        return cls(config.job_retention_s, config.idempotency_retention_s)

    def job_expired(self, record: JobRecord, now: float) -> bool:
        ended = record.completed_at
        return record.is_terminal and ended is not None and now - ended >= self.job_retention_s

    def key_expired(self, record: JobRecord | None, now: float) -> bool:
        return record is None or now - record.created_at >= self.idempotency_retention_s


@dataclass(frozen=True)
class SweepResult:
    jobs_deleted: int
    keys_deleted: int


def sweep(jobs: JobStore, policy: RetentionPolicy, now: float) -> SweepResult:
    """Delete expired idempotency keys, then expired job records and their images (blocking)."""
    store = jobs.store
    keys_deleted = jobs_deleted = 0
    for key in store.list_keys(IDEMPOTENCY):
        if policy.key_expired(jobs.load(store.get(key).decode()), now):
            store.delete(key)
            keys_deleted += 1
    for key in store.list_keys(RECORDS):
        job_id = key.removeprefix(f"{RECORDS}/").removesuffix(".json")
        record = jobs.load(job_id)
        if record is not None and policy.job_expired(record, now):
            for image in record.images:
                store.delete(image.object_key)
            store.delete(f"{RECORDS}/{job_id}.json")
            jobs_deleted += 1
    return SweepResult(jobs_deleted, keys_deleted)


async def sweep_periodically(
    jobs: JobStore, policy: RetentionPolicy, interval_s: float, clock: Callable[[], float] = time.time
) -> None:
    """Sweep every ``interval_s``, off the event loop; a failing store waits for the next round."""
    while True:
        await asyncio.sleep(interval_s)  # a timer: records expire by age
        try:
            result = await asyncio.to_thread(sweep, jobs, policy, clock())
        except Exception:
            logger.warning("retention sweep failed; trying again next round", exc_info=True)
            continue
        if result.jobs_deleted or result.keys_deleted:
            logger.info(
                "retention: %d jobs and %d idempotency keys deleted", result.jobs_deleted, result.keys_deleted
            )
