"""`imagegen bench --quick` as a user runs it: the whole harness, so it cannot rot.

It starts imagegen-serve for real and checks the report files and their columns, not timings.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from benchmarks.run_report import PLOTS, REQUEST_SCHEMA, SUMMARY_SCHEMA

RUN_TIMEOUT_S = 240


def test_quick_benchmark_writes_every_report_file(tmp_path: Path) -> None:
    out = tmp_path / "results"
    executable = Path(sys.executable).with_name("imagegen")
    finished = subprocess.run(
        [str(executable), "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]

    requests = pq.read_table(out / "requests.parquet")
    summary = pq.read_table(out / "summary.parquet")
    assert requests.schema.names == REQUEST_SCHEMA.names
    assert summary.schema.names == SUMMARY_SCHEMA.names
    rows = summary.to_pylist()
    scenarios = {(row["system"], row["scenario"]) for row in rows}
    assert {("bare", "batch-1"), ("imagegen", "closed-1"), ("imagegen", "closed-8")} <= scenarios
    assert any(row["system"] == "imagegen" and row["mode"] == "open" for row in rows)
    assert all(row["requests"] > 0 for row in rows), rows  # even an open loop at a low rate
    served = [r for r in requests.to_pylist() if r["system"] == "imagegen" and r["status"] == 200]
    assert served and all(r["bytes"] > 0 and r["batch_sizes"] for r in served)

    report = (out / "report.md").read_text()
    for heading in ("## Images/s at fixed concurrency", "## Targets (imagegen-serve)", "## All scenarios"):
        assert heading in report
    assert "| imagegen-serve | closed-8 |" in report
    for name in PLOTS:
        with Image.open(out / name) as plot:
            assert plot.format == "PNG" and plot.size[0] > 100
