"""Offline batch generation on Ray Data: ``imagegen batch --prompts p.parquet --variant X --out URL``.

1. ``ray.data.read_parquet`` reads the prompts: a ``prompt`` column, and optionally ``seed``
   (without it a prompt's seed comes from its text, so a rerun draws the same image).
2. Each prompt gets an object key from everything that decides its pixels (variant, prompt, seed,
   size, steps, guidance): ``batch/<variant>/<sha256>.png``. Prompts whose key is already in the
   store are skipped, so a stopped run resumes where it stopped.
3. ``map_batches`` runs the rest on a pool of actors, each holding one copy of the weights in the
   same family class a `ModelReplica` uses (on a GPU when the actor is given one), and writes each
   image to the store (file:// or s3://) in one call.
4. A results Parquet (prompt, seed, variant, object key, timings) for the images made by this run
   goes to ``<out>/batch/<variant>/results/<run id>.parquet``; together the files list every image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deployments.config import StorageConfig, VariantConfig, parse_size
from deployments.contracts import ImageTask
from deployments.errors import InvalidRequestError
from deployments.images import encode_image
from deployments.models.registry import load_family
from deployments.storage import ObjectStore
from serve_app.config import load_config
from serve_app.planning import resolve_steps

BATCH_PREFIX = "batch"
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("object_key", pa.string(), nullable=False),
        pa.field("batch_size", pa.int32(), nullable=False),
        pa.field("model_s", pa.float64(), nullable=False),
        pa.field("upload_s", pa.float64(), nullable=False),
    ]
)


@dataclass(frozen=True)
class BatchSettings:
    """What every image of one batch run shares."""

    variant: VariantConfig
    width: int
    height: int
    steps: int

    def object_key(self, prompt: str, seed: int) -> str:
        """Where this prompt's image goes: a digest of everything that decides its pixels."""
        fields = [self.variant.name, prompt, seed, self.width, self.height, self.steps]
        digest = hashlib.sha256(json.dumps([*fields, self.variant.guidance_scale]).encode()).hexdigest()
        return f"{self.prefix}/{digest[:32]}.png"

    @property
    def prefix(self) -> str:
        return f"{BATCH_PREFIX}/{self.variant.name}"

    def task(self, prompt: str, seed: int, index: int) -> ImageTask:
        return ImageTask(
            request_id="batch",
            index=index,
            tenant="batch",
            variant=self.variant.name,
            kind="generate",
            prompt=prompt,
            negative_prompt=None,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.variant.guidance_scale,
            seed=seed,
        )


def seed_from_prompt(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") >> 1


def with_keys(batch: dict[str, np.ndarray], settings: BatchSettings, done: frozenset[str]) -> dict[str, Any]:
    """Seeds (from the prompt when absent) and object keys; rows already in the store are dropped."""
    prompts = [str(prompt) for prompt in batch["prompt"]]
    seeds = (
        [int(seed) for seed in batch["seed"]] if "seed" in batch else [seed_from_prompt(p) for p in prompts]
    )
    keys = [settings.object_key(prompt, seed) for prompt, seed in zip(prompts, seeds, strict=True)]
    todo = [i for i, key in enumerate(keys) if key not in done]
    return {
        "prompt": np.asarray([prompts[i] for i in todo], dtype=object),
        "seed": np.asarray([seeds[i] for i in todo], dtype=np.int64),
        "object_key": np.asarray([keys[i] for i in todo], dtype=object),
    }


class GenerateImages:
    """A Ray Data actor: one copy of the variant's weights, loaded once, serving many batches."""

    def __init__(self, settings: BatchSettings, storage: StorageConfig, cache_dir: Path) -> None:
        self.settings = settings
        self.family, description = load_family(settings.variant, cache_dir)
        print(f"batch actor: {description}", flush=True)
        self.store = ObjectStore(storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        tasks = [
            self.settings.task(str(prompt), int(seed), index)
            for index, (prompt, seed) in enumerate(zip(batch["prompt"], batch["seed"], strict=True))
        ]
        started = time.perf_counter()
        images = self.family.generate(tasks)
        model_s = (time.perf_counter() - started) / len(tasks)
        upload_s = []
        for key, pixels in zip(batch["object_key"], images, strict=True):
            started = time.perf_counter()
            self.store.put(str(key), encode_image(pixels, "png", None))
            upload_s.append(time.perf_counter() - started)
        return {
            "prompt": batch["prompt"],
            "seed": batch["seed"],
            "variant": np.asarray([self.settings.variant.name] * len(tasks), dtype=object),
            "object_key": batch["object_key"],
            "batch_size": np.full(len(tasks), len(tasks), dtype=np.int32),
            "model_s": np.full(len(tasks), model_s),
            "upload_s": np.asarray(upload_s),
        }


@dataclass(frozen=True)
class BatchRun:
    """What one run did: images made now, prompts skipped as already stored, where results went."""

    generated: int
    skipped: int
    seconds: float
    results_key: str | None

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def stored_keys(store: ObjectStore, prefix: str) -> frozenset[str]:
    return frozenset(key for key in store.list_keys(prefix) if key.endswith(".png"))


def run_batch(
    prompts_path: str,
    settings: BatchSettings,
    storage: StorageConfig,
    cache_dir: Path,
    *,
    actors: int = 1,
    batch_size: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
) -> BatchRun:
    """Generate every prompt's image not yet in the store; needs a connected Ray (``ray.init``)."""
    import ray.data
    from tqdm import tqdm

    store = ObjectStore(storage)
    done = stored_keys(store, settings.prefix)
    started = time.perf_counter()
    prompts = ray.data.read_parquet(prompts_path)
    total = prompts.count()

    def keyed(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return with_keys(batch, settings, done)

    todo = prompts.map_batches(keyed, batch_format="numpy", num_cpus=0.1)  # a light task
    resources = settings.variant.resources
    results = todo.map_batches(
        GenerateImages,
        fn_constructor_kwargs={"settings": settings, "storage": storage, "cache_dir": cache_dir},
        batch_size=batch_size or settings.variant.batching.max_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus if num_gpus is None else num_gpus,
    )
    tables = []
    with tqdm(total=total, desc=f"batch {settings.variant.name}", unit="img", disable=not progress) as bar:
        bar.update(0)
        for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(table, pa.Table)  # what batch_format="pyarrow" yields
            tables.append(table)
            bar.update(table.num_rows)
        generated = sum(table.num_rows for table in tables)
        bar.update(total - bar.n)  # the skipped prompts
    seconds = time.perf_counter() - started
    results_key = None
    if generated:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        results_key = f"{settings.prefix}/results/{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        buffer = io.BytesIO()
        pq.write_table(
            pa.concat_tables([t.select(RESULTS_SCHEMA.names) for t in tables]).cast(RESULTS_SCHEMA), buffer
        )
        store.put(results_key, buffer.getvalue())
    return BatchRun(generated, total - generated, seconds, results_key)


def read_results(storage: StorageConfig, variant: str) -> pa.Table:
    """Every results file of ``variant``'s batch runs in the store, as one table."""
    return ObjectStore(storage).read_parquet(f"{BATCH_PREFIX}/{variant}/results", RESULTS_SCHEMA)


def batch_settings(variant: VariantConfig, size: str | None, quality: str) -> BatchSettings:
    width, height = parse_size(size or variant.default_size)
    if f"{width}x{height}" not in variant.sizes:
        raise ValueError(f"size {size!r} is not offered by {variant.name!r}; sizes: {variant.sizes}")
    return BatchSettings(variant, width, height, resolve_steps(quality, variant))


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(prog="imagegen batch", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, help="Parquet file or folder with a 'prompt' column")
    parser.add_argument("--variant", required=True, help="a variant of the config")
    parser.add_argument(
        "--out", required=True, help="store URL for the images: file:///path or s3://bucket/x"
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, moto, ...)")
    parser.add_argument("--config", help="YAML config naming the variant (default: the embedded one)")
    parser.add_argument("--size", help="image size (default: the variant's first)")
    parser.add_argument("--quality", default="medium", help="low, medium, high, ... (default: medium)")
    parser.add_argument("--actors", type=int, default=1, help="actors, each with its own copy of the weights")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the variant's)")
    parser.add_argument(
        "--address", default="local", help="Ray: 'local' starts one, 'auto' joins the cluster"
    )
    args = parser.parse_args(argv)
    config = load_config(args.config)
    variant = config.variant(args.variant)
    if variant is None:
        parser.error(f"unknown variant {args.variant!r}; the config has {[v.name for v in config.variants]}")
    try:
        settings = batch_settings(variant, args.size, args.quality)
    except (ValueError, InvalidRequestError) as bad:
        parser.error(str(bad))
    storage = StorageConfig(url=args.out, endpoint_url=args.endpoint_url)
    ray.init(address=args.address, include_dashboard=False)
    try:
        run = run_batch(
            args.prompts, settings, storage, config.cache_dir, actors=args.actors, batch_size=args.batch_size
        )
    finally:
        ray.shutdown()
    print(
        f"{run.generated} images generated, {run.skipped} already stored; {run.images_per_s:.2f} images/s; "
        f"results: {run.results_key or '(nothing new)'}"
    )
    return 0
