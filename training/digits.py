"""Train the embedded digit models: ``python -m training.digits [--model digits|digits-ar|all]``.

Each model is trained from a seed on every one of scikit-learn's 1,797 digits and written where
its variant's weights point (``deployments/models/embedded/<name>``), with a ``training_info.json``
saying how it was made. Same seed, same machine: same weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deployments.models.builtin import EMBEDDED_DIR
from training.autoregressive import AutoregressiveSchedule, train_autoregressive
from training.diffusion import DiffusionSchedule, train_diffusion

TRAINERS: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "digits": lambda target, seed: train_diffusion(target, seed, DiffusionSchedule()),
    "digits-ar": lambda target, seed: train_autoregressive(target, seed, AutoregressiveSchedule()),
}


def train(name: str, output_dir: Path, seed: int) -> Path:
    """Train one model into ``output_dir/name``, replacing what was there only once it is complete."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=output_dir))
    started = time.perf_counter()
    measured = TRAINERS[name](staging, seed)
    info = {
        "model": name,
        "dataset": "sklearn-digits",
        "seed": seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "command": f"python -m training.digits --model {name} --seed {seed}",
        **measured,
    }
    (staging / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    target = output_dir / name
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    target.chmod(0o755)  # mkdtemp made it private; the package ships it to every user
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*TRAINERS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--threads", type=int, default=2, help="Torch threads (the machine may be shared).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in TRAINERS if args.model == "all" else [args.model]:
        print(f"{name}: written to {train(name, args.output_dir, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
