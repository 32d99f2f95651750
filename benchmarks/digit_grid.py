"""A grid of digits drawn by a running service: ``python -m benchmarks.digit_grid --base-url URL``.

One row per digit (prompt "a handwritten <d>"), ``--per-model`` images from each model side by
side, asked through the official openai client like any user; written as one PNG.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

GAP = 8


def draw_grid(base_url: str, models: list[str], per_model: int, seed: int, size: int) -> Image.Image:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="sk-local", timeout=300)
    width = len(models) * per_model * size + (len(models) - 1) * GAP
    grid = Image.new("RGB", (width, 10 * size), "white")
    for digit in range(10):
        for column, model in enumerate(models):
            result = client.images.generate(
                model=model,
                prompt=f"a handwritten {digit}",
                n=per_model,
                size=f"{size}x{size}",
                extra_body={"seed": seed + digit * 100},
            )
            for index, image in enumerate(result.data or []):
                tile = Image.open(io.BytesIO(base64.b64decode(image.b64_json or "")))
                grid.paste(tile, ((column * per_model + index) * size + column * GAP, digit * size))
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", action="append", help="models, one block of columns each (default: both)")
    parser.add_argument("--per-model", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/digits-grid.png"))
    args = parser.parse_args(argv)
    grid = draw_grid(
        args.base_url, args.model or ["digits", "digits-ar"], args.per_model, args.seed, args.size
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(f"{np.asarray(grid).shape[1]}x{np.asarray(grid).shape[0]} grid written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
