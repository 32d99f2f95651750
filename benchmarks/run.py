"""`make bench` / `imagegen bench`: imagegen-serve and its peers on the same model under the same load.

Without ``--url`` it compares, one system at a time on this machine:

1. the bare pipeline, called in this process at several batch sizes (the limit);
2. a naive FastAPI + diffusers server (one request at a time);
3. LitServe with its dynamic batching;
4. imagegen-serve (``imagegen serve``).

Each server gets the same scenarios: closed loops at 1, 8 and a saturating number of clients
(its capacity is its best closed-loop throughput), open loops (Poisson by default) at the same
absolute rates for every system (fractions of the bare pipeline's best images/s), and an open
loop at 80% of its own capacity. After the rounds, every server runs at once and each gets one
request in turn while the others are paused (``--one-client-turns``): the 1-client comparison in
the same seconds. With ``--url`` it loads one running server instead, with any
schedule and request mix. Either way it writes Parquet, a Markdown report and PNG plots.

    python -m benchmarks.run                 # the full comparison (< 10 minutes on 2 cores)
    python -m benchmarks.run --quick         # the same harness in well under a minute
    python -m benchmarks.run --url http://127.0.0.1:8000 --schedule ramp:1,10 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.loadgen import RequestRecord, http_client, run_closed_loop, run_open_loop, send, warm_up
from benchmarks.machine import ForeignLoadMeter, measure_idle, noisy_neighbour, session_cpu, signal_session
from benchmarks.run_report import (
    ONE_CLIENT_IN_TURN,
    PEERS,
    TARGET_SYSTEM,
    RunInfo,
    ServerCpu,
    saturated_throughput,
    write_report,
)
from benchmarks.stats import Scenario, summarize, summarize_runs, window_s
from benchmarks.workload import (
    RateSchedule,
    RequestMix,
    Tier,
    arrival_offsets,
    build_requests,
    iter_requests,
    parse_weighted,
)
from serve_app.config import load_config

if TYPE_CHECKING:
    from benchmarks.systems import BarePipeline, RunningServer

RESULTS_DIR = Path(__file__).parent / "results"
SYSTEM_ORDER = ("bare", "naive", "litserve", "litserve-workers", "imagegen", "imagegen-all-threads")
LABELS = {
    "bare": "bare pipeline (in-process)",
    "naive": "naive FastAPI",
    "litserve": "LitServe (batching)",
    "litserve-workers": "LitServe, a one-thread worker per core",
    "imagegen": "imagegen-serve",
    "imagegen-all-threads": "imagegen-serve, cpu_threads: all",
}
QUICK = {
    "duration": 1.5,
    "systems": "bare,imagegen",
    "clients": "1,8",
    "saturation_clients": 8,
    "load_fractions": "0.5",
    "bare_batch_sizes": "1,2",
    "bare_one_thread": False,
    "one_client_turns": 0,
    "drain": 15.0,  # short scenarios, but no request should fail for want of waiting
    "rounds": 1,
}
FULL = {
    "duration": 6.0,  # per scenario and round
    "systems": "bare,naive,litserve,litserve-workers,imagegen",  # imagegen-all-threads on request
    "clients": "1,8",
    "saturation_clients": 16,
    "load_fractions": "0.3,0.6,0.9,1.2",
    "bare_batch_sizes": "1,2,4,8,16",
    "bare_one_thread": True,
    "one_client_turns": 30,
    "rounds": 2,
}
IDLE_WINDOW_S = 20.0
P99_REQUESTS = 100
"""Requests the loop at a share of a server's own capacity sends over all rounds: its p99 is a
target, and over the 20-odd requests of one 6 s round it was the slowest request or two."""
SATURATION_ANSWERS = 6
"""Answers each client of the saturating closed loop gets per round. Its first answer waits behind
the whole burst of the others, and its last one drains the queue: over a 6 s round (two or three
answers each at 16 clients) that ramp and drain were a third of the window."""
SATURATION_MAX_S = 45.0
"""The longest round of the saturating loop, however slow the server."""
MIN_PAIRS = 3
# Between the calls timed in turn: a server's work goes on after its answer (imagegen-serve gives
# its slots back 10 ms later, in a call of its own), and it would otherwise slow the bare pass
# that follows, favouring the server.
SETTLE_S = 0.1


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("the run")
    run.add_argument(
        "--quick", action="store_true", help="short scenarios, bare pipeline and imagegen-serve only"
    )
    run.add_argument(
        "--out", type=Path, help=f"report directory (default {RESULTS_DIR}, or its quick/ with --quick)"
    )
    run.add_argument("--duration", type=float, help="seconds per scenario and round (default 6; 1.5 quick)")
    run.add_argument("--systems", help=f"comma-separated, from {','.join(SYSTEM_ORDER)}")
    run.add_argument(
        "--rounds",
        type=int,
        help="run every system this many times, interleaved A B A B (default 2; 1 quick)",
    )
    run.add_argument(
        "--noisy-neighbour",
        type=int,
        default=0,
        metavar="CORES",
        help="burn this many cores in other processes for the whole run (default 0)",
    )
    run.add_argument("--slo-ms", type=float, default=1000.0, help="latency SLO for goodput (default 1000)")
    run.add_argument("--seed", type=int, default=0, help="seed of arrivals and request mixes")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as failed")
    run.add_argument("--max-requests", type=int, help="at most this many requests per scenario")
    run.add_argument(
        "--drain", type=float, help="seconds a scenario waits for answers after sending (default: --duration)"
    )
    compare = parser.add_argument_group("the comparison (without --url)")
    compare.add_argument("--clients", help="closed-loop client counts (default 1,8)")
    compare.add_argument("--saturation-clients", type=int, help="clients that saturate a server (default 16)")
    compare.add_argument(
        "--load-fractions", help="open-loop rates as fractions of the bare pipeline's best images/s"
    )
    compare.add_argument(
        "--capacity-fraction", type=float, default=0.8, help="open loop at this share of own capacity"
    )
    compare.add_argument(
        "--bare-batch-sizes", help="batch sizes for the in-process pipeline (default 1,2,4,8,16)"
    )
    compare.add_argument(
        "--bare-threads",
        type=int,
        help="torch threads of the in-process pipeline (default: torch's, every core); beside a noisy "
        "neighbour a pass on every core spins at each barrier and takes 50-90x as long, so 1 is "
        "the bare pipeline at its best there",
    )
    compare.add_argument(
        "--bare-one-thread",
        action=argparse.BooleanOptionalAction,
        help="also time the pipeline on one torch thread, as a 1-CPU Ray worker runs it (default: on)",
    )
    compare.add_argument(
        "--one-client-turns",
        type=int,
        help="after the rounds, start every server at once and send each one request in turn, "
        "the others paused, this many times (default 30; 0: none)",
    )
    target = parser.add_argument_group("one running server (--url)")
    target.add_argument("--url", help="load this server instead of starting the peers")
    target.add_argument("--name", default="target", help="its name in the report")
    target.add_argument("--mode", choices=("open", "closed"), default="open")
    target.add_argument("--rate", type=float, default=2.0, help="open loop: requests/s")
    target.add_argument(
        "--schedule", help="open loop: 'step:R1,R2,...' (equal segments) or 'ramp:START,END' (requests/s)"
    )
    mix = parser.add_argument_group("requests and arrivals")
    mix.add_argument("--size", default="64x64", help="sizes with weights, e.g. '64x64:3,128x128:1'")
    mix.add_argument("--endpoint", default="generations", help="e.g. 'generations:4,edits:1'")
    mix.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="TIER=KEY[:WEIGHT]",
        help="a tier's key (repeatable)",
    )
    mix.add_argument("--stream-fraction", type=float, default=0.0, help="share of requests with stream=true")
    mix.add_argument("--partial-images", type=int, default=2, help="partial images a stream asks for (0-3)")
    mix.add_argument("--n", type=int, default=1, help="images per request")
    mix.add_argument("--model", help="the request's model (default: the server's default)")
    mix.add_argument("--arrival", choices=("poisson", "gamma", "uniform"), default="poisson")
    mix.add_argument("--burstiness", type=float, default=2.0, help="gamma: coefficient of variation of gaps")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drain is None:
        args.drain = args.duration
    if args.out is None:  # only the full comparison writes the committed report
        args.out = (
            RESULTS_DIR / (args.name if args.url else "quick") if args.url or args.quick else RESULTS_DIR
        )
    return args


def request_mix(args: argparse.Namespace) -> RequestMix:
    tiers = tuple(Tier.parse(spec) for spec in args.api_key) or (Tier("default", "sk-bench"),)
    return RequestMix(
        sizes=parse_weighted(args.size),
        endpoints=parse_weighted(args.endpoint),
        tiers=tiers,
        stream_fraction=args.stream_fraction,
        partial_images=args.partial_images,
        images_per_request=args.n,
        model=args.model,
    )


def burstiness(args: argparse.Namespace) -> float:
    return {"poisson": 1.0, "uniform": 0.0}.get(args.arrival, args.burstiness)


def schedule(args: argparse.Namespace) -> RateSchedule:
    if not args.schedule:
        return RateSchedule.fixed(args.rate)
    kind, _, values = args.schedule.partition(":")
    rates = _floats(values)
    if kind == "step" and rates:
        return RateSchedule.step(rates, args.duration / len(rates))
    if kind == "ramp" and len(rates) == 2:
        return RateSchedule.ramp(rates[0], rates[1], args.duration)
    raise SystemExit(f"--schedule: expected 'step:1,2,4' or 'ramp:1,8', got {args.schedule!r}")


def capacity_loop_seconds(rate: float, duration_s: float, rounds: int, quick: bool) -> float:
    """Each round's length of the open loop at a share of the server's own capacity: at least
    ``duration_s``, and long enough for `P99_REQUESTS` over all rounds (``quick`` keeps it short)."""
    if quick:
        return duration_s
    return max(duration_s, P99_REQUESTS / (rate * rounds))


def saturation_loop_seconds(
    clients: int, requests_per_s: float | None, duration_s: float, quick: bool
) -> float:
    """Each round's length of the closed loop that saturates a server: at least ``duration_s``, and
    long enough for `SATURATION_ANSWERS` per client at ``requests_per_s`` (the server's rate at
    fewer clients, so no more than its rate here), within `SATURATION_MAX_S`."""
    if quick or not requests_per_s:
        return duration_s
    return max(duration_s, min(SATURATION_MAX_S, SATURATION_ANSWERS * clients / requests_per_s))


def open_arrivals(
    args: argparse.Namespace,
    rates: RateSchedule,
    mix: RequestMix,
    seed: int,
    duration_s: float,
) -> list[tuple[float, Any]]:
    """The same (offset, request) list for every system given the same seed, over ``duration_s``.

    A scenario sends at least one request: a low rate over a short run (a slow machine's capacity
    under --quick) may otherwise draw no arrival at all and measure nothing.
    """
    offsets = arrival_offsets(
        rates,
        duration_s,
        burstiness=burstiness(args),
        rng=random.Random(seed),
        max_requests=args.max_requests,
    ) or [0.0]
    return list(zip(offsets, build_requests(mix, len(offsets), random.Random(seed + 1)), strict=True))


class Collector:
    """Records of a run by system and scenario, one list per round, in the order scenarios ran."""

    def __init__(self, slo_s: float) -> None:
        self.slo_s = slo_s
        self.runs: dict[tuple[str, str], tuple[Scenario, list[list[RequestRecord]]]] = {}
        self.records: list[RequestRecord] = []

    def add(self, scenario: Scenario, records: list[RequestRecord], round_index: int = 0) -> dict[str, Any]:
        for record in records:
            record.round = round_index
        self.runs.setdefault((scenario.system, scenario.name), (scenario, []))[1].append(records)
        self.records.extend(records)
        row = summarize(scenario, records, self.slo_s)
        print(
            f"  {scenario.system:9} {scenario.name:14} ok {row['ok']:4}/{row['requests']:<4} "
            f"p50 {_ms(row['p50_ms'])} p99 {_ms(row['p99_ms'])} {row['throughput_img_s']:6.2f} img/s",
            flush=True,
        )
        return row

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per system and scenario over every round so far."""
        return [summarize_runs(scenario, runs, self.slo_s) for scenario, runs in self.runs.values()]


def _ms(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.0f}"


async def benchmark_server(
    args: argparse.Namespace,
    name: str,
    server: RunningServer,
    mix: RequestMix,
    reference_rps: float | None,
    collector: Collector,
    round_index: int,
    bare: BarePipeline | None,
) -> tuple[float | None, ServerCpu]:
    """Every scenario against one running server; returns the reference rate for the open loops
    and the server's CPU (idle after warming up, and per image at saturation). With ``bare``, the
    bare pass is also timed beside the idle server, at batch 1 and at its largest batch."""
    base_url = server.base_url
    common = {"system": name, "timeout_s": args.timeout, "drain_s": args.drain}
    client_counts = sorted({*_ints(args.clients), args.saturation_clients})
    # The first forward pass at each batch size sets up kernels for its shapes (up to seconds on a
    # CPU): bursts of 1..max_batch_size requests pay for that before anything is measured (--quick,
    # which measures nothing worth comparing, warms with one burst).
    max_batch = load_config().variants[0].batching.max_batch_size
    bursts = [max(client_counts)] if args.quick else [*range(1, max_batch + 1), max(client_counts)]
    await warm_up(base_url, mix, bursts, **common)
    idle_share, _ = await asyncio.to_thread(measure_idle, server.session, IDLE_WINDOW_S)
    if bare is not None:
        # Peers may not batch one request's images into one pass: they are timed at batch 1 only.
        batches = [1, max_batch] if name.startswith(TARGET_SYSTEM) else [1]
        threads = server.system.torch_threads
        await time_in_turn(args, name, base_url, mix, bare, batches, threads, collector, round_index)
    saturation_cpu: tuple[dict[int, tuple[str, float]], dict[int, tuple[str, float]]] | None = None

    async def settle() -> None:
        # An overloaded server may still be working through requests the client gave up on; one
        # answered request (queued behind them) says it is idle again before the next scenario.
        await run_closed_loop(
            base_url,
            iter_requests(mix, random.Random(-1)),
            scenario="settle",
            clients=1,
            duration_s=args.timeout,
            max_requests=1,
            system=name,
            timeout_s=args.timeout * 4,
        )

    requests_per_s = None  # in the last closed loop
    for clients in client_counts:
        scenario = Scenario(name, f"closed-{clients}", "closed", clients=clients)
        saturating = clients == max(client_counts)
        seconds = args.duration
        if saturating:
            seconds = saturation_loop_seconds(clients, requests_per_s, args.duration, args.quick)
        cpu_before = session_cpu(server.session)
        records = await run_closed_loop(
            base_url,
            iter_requests(mix, random.Random(args.seed + clients)),
            scenario=scenario.name,
            clients=clients,
            duration_s=seconds,
            max_requests=args.max_requests,
            **common,
        )
        collector.add(scenario, records, round_index)
        answered = sum(record.ok for record in records)
        requests_per_s = answered / window_s(records) if answered else None
        if saturating:
            saturation_cpu = (cpu_before, session_cpu(server.session))
            saturation_images = sum(record.images for record in records)
    capacity = saturated_throughput(collector.rows, name)
    reference_rps = reference_rps or capacity
    # Own-capacity load first, then the common rates from light to overload, so that any backlog
    # an overload leaves behind can only follow heavier load.
    rates: list[tuple[str, float, int, float]] = []  # name, requests/s, seed offset, seconds
    if capacity:
        rate = args.capacity_fraction * capacity
        seconds = capacity_loop_seconds(rate, args.duration, args.rounds, args.quick)
        rates.append((f"open-{args.capacity_fraction:g}cap", rate, 0, seconds))
    if reference_rps:
        fractions = sorted(_floats(args.load_fractions))
        rates += [
            (f"open-{f * reference_rps:.2f}rps", f * reference_rps, i + 1, args.duration)
            for i, f in enumerate(fractions)
        ]
    for scenario_name, rate, seed_offset, seconds in rates:
        await settle()
        scenario = Scenario(name, scenario_name, "open", offered_rps=rate)
        arrivals = open_arrivals(args, RateSchedule.fixed(rate), mix, args.seed + 1000 * seed_offset, seconds)
        records = await run_open_loop(base_url, arrivals, scenario=scenario.name, **common)
        collector.add(scenario, records, round_index)
    assert saturation_cpu is not None
    cpu = ServerCpu.from_samples(name, round_index, idle_share, *saturation_cpu, saturation_images)
    return reference_rps, cpu


async def time_in_turn(
    args: argparse.Namespace,
    name: str,
    base_url: str,
    mix: RequestMix,
    bare: BarePipeline,
    batch_sizes: Sequence[int],
    threads: int | None,
    collector: Collector,
    round_index: int,
) -> None:
    """A bare pass of b images, then one request for b images to the idle server (one pass of b
    in a batching server), in turn for ``--duration`` per batch size (at least `MIN_PAIRS` of
    each), `SETTLE_S` apart: the two see the same seconds of a machine whose speed drifts by 1.5x
    within minutes. Scenarios ``beside-<name>-batch-<b>`` of the bare pipeline and
    ``paired-batch-<b>`` (mode "paired", not a load point) of the server, whose records carry the
    replica's own model time. The bare pass runs on the server's torch threads where it fixes
    them (one thread in each of LitServe's workers), so the two time the same computation."""
    size = next(iter(mix.sizes))
    specs = iter_requests(mix, random.Random(args.seed - 1))
    async with http_client(base_url, args.timeout) as client:
        for batch in batch_sizes:
            bare_scenario = Scenario("bare", f"beside-{name}-batch-{batch}", "in-process", clients=batch)
            served_scenario = Scenario(name, f"paired-batch-{batch}", "paired", clients=1)
            bare_records: list[RequestRecord] = []
            served: list[RequestRecord] = []
            origin = time.perf_counter()
            while len(served) < MIN_PAIRS or time.perf_counter() - origin < args.duration:
                call = (bare_scenario.name, batch, size, len(served), origin, threads)
                bare_records.append(bare.time_call(*call))
                await asyncio.sleep(SETTLE_S)
                spec = replace(next(specs), index=len(served), size=size, n=batch, stream=False)
                served.append(
                    await send(
                        client,
                        spec,
                        system=name,
                        scenario=served_scenario.name,
                        origin=origin,
                        scheduled_s=None,
                    )
                )
                await asyncio.sleep(SETTLE_S)
            collector.add(bare_scenario, bare_records, round_index)
            collector.add(served_scenario, served, round_index)


async def one_client_in_turn(
    args: argparse.Namespace, servers: dict[str, RunningServer], mix: RequestMix, collector: Collector
) -> None:
    """One request to each server in turn, again and again (``--one-client-turns``), every other
    server paused (SIGSTOP, its whole session) meanwhile: the 1-client latencies of the systems in
    the same seconds, none slowed by another's idle work. Run system by system, minutes apart,
    their medians moved with the machine more than they differed (2026-12-02, by hand, four
    windows each: imagegen-serve 278-359 ms, LitServe 280-354). Scenario `ONE_CLIENT_IN_TURN`
    (mode "in-turn", not a load point). A server resumed waits `SETTLE_S` (its timers run late)
    before its request, and is paused again as soon as it answers: work it does after an answer
    stays in its own turn."""
    specs = iter_requests(mix, random.Random(args.seed - 2))
    records: dict[str, list[RequestRecord]] = {name: [] for name in servers}
    common = {"timeout_s": args.timeout, "drain_s": args.drain}
    for name, server in servers.items():
        await warm_up(server.base_url, mix, [1, 1, 1], system=name, **common)
        signal_session(server.session, signal.SIGSTOP)
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = {
                name: await stack.enter_async_context(http_client(server.base_url, args.timeout))
                for name, server in servers.items()
            }
            origin = time.perf_counter()
            for turn in range(args.one_client_turns):
                print(f"one client in turn: {turn + 1}/{args.one_client_turns}", end="\r", flush=True)
                for name, server in servers.items():
                    signal_session(server.session, signal.SIGCONT)
                    await asyncio.sleep(SETTLE_S)
                    spec = replace(next(specs), index=turn, n=1, stream=False)
                    records[name].append(
                        await send(
                            clients[name],
                            spec,
                            system=name,
                            scenario=ONE_CLIENT_IN_TURN,
                            origin=origin,
                            scheduled_s=None,
                        )
                    )
                    signal_session(server.session, signal.SIGSTOP)
    finally:
        for server in servers.values():
            signal_session(server.session, signal.SIGCONT)
    for name, served in records.items():
        collector.add(Scenario(name, ONE_CLIENT_IN_TURN, "in-turn", clients=1), served)


def measure_one_client_in_turn(
    args: argparse.Namespace,
    systems: Sequence[str],
    storage: Path,
    mix: RequestMix,
    collector: Collector,
    info: RunInfo,
    meter: ForeignLoadMeter,
) -> None:
    """Start every server of ``systems`` at once, each on a port of its own, and time them in
    turn at one client (:func:`one_client_in_turn`)."""
    from benchmarks.systems import running_server, server_systems

    names = [name for name in (*PEERS, TARGET_SYSTEM) if name in systems]  # one Ray service at a time
    if args.one_client_turns <= 0 or len(names) < 2:
        return
    print(f"one client in turn: starting {', '.join(names)} at once", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            servers = {}
            for name in names:
                port = free_port()
                system = server_systems(port, storage)[name]
                servers[name] = stack.enter_context(running_server(system, port))
            meter.start(*(server.session for server in servers.values()))
            asyncio.run(one_client_in_turn(args, servers, mix, collector))
            note_foreign_load(info, "one client in turn", meter)
    except RuntimeError as failure:
        info.notes.append(f"one client in turn was skipped: {str(failure).splitlines()[0]}")
        print(failure, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    import torch

    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM, {device}; "
        f"{platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS_DIR.parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=RESULTS_DIR.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def run_info(args: argparse.Namespace, argv: Sequence[str], title: str) -> RunInfo:
    return RunInfo(
        title=title,
        machine=machine_description(),
        started=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        command=" ".join(["python -m benchmarks.run", *argv]),
        duration_s=args.duration,
        slo_ms=args.slo_ms,
        load_before=os.getloadavg(),
        labels=dict(LABELS),
        notes=[f"a noisy neighbour burned {args.noisy_neighbour} core(s) throughout"]
        if args.noisy_neighbour
        else [],
    )


def note_foreign_load(info: RunInfo, name: str, meter: ForeignLoadMeter) -> None:
    load = meter.stop()
    if load is not None:
        info.foreign_load[name] = load.describe()
        print(f"  {name}: CPU used outside the benchmark: {load.describe()}", flush=True)


def per_scenario(
    scenarios: list[Scenario], records: list[RequestRecord]
) -> list[tuple[Scenario, list[RequestRecord]]]:
    """``BarePipeline.measure``'s scenarios, each with its own records."""
    return [(scenario, [r for r in records if r.scenario == scenario.name]) for scenario in scenarios]


def measure_bare(
    args: argparse.Namespace, bare: BarePipeline, mix: RequestMix
) -> list[tuple[Scenario, list[RequestRecord]]]:
    """The in-process pipeline at each batch size (and on one thread, as a 1-CPU Ray worker)."""
    size = next(iter(mix.sizes))
    scenarios, records = bare.measure(_ints(args.bare_batch_sizes), args.duration / 2, size)
    if args.bare_one_thread:
        # A Ray worker with num_cpus=1 runs torch on one thread (Ray sets OMP_NUM_THREADS).
        batch = load_config().variants[0].batching.max_batch_size
        one_thread = bare.measure([1, batch], args.duration / 2, size, threads=1)
        scenarios, records = scenarios + one_thread[0], records + one_thread[1]
    return per_scenario(scenarios, records)


def compare(args: argparse.Namespace, argv: Sequence[str]) -> RunInfo:
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(systems) - set(SYSTEM_ORDER)
    if unknown:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; known: {','.join(SYSTEM_ORDER)}")
    info = run_info(args, argv, "imagegen-serve and peers on the embedded default (tiny-sd)")
    collector = Collector(args.slo_ms / 1000)
    mix = request_mix(args)
    meter = ForeignLoadMeter()
    started = time.perf_counter()
    bare = None
    if "bare" in systems:
        from benchmarks.systems import BarePipeline

        bare = BarePipeline(threads=args.bare_threads)
        if args.bare_threads:
            info.notes.append(f"the bare pipeline ran on {args.bare_threads} torch thread(s)")
    from benchmarks.systems import running_server, server_systems

    reference_rps: float | None = None
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as storage:
        servers = server_systems(port, Path(storage))
        for round_index in range(args.rounds):  # A B A B: a slow minute does not favour one system
            if bare is not None:
                print(f"round {round_index + 1}/{args.rounds}: bare pipeline, in-process", flush=True)
                meter.start()
                for scenario, records in measure_bare(args, bare, mix):
                    collector.add(scenario, records, round_index)
                note_foreign_load(info, f"bare, round {round_index + 1}", meter)
            # The open loops' common rates come from the first round's bare pipeline (or first server).
            reference_rps = reference_rps or saturated_throughput(collector.rows, "bare", "batch-")
            for name in (name for name in SYSTEM_ORDER if name in systems and name != "bare"):
                print(f"round {round_index + 1}/{args.rounds}: {LABELS[name]}: starting", flush=True)
                try:
                    with running_server(servers[name], port) as server:
                        info.startup_s.setdefault(name, server.startup_s)
                        meter.start(server.session)
                        reference_rps, cpu = asyncio.run(
                            benchmark_server(
                                args, name, server, mix, reference_rps, collector, round_index, bare
                            )
                        )
                        info.server_cpu.append(cpu)
                        note_foreign_load(info, f"{name}, round {round_index + 1}", meter)
                except RuntimeError as failure:
                    info.notes.append(f"{name} was skipped: {str(failure).splitlines()[0]}")
                    print(failure, file=sys.stderr, flush=True)
        measure_one_client_in_turn(args, systems, Path(storage), mix, collector, info, meter)
    if reference_rps:
        info.notes.append(
            f"open loops at the same rates for every system: fractions {args.load_fractions} of "
            f"{reference_rps:.2f} images/s (the bare pipeline's best); 'open-{args.capacity_fraction:g}cap' "
            "is each server at that share of its own capacity"
        )
    info.wall_s = time.perf_counter() - started
    info.load_after = os.getloadavg()
    write_report(args.out, info, collector.rows, collector.records)
    return info


def load_one_server(args: argparse.Namespace, argv: Sequence[str]) -> RunInfo:
    info = run_info(args, argv, f"Load test of {args.url}")
    info.labels[args.name] = args.name
    collector = Collector(args.slo_ms / 1000)
    mix = request_mix(args)
    started = time.perf_counter()
    if args.mode == "closed":
        for clients in _ints(args.clients):
            scenario = Scenario(args.name, f"closed-{clients}", "closed", clients=clients)
            records = asyncio.run(
                run_closed_loop(
                    args.url,
                    iter_requests(mix, random.Random(args.seed)),
                    system=args.name,
                    scenario=scenario.name,
                    clients=clients,
                    duration_s=args.duration,
                    max_requests=args.max_requests,
                    timeout_s=args.timeout,
                    drain_s=args.drain,
                )
            )
            collector.add(scenario, records)
    else:
        rates = schedule(args)
        label = args.schedule or f"{args.rate:g}rps"
        mean_rate = rates.expected_count(args.duration) / args.duration
        scenario = Scenario(args.name, f"open-{args.arrival}-{label}", "open", offered_rps=mean_rate)
        arrivals = open_arrivals(args, rates, mix, args.seed, args.duration)
        records = asyncio.run(
            run_open_loop(
                args.url,
                arrivals,
                system=args.name,
                scenario=scenario.name,
                timeout_s=args.timeout,
                drain_s=args.drain,
            )
        )
        collector.add(scenario, records)
    info.wall_s = time.perf_counter() - started
    info.load_after = os.getloadavg()
    write_report(args.out, info, collector.rows, collector.records)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    # The systems, the peers and the servers started here all read the config from the environment.
    os.environ.setdefault("IMAGEGEN_CONFIG", str(Path(__file__).parent / "configs" / "tiny-sd.yaml"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with noisy_neighbour(args.noisy_neighbour):
        info = load_one_server(args, argv) if args.url else compare(args, argv)
    print(f"report: {args.out / 'report.md'} ({info.wall_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
