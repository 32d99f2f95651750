"""Variants and aliases side by side, online (through a running service) or offline (Ray Data batch).

``imagegen eval --url http://127.0.0.1:PORT --model digits --model imagegen-1 --batch-variant digits``
runs the same seeded digit prompts (benchmarks/quality.py's prompt set) each way, reads every image
with the same independent classifier, and writes one table (Markdown + Parquet) and one plot: the
share of images read as the digit asked for, beside latency and images/s. ``--rounds R`` alternates
the ways R times in one sitting, so a machine's slow minute does not favour one of them.

- online: one warm-up request, then ``LATENCY_RUNS`` requests alone (their median is the latency),
  then every prompt at ``--concurrency`` callers (images/s). An alias's callers are ``eval-<i>``
  (the ``user`` field), so its split is exercised; the variants that served are counted from the
  ``x-model-variant`` header.
- batch: ``imagegen batch`` of the prompts into a fresh store (so nothing is skipped); images/s is
  the run's wall time including actor start, latency the median forward pass per batch.
"""

from __future__ import annotations

import base64
import io
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.quality import LATENCY_RUNS, PromptCase, read_digits

REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ComparisonRow:
    model: str
    """A variant or an alias."""
    mode: str
    """online or batch."""
    round: int
    images: int
    correct_share: float
    served_by: str
    """The variants that made the images, with their shares (an alias splits)."""
    p50_latency_s: float
    images_per_s: float


def decode(b64_json: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"))


def served_share(variants: list[str]) -> str:
    counts = Counter(variants)
    return ", ".join(f"{name} {count / len(variants):.0%}" for name, count in sorted(counts.items()))


def correct_share(reader: Any, cases: list[PromptCase], images: list[np.ndarray]) -> float:
    read = read_digits(reader, images)
    return float(np.mean(read == np.asarray([case.digit for case in cases])))


def run_online(
    base_url: str, model: str, cases: list[PromptCase], reader: Any, concurrency: int, round_: int
) -> ComparisonRow:
    from openai import OpenAI

    client = OpenAI(
        base_url=f"{base_url.rstrip('/')}/v1", api_key="eval", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )

    def request(index: int, case: PromptCase) -> tuple[np.ndarray, str, float]:
        started = time.perf_counter()
        raw = client.images.with_raw_response.generate(
            model=model,
            prompt=case.prompt,
            response_format="b64_json",
            user=f"eval-{index}",
            extra_body={"seed": case.seed},
        )
        elapsed = time.perf_counter() - started
        data = raw.parse().data
        assert data and data[0].b64_json, "the service answered without an image"
        return decode(data[0].b64_json), raw.headers["x-model-variant"], elapsed

    request(0, cases[0])  # warm-up, not recorded
    latencies = [request(index, case)[2] for index, case in enumerate(cases[:LATENCY_RUNS])]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(request, range(len(cases)), cases))
    elapsed = time.perf_counter() - started
    images = [image for image, _, _ in results]
    return ComparisonRow(
        model,
        "online",
        round_,
        len(images),
        correct_share(reader, cases, images),
        served_share([variant for _, variant, _ in results]),
        statistics.median(latencies),
        len(images) / elapsed,
    )


def run_offline_batch(
    variant_name: str, cases: list[PromptCase], reader: Any, config_path: str | None, round_: int
) -> ComparisonRow:
    """The prompts through ``imagegen batch`` on the connected Ray, into a fresh temporary store."""
    from deployments.config import StorageConfig
    from deployments.storage import ObjectStore
    from serve_app.batch import batch_settings, read_results, run_batch
    from serve_app.config import load_config

    config = load_config(config_path)
    variant = config.variant(variant_name)
    if variant is None:
        raise ValueError(
            f"unknown variant {variant_name!r}; the config has {[v.name for v in config.variants]}"
        )
    settings = batch_settings(variant, None, "medium")
    with tempfile.TemporaryDirectory(prefix="imagegen-eval-") as folder:
        prompts = Path(folder) / "prompts.parquet"
        pq.write_table(
            pa.table({"prompt": [c.prompt for c in cases], "seed": [c.seed for c in cases]}), prompts
        )
        storage = StorageConfig(url=f"file://{folder}/store")
        run = run_batch(str(prompts), settings, storage, config.cache_dir, progress=False)
        results = read_results(storage, variant.name)
        store = ObjectStore(storage)
        pixels = {
            (row["prompt"], row["seed"]): np.asarray(
                Image.open(io.BytesIO(store.get(row["object_key"]))).convert("RGB")
            )
            for row in results.to_pylist()
        }
        passes = [row["model_s"] * row["batch_size"] for row in results.to_pylist()]
    images = [pixels[(case.prompt, case.seed)] for case in cases]
    return ComparisonRow(
        variant.name,
        "batch",
        round_,
        len(images),
        correct_share(reader, cases, images),
        served_share([variant.name] * len(images)),
        statistics.median(passes),
        run.images_per_s,
    )


def format_comparison(rows: list[ComparisonRow]) -> str:
    lines = [
        "| model | mode | round | images | correct | served by | p50 latency | images/s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.mode} | {row.round} | {row.images} | {row.correct_share:.1%} | "
            f"{row.served_by} | {row.p50_latency_s * 1000:.0f} ms | {row.images_per_s:.2f} |"
        )
    return "\n".join(lines)


def write_comparison(rows: list[ComparisonRow], out: Path, command: str) -> None:
    """``comparison.md``, ``comparison.parquet`` and ``comparison.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(f"{format_comparison(rows)}\n\nCommand: `{command}`\n")
    pq.write_table(pa.Table.from_pylist([asdict(row) for row in rows]), out / "comparison.parquet")
    labels = [f"{row.model}\n{row.mode} #{row.round}" for row in rows]
    figure, (quality, speed, latency) = plt.subplots(1, 3, figsize=(4 + 1.4 * len(rows), 3.6))
    quality.bar(labels, [row.correct_share for row in rows], color="tab:green")
    quality.set(ylim=(0, 1), title="read as the digit asked for")
    speed.bar(labels, [row.images_per_s for row in rows], color="tab:blue")
    speed.set(title="images/s")
    latency.bar(labels, [row.p50_latency_s * 1000 for row in rows], color="tab:orange")
    latency.set(title="p50 latency (ms)")
    for axes in (quality, speed, latency):
        axes.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(out / "comparison.png", dpi=110)
    plt.close(figure)


def run_comparison(
    cases: list[PromptCase],
    reader: Any,
    *,
    url: str | None,
    models: list[str],
    batch_variants: list[str],
    rounds: int,
    concurrency: int,
    config_path: str | None,
    address: str,
) -> list[ComparisonRow]:
    """Every model online and every batch variant offline, alternating, ``rounds`` times."""
    rows = []
    if batch_variants:
        import ray

        ray.init(address=address, include_dashboard=False)
    try:
        for round_ in range(1, rounds + 1):
            for model in models:
                assert url is not None, "online runs need the service's URL"
                rows.append(run_online(url, model, cases, reader, concurrency, round_))
                print(format_comparison(rows[-1:]).splitlines()[-1], flush=True)
            for variant in batch_variants:
                rows.append(run_offline_batch(variant, cases, reader, config_path, round_))
                print(format_comparison(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if batch_variants:
            ray.shutdown()
    return rows
