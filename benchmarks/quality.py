"""Quality beside speed: ``imagegen eval --variant A [--variant B ...] [--steps 8 16 ...]``.

Each variant draws a fixed, seeded prompt set ("a handwritten 7", "the digit seven", "7", ...:
the same prompts and seeds on every run) in its own process, through its family exactly as a
replica runs it. An independent reader, a scikit-learn support-vector classifier trained on
scikit-learn's digits (and on nothing the generators made), reads each image; the score is the
share it reads as the digit the prompt asked for. Beside it: the median latency of one image
alone, and images per second at the variant's batch size. One row per variant and step count, so
the quality-vs-steps curve is visible; variants not trained on the digits show "n/a" (their
weights carry no ``training_info.json`` naming the digits dataset). A confusion matrix per row is
written as a PNG next to the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deployments.config import VariantConfig
from deployments.contracts import ImageTask
from deployments.models.registry import ImageFamily, generation_tasks, load_family
from serve_app.config import CONFIG_DIR, load_config
from training.data import PROMPT_TEMPLATES, pixels_to_ink, prompt_for

DIGITS_DATASET = "sklearn-digits"
LATENCY_RUNS = 5


@dataclass(frozen=True)
class PromptCase:
    digit: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class QualityRow:
    variant: str
    steps: int
    images: int
    correct_share: float | None
    """Share of images read as the prompted digit; None for variants that do not draw digits."""
    p50_latency_s: float
    images_per_s: float
    confusion: np.ndarray | None = None
    """(prompted digit, read digit) counts, 10x10."""


def prompt_set(per_digit: int, seed: int = 0) -> list[PromptCase]:
    """``per_digit`` prompts for each digit, templates and image seeds drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    cases = []
    for digit in range(10):
        for _ in range(per_digit):
            template = int(rng.integers(len(PROMPT_TEMPLATES)))
            cases.append(PromptCase(digit, prompt_for(digit, template), int(rng.integers(2**31))))
    return cases


def digit_reader() -> Any:
    """A support-vector classifier on every sklearn digit (ink 0-16, 8x8); ~99% on held-out digits."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def read_digits(reader: Any, images: list[np.ndarray]) -> np.ndarray:
    """The digit ``reader`` sees in each uint8 (H, W, 3) image."""
    return np.asarray(reader.predict(np.stack([pixels_to_ink(image).ravel() for image in images])))


def draws_digits(family: ImageFamily) -> bool:
    info = Path(family.weights_source()) / "training_info.json"
    return info.is_file() and json.loads(info.read_text()).get("dataset") == DIGITS_DATASET


def generate_all(
    family: ImageFamily, tasks: list[ImageTask], batch_size: int
) -> tuple[list[np.ndarray], float]:
    """Every task's image, in batches of ``batch_size``; with the seconds it took."""
    images: list[np.ndarray] = []
    started = time.perf_counter()
    for start in range(0, len(tasks), batch_size):
        images += family.generate(tasks[start : start + batch_size])
    return images, time.perf_counter() - started


def evaluate(
    family: ImageFamily, cases: list[PromptCase], steps: int, reader: Any, scored: bool
) -> QualityRow:
    variant = family.variant
    tasks = generation_tasks(variant, [(case.prompt, case.seed) for case in cases], "eval", steps=steps)
    latencies = []
    for task in tasks[:LATENCY_RUNS]:
        started = time.perf_counter()
        family.generate([task])
        latencies.append(time.perf_counter() - started)
    images, elapsed = generate_all(family, tasks, variant.batching.max_batch_size)
    row = QualityRow(
        variant.name, steps, len(images), None, statistics.median(latencies), len(images) / elapsed
    )
    if not scored:
        return row
    prompted = np.asarray([case.digit for case in cases])
    read = read_digits(reader, images)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (prompted, read), 1)
    return replace(row, correct_share=float(np.mean(read == prompted)), confusion=confusion)


def format_table(rows: list[QualityRow]) -> str:
    lines = [
        "| variant | steps | images | correct | p50 latency (1 image) | images/s (batched) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        share = "n/a" if row.correct_share is None else f"{row.correct_share:.1%}"
        lines.append(
            f"| {row.variant} | {row.steps} | {row.images} | {share} | "
            f"{row.p50_latency_s * 1000:.0f} ms | {row.images_per_s:.1f} |"
        )
    return "\n".join(lines)


def plot_confusion(row: QualityRow, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert row.confusion is not None
    figure, axes = plt.subplots(figsize=(4.2, 4))
    axes.imshow(row.confusion, cmap="Blues")
    for prompted in range(10):
        for read in range(10):
            if count := row.confusion[prompted, read]:
                axes.text(read, prompted, str(count), ha="center", va="center", fontsize=7)
    axes.set(xticks=range(10), yticks=range(10), xlabel="digit read", ylabel="digit prompted")
    axes.set_title(f"{row.variant}, {row.steps} steps: {row.correct_share:.1%} correct", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegen eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="a variant of the config, or one shipped in serve_app/configs/variants (repeat)",
    )
    parser.add_argument(
        "--url", help="a running service: score --model names through it (benchmarks/compare.py)"
    )
    parser.add_argument(
        "--model", action="append", default=[], help="a variant or alias the --url serves (repeat)"
    )
    parser.add_argument(
        "--batch-variant",
        action="append",
        default=[],
        help="a variant run offline with imagegen batch (repeat)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="online and batch runs alternate this many times"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent online callers (default: 8)")
    parser.add_argument(
        "--address", default="local", help="Ray for --batch-variant: 'local', 'auto' or an address"
    )
    parser.add_argument("--config", help="YAML config naming the variants (default: the embedded one)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="*",
        default=[],
        help="step counts to score (default: the variant's medium)",
    )
    parser.add_argument("--per-digit", type=int, default=20, help="prompts per digit (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"), help="report folder")
    args = parser.parse_args(argv)
    if args.model and not args.url:
        parser.error("--model needs --url (the running service)")
    if args.model or args.batch_variant:
        return compare(args, argv)
    if not args.variant:
        parser.error("name at least one --variant (in process), --model with --url, or --batch-variant")
    config = load_config(args.config)
    shipped = [
        VariantConfig(**yaml.safe_load(path.read_text())) for path in CONFIG_DIR.glob("variants/*.yaml")
    ]
    known = {variant.name: variant for variant in [*shipped, *config.variants]}
    if unknown := [name for name in args.variant if name not in known]:
        parser.error(f"unknown variant(s) {unknown}; the config has {sorted(known)}")
    cases, reader = prompt_set(args.per_digit, args.seed), digit_reader()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variant:
        family, description = load_family(known[name], config.cache_dir)
        print(description, flush=True)
        scored = draws_digits(family)
        for steps in sorted({min(steps, family.variant.max_steps) for steps in args.steps}) or [
            family.variant.steps.medium
        ]:
            row = evaluate(family, cases, steps, reader, scored)
            rows.append(row)
            if row.confusion is not None:
                plot_confusion(row, args.out / f"confusion-{row.variant}-{row.steps}.png")
            print(format_table([row]).splitlines()[-1], flush=True)
    table = format_table(rows)
    command = "imagegen eval " + " ".join(argv if argv is not None else [])
    (args.out / "report.md").write_text(f"{table}\n\nCommand: `{command.strip()}`\n")
    print(table)
    return 0


def compare(args: argparse.Namespace, argv: list[str] | None) -> int:
    from benchmarks.compare import format_comparison, run_comparison, write_comparison

    rows = run_comparison(
        prompt_set(args.per_digit, args.seed),
        digit_reader(),
        url=args.url,
        models=args.model,
        batch_variants=args.batch_variant,
        rounds=args.rounds,
        concurrency=args.concurrency,
        config_path=args.config,
        address=args.address,
    )
    write_comparison(rows, args.out, "imagegen eval " + " ".join(argv if argv is not None else []))
    print(format_comparison(rows))
    print(f"written: {args.out}/comparison.md, comparison.parquet, comparison.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
