"""One mapping from every failure to OpenAI's error JSON, its status code and headers.

The kinds of failure the stages raise live in deployments/errors.py, without HTTP; here are the
face's own (authentication, rate limits, idempotency, ...) and the one table from each kind to
OpenAI's error type and an HTTP status. Every error body is built by `error_info`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import (
    APIError,
    ClientError,
    InvalidRequestError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    UpstreamTimeoutError,
    is_replica_failure,
    unwrap_remote_error,
)
from deployments.moderation import ModerationBlocked, ModerationUnavailable
from serve_app.protocol import ErrorInfo, ErrorResponse, ModerationDetails

logger = logging.getLogger("imagegen.errors")


class ModerationBlockedError(ClientError):
    """OpenAI's ``moderation_blocked``: a moderation check flagged the prompt, an upload or an image."""

    default_code = "moderation_blocked"

    def __init__(self, blocked: ModerationBlocked) -> None:
        super().__init__(
            "Your request was rejected by the safety system. If you believe this is an error, contact "
            f"the service operator and include the request ID {blocked.request_id}. "
            f"safety_violations=[{', '.join(blocked.categories)}]."
        )
        self.blocked = blocked

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.blocked,))


class AuthenticationError(ClientError):
    default_code = "invalid_api_key"


class ForbiddenError(ClientError):
    pass


class NotFoundError(ClientError):
    pass


class RequestTimeoutError(ClientError):
    default_code = "request_timeout"


class PayloadTooLargeError(ClientError):
    default_code = "payload_too_large"


class IdempotencyConflictError(ClientError):
    default_code = "idempotency_key_reused"


class RateLimitError(ClientError):
    """A rate limit was hit; ``rate_limit_headers`` are OpenAI's ``x-ratelimit-*`` for the caller."""

    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        rate_limit_headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)
        self.rate_limit_headers = rate_limit_headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_rate_limit_error,
            (type(self), self.message, self.retry_after_s, self.rate_limit_headers),
        )


def _rebuild_rate_limit_error(
    cls: type[RateLimitError], message: str, retry_after_s: float, rate_limit_headers: dict[str, str]
) -> RateLimitError:
    return cls(message, retry_after_s=retry_after_s, rate_limit_headers=rate_limit_headers)


class OverloadedError(RateLimitError):
    """Work shed at peak: it was not accepted, so the client should retry later."""

    default_code = "overloaded"


class ModelStartingError(ServiceUnavailableError):
    """A variant at zero replicas did not start in time; it usually is up soon after."""

    default_code = "model_starting"


class StatusError(APIError):
    """An error whose status and type were decided elsewhere: a job's recorded failure, a bad route."""

    def __init__(self, message: str, *, status: int, error_type: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.error_type = error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_status_error, (self.message, self.status, self.error_type, self.code))


def _rebuild_status_error(message: str, status: int, error_type: str, code: str | None) -> StatusError:
    return StatusError(message, status=status, error_type=error_type, code=code)


# Each kind of failure as OpenAI reports it: (HTTP status, error type). A kind not listed takes
# the entry of its nearest listed base class.
HTTP_STATUS_AND_TYPE: dict[type[APIError], tuple[int, str]] = {
    APIError: (500, "server_error"),
    InvalidRequestError: (400, "invalid_request_error"),
    ModerationBlockedError: (400, "image_generation_user_error"),
    AuthenticationError: (401, "invalid_request_error"),
    ForbiddenError: (403, "invalid_request_error"),
    NotFoundError: (404, "invalid_request_error"),
    RequestTimeoutError: (408, "invalid_request_error"),
    PayloadTooLargeError: (413, "invalid_request_error"),
    UnsupportedMediaTypeError: (415, "invalid_request_error"),
    IdempotencyConflictError: (422, "invalid_request_error"),
    RateLimitError: (429, "requests"),
    OverloadedError: (429, "server_overloaded"),
    ServiceUnavailableError: (503, "server_error"),
    UpstreamTimeoutError: (504, "server_error"),
}
# Kinds after which OpenAI's SDKs should retry even where they would not by status alone.
SHOULD_RETRY: tuple[type[APIError], ...] = (OverloadedError, ModelStartingError, UpstreamTimeoutError)


def status_and_type(error: APIError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of ``error``."""
    if isinstance(error, StatusError):
        return error.status, error.error_type
    kind = next(cls for cls in type(error).__mro__ if cls in HTTP_STATUS_AND_TYPE)
    return HTTP_STATUS_AND_TYPE[kind]


def http_status(error: APIError) -> int:
    return status_and_type(error)[0]


def retry_after_header(seconds: float) -> str:
    """``retry-after`` in whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))


def error_info(error: APIError) -> ErrorInfo:
    """The ``error`` object of OpenAI's error body (a failed job's ``error`` too)."""
    info = ErrorInfo(
        message=error.message, type=status_and_type(error)[1], param=error.param, code=error.code
    )
    if isinstance(error, ModerationBlockedError):
        details = ModerationDetails(
            moderation_stage=error.blocked.stage, categories=list(error.blocked.categories)
        )
        return info.model_copy(update={"moderation_details": details})
    return info


def error_body(error: APIError) -> ErrorResponse:
    """OpenAI's error body, as a JSON response and a stream's ``error`` event both send it."""
    return ErrorResponse(error=error_info(error))


def error_headers(error: APIError) -> dict[str, str]:
    """The response headers an error carries: rate limits, when to retry, whether to."""
    headers = dict(error.rate_limit_headers) if isinstance(error, RateLimitError) else {}
    if error.retry_after_s is not None:
        headers["retry-after"] = retry_after_header(error.retry_after_s)
    if isinstance(error, SHOULD_RETRY):
        headers["x-should-retry"] = "true"
    return headers


def as_api_error(exc: BaseException) -> APIError:
    """Map any exception to the error the client sees; unknown failures become a logged 500."""
    exc = unwrap_remote_error(exc)
    if isinstance(exc, APIError):
        return exc
    from ray.serve import exceptions as serve_exceptions

    if isinstance(exc, ModerationBlocked):
        return ModerationBlockedError(exc)
    if isinstance(exc, ModerationUnavailable):
        logger.error("moderation unavailable: %s", exc)
        return ServiceUnavailableError(
            "Moderation is unavailable, so the request was not run; retry shortly.",
            code="moderation_unavailable",
            retry_after_s=1,
        )
    if isinstance(exc, serve_exceptions.BackPressureError):
        return ServiceUnavailableError(
            "The service is at capacity; retry shortly.", code="overloaded", retry_after_s=1
        )
    if is_replica_failure(exc):
        return ServiceUnavailableError("A model replica became unavailable; retry shortly.", retry_after_s=1)
    logger.error("unhandled error", exc_info=exc)
    return APIError("The server had an error while processing your request.")


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error).model_dump()
    return JSONResponse(body, status_code=http_status(error), headers=error_headers(error))


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI parses an untyped body as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error(exc: RequestValidationError, content_type: str | None) -> APIError:
    """A 400 naming the offending field, or 415 when the body was not JSON at all."""
    errors = exc.errors()
    body_errors = [error for error in errors if error.get("loc", ("",))[0] == "body"]
    if body_errors and not is_json(content_type):
        return UnsupportedMediaTypeError(
            f"Unsupported Content-Type {content_type!r}; send 'application/json'."
        )
    first = errors[0] if errors else {"msg": "Invalid request.", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            "We could not parse the JSON body of your request. Send a JSON object.", code="invalid_json"
        )
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    if first.get("type") in ("model_attributes_type", "dict_type", "missing") and not location:
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return field_error(first)


def field_error(error: Mapping[str, Any]) -> InvalidRequestError:
    """A 400 naming the field of one pydantic error (JSON bodies and multipart forms alike)."""
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    if error.get("type") == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    message = f"Invalid value for '{param}': {error.get('msg')}" if param else str(error.get("msg"))
    return InvalidRequestError(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make FastAPI's own failures (validation, 404 routes, 405, crashes) speak the OpenAI shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = validation_error(exc, request.headers.get("content-type"))
        return error_response(error)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = StatusError(
            f"Invalid URL ({request.method} {request.url.path}): {exc.detail}",
            status=exc.status_code,
            error_type="invalid_request_error" if exc.status_code < 500 else "server_error",
        )
        return error_response(error)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_api_error)
