"""`imagegen report`: latency per stage and variant, throughput and errors from the generation log."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deployments.generation_log import LOG_PREFIX, SCHEMA, STAGES
from deployments.storage import ObjectStore

DURATION_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PERCENTILES = (50, 95, 99)


def parse_duration(text: str) -> dt.timedelta:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` -> timedelta."""
    match = DURATION_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"duration must look like 90s, 15m, 1h or 2d, got {text!r}")
    return dt.timedelta(seconds=float(match.group(1)) * DURATION_UNITS[match.group(2)])


def read_generation_log(store: ObjectStore, since: dt.datetime | None = None) -> pa.Table:
    """Every row of the log (optionally those created at or after ``since``) with `SCHEMA`; a
    column a file was written without reads as nulls."""
    table = store.read_parquet(LOG_PREFIX, SCHEMA)
    if since is not None:
        table = table.filter(pc.field("created_at") >= pa.scalar(since, pa.timestamp("ms", "UTC")))
    return table.select(SCHEMA.names)


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    images: int
    failed: int
    images_per_s: float
    stage_ms: dict[str, tuple[float, ...]]  # stage -> (p50, p95, p99) over succeeded images

    @property
    def error_rate(self) -> float:
        return self.failed / self.images if self.images else 0.0


def summarize(table: pa.Table) -> list[VariantSummary]:
    """Per variant: image count, failures, throughput over the span of the rows, stage percentiles."""
    summaries = []
    for variant in sorted(set(table.column("variant").to_pylist())):
        rows = table.filter(pc.equal(table.column("variant"), variant))
        succeeded = rows.filter(pc.equal(rows.column("status"), "succeeded"))
        created = rows.column("created_at").cast(pa.int64()).to_numpy()  # ms since the epoch
        span_s = (created.max() - created.min()) / 1000 if len(created) > 1 else 0.0
        stage_ms = {}
        for stage in STAGES:
            values = succeeded.column(f"{stage}_s").drop_null().to_numpy()
            if len(values):
                stage_ms[stage] = tuple(float(v) * 1000 for v in np.percentile(values, PERCENTILES))
        summaries.append(
            VariantSummary(
                variant=variant,
                images=rows.num_rows,
                failed=rows.num_rows - succeeded.num_rows,
                images_per_s=succeeded.num_rows / span_s if span_s > 0 else float("nan"),
                stage_ms=stage_ms,
            )
        )
    return summaries


def format_report(summaries: list[VariantSummary]) -> str:
    """A Markdown table per variant: one row per stage with p50/p95/p99 in milliseconds."""
    if not summaries:
        return "No generations logged in this window."
    lines = []
    for summary in summaries:
        lines += [
            f"## {summary.variant}: {summary.images} images, {summary.failed} failed "
            f"({summary.error_rate:.1%}), {summary.images_per_s:.2f} images/s",
            "",
            "| stage | p50 ms | p95 ms | p99 ms |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {stage} | " + " | ".join(f"{value:.1f}" for value in values) + " |"
            for stage, values in summary.stage_ms.items()
        ]
        lines.append("")
    return "\n".join(lines)


def plot_report(summaries: list[VariantSummary], path: Path) -> None:
    """Grouped bars: p50/p95/p99 latency by stage, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, max(len(summaries), 1), figsize=(6 * max(len(summaries), 1), 4), squeeze=False
    )
    for axis, summary in zip(axes[0], summaries, strict=False):
        stages = list(summary.stage_ms)
        positions = np.arange(len(stages))
        for offset, (index, percentile) in zip((-0.27, 0, 0.27), enumerate(PERCENTILES), strict=True):
            heights = [summary.stage_ms[stage][index] for stage in stages]
            axis.bar(positions + offset, heights, width=0.27, label=f"p{percentile}")
        axis.set_xticks(positions, stages)
        axis.set_ylabel("latency (ms)")
        axis.set_title(f"{summary.variant}: latency by stage ({summary.images} images)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
