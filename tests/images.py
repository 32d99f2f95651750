"""Image files for tests, hostile ones included, made in memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


def noise_png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    return encoded(noise(width, height, seed=seed), "PNG")


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height``: a decompression bomb's calling card."""
    real = encoded(Image.new("RGB", (8, 8), "red"), "PNG")
    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return real[:8] + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header)) + real[33:]


def animated(image_format: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    return encoded(frames[0], image_format, save_all=True, append_images=frames[1:])


def hole_mask(width: int, height: int) -> bytes:
    """A PNG mask, opaque except a transparent centre: the centre is what an edit repaints."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return encoded(mask, "PNG")
