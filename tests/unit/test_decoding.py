"""Safe decoding of uploads and the preparation of edit inputs, with hostile files made in the test."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.contracts import ImageRequest
from deployments.decoding import mask_from_alpha, open_upload, sniff_format, to_rgb_array
from deployments.errors import APIError, InvalidRequestError, UnsupportedMediaTypeError
from deployments.images import encode_image
from deployments.preprocess import collage, expand_request, prepare_inputs
from serve_app.errors import http_status
from tests.images import animated, encoded, hole_mask, noise, png_declaring

MAX_PIXELS = 4096 * 4096


def decode_error(data: bytes, max_pixels: int = MAX_PIXELS) -> APIError:
    with pytest.raises(APIError) as raised:
        open_upload(data, max_pixels=max_pixels, param="image")
    return raised.value


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb_uint8(image_format: str) -> None:
    image = open_upload(encoded(noise(48, 32), image_format), max_pixels=MAX_PIXELS, param="image")
    pixels = to_rgb_array(image)
    assert pixels.shape == (32, 48, 3) and pixels.dtype == np.uint8 and pixels.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (100_000, 100_000, MAX_PIXELS),  # beyond Pillow's own hard limit
        (5_000, 5_000, MAX_PIXELS),  # beyond ours
        (10_000, 10_000, 200_000_000),  # between Pillow's warning and its error: the warning is an error
    ],
)
def test_pixel_bombs_are_refused_before_decoding(width: int, height: int, max_pixels: int) -> None:
    error = decode_error(png_declaring(width, height), max_pixels)
    assert isinstance(error, InvalidRequestError)
    # A decode would have failed as truncated (the file holds 8x8 pixels): the size check came first.
    assert (error.code, error.param) == ("image_too_large", "image")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encoded(noise(16, 16), "TIFF"), id="tiff"),
        pytest.param(encoded(noise(16, 16), "GIF"), id="gif"),
        pytest.param(animated("GIF"), id="animated-gif"),
        pytest.param(encoded(noise(16, 16), "BMP"), id="bmp"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", id="svg"),
        pytest.param(b"GIF89a" + b"\x00" * 64, id="gif-header"),
    ],
)
def test_other_formats_are_415_whatever_they_are_called(data: bytes) -> None:
    error = decode_error(data)
    assert isinstance(error, UnsupportedMediaTypeError) and http_status(error) == 415


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(encoded(noise(64, 64), "JPEG")[:300], id="truncated-jpeg"),
        pytest.param(encoded(noise(64, 64), "PNG")[:60], id="truncated-png"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, id="corrupt-png"),
        pytest.param(b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8, id="corrupt-webp"),
        pytest.param(animated("PNG"), id="animated-png"),
        pytest.param(animated("WEBP"), id="animated-webp"),
    ],
)
def test_empty_corrupt_truncated_and_animated_are_400_invalid_image(data: bytes) -> None:
    error = decode_error(data)
    assert isinstance(error, InvalidRequestError)
    assert (http_status(error), error.code, error.param) == (400, "invalid_image", "image")


def test_sniffing_reads_signatures_only() -> None:
    assert sniff_format(encoded(noise(8, 8), "WEBP")) == "WEBP"
    assert sniff_format(b"II*\x00") is None


def test_exif_orientation_is_applied_and_no_metadata_leaves() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encoded(noise(40, 20), "JPEG", exif=exif.tobytes(), icc_profile=b"\x00" * 128)
    image = open_upload(data, max_pixels=MAX_PIXELS, param="image")
    pixels = to_rgb_array(image)
    assert pixels.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
    output = Image.open(io.BytesIO(encode_image(pixels, "jpeg", None)))
    assert not output.info.get("exif") and not output.info.get("icc_profile")


def test_mask_alpha_marks_the_area_to_edit() -> None:
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))
    alpha = mask_from_alpha(mask)
    assert alpha.shape == (2, 4, 1) and alpha.dtype == np.uint8
    assert alpha[0, 1, 0] == 255 and alpha[0, 0, 0] == 0


def test_a_mask_without_alpha_is_400() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        mask_from_alpha(Image.new("RGB", (4, 4)))
    assert (raised.value.param, raised.value.code) == ("mask", "invalid_mask")


def edit_request(images: list[bytes], mask: bytes | None = None, n: int = 1) -> ImageRequest:
    return ImageRequest(
        request_id="req",
        tenant="t",
        variant="tiny-sd",
        kind="edit",
        prompt="p",
        negative_prompt=None,
        n=n,
        width=64,
        height=64,
        steps=4,
        guidance_scale=5.0,
        seed=1,
        strength=0.8,
        images=tuple(images),
        mask=mask,
    )


def test_one_image_is_cropped_to_the_requested_size() -> None:
    image, mask = prepare_inputs(edit_request([encoded(noise(160, 80), "PNG")]), MAX_PIXELS)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and mask is None


def test_a_mask_of_another_size_is_400_on_mask() -> None:
    request = edit_request([encoded(noise(80, 80), "PNG")], mask=hole_mask(64, 64))
    with pytest.raises(InvalidRequestError) as raised:
        prepare_inputs(request, MAX_PIXELS)
    assert (http_status(raised.value), raised.value.param) == (400, "mask")


def test_several_images_with_a_mask_fill_the_hole_from_the_others() -> None:
    first, second = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    request = edit_request([encoded(first, "PNG"), encoded(second, "PNG")], mask=hole_mask(64, 64))
    image, mask = prepare_inputs(request, MAX_PIXELS)
    assert mask is not None and mask.shape == (64, 64, 1)
    assert mask[32, 32, 0] == 255 and mask[2, 2, 0] == 0
    assert tuple(image[32, 32]) == (0, 0, 255) and tuple(image[2, 2]) == (255, 0, 0)


def test_several_images_without_a_mask_are_tiled() -> None:
    colours = ["red", "lime", "blue"]
    tiled = collage([Image.new("RGB", (30, 30), colour) for colour in colours], 64, 64)
    assert tuple(tiled[10, 10]) == (255, 0, 0)
    assert tuple(tiled[10, 50]) == (0, 255, 0)
    assert tuple(tiled[50, 10]) == (0, 0, 255)


def test_the_n_tasks_of_a_request_share_one_decoded_image() -> None:
    request = edit_request([encoded(noise(64, 64), "PNG")], mask=hole_mask(64, 64), n=3)
    tasks = expand_request(request, *prepare_inputs(request, MAX_PIXELS))
    assert [task.seed for task in tasks] == [1, 2, 3]
    assert all(task.image is tasks[0].image and task.mask is tasks[0].mask for task in tasks)
    assert len({task.bucket for task in tasks}) == 1 and tasks[0].bucket.masked
