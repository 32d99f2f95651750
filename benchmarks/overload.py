"""`make bench-overload`: the paid tier through a free-tier spike at twice imagegen-serve's capacity.

What ChatGPT Images had to survive: a viral spike of free users on top of steady paid traffic.
This starts ``imagegen serve`` with a keys file (one paid tenant, many free tenants, the shipped
tier and scheduler settings) and runs, after a warm-up:

1. **capacity**: a closed loop of 16 paid clients; its images/s is the service's capacity ``C``.
2. **paid alone** (``unloaded``): paid requests, Poisson at ``--paid-share`` x C (default 0.25 C).
3. **spike** (``overload``): the *same* paid arrivals, plus free requests from ``--free-tenants``
   tenants at ``(--overload - --paid-share)`` x C, so the offered load is ``--overload`` x C (2 C).

It checks the two promises of issue 6: the paid p99 in the spike within 1.5x its p99 alone, and no
accepted request lost: every request ends 200 or is shed with 429 at admission; nothing times out,
nothing fails with a 5xx. Writes ``report.md``, ``overload.png`` and ``requests.parquet`` to
``benchmarks/results/overload/`` (``--quick``: a short run into ``overload-quick/`` for the test).

    python -m benchmarks.overload            # about 3 minutes on 2 cores
    python -m benchmarks.overload --quick    # under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.loadgen import RequestRecord, run_closed_loop, run_open_loop, warm_up
from benchmarks.run import RESULTS_DIR, free_port, git_commit, machine_description
from benchmarks.run_report import REQUEST_SCHEMA, markdown_table
from benchmarks.stats import Scenario, percentile, summarize, throughput
from benchmarks.systems import running_server, server_systems
from benchmarks.workload import RateSchedule, RequestMix, RequestSpec, Tier, arrival_offsets, iter_requests

PAID = Tier("paid", "sk-bench-paid")
PAID_P99_BOUND = 1.5  # issue 6: paid p99 in the spike within 1.5x its p99 alone
SHED_STATUS = 429
SYSTEM = "imagegen"


def free_tiers(tenants: int) -> list[Tier]:
    return [Tier("free", f"sk-bench-free-{index:03d}") for index in range(tenants)]


def keys_yaml(free: Sequence[Tier]) -> str:
    """The keys file: one paid tenant and one tenant per free key."""
    lines = ["keys:", f"  - {{key: {PAID.api_key}, tenant: acme, tier: paid}}"]
    lines += [f"  - {{key: {tier.api_key}, tenant: free-{i:03d}, tier: free}}" for i, tier in enumerate(free)]
    return "\n".join(lines) + "\n"


def generations(tier: Tier) -> RequestMix:
    """What every request here is: one 64x64 image from /v1/images/generations."""
    return RequestMix(sizes={"64x64": 1.0}, endpoints={"generations": 1.0}, tiers=(tier,))


def tier_arrivals(
    tiers: Sequence[Tier], rate: float, duration_s: float, seed: int
) -> list[tuple[float, RequestSpec]]:
    """Poisson arrivals of one tier, each request with the key of one of ``tiers`` (its tenants)."""
    rng = random.Random(seed)
    # At least one request, as in benchmarks.run: a slow machine's --quick run may draw none.
    offsets = arrival_offsets(RateSchedule.fixed(rate), duration_s, burstiness=1.0, rng=rng) or [0.0]
    specs = iter_requests(generations(tiers[0]), rng)
    return [
        (offset, dataclasses.replace(spec, api_key=rng.choice(tiers).api_key))
        for offset, spec in zip(offsets, specs, strict=False)
    ]


def merge(*streams: Sequence[tuple[float, RequestSpec]]) -> list[tuple[float, RequestSpec]]:
    """Streams of arrivals as one, by time, each request with its own index."""
    ordered = sorted((item for stream in streams for item in stream), key=lambda item: item[0])
    return [(offset, dataclasses.replace(spec, index=i)) for i, (offset, spec) in enumerate(ordered)]


def lost(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """Requests neither answered in full nor shed at admission: no answer, a 5xx, a broken stream."""
    return [r for r in records if not r.ok and r.status != SHED_STATUS]


def tier_rows(
    scenario: str, offered: dict[str, float], records: Sequence[RequestRecord]
) -> list[dict[str, Any]]:
    """One summary row per tier of one scenario (the row's ``system`` is the tier)."""
    rows = []
    for tier, rate in offered.items():
        mine = [r for r in records if r.tier == tier]
        row = summarize(Scenario(tier, scenario, "open", offered_rps=rate), mine, slo_s=1.0)
        row["shed"] = sum(r.status == SHED_STATUS for r in mine)
        row["lost"] = len(lost(mine))
        rows.append(row)
    return rows


def paid_p99_ratio(rows: Sequence[dict[str, Any]]) -> float | None:
    """The paid p99 in the spike over its p99 alone (pure; None when either is missing)."""
    p99 = {row["scenario"]: row["p99_ms"] for row in rows if row["system"] == PAID.name}
    alone, spike = p99.get("unloaded"), p99.get("overload")
    return spike / alone if alone and spike else None


def render(meta: dict[str, Any], rows: Sequence[dict[str, Any]], records: Sequence[RequestRecord]) -> str:
    ratio = paid_p99_ratio(rows)
    lost_count = len(lost([r for r in records if r.scenario == "overload"]))
    accepted = sum(r.ok for r in records if r.scenario == "overload")
    body = [
        [
            row["scenario"],
            row["system"],
            f"{row['offered_rps']:.2f}",
            str(row["requests"]),
            str(row["ok"]),
            str(row["shed"]),
            str(row["lost"]),
            *(f"{row[key]:.0f}" if row[key] is not None else "-" for key in ("p50_ms", "p95_ms", "p99_ms")),
            f"{row['throughput_img_s']:.2f}",
        ]
        for row in rows
    ]
    headers = [
        "scenario",
        "tier",
        "offered req/s",
        "sent",
        "200",
        "429",
        "lost",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "img/s",
    ]
    verdicts = [
        [
            f"paid p99 in the spike / paid p99 alone ≤ {PAID_P99_BOUND}",
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if ratio is None else ("met" if ratio <= PAID_P99_BOUND else "missed"),
        ],
        [
            "accepted requests lost (neither 200 nor shed with 429)",
            f"{lost_count} of {accepted + lost_count}",
            "met" if lost_count == 0 else "missed",
        ],
    ]
    return "\n".join(
        [
            "# Overload: the paid tier through a free-tier spike",
            "",
            f"- machine: {meta['machine']}",
            f"- started: {meta['started']}, commit {meta['commit']}, {meta['wall_s']:.0f} s",
            f"- command: `{meta['command']}`",
            f"- capacity C = {meta['capacity']:.2f} images/s (closed loop, 16 paid clients); "
            f"paid alone at {meta['paid_rps']:.2f} req/s, then the same paid arrivals plus "
            f"{meta['free_rps']:.2f} req/s of free work from {meta['free_tenants']} tenants: "
            f"{meta['overload']:g} x C offered, {meta['duration_s']:g} s each",
            f"- load average before {meta['load_before']}, after {meta['load_after']}",
            "",
            "## Targets (issue 6)",
            "",
            markdown_table(["target", "value", ""], verdicts),
            "",
            "## Per tier",
            "",
            markdown_table(headers, body),
            "",
            "Latency counts from each request's scheduled arrival to the last byte of its answer; "
            "percentiles are over answered requests. `429` is work shed at admission (with `retry-after` "
            "and `x-should-retry`), never work the service had accepted.",
            "",
            "![paid and free latency through the spike](overload.png)",
            "",
        ]
    )


def plot(path: Path, records: Sequence[RequestRecord]) -> None:
    """Left: each request of the spike by arrival; right: the paid latency CDF alone and in the spike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (timeline, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    spike = [r for r in records if r.scenario == "overload"]
    for tier, colour in (("free", "tab:orange"), (PAID.name, "tab:blue")):
        done = [r for r in spike if r.tier == tier and r.ok]
        timeline.scatter(
            [r.scheduled_s for r in done], [r.latency_s for r in done], s=6, c=colour, label=f"{tier}: 200"
        )
    shed = [r for r in spike if r.status == SHED_STATUS]
    timeline.scatter(
        [r.scheduled_s for r in shed],
        [r.latency_s for r in shed],
        s=10,
        marker="x",
        c="tab:red",
        label="free: 429",
    )
    timeline.set(xlabel="arrival (s into the spike)", ylabel="latency (s)", yscale="log", title="The spike")
    timeline.legend(fontsize=8)
    timeline.grid(alpha=0.3, which="both")
    for scenario, style in (("unloaded", "--"), ("overload", "-")):
        latencies = sorted(
            r.latency_s for r in records if r.scenario == scenario and r.tier == PAID.name and r.ok
        )
        if latencies:
            shares = [(i + 1) / len(latencies) for i in range(len(latencies))]
            cdf.plot(
                latencies,
                shares,
                style,
                label=f"paid, {'alone' if scenario == 'unloaded' else 'in the spike'}",
            )
    alone = [r.latency_s for r in records if r.scenario == "unloaded" and r.tier == PAID.name and r.ok]
    p99_alone = percentile(alone, 99)
    if p99_alone:
        cdf.axvline(
            PAID_P99_BOUND * p99_alone, color="tab:red", linestyle=":", label=f"{PAID_P99_BOUND}x p99 alone"
        )
    cdf.set(xlabel="latency (s)", ylabel="share of paid requests", title="Paid latency")
    cdf.legend(fontsize=8)
    cdf.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


async def scenarios(
    args: argparse.Namespace, base_url: str, free: Sequence[Tier]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[RequestRecord]]:
    common = {"system": SYSTEM, "timeout_s": args.timeout, "drain_s": args.timeout}
    paid_mix = generations(PAID)
    await warm_up(base_url, paid_mix, args.warmup_bursts, **common)
    capacity_records = await run_closed_loop(
        base_url,
        iter_requests(paid_mix, random.Random(args.seed)),
        scenario="capacity",
        clients=16,
        duration_s=args.capacity_duration,
        **common,
    )
    capacity = throughput(capacity_records)
    paid_rps = args.paid_share * capacity
    free_rps = (args.overload - args.paid_share) * capacity
    paid = tier_arrivals([PAID], paid_rps, args.duration, args.seed + 1)
    spike = merge(paid, tier_arrivals(free, free_rps, args.duration, args.seed + 2))
    rows: list[dict[str, Any]] = []
    records: list[RequestRecord] = []
    for name, arrivals, offered in (
        ("unloaded", merge(paid), {PAID.name: paid_rps}),
        ("overload", spike, {PAID.name: paid_rps, "free": free_rps}),
    ):
        print(f"  {name}: {len(arrivals)} requests over {args.duration:g} s", flush=True)
        scenario_records = await run_open_loop(base_url, arrivals, scenario=name, **common)
        rows += tier_rows(name, offered, scenario_records)
        records += scenario_records
        for row in rows[-len(offered) :]:
            print(
                f"  {name:9} {row['system']:5} sent {row['requests']:4} 200 {row['ok']:4} "
                f"429 {row['shed']:4} "
                f"lost {row['lost']} p50 {row['p50_ms'] or 0:6.0f} p99 {row['p99_ms'] or 0:6.0f} ms",
                flush=True,
            )
    meta = {"capacity": capacity, "paid_rps": paid_rps, "free_rps": free_rps}
    return meta, rows, records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short scenarios, for the harness test")
    parser.add_argument("--out", type=Path, help="report directory (default benchmarks/results/overload)")
    parser.add_argument("--duration", type=float, help="seconds of each open-loop scenario (default 60)")
    parser.add_argument("--paid-share", type=float, default=0.25, help="paid load as a share of capacity")
    parser.add_argument(
        "--overload", type=float, default=2.0, help="total offered load in the spike, x capacity"
    )
    parser.add_argument("--free-tenants", type=int, default=32, help="free tenants the spike comes from")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take before it counts as lost"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.duration = args.duration or (4.0 if args.quick else 60.0)  # ~130 paid requests for a p99
    args.capacity_duration = 3.0 if args.quick else 10.0
    args.warmup_bursts = [16] if args.quick else [*range(1, 9), 16]
    out = args.out or RESULTS_DIR / ("overload-quick" if args.quick else "overload")
    free = free_tiers(args.free_tenants)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "machine": machine_description(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "command": " ".join(["python -m benchmarks.overload", *argv]),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "free_tenants": args.free_tenants,
        "overload": args.overload,
        "duration_s": args.duration,
    }
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="imagegen-overload-") as workdir:
        keys_file = Path(workdir) / "keys.yaml"
        keys_file.write_text(keys_yaml(free))
        imagegen = server_systems(port, Path(workdir) / "store")[SYSTEM]
        system = dataclasses.replace(
            imagegen, env={**imagegen.env, "IMAGEGEN_AUTH__KEYS_FILE": str(keys_file)}
        )
        print("imagegen-serve with a keys file: starting", flush=True)
        with running_server(system, port) as server:
            found, rows, records = asyncio.run(scenarios(args, server.base_url, free))
    meta |= found
    meta["wall_s"] = time.perf_counter() - started
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist([r.as_row() for r in records], schema=REQUEST_SCHEMA), out / "requests.parquet"
    )
    (out / "report.md").write_text(render(meta, rows, records))
    plot(out / "overload.png", records)
    ratio = paid_p99_ratio(rows)
    print(
        f"paid p99 ratio {ratio if ratio is None else round(ratio, 2)}; lost {len(lost(records))}", flush=True
    )
    print(f"report: {out / 'report.md'} ({meta['wall_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
