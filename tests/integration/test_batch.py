"""Offline batch generation on Ray Data, on the integration session's Ray: N prompts, N images, a
results table, and a rerun that skips the work already done."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deployments.config import StorageConfig
from deployments.models.registry import load_family
from deployments.storage import ObjectStore
from serve_app.batch import BatchSettings, batch_settings, read_results, run_batch, seed_from_prompt
from tests.conftest import load_variant
from tests.integration.conftest import ProxiedS3, RunningService

PROMPTS = ["a handwritten 0", "the digit one", "2", "a handwritten 3", "the digit four"]
SEEDS = [10, 11, 12, 13, 14]


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "seed": SEEDS}), path)
    return str(path)


@pytest.fixture
def settings() -> BatchSettings:
    variant = load_variant("digits")
    return batch_settings(
        variant.model_copy(update={"resources": variant.resources.model_copy(update={"num_cpus": 0.25})}),
        None,
        "low",
    )


def png_pixels(store: ObjectStore, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.get(key))).convert("RGB"))


def test_batch_writes_images_and_results_and_resumes(
    service: RunningService, prompts_file: str, settings: BatchSettings, tmp_path: Path
) -> None:
    storage = StorageConfig(url=f"file://{tmp_path / 'out'}")
    store = ObjectStore(storage)
    cache_dir = service.config.cache_dir

    first = run_batch(prompts_file, settings, storage, cache_dir, batch_size=2, progress=False)
    assert (first.generated, first.skipped) == (len(PROMPTS), 0)
    results = read_results(storage, "digits").sort_by("seed").to_pylist()
    assert [row["prompt"] for row in results] == PROMPTS and [row["seed"] for row in results] == SEEDS
    assert {row["variant"] for row in results} == {"digits"}
    assert all(row["model_s"] > 0 and row["batch_size"] in (1, 2) for row in results)
    keys = [row["object_key"] for row in results]
    assert keys == [settings.object_key(prompt, seed) for prompt, seed in zip(PROMPTS, SEEDS, strict=True)]
    images = {key: png_pixels(store, key) for key in keys}
    assert all(pixels.shape == (64, 64, 3) for pixels in images.values())
    # The pixels are the family's own, as a model replica makes them with the same seed.
    family, _ = load_family(settings.variant, cache_dir)
    assert np.array_equal(images[keys[2]], family.generate([settings.task(PROMPTS[2], SEEDS[2], 0)])[0])

    rerun = run_batch(prompts_file, settings, storage, cache_dir, progress=False)
    assert (rerun.generated, rerun.skipped, rerun.results_key) == (0, len(PROMPTS), None)
    assert len(read_results(storage, "digits")) == len(PROMPTS)

    for key in keys[:2]:
        store.delete(key)
    resumed = run_batch(prompts_file, settings, storage, cache_dir, progress=False)
    assert (resumed.generated, resumed.skipped) == (2, len(PROMPTS) - 2)
    assert sorted(read_results(storage, "digits")["object_key"].to_pylist()) == sorted([*keys, *keys[:2]])
    assert all(np.array_equal(png_pixels(store, key), images[key]) for key in keys[:2])


def test_prompts_without_seeds_get_seeds_from_their_text(
    service: RunningService, settings: BatchSettings, tmp_path: Path
) -> None:
    path = tmp_path / "unseeded.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS[:2]}), path)
    storage = StorageConfig(url=f"file://{tmp_path / 'out'}")
    run = run_batch(str(path), settings, storage, service.config.cache_dir, progress=False)
    assert run.generated == 2
    seeds = sorted(read_results(storage, "digits")["seed"].to_pylist())
    assert seeds == sorted(seed_from_prompt(prompt) for prompt in PROMPTS[:2])


def test_batch_writes_to_s3_and_resumes(
    service: RunningService, proxied_s3: ProxiedS3, prompts_file: str, settings: BatchSettings
) -> None:
    """The same run against an S3 API (moto on loopback): images and results land in the bucket,
    and a rerun finds them there."""
    storage = proxied_s3.storage("batch-out", "runs")
    first = run_batch(prompts_file, settings, storage, service.config.cache_dir, progress=False)
    assert (first.generated, first.skipped) == (len(PROMPTS), 0)
    listed = proxied_s3.client.list_objects_v2(Bucket="batch-out", Prefix="runs/")
    stored = {item["Key"].removeprefix("runs/") for item in listed.get("Contents", [])}
    keys = [settings.object_key(prompt, seed) for prompt, seed in zip(PROMPTS, SEEDS, strict=True)]
    assert set(keys) <= stored and first.results_key in stored
    assert sorted(read_results(storage, "digits")["object_key"].to_pylist()) == sorted(keys)
    rerun = run_batch(prompts_file, settings, storage, service.config.cache_dir, progress=False)
    assert (rerun.generated, rerun.skipped) == (0, len(PROMPTS))
