"""Request bodies, JSON and multipart forms (as the OpenAI SDKs send images), read under limits.

``Content-Length`` is only a hint: a body that declares too much is refused at once, and every
body is counted while it streams in, so an oversized body is refused (413) as soon as it
crosses a limit, never after it has been buffered whole. A body that does not arrive whole
within ``body_read_timeout_s`` is refused (408). Files are kept as bytes: the service hands
them to preprocess once, where they are decoded safely.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from deployments.config import LimitsConfig
from deployments.errors import InvalidRequestError, UnsupportedMediaTypeError
from serve_app.errors import PayloadTooLargeError, RequestTimeoutError, field_error, is_json, validation_error
from serve_app.jobs import body_digest
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest, ImageVariationRequest

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

ModelT = TypeVar("ModelT", bound=BaseModel)
BRACKETED_NAME = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]+\])+)$")
MAX_FORM_PARTS = 64
"""Parts one form may have: every field OpenAI defines, 16 images and a mask fit many times over."""


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_total_bytes: int
    max_field_bytes: int
    max_files: int
    read_timeout_s: float
    max_parts: int = MAX_FORM_PARTS

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> UploadLimits:
        return cls(
            max_file_bytes=limits.max_upload_bytes,
            max_total_bytes=limits.max_total_upload_bytes,
            max_field_bytes=limits.max_request_bytes,
            max_files=limits.max_input_images + 1,  # the images and a mask
            read_timeout_s=limits.body_read_timeout_s,
        )


@dataclass
class UploadedForm:
    """A form's text fields (each given once) and its files by field name, in the order sent."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)

    def files_of(self, *names: str) -> list[bytes]:
        """The files sent under any of ``names`` (``image`` and ``image[]`` are one field to OpenAI)."""
        for name in names:
            if name in self.fields:
                raise InvalidRequestError(f"'{name}' must be a file upload.", param=name)
        return [data for name in names for data in self.files.get(name, [])]

    def only_files(self, *names: str) -> None:
        unknown = sorted(set(self.files) - set(names))
        if unknown:
            raise InvalidRequestError(f"Unrecognized file field: {unknown[0]}", param=unknown[0])


class _FormCollector:
    """python-multipart callbacks that keep each part within its limit while it is parsed."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.form = UploadedForm()
        self.complete = False
        self.parts = 0
        self.file_count = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise InvalidRequestError(f"Too many form fields: at most {self.limits.max_parts}.")
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequestError("A form part has no name.", code="invalid_multipart")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in options
        if self._is_file:
            self.file_count += 1
            if self.file_count > self.limits.max_files:
                raise InvalidRequestError(
                    f"Too many files: at most {self.limits.max_files - 1} images and a mask.",
                    param=self._name,
                    code="too_many_images",
                )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.limits.max_file_bytes if self._is_file else self.limits.max_field_bytes
        if len(self._data) + (end - start) > limit:
            what = "file" if self._is_file else "field"
            raise PayloadTooLargeError(
                f"The {what} '{self._name}' is larger than {limit} bytes.", param=self._name
            )
        self._data += data[start:end]

    def _on_part_end(self) -> None:
        if self._is_file:
            self.form.files.setdefault(self._name, []).append(bytes(self._data))
            return
        if self._name in self.form.fields:
            raise InvalidRequestError(f"The field '{self._name}' is given twice.", param=self._name)
        try:
            self.form.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError as undecodable:
            raise InvalidRequestError(
                f"The field '{self._name}' is not UTF-8 text.", param=self._name
            ) from undecodable

    def _on_end(self) -> None:
        self.complete = True


async def read_form(request: Request, limits: UploadLimits) -> UploadedForm:
    """Parse a ``multipart/form-data`` body: 415 for other bodies, 413 past a limit, 400 if malformed."""
    media_type, parameters = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"Unsupported Content-Type {request.headers.get('content-type')!r}; "
            "send multipart/form-data, as the OpenAI SDKs do."
        )
    boundary = parameters.get(b"boundary")
    if not boundary:
        raise InvalidRequestError("The multipart body has no boundary.", code="invalid_multipart")
    collector = _FormCollector(limits)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in body_chunks(request, limits.max_total_bytes, limits.read_timeout_s):
            parser.write(chunk)
    except MultipartParseError as malformed:
        raise InvalidRequestError("The multipart body is malformed.", code="invalid_multipart") from malformed
    if not collector.complete:
        raise InvalidRequestError(
            "The multipart body ended before its closing boundary.", code="invalid_multipart"
        )
    return collector.form


@dataclass(frozen=True)
class GenerationBody:
    """A generations request as the route read it: the typed body and its digest."""

    request: ImageGenerationRequest
    body_sha256: str


@dataclass(frozen=True)
class EditUpload:
    """An edits request as the route read it: the typed fields, the files, and their digest."""

    request: ImageEditRequest
    images: list[bytes]
    mask: bytes | None
    markup: bytes | None
    body_sha256: str


@dataclass(frozen=True)
class VariationUpload:
    """A variations request as the route read it: the typed fields, the image, and their digest."""

    request: ImageVariationRequest
    images: list[bytes]
    body_sha256: str


def upload_digest(fields: dict[str, str], files: list[bytes]) -> str:
    """A digest of a multipart request's text fields and files, for idempotency checks."""
    digest = hashlib.sha256(body_digest(fields).encode())
    for data in files:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


async def read_generation(request: Request, limits: UploadLimits) -> GenerationBody:
    body = await read_json(request, ImageGenerationRequest, limits)
    return GenerationBody(body, body_digest(body.model_dump(mode="json", exclude_unset=True)))


async def read_edit(request: Request, limits: UploadLimits) -> EditUpload:
    form = await read_form(request, limits)
    form.only_files("image", "image[]", "mask", "markup")
    fields = parse_fields(ImageEditRequest, form.fields)
    images, masks, markups = form.files_of("image", "image[]"), form.files_of("mask"), form.files_of("markup")
    if len(masks) > 1:
        raise InvalidRequestError("Send at most one mask.", param="mask")
    return EditUpload(
        fields,
        images,
        masks[0] if masks else None,
        markups[0] if markups else None,
        upload_digest(form.fields, [*images, *masks]),
    )


async def read_variation(request: Request, limits: UploadLimits) -> VariationUpload:
    form = await read_form(request, limits)
    form.only_files("image")
    fields = parse_fields(ImageVariationRequest, form.fields)
    images = form.files_of("image")
    return VariationUpload(fields, images, upload_digest(form.fields, images))


async def body_chunks(request: Request, max_bytes: int, timeout_s: float) -> AsyncIterator[bytes]:
    """The body as it arrives: 413 once it passes ``max_bytes``, 408 if not whole within ``timeout_s``."""
    too_large = PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > max_bytes:
        raise too_large
    received = 0
    chunks = request.stream()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with asyncio.timeout_at(deadline):  # a slow sender is cut off, holding no slot
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request body did not arrive within {timeout_s:g}s.", code="request_timeout"
            ) from None
        received += len(chunk)
        if received > max_bytes:
            raise too_large
        yield chunk


async def read_json(request: Request, model: type[ModelT], limits: UploadLimits) -> ModelT:
    """A JSON body validated by ``model``: 415 for other media, 413 or 408 as for forms, 400 if invalid."""
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"Unsupported Content-Type {content_type!r}; send 'application/json'."
        )
    body = bytearray()
    async for chunk in body_chunks(request, limits.max_field_bytes, limits.read_timeout_s):
        body += chunk
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as invalid:
        located = [{**error, "loc": ("body", *error["loc"])} for error in invalid.errors()]
        raise validation_error(RequestValidationError(located), content_type) from None


def nest_form_fields(fields: dict[str, str]) -> dict[str, Any]:
    """Bracketed names as the SDKs send objects in a form (``svg[reasoning][effort]``), as nested dicts."""
    nested: dict[str, Any] = {}
    for name, value in fields.items():
        match = BRACKETED_NAME.match(name)
        if match is None:
            nested[name] = value
            continue
        keys = [match.group(1), *re.findall(r"\[([^\[\]]+)\]", match.group(2))]
        target = nested
        for key in keys[:-1]:
            child = target.setdefault(key, {})
            if not isinstance(child, dict):
                raise InvalidRequestError(
                    f"The field '{key}' is given both as text and as an object.", param=key
                )
            target = child
        target[keys[-1]] = value
    return nested


def parse_fields(model: type[ModelT], fields: dict[str, str]) -> ModelT:
    """A form's text fields validated by ``model``; errors name the field as JSON bodies do."""
    try:
        return model.model_validate(nest_form_fields(fields))
    except ValidationError as invalid:
        raise field_error(invalid.errors()[0]) from None


def json_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a JSON body read by `read_json` (its schema is a component)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def form_openapi(model: type[BaseModel], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a multipart form: ``model``'s text fields plus the file fields."""
    schema = model.model_json_schema()
    schema["properties"].update(files)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
