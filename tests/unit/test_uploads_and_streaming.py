"""Multipart reading under limits and OpenAI's server-sent events, without HTTP servers or Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable

import pytest
from openai import BaseModel
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from starlette.requests import Request

from deployments.contracts import EncodedPartialImage, StoredImage, StreamEvent
from deployments.errors import APIError, InvalidRequestError, UnsupportedMediaTypeError
from serve_app.errors import PayloadTooLargeError, http_status
from serve_app.streaming import StreamDescription, estimate_usage, event_stream
from serve_app.uploads import UploadedForm, UploadLimits, read_form

LIMITS = UploadLimits(
    max_file_bytes=1000, max_total_bytes=4000, max_field_bytes=100, max_files=3, read_timeout_s=30.0
)
BOUNDARY = "test-boundary"


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


def body(*parts: bytes, closed: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


class ChunkedRequest:
    """A Starlette request whose body arrives in chunks, counting how many were read."""

    def __init__(self, chunks: Iterable[bytes], headers: dict[str, str] | None = None) -> None:
        self.chunks = list(chunks)
        self.read = 0
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})}
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/images/edits",
            "headers": [(key.encode(), value.encode()) for key, value in headers.items()],
        }
        self.request = Request(scope, self.receive)

    async def receive(self) -> dict[str, object]:
        chunk = self.chunks[self.read]
        self.read += 1
        return {"type": "http.request", "body": chunk, "more_body": self.read < len(self.chunks)}


Headers = dict[str, str] | None


def read(chunks: Iterable[bytes], headers: Headers = None) -> tuple[UploadedForm, ChunkedRequest]:
    request = ChunkedRequest(chunks, headers)
    return asyncio.run(read_form(request.request, LIMITS)), request


def read_error(
    chunks: Iterable[bytes], headers: Headers = None, limits: UploadLimits = LIMITS
) -> tuple[APIError, ChunkedRequest]:
    request = ChunkedRequest(chunks, headers)
    with pytest.raises(APIError) as raised:
        asyncio.run(read_form(request.request, limits))
    return raised.value, request


def test_fields_and_files_in_the_order_sent() -> None:
    data = body(
        part("prompt", "a cät".encode()),
        part("image[]", b"first", "a.png"),
        part("image[]", b"second", "b.png"),
        part("mask", b"m", "m.png"),
    )
    form, _ = read([data[:7], data[7:50], data[50:]])
    assert form.fields == {"prompt": "a cät"}
    assert form.files_of("image", "image[]") == [b"first", b"second"]
    assert form.files_of("mask") == [b"m"]


def test_a_file_over_its_limit_is_413_before_the_rest_is_read() -> None:
    chunks = [part("image", b"x" * 600, "a.png")[:-2], b"x" * 600] + [b"x" * 500] * 20
    error, request = read_error(chunks)
    assert isinstance(error, PayloadTooLargeError) and error.param == "image"
    assert request.read == 2


def test_the_total_is_counted_while_reading_not_taken_from_content_length() -> None:
    files = [part(f"image{index}", b"x" * 900, "a.png") for index in range(6)]
    limits = dataclasses.replace(LIMITS, max_files=10)
    error, request = read_error([*files, b"tail"], headers={"content-length": "10"}, limits=limits)
    assert isinstance(error, PayloadTooLargeError) and error.param is None
    assert request.read == 5  # 5 parts of ~1 KB cross 4 KB; the sixth is never read


def test_a_declared_oversize_body_is_refused_without_reading() -> None:
    error, request = read_error([b"never read"], headers={"content-length": "999999"})
    assert isinstance(error, PayloadTooLargeError) and request.read == 0


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (body(part("prompt", b"x" * 101)), 413, "payload_too_large"),
        (body(*(part("image[]", b"x", "a.png") for _ in range(4))), 400, "too_many_images"),
        (body(part("prompt", b"a"), part("prompt", b"b")), 400, None),
        (body(part("prompt", b"\xff\xfe")), 400, None),
        (body(part("image", b"truncated", "a.png"), closed=False), 400, "invalid_multipart"),
        (b"no boundary here at all", 400, "invalid_multipart"),
    ],
)
def test_malformed_and_oversized_forms(data: bytes, status: int, code: str | None) -> None:
    error, _ = read_error([data])
    assert http_status(error) == status
    if code is not None:
        assert error.code == code


def test_other_content_types_are_415() -> None:
    error, _ = read_error([b"{}"], headers={"content-type": "application/json"})
    assert isinstance(error, UnsupportedMediaTypeError)


def test_file_fields_must_be_files_and_known() -> None:
    form = UploadedForm(fields={"image": "https://example.com/a.png"}, files={"extra": [b"x"]})
    with pytest.raises(InvalidRequestError, match="file upload"):
        form.files_of("image")
    with pytest.raises(InvalidRequestError) as raised:
        form.only_files("image", "mask")
    assert raised.value.param == "extra"


def stored(b64_json: str) -> StoredImage:
    return StoredImage(seed=1, output_format="png", byte_count=3, batch_size=1, timings={}, b64_json=b64_json)


async def events_of(
    first: StreamEvent, rest: list[StreamEvent | Exception], prefix: str
) -> list[tuple[str, dict[str, object]]]:
    async def upstream() -> AsyncIterator[StreamEvent]:
        for item in rest:
            if isinstance(item, Exception):
                raise item
            yield item

    description = StreamDescription(
        prefix,  # type: ignore[arg-type]
        "64x64",
        "medium",
        "opaque",
        "png",
        estimate_usage("a cat", 64, 64, input_images=1 if prefix == "image_edit" else 0),
    )
    parsed = []
    async for chunk in event_stream(first, upstream(), description, cancel=lambda: None):
        text = chunk.decode()
        assert text.endswith("\n\n")
        event_line, data_line = text.strip().split("\n")
        parsed.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return parsed


@pytest.mark.parametrize(
    ("prefix", "partial_model", "completed_model"),
    [
        ("image_generation", ImageGenPartialImageEvent, ImageGenCompletedEvent),
        ("image_edit", ImageEditPartialImageEvent, ImageEditCompletedEvent),
    ],
)
def test_events_are_what_the_openai_sdk_parses(
    prefix: str, partial_model: type[BaseModel], completed_model: type[BaseModel]
) -> None:
    first = EncodedPartialImage(task_index=0, partial_image_index=0, b64_json="cGFydA==")
    events = asyncio.run(events_of(first, [stored("ZmluYWw=")], prefix))
    assert [name for name, _ in events] == [f"{prefix}.partial_image", f"{prefix}.completed"]
    partial = partial_model.model_validate(events[0][1])
    completed = completed_model.model_validate(events[1][1])
    assert set(events[0][1]) == set(partial_model.model_fields) - {"safety_identifier"}
    assert set(events[1][1]) == set(completed_model.model_fields) - {"safety_identifier"}
    assert (partial.partial_image_index, partial.size, completed.b64_json) == (0, "64x64", "ZmluYWw=")
    usage = completed.usage
    assert usage.output_tokens == 64 and usage.input_tokens_details.text_tokens == 2
    assert usage.input_tokens_details.image_tokens == (64 if prefix == "image_edit" else 0)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_a_failure_mid_stream_is_an_openai_error_event() -> None:
    first = EncodedPartialImage(task_index=0, partial_image_index=0, b64_json="cGFydA==")
    failure = InvalidRequestError("bad", param="image", code="invalid_image")
    events = asyncio.run(events_of(first, [failure], "image_edit"))
    assert events[-1] == (
        "error",
        {
            "error": {
                "message": "bad",
                "type": "invalid_request_error",
                "param": "image",
                "code": "invalid_image",
            }
        },
    )
