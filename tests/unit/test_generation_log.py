"""The generation log on the local store: schema, partitions, buffering while the store is down, report."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deployments.config import GenerationLogConfig, StorageConfig
from deployments.contracts import ImageRequest, StoredImage
from deployments.errors import StorageUnavailableError
from deployments.generation_log import SCHEMA, GenerationLog, generation_rows
from deployments.storage import ObjectStore
from serve_app.log_report import format_report, parse_duration, plot_report, read_generation_log, summarize

REQUEST = ImageRequest(
    request_id="req-1",
    tenant="acme",
    variant="tiny-sd",
    kind="generate",
    prompt="a secret prompt",
    negative_prompt=None,
    n=2,
    width=64,
    height=64,
    steps=4,
    guidance_scale=5.0,
    seed=10,
)


def stored(seed: int, model_s: float) -> StoredImage:
    timings = {"queue": 0.01, "preprocess": 0.001, "model": model_s, "postprocess": 0.002, "upload": 0.003}
    return StoredImage(seed=seed, output_format="png", byte_count=1000, batch_size=2, timings=timings)


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rows_hash_prompts_unless_configured() -> None:
    rows = generation_rows(REQUEST, [stored(10, 0.2), stored(11, 0.2)], include_prompt=False)
    assert [row["seed"] for row in rows] == [10, 11]
    assert rows[0]["prompt"] is None and rows[0]["prompt_chars"] == len(REQUEST.prompt)
    assert len(rows[0]["prompt_sha256"]) == 64
    assert generation_rows(REQUEST, None, include_prompt=True, error_code="x")[1]["prompt"] == REQUEST.prompt


def test_failed_rows_carry_the_error_code() -> None:
    rows = generation_rows(REQUEST, None, include_prompt=False, error_code="storage_unavailable")
    assert [(row["status"], row["error_code"], row["seed"]) for row in rows] == [
        ("failed", "storage_unavailable", 10),
        ("failed", "storage_unavailable", 11),
    ]


def test_flush_writes_hive_partitions_with_the_schema(tmp_path: Path) -> None:
    store = ObjectStore(StorageConfig(url=f"file://{tmp_path}"))
    log = GenerationLog(store, GenerationLogConfig(flush_rows=3))
    at = dt.datetime(2026, 11, 22, 7, 30, tzinfo=dt.UTC)
    log.append(generation_rows(REQUEST, [stored(10, 0.2), stored(11, 0.4)], include_prompt=False, now=at))
    assert not log.is_due()
    log.append(generation_rows(REQUEST, None, include_prompt=False, error_code="overloaded", now=at))
    assert log.is_due()
    assert log.flush() == 4
    files = list(tmp_path.rglob("*.parquet"))
    assert [file.parent.relative_to(tmp_path).as_posix() for file in files] == [
        "generation_log/date=2026-11-22/hour=07"
    ]
    assert pq.read_schema(files[0]).remove_metadata() == SCHEMA
    table = read_generation_log(store)
    assert table.num_rows == 4
    (summary,) = summarize(table)
    assert (summary.images, summary.failed) == (4, 2)
    assert summary.stage_ms["model"][0] == pytest.approx(300.0)
    assert "| model |" in format_report([summary])
    plot_report([summary], tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0


def test_the_report_reads_the_rows_since_a_time_and_files_written_before_a_column(tmp_path: Path) -> None:
    store = ObjectStore(StorageConfig(url=f"file://{tmp_path}"))
    log = GenerationLog(store, GenerationLogConfig())
    early, late = (dt.datetime(2026, 11, 22, hour, tzinfo=dt.UTC) for hour in (7, 9))
    log.append(generation_rows(REQUEST, [stored(10, 0.2), stored(11, 0.4)], include_prompt=False, now=early))
    log.flush()
    log.append(generation_rows(REQUEST, None, include_prompt=False, error_code="overloaded", now=late))
    log.flush()
    older = tmp_path / "generation_log" / "date=2026-11-22" / "hour=08" / "older.parquet"
    older.parent.mkdir(parents=True)
    columns = [name for name in SCHEMA.names if name != "alias"]  # a log written before aliases
    first_row = read_generation_log(store).slice(0, 1).select(columns)
    pq.write_table(
        first_row.set_column(
            columns.index("created_at"),
            "created_at",
            pa.array([early.replace(hour=8)], SCHEMA.field("created_at").type),
        ),
        older,
    )

    table = read_generation_log(store)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.num_rows == 5
    assert table.column("alias").null_count == table.num_rows
    since = read_generation_log(store, since=early.replace(hour=8))
    assert sorted(since.column("status").to_pylist()) == ["failed", "failed", "succeeded"]


class OutageStore(ObjectStore):
    """The local store, with a switch that makes every write fail the way a network outage does."""

    down = False

    def _write(self, key: str, data: bytes) -> None:
        if self.down:
            raise ConnectionRefusedError("store unreachable")
        super()._write(key, data)


def test_rows_wait_while_the_store_is_down_and_the_overflow_is_counted(tmp_path: Path) -> None:
    store = OutageStore(StorageConfig(url=f"file://{tmp_path}/store", attempts=1, breaker_failures=1))
    dropped: list[int] = []
    clock = FakeClock()
    log = GenerationLog(
        store, GenerationLogConfig(max_buffered_rows=3, flush_interval_s=5), dropped.append, clock
    )
    log.append(generation_rows(REQUEST, None, include_prompt=False))
    assert not log.is_due()
    clock.now = 5.0
    assert log.is_due()
    store.down = True
    with pytest.raises(StorageUnavailableError):
        log.flush()
    assert log.buffered_rows == 2
    log.append(generation_rows(REQUEST, None, include_prompt=False))
    assert log.buffered_rows == 3 and dropped == [1] and log.dropped_rows == 1
    store.down = False
    store.breaker.record_success()  # as a half-open probe would
    assert log.flush() == 3
    assert read_generation_log(store).num_rows == 3


def test_report_window_and_durations(tmp_path: Path) -> None:
    store = ObjectStore(StorageConfig(url=f"file://{tmp_path}"))
    log = GenerationLog(store, GenerationLogConfig())
    now = dt.datetime.now(dt.UTC)
    log.append(
        generation_rows(REQUEST, [stored(1, 0.1)] * 2, include_prompt=False, now=now - dt.timedelta(hours=3))
    )
    log.append(generation_rows(REQUEST, [stored(1, 0.1)] * 2, include_prompt=False, now=now))
    log.flush()
    assert read_generation_log(store).num_rows == 4
    assert read_generation_log(store, now - parse_duration("1h")).num_rows == 2
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    with pytest.raises(ValueError, match="duration"):
        parse_duration("an hour")
    assert summarize(read_generation_log(ObjectStore(StorageConfig(url=f"file://{tmp_path}/empty")))) == []
