"""Pixel arrays in and out: float model outputs to uint8, and uint8 arrays to encoded bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from deployments.contracts import OutputFormat

PIL_FORMATS: dict[OutputFormat, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_LOSSY_QUALITY = 90


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as a contiguous uint8 (H, W, C) array."""
    return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def encode_image(pixels: np.ndarray, output_format: OutputFormat, compression: int | None) -> bytes:
    """Encode a uint8 (H, W, C) array; no metadata is written.

    ``compression`` follows OpenAI's ``output_compression`` (0-100): for JPEG and WebP it is
    100 minus the quality, for PNG it scales zlib's level 0-9.
    """
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        level = 6 if compression is None else round(compression * 9 / 100)
        image.save(buffer, format="PNG", compress_level=level)
    else:
        quality = DEFAULT_LOSSY_QUALITY if compression is None else max(1, 100 - compression)
        image.save(buffer, format=PIL_FORMATS[output_format], quality=quality)
    return buffer.getvalue()
