"""Benchmark statistics and the targets they are judged by: pure functions over hand-made records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks.loadgen import RequestRecord
from benchmarks.machine import MODEL_PASSES
from benchmarks.run_report import (
    RunInfo,
    ServerCpu,
    concurrency_table,
    evaluate_targets,
    forward_pass_table,
    latency_cdf_panels,
    saturated_throughput,
    target_system,
    write_report,
)
from benchmarks.stats import (
    Scenario,
    batch_size_counts,
    errors_by_status,
    goodput,
    mean_batch_size,
    percentile,
    summarize,
    summarize_runs,
    throughput,
    window_s,
)


def record(
    start: float,
    end: float,
    status: int = 200,
    n: int = 1,
    scheduled: float | None = None,
    system: str = "s",
    **extra: Any,
) -> RequestRecord:
    return RequestRecord(
        system=system, scenario="x", index=0, endpoint="generations", size="64x64", n=n, stream=False,
        tier="default", scheduled_s=scheduled, start_s=start, end_s=end, status=status, bytes=10, **extra,
    )  # fmt: skip


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_throughput_counts_images_of_successes_over_the_window() -> None:
    records = [record(0.0, 1.0, n=2), record(1.0, 2.0), record(1.5, 4.0, status=500)]
    assert window_s(records) == 4.0
    assert throughput(records) == pytest.approx(3 / 4)
    assert throughput([]) == 0.0


def test_open_loop_latency_counts_from_the_scheduled_arrival() -> None:
    late = record(start=1.5, end=2.0, scheduled=1.0)
    assert late.latency_s == pytest.approx(1.0)
    assert window_s([late]) == pytest.approx(1.0)  # from the first *scheduled* arrival


def test_goodput_counts_only_answers_within_the_slo() -> None:
    records = [record(0.0, 0.5), record(0.0, 1.5), record(0.0, 0.2, status=429), record(1.0, 2.0)]
    assert goodput(records, slo_s=1.0) == pytest.approx(2 / 2.0)
    assert goodput(records, slo_s=2.0) == pytest.approx(3 / 2.0)


def test_errors_and_batch_sizes() -> None:
    records = [
        record(0, 1, batch_sizes=[4, 4]),
        record(0, 1, batch_sizes=[1]),
        record(0, 1, status=503, batch_sizes=[8]),
        record(0, 1, status=0),
        record(0, 1, status=503),
    ]
    assert errors_by_status(records) == {503: 2, 0: 1}
    assert batch_size_counts(records) == {1: 1, 4: 2}
    assert mean_batch_size(records) == pytest.approx(3.0)
    assert mean_batch_size([record(0, 1)]) is None


def test_summary_row_has_every_report_column() -> None:
    records = [record(0.0, 0.1 * (i + 1), batch_sizes=[2]) for i in range(10)] + [record(0, 1, status=429)]
    row = summarize(Scenario("imagegen", "closed-8", "closed", clients=8), records, slo_s=0.5)
    assert row["requests"] == 11 and row["ok"] == 10
    assert row["errors"] == "429:1"
    assert row["p50_ms"] == pytest.approx(550.0)
    assert row["p99_ms"] == pytest.approx(991.0)
    assert row["goodput_img_s"] == pytest.approx(5 / 1.0)
    assert row["mean_batch_size"] == 2.0
    assert row["first_partial_p50_ms"] is None


def row(
    system: str, scenario: str, mode: str, img_s: float, p50: float = 0.0, p99: float = 0.0
) -> dict[str, Any]:
    return {
        "system": system, "scenario": scenario, "mode": mode, "throughput_img_s": img_s,
        "p50_ms": p50, "p99_ms": p99,
    }  # fmt: skip


def test_targets_compare_imagegen_with_the_bare_pipeline_and_peers() -> None:
    rows = [
        row("bare", "batch-1", "in-process", 5.0, p50=200.0),
        row("bare", "batch-8", "in-process", 8.0, p50=1000.0),
        row("naive", "closed-16", "closed", 5.0),
        row("litserve", "closed-16", "closed", 7.5),
        row("imagegen", "closed-1", "closed", 4.5, p50=220.0),
        row("bare", "beside-imagegen-batch-1", "in-process", 4.0, p50=190.0),
        {**row("imagegen", "paired-batch-1", "paired", 9.0, p50=230.0), "model_p50_ms": 200.0},
        row("bare", "beside-imagegen-batch-8", "in-process", 8.0, p50=1000.0),
        {**row("imagegen", "paired-batch-8", "paired", 9.0, p50=1100.0), "model_p50_ms": 1050.0},
        row("imagegen", "closed-16", "closed", 7.6),
        row("imagegen", "open-0.8cap", "open", 6.0, p50=400.0, p99=700.0),
        row("imagegen", "open-9.00rps", "open", 9.0),  # open loops do not define capacity
        row("imagegen", "one-client-in-turn", "in-turn", 3.0, p50=250.0),
        row("litserve", "one-client-in-turn", "in-turn", 3.0, p50=260.0),
        row("naive", "one-client-in-turn", "in-turn", 3.0, p50=240.0),
    ]
    assert saturated_throughput(rows, "imagegen") == 7.6
    results = {target.name: target for target in evaluate_targets(rows)}
    assert results["saturated throughput / bare pipeline at its best batch"].value == pytest.approx(0.95)
    assert results["saturated throughput / bare pipeline at its best batch"].met is True
    assert results["saturated throughput / naive"].met is True
    assert results["saturated throughput / litserve"].value == pytest.approx(7.6 / 7.5)
    assert results["p99 at 80% of capacity / unloaded p50"].value == pytest.approx(700 / 220)
    assert results["p99 at 80% of capacity / unloaded p50"].met is False
    assert results["p99 / p50, both at 80% of capacity"].value == pytest.approx(700 / 400)
    assert results["p99 / p50, both at 80% of capacity"].met is True
    assert results["p50 added over the bare call at 1 client (ms)"].value == pytest.approx(20.0)
    assert results["p50 added over the bare call at 1 client (ms)"].met is True
    in_turn = results["p50 added over the bare call timed in turn with it, at 1 client (ms)"]
    assert in_turn.value == pytest.approx(40.0)  # the paired requests against their bare calls
    assert in_turn.met is False
    against_litserve = results["p50 at 1 client, one request each in turn / litserve"]
    assert (against_litserve.value, against_litserve.met) == (pytest.approx(250 / 260), True)
    assert results["p50 at 1 client, one request each in turn / naive"].met is False
    assert results["p50 at 1 client, one request each in turn / litserve-workers"].met is None  # not run
    one = results["forward pass in the replica / bare pass timed in turn with it, batch 1"]
    assert (one.value, one.met) == (pytest.approx(200 / 190), True)
    eight = results["forward pass in the replica / bare pass timed in turn with it, batch 8"]
    assert (eight.value, eight.met) == (pytest.approx(1.05), True)
    assert [t.name for t in results.values()][-2:] == [  # by batch size
        "forward pass in the replica / bare pass timed in turn with it, batch 1",
        "forward pass in the replica / bare pass timed in turn with it, batch 8",
    ]


def test_targets_without_the_systems_they_need_are_unknown() -> None:
    results = evaluate_targets([row("imagegen", "closed-1", "closed", 4.0, p50=200.0)])
    assert all(target.met is None for target in results)


def test_concurrency_table_reads_bare_batches_as_clients() -> None:
    rows = [
        row("bare", "batch-1", "in-process", 5.0),
        row("bare", "batch-8", "in-process", 8.0),
        row("bare", "1-thread-batch-1", "in-process", 4.5),
        row("bare", "1-thread-batch-8", "in-process", 6.5),
        row("imagegen", "closed-1", "closed", 4.0),
        row("imagegen", "closed-8", "closed", 6.0),
        row("imagegen", "closed-16", "closed", 6.2),
    ]
    assert concurrency_table(rows, ["bare", "imagegen"]) == [
        ["bare", "5.00", "8.00", "8.00"],
        ["bare, 1 thread", "4.50", "6.50", "6.50"],
        ["imagegen", "4.00", "6.00", "6.20"],
    ]


def test_rounds_pool_latencies_and_count_throughput_over_both_windows() -> None:
    first = [record(0.0, 1.0), record(0.0, 2.0)]  # 2 images in a 2 s window
    second = [record(0.0, 0.5), record(0.5, 1.0), record(0.5, 1.0, status=503)]  # 2 in 1 s
    row = summarize_runs(Scenario("imagegen", "closed-1", "closed", clients=1), [first, second], 0.75)
    assert row["rounds"] == 2 and row["requests"] == 5 and row["ok"] == 4
    assert row["throughput_img_s"] == pytest.approx(4 / 3.0)
    assert row["round_img_s"] == pytest.approx([1.0, 2.0])
    assert row["goodput_img_s"] == pytest.approx(2 / 3.0)  # the two 0.5 s answers
    assert row["p50_ms"] == pytest.approx(750.0)


def test_the_forward_pass_in_the_replica_is_set_beside_the_bare_passes_of_its_batch_size() -> None:
    ours = [record(0, 1, system="imagegen", batch_sizes=[1], server_model_ms=ms) for ms in (110, 130, 120)]
    ours.append(record(0, 1, system="imagegen", batch_sizes=[4], server_model_ms=400.0))
    ours.append(record(0, 1, system="imagegen", n=2, batch_sizes=[4, 4], server_model_ms=1.0))  # 2 passes
    ours.append(record(0, 1, system="imagegen", status=503, batch_sizes=[1], server_model_ms=1.0))
    ours.append(record(0, 1, system="imagegen-all-threads", batch_sizes=[1], server_model_ms=90.0))
    ours.append(record(0, 1, system="litserve", batch_sizes=[1], server_model_ms=1.0))  # not ours
    rows = [
        row("bare", "batch-1", "in-process", 8.0, p50=100.0),
        row("bare", "beside-imagegen-batch-1", "in-process", 8.0, p50=150.0),  # a slower minute
        {**row("imagegen", "paired-batch-1", "paired", 3.0), "model_p50_ms": 165.0},
        row("bare", "beside-imagegen-batch-4", "in-process", 2.0, p50=500.0),
        {**row("imagegen", "paired-batch-4", "paired", 3.0), "model_p50_ms": 450.0},
    ]
    assert forward_pass_table(rows, ours) == [
        ["imagegen", "1", "3", "120", "100", "1.20", "165", "150", "1.10"],
        ["imagegen", "4", "1", "400", "-", "-", "450", "500", "0.90"],
        ["imagegen-all-threads", "1", "1", "90", "100", "0.90", "-", "-", "-"],
    ]


def test_server_cpu_per_image_splits_the_forward_passes_from_the_rest() -> None:
    replica = "ray::ServeReplica:imagegen:Ingress"
    before = {
        1: (replica, 2.0),
        -1: (f"{replica}: {MODEL_PASSES}", 8.0),
        2: ("ray::ProxyActor", 1.0),
        3: ("raylet", 5.0),
    }
    after = {
        1: (replica, 2.5),
        -1: (f"{replica}: {MODEL_PASSES}", 16.0),
        2: ("ray::ProxyActor", 2.0),
        3: ("raylet", 5.5),
        4: ("new", 9.0),
    }
    cpu = ServerCpu.from_samples("imagegen", 0, 0.04, before, after, images=10)
    assert cpu.core_ms_per_image == pytest.approx(1000.0)
    assert cpu.outside_model_core_ms_per_image == pytest.approx(200.0)
    single = ServerCpu.from_samples("litserve", 1, 0.0, {7: ("python", 1.0)}, {7: ("python", 3.0)}, images=4)
    assert (single.core_ms_per_image, single.outside_model_core_ms_per_image) == (500.0, None)


def test_targets_are_for_imagegen_or_else_the_variant_of_it_that_ran() -> None:
    assert target_system(["bare", "litserve", "imagegen", "imagegen-all-threads"]) == "imagegen"
    assert target_system(["bare", "imagegen-all-threads"]) == "imagegen-all-threads"
    rows = [
        row("bare", "batch-8", "in-process", 4.0),
        row("imagegen-all-threads", "closed-16", "closed", 3.0),
    ]
    results = {target.name: target for target in evaluate_targets(rows, "imagegen-all-threads")}
    assert results["saturated throughput / bare pipeline at its best batch"].value == pytest.approx(0.75)


def test_latency_cdf_shows_the_fewest_clients_and_the_middle_of_the_open_sweep() -> None:
    rows = [
        summarize(Scenario("s", "closed-16", "closed", clients=16), [record(0.0, 1.0)], 1.0),
        summarize(Scenario("s", "closed-4", "closed", clients=4), [record(0.0, 1.0)], 1.0),
        *(
            summarize(Scenario("s", f"open-{rate}rps", "open", offered_rps=rate), [record(0.0, 1.0)], 1.0)
            for rate in (1.0, 3.0, 2.0)
        ),
        summarize(Scenario("s", "open-0.8cap", "open", offered_rps=9.0), [record(0.0, 1.0)], 1.0),
    ]
    assert latency_cdf_panels(rows) == [
        ("closed-4", "4 clients", "linear"),
        ("open-2.0rps", "open loop, 2.0 requests/s", "log"),
    ]


def test_a_run_of_one_loaded_closed_loop_writes_its_report_and_plots(tmp_path: Path) -> None:
    """`imagegen bench --url URL --mode closed --clients 16`: no 1-client loop and no open sweep."""
    records = [replace(record(0.0, 1.0 + i / 10), scenario="closed-16") for i in range(16)]
    rows = [summarize(Scenario("s", "closed-16", "closed", clients=16), records, 1.0)]
    info = RunInfo("t", "m", "2026-11-30", "abc", "imagegen bench", 1.0, 1000.0)
    paths = write_report(tmp_path, info, rows, records)
    assert all(path.stat().st_size > 0 for path in paths)
    assert "closed-16" in (tmp_path / "report.md").read_text()


def test_a_row_carries_the_servers_own_model_time() -> None:
    records = [record(0.0, 1.0, server_model_ms=ms) for ms in (300.0, 100.0, 200.0)]
    records.append(record(0.0, 1.0, status=500, server_model_ms=900.0))  # failed: not counted
    assert summarize(Scenario("s", "paired-batch-1", "paired"), records, 1.0)["model_p50_ms"] == 200.0
    assert summarize(Scenario("s", "closed-1", "closed"), [record(0.0, 1.0)], 1.0)["model_p50_ms"] is None


def test_the_loop_at_a_share_of_capacity_runs_long_enough_for_its_p99() -> None:
    from benchmarks.run import P99_REQUESTS, capacity_loop_seconds

    seconds = capacity_loop_seconds(4.7, duration_s=6.0, rounds=2, quick=False)
    assert 4.7 * seconds * 2 == pytest.approx(P99_REQUESTS)  # about 21 per round at 6 s before
    assert capacity_loop_seconds(40.0, duration_s=6.0, rounds=2, quick=False) == 6.0  # never shorter
    assert capacity_loop_seconds(4.7, duration_s=1.5, rounds=1, quick=True) == 1.5  # --quick stays quick


def test_the_saturating_loop_runs_long_enough_to_leave_its_ramp_behind() -> None:
    from benchmarks.run import SATURATION_ANSWERS, SATURATION_MAX_S, saturation_loop_seconds

    seconds = saturation_loop_seconds(16, 5.0, duration_s=6.0, quick=False)
    assert seconds * 5.0 == pytest.approx(SATURATION_ANSWERS * 16)  # two or three each at 6 s before
    assert saturation_loop_seconds(16, 100.0, duration_s=6.0, quick=False) == 6.0  # never shorter
    assert saturation_loop_seconds(16, 0.1, duration_s=6.0, quick=False) == SATURATION_MAX_S
    assert saturation_loop_seconds(16, None, duration_s=6.0, quick=False) == 6.0  # no rate to go by
    assert saturation_loop_seconds(16, 5.0, duration_s=1.5, quick=True) == 1.5  # --quick stays quick
