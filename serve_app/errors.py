"""One mapping from every failure to OpenAI's error JSON and its status code."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.moderation import ModerationBlocked, ModerationUnavailable
from serve_app.protocol import ErrorInfo, ErrorResponse, ModerationDetails

logger = logging.getLogger("imagegen.errors")


class APIError(Exception):
    """An error the client should see as it is. Subclasses fix the status and type."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments need this to survive pickling between Ray processes.
        return (_rebuild_api_error, (type(self), self.message, self.param, self.code, self.headers))

    def info(self) -> ErrorInfo:
        """The ``error`` object of OpenAI's error body."""
        return ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)


def _rebuild_api_error(
    cls: type[APIError], message: str, param: str | None, code: str | None, headers: dict[str, str]
) -> APIError:
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ModerationBlockedError(APIError):
    """OpenAI's ``moderation_blocked``: a moderation check flagged the prompt, an upload or an image."""

    status_code = 400
    error_type = "image_generation_user_error"
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

    def info(self) -> ErrorInfo:
        details = ModerationDetails(
            moderation_stage=self.blocked.stage, categories=list(self.blocked.categories)
        )
        return super().info().model_copy(update={"moderation_details": details})


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class ForbiddenError(APIError):
    status_code = 403
    error_type = "invalid_request_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestTimeoutError(APIError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class IdempotencyConflictError(APIError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "idempotency_key_reused"


class RateLimitError(APIError):
    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class OverloadedError(RateLimitError):
    """Work shed at peak: it was not accepted, so the client should retry later."""

    error_type = "server_overloaded"
    default_code = "overloaded"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class StorageUnavailableError(ServiceUnavailableError):
    default_code = "storage_unavailable"


class ClientErrorLogFilter(logging.Filter):
    """Drops Serve's "Request failed." traceback when the failure is the client's (a 4xx APIError).

    A stage that rejects bad input raises, and Serve logs every raised exception with its
    traceback; without this, each hostile upload would write one. Access logs still show them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, APIError) and error.status_code < 500)


def quiet_client_errors() -> None:
    """Install ClientErrorLogFilter on Serve's logger in this process (once)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(existing, ClientErrorLogFilter) for existing in serve_logger.filters):
        serve_logger.addFilter(ClientErrorLogFilter())


def unwrap_remote_error(exc: BaseException) -> BaseException:
    """The original exception behind Ray's task wrappers (a stage's error keeps its own type)."""
    seen = 0
    while (
        seen < 8 and getattr(exc, "cause", None) is not None and type(exc).__name__.startswith("RayTaskError")
    ):
        exc = exc.cause  # type: ignore[attr-defined]
        seen += 1
    return exc


def is_storage_failure(error: BaseException) -> bool:
    """The object store failed (or its circuit is open): worth retrying once the store is back."""
    return isinstance(unwrap_remote_error(error), StorageUnavailableError)


def is_replica_failure(error: BaseException) -> bool:
    """A replica died or became unreachable: the work itself may well succeed elsewhere.

    Serve reports a dead upstream stage as a RayServeException whose ``__cause__`` is Ray's
    actor error, so the whole cause chain is searched.
    """
    from ray import exceptions as ray_exceptions

    cause: BaseException | None = error
    for _ in range(8):
        if cause is None:
            return False
        cause = unwrap_remote_error(cause)
        if isinstance(cause, ray_exceptions.RayActorError | ray_exceptions.ActorUnavailableError):
            return True
        cause = cause.__cause__
    return False


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
            headers={"retry-after": "1"},
        )
    if isinstance(exc, serve_exceptions.BackPressureError):
        return ServiceUnavailableError(
            "The service is at capacity; retry shortly.", code="overloaded", headers={"retry-after": "1"}
        )
    if is_replica_failure(exc):
        return ServiceUnavailableError(
            "A model replica became unavailable; retry shortly.", headers={"retry-after": "1"}
        )
    logger.error("unhandled error", exc_info=exc)
    return APIError("The server had an error while processing your request.")


def error_response(error: APIError) -> JSONResponse:
    body = ErrorResponse(error=error.info())
    return JSONResponse(body.model_dump(), status_code=error.status_code, headers=error.headers)


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
        error_class = {404: NotFoundError, 405: InvalidRequestError}.get(exc.status_code, APIError)
        error = error_class(f"Invalid URL ({request.method} {request.url.path}): {exc.detail}")
        error.status_code = exc.status_code
        return error_response(error)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_api_error)
