"""The generation log: one row per image, buffered and written as a Hive-partitioned Parquet dataset.

Files land in the object store under ``generation_log/date=YYYY-MM-DD/hour=HH/<uuid>.parquet``,
one file per flush and partition, with the explicit `SCHEMA` below. While the store is down,
rows stay buffered (bounded: the oldest are dropped and counted) and go out with a later flush.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deployments.config import GenerationLogConfig
from deployments.contracts import ImageRequest, StoredImage
from deployments.storage import ObjectStore

LOG_PREFIX = "generation_log"
STAGES = ("queue", "preprocess", "model", "postprocess", "upload")
logger = logging.getLogger("imagegen.generation_log")

SCHEMA = pa.schema(
    [
        pa.field("created_at", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("image_index", pa.int16(), nullable=False),
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("safety_identifier", pa.string()),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("alias", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance_scale", pa.float32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("prompt_chars", pa.int32(), nullable=False),
        pa.field("prompt_sha256", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        *(pa.field(f"{stage}_s", pa.float64()) for stage in STAGES),
        pa.field("batch_size", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
    ]
)


def generation_rows(
    request: ImageRequest,
    stored: list[StoredImage] | None,
    *,
    include_prompt: bool,
    error_code: str | None = None,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """One row per image of ``request``: from its stored images, or failed rows with ``error_code``."""
    created_at = now or dt.datetime.now(dt.UTC)
    common = {
        "created_at": created_at,
        "request_id": request.request_id,
        "tenant": request.tenant,
        "safety_identifier": request.safety_identifier,
        "variant": request.variant,
        "alias": request.alias,
        "task": request.kind,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "prompt_chars": len(request.prompt),
        "prompt_sha256": hashlib.sha256(request.prompt.encode()).hexdigest(),
        "prompt": request.prompt if include_prompt else None,
    }
    if stored is None:
        return [
            {
                **common,
                "image_index": index,
                "seed": request.seed + index,
                "status": "failed",
                "error_code": error_code or "server_error",
            }
            for index in range(request.n)
        ]
    return [
        {
            **common,
            "image_index": index,
            "seed": image.seed,
            **{f"{stage}_s": image.timings.get(stage) for stage in STAGES},
            "batch_size": image.batch_size,
            "bytes": image.byte_count,
            "status": "succeeded",
            "error_code": None,
        }
        for index, image in enumerate(stored)
    ]


def partition_key(created_at: dt.datetime) -> str:
    return f"{LOG_PREFIX}/date={created_at:%Y-%m-%d}/hour={created_at:%H}"


class GenerationLog:
    """Thread-safe row buffer with bounded memory; `flush` writes it to the store."""

    def __init__(
        self,
        store: ObjectStore,
        config: GenerationLogConfig,
        on_drop: Callable[[int], None] = lambda count: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.dropped_rows = 0
        self._on_drop = on_drop
        self._clock = clock
        self._rows: deque[dict[str, Any]] = deque()
        self._oldest_at: float | None = None
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            if not self._rows:
                self._oldest_at = self._clock()
            self._rows.extend(rows)
            self._drop_overflow()

    def record(
        self, request: ImageRequest, stored: list[StoredImage] | None, error_code: str | None = None
    ) -> None:
        """Append one request's rows (a row per image, or one for a failure), when the log is on."""
        if self.config.enabled:
            include_prompt = self.config.include_prompt
            self.append(
                generation_rows(request, stored, include_prompt=include_prompt, error_code=error_code)
            )

    def _drop_overflow(self) -> None:
        overflow = len(self._rows) - self.config.max_buffered_rows
        if overflow > 0:
            for _ in range(overflow):
                self._rows.popleft()
            self.dropped_rows += overflow
            self._on_drop(overflow)

    @property
    def buffered_rows(self) -> int:
        return len(self._rows)

    def is_due(self) -> bool:
        with self._lock:
            if not self._rows:
                return False
            assert self._oldest_at is not None
            full = len(self._rows) >= self.config.flush_rows
            return full or self._clock() - self._oldest_at >= self.config.flush_interval_s

    def flush(self) -> int:
        """Write every buffered row (one file per hour partition); returns rows written.

        On a store failure the unwritten rows go back to the front of the buffer and the error
        propagates, so the next flush tries them again.
        """
        with self._flush_lock:
            with self._lock:
                rows = list(self._rows)
                self._rows.clear()
                oldest_at = self._oldest_at
            pending = list(self._by_partition(rows).items())
            written = 0
            try:
                while pending:
                    partition, part = pending[0]
                    self.store.put(f"{partition}/{uuid.uuid4().hex}.parquet", self._encode(part))
                    pending.pop(0)
                    written += len(part)
            except Exception:
                self._requeue([row for _, part in pending for row in part], oldest_at)
                raise
            return written

    def _requeue(self, rows: list[dict[str, Any]], oldest_at: float | None) -> None:
        with self._lock:
            self._rows.extendleft(reversed(rows))
            self._oldest_at = oldest_at if oldest_at is not None else self._clock()
            self._drop_overflow()

    @staticmethod
    def _encode(rows: list[dict[str, Any]]) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer, compression="zstd")
        return buffer.getvalue()

    @staticmethod
    def _by_partition(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        partitions: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            partitions.setdefault(partition_key(row["created_at"]), []).append(row)
        return partitions
