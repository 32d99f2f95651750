"""Edits, variations and streaming through real HTTP, real Ray Serve and the official openai client,
and a battery of hostile uploads that must each get their documented 4xx."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments.model_replica import ReplicaStats
from tests.images import animated, encoded, hole_mask, noise, noise_png, png_declaring
from tests.integration.conftest import TEST_LIMITS
from tests.integration.test_generations import assert_openai_error

STATS_DEADLINE_S = 120.0


def decode(b64_json: str | None) -> Image.Image:
    assert b64_json is not None
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def png_file(data: bytes, name: str = "image.png") -> tuple[str, bytes, str]:
    return (name, data, "image/png")


def test_edit_one_image(openai_client: OpenAI) -> None:
    result = openai_client.images.edit(image=png_file(noise_png(96, 64)), prompt="make it blue", size="64x64")
    assert result.data is not None and len(result.data) == 1
    image = decode(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert result.size == "64x64" and result.output_format == "png"


def test_edit_with_mask_repaints_only_the_transparent_area(openai_client: OpenAI) -> None:
    source = noise_png(64, 64, seed=3)
    result = openai_client.images.edit(
        image=png_file(source), mask=png_file(hole_mask(64, 64), "mask.png"), prompt="a hole", size="64x64"
    )
    assert result.data is not None
    edited = np.asarray(decode(result.data[0].b64_json))
    original = np.asarray(Image.open(io.BytesIO(source)))
    keep = np.ones((64, 64), dtype=bool)
    keep[16:48, 16:48] = False
    assert np.array_equal(edited[keep], original[keep])  # opaque in the mask: byte for byte
    assert not np.array_equal(edited[~keep], original[~keep])


def test_edit_several_images(openai_client: OpenAI) -> None:
    images = [png_file(noise_png(64, 64, seed=seed), f"{seed}.png") for seed in range(3)]
    result = openai_client.images.edit(image=images, prompt="all together", n=2, size="64x64")
    assert result.data is not None and len(result.data) == 2
    assert result.data[0].b64_json != result.data[1].b64_json


def test_edit_is_reproducible_with_a_seed_and_served_by_url(openai_client: OpenAI) -> None:
    def edit() -> str | None:
        result = openai_client.images.edit(
            image=png_file(noise_png()), prompt="same", size="64x64", extra_body={"seed": 7, "strength": 0.5}
        )
        assert result.data is not None
        return result.data[0].b64_json

    assert edit() == edit()
    result = openai_client.images.edit(
        image=png_file(encoded(noise(64, 64), "JPEG")), prompt="by url", response_format="url"
    )
    assert result.data is not None and result.data[0].url
    assert httpx.get(result.data[0].url, timeout=30).status_code == 200


def test_create_variation(openai_client: OpenAI) -> None:
    result = openai_client.images.create_variation(image=png_file(encoded(noise(64, 64), "WEBP")), n=2)
    assert result.data is not None and len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert all(image.size == (64, 64) and image.format == "PNG" for image in images)
    assert result.data[0].b64_json != result.data[1].b64_json


def test_generate_streams_two_partial_images_then_the_image(openai_client: OpenAI) -> None:
    stream = openai_client.images.generate(
        prompt="a lighthouse", size="64x64", stream=True, partial_images=2, output_format="webp"
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials = [event for event in events if event.type == "image_generation.partial_image"]
    assert [event.partial_image_index for event in partials] == [0, 1]
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    image = decode(completed.b64_json)
    assert (image.format, image.size) == ("WEBP", (64, 64))
    assert (completed.size, completed.output_format, completed.quality) == ("64x64", "webp", "medium")
    assert completed.usage.output_tokens > 0
    assert decode(partials[0].b64_json).size == (64, 64)


def test_edit_streams_partial_images(openai_client: OpenAI) -> None:
    stream = openai_client.images.edit(
        image=png_file(noise_png()), prompt="stream it", stream=True, partial_images=1, size="64x64"
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    completed = events[-1]
    assert completed.type == "image_edit.completed"
    assert decode(completed.b64_json).size == (64, 64)
    assert completed.usage.input_tokens_details.image_tokens > 0


def test_bad_streaming_requests_get_a_plain_error_not_a_stream(openai_client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        openai_client.images.edit(
            image=png_file(encoded(noise(16, 16), "TIFF")), prompt="x", stream=True, partial_images=2
        )
    assert raised.value.status_code == 415
    with pytest.raises(openai.BadRequestError):
        openai_client.images.generate(prompt="x", stream=True, n=2)


BOUNDARY = "imagegen-test"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def multipart_parts(fields: dict[str, str], files: list[tuple[str, bytes]]) -> Iterator[bytes]:
    """A multipart body in pieces, as the SDKs send it (every file claims to be image/png)."""
    for name, value in fields.items():
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for name, data in files:
        disposition = f'form-data; name="{name}"; filename="upload.png"'
        yield f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        yield b"Content-Type: image/png\r\n\r\n"
        yield from (data[start : start + 65536] for start in range(0, len(data), 65536))
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def post_edit(http: httpx.Client, fields: dict[str, str], files: list[tuple[str, bytes]]) -> httpx.Response:
    return http.post("/v1/images/edits", content=b"".join(multipart_parts(fields, files)), headers=MULTIPART)


@dataclass(frozen=True)
class Hostile:
    """An upload and the error it must get."""

    files: list[tuple[str, bytes]]
    status: int
    param: str | None
    code: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


JPEG = encoded(noise(64, 64), "JPEG")
TOO_BIG_FILE = b"\x89PNG\r\n\x1a\n" + b"x" * (TEST_LIMITS.max_upload_bytes + 1024)
TOO_LARGE, INVALID, UNSUPPORTED = "image_too_large", "invalid_image", "unsupported_media_type"
BAD_MASK = "invalid_mask"
HOSTILE_UPLOADS = {
    "pixel-bomb-png": Hostile([("image", png_declaring(100_000, 100_000))], 400, "image", TOO_LARGE),
    "bomb-under-pillows-limit": Hostile([("image", png_declaring(5_000, 5_000))], 400, "image", TOO_LARGE),
    "tiff-named-png": Hostile([("image", encoded(noise(16, 16), "TIFF"))], 415, "image", UNSUPPORTED),
    "truncated-jpeg": Hostile([("image", JPEG[: len(JPEG) // 2])], 400, "image", INVALID),
    "animated-gif": Hostile([("image", animated("GIF"))], 415, "image", UNSUPPORTED),
    "animated-png": Hostile([("image", animated("PNG"))], 400, "image", INVALID),
    "empty-file": Hostile([("image", b"")], 400, "image", INVALID),
    "mask-wrong-size": Hostile([("image", noise_png()), ("mask", hole_mask(32, 32))], 400, "mask", BAD_MASK),
    "mask-without-alpha": Hostile([("image", noise_png()), ("mask", noise_png())], 400, "mask", BAD_MASK),
    "17-images": Hostile([("image[]", noise_png(8, 8))] * 17, 400, "image", "too_many_images"),
    "part-over-size-limit": Hostile([("image", TOO_BIG_FILE)], 413, "image", "payload_too_large"),
    "no-image": Hostile([], 400, "image", "missing_image"),
    "text-for-image": Hostile([], 400, "image", fields={"image": "https://example.com/a.png"}),
    "unknown-field": Hostile([("image", noise_png())], 400, "colour", fields={"colour": "red"}),
    "bad-strength": Hostile([("image", noise_png())], 400, "strength", "invalid_value", {"strength": "1.5"}),
}


@pytest.mark.parametrize("hostile", HOSTILE_UPLOADS.values(), ids=HOSTILE_UPLOADS)
def test_hostile_uploads_get_their_documented_error(http: httpx.Client, hostile: Hostile) -> None:
    response = post_edit(http, {"prompt": "edit", **hostile.fields}, hostile.files)
    error = assert_openai_error(response, hostile.status, param=hostile.param)
    if hostile.code is not None:
        assert error["code"] == hostile.code


def test_a_body_over_the_total_limit_is_413_without_content_length(http: httpx.Client) -> None:
    per_file = TEST_LIMITS.max_upload_bytes - 1024
    count = TEST_LIMITS.max_total_upload_bytes // per_file + 1
    files = [("image[]", b"\x89PNG" + b"x" * per_file)] * count
    body = multipart_parts({"prompt": "x"}, files)  # a generator: sent chunked
    response = http.post("/v1/images/edits", content=body, headers=MULTIPART)
    assert "content-length" not in response.request.headers
    assert assert_openai_error(response, 413)["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("route", "content_type", "status"),
    [("/v1/images/edits", "application/json", 415), ("/v1/images/variations", "text/plain", 415)],
)
def test_non_multipart_bodies_are_415(http: httpx.Client, route: str, content_type: str, status: int) -> None:
    assert_openai_error(http.post(route, content=b"{}", headers={"content-type": content_type}), status)


def test_the_service_keeps_serving_after_hostile_uploads(http: httpx.Client, openai_client: OpenAI) -> None:
    for hostile in HOSTILE_UPLOADS.values():
        response = post_edit(http, {"prompt": "edit", **hostile.fields}, hostile.files)
        assert response.status_code == hostile.status
    result = openai_client.images.edit(image=png_file(noise_png()), prompt="still here", size="64x64")
    assert result.data is not None and decode(result.data[0].b64_json).size == (64, 64)
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def wait_for_stats(model_replica: DeploymentHandle, condition: object) -> ReplicaStats:
    """Poll the replica's scheduling state until ``condition`` holds or the deadline passes."""
    deadline = time.monotonic() + STATS_DEADLINE_S
    while True:
        stats: ReplicaStats = model_replica.stats.remote().result()
        if condition(stats) or time.monotonic() > deadline:  # type: ignore[operator]
            return stats
        time.sleep(0.05)


def test_a_disconnect_mid_stream_stops_the_work_and_frees_the_slot(
    openai_client: OpenAI, model_replica: DeploymentHandle
) -> None:
    before: ReplicaStats = model_replica.stats.remote().result()
    stream = openai_client.images.generate(
        prompt="a long one",
        size="64x64",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 50},
    )
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    assert model_replica.stats.remote().result().running == 1
    stream.close()  # the client goes away after its first preview

    after = wait_for_stats(model_replica, lambda stats: stats.running == 0 and stats.in_flight == 0)
    assert (after.running, after.in_flight) == (0, 0)
    assert after.cancelled == before.cancelled + 1
    assert after.stopped_passes == before.stopped_passes + 1  # stopped between steps, not run to the end
    result = openai_client.images.generate(prompt="next in line", size="64x64")
    assert result.data is not None and len(result.data) == 1


def test_openapi_documents_the_multipart_forms(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    edit = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = edit["schema"]["properties"]
    assert {"image", "image[]", "mask", "prompt", "stream", "partial_images"} <= set(fields)
    assert "Extension" in fields["strength"]["description"]
    assert "/v1/images/variations" in schema["paths"]
