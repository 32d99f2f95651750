"""Safe decoding of uploaded images: untrusted bytes in, plain uint8 arrays out.

Only the PNG, JPEG and WebP decoders ever run, chosen by the file's own signature (never by its
name or declared content type). An image's declared size is checked before any pixel is
decoded, Pillow's decompression-bomb warning is an error, animations are refused, and EXIF
orientation is applied, so what leaves here is upright pixels without metadata.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from deployments.errors import InvalidRequestError, UnsupportedMediaTypeError

# A bomb that slips under our own pixel limit still trips Pillow's check, as an error.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` says it is by its signature, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_upload(data: bytes, *, max_pixels: int, param: str) -> Image.Image:
    """Decode one uploaded image, upright, with every check done before its pixels are decoded.

    Raises UnsupportedMediaTypeError (415) for anything but PNG, JPEG or WebP, and
    InvalidRequestError (400, ``param``) for empty, corrupt, truncated, animated or too-large images.
    """
    if not data:
        raise InvalidRequestError(f"The file for '{param}' is empty.", param=param, code="invalid_image")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedMediaTypeError(
            f"The file for '{param}' is not a supported image. Send PNG, JPEG or WebP.", param=param
        )
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(param, max_pixels, f" ({width}x{height})")
        if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
            raise InvalidRequestError(
                f"The image for '{param}' is animated; send a still image.", param=param, code="invalid_image"
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except BOMB_ERRORS as bomb:
        raise _too_large(param, max_pixels) from bomb
    except DECODE_ERRORS as corrupt:
        raise InvalidRequestError(
            f"The image for '{param}' could not be decoded: it is corrupt or truncated.",
            param=param,
            code="invalid_image",
        ) from corrupt


def _too_large(param: str, max_pixels: int, size: str = "") -> InvalidRequestError:
    return InvalidRequestError(
        f"The image for '{param}' is too large{size}: at most {max_pixels} pixels.",
        param=param,
        code="image_too_large",
    )


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Contiguous uint8 (H, W, 3); alpha and palettes are dropped, metadata never leaves."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def mask_from_alpha(mask: Image.Image, param: str = "mask") -> np.ndarray:
    """uint8 (H, W, 1) with 255 where the mask is transparent (edit) and 0 where it is opaque (keep)."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InvalidRequestError(
            "The mask has no alpha channel. Send a PNG whose transparent pixels mark the area to edit.",
            param=param,
            code="invalid_mask",
        )
    alpha = np.asarray(mask.convert("RGBA").getchannel("A"), dtype=np.uint8)
    return np.ascontiguousarray((255 - alpha)[:, :, None])
