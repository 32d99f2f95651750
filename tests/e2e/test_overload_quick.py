"""`python -m benchmarks.overload --quick`: the spike harness end to end, so it cannot rot.

It starts imagegen-serve with a keys file for real and checks behaviour that holds at any speed:
both tiers were sent, paid work (far below the hard backlog limit) was never shed, nothing the
service accepted was lost, and the report and plot were written. No timing is asserted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from benchmarks.run_report import REQUEST_SCHEMA

RUN_TIMEOUT_S = 240


def test_quick_overload_run_sheds_no_paid_work_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "overload"
    finished = subprocess.run(
        [sys.executable, "-m", "benchmarks.overload", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]

    requests = pq.read_table(out / "requests.parquet")
    assert requests.schema.names == REQUEST_SCHEMA.names
    records = requests.to_pylist()
    spike = [r for r in records if r["scenario"] == "overload"]
    assert {r["tier"] for r in spike} == {"paid", "free"}
    assert {r["tier"] for r in records if r["scenario"] == "unloaded"} == {"paid"}
    assert all(r["status"] == 200 and r["error"] is None for r in records if r["tier"] == "paid")
    assert all(r["status"] in (200, 429) and r["error"] is None for r in records), [
        (r["status"], r["error"]) for r in records if r["status"] not in (200, 429) or r["error"]
    ]

    report = (out / "report.md").read_text()
    assert "## Targets (issue 6)" in report and "| accepted requests lost" in report
    with Image.open(out / "overload.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 100
