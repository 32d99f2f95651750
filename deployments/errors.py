"""What can go wrong, in terms a client can act on; no HTTP here.

Every failure the client should see as it is, is an `APIError`: a message, the parameter at
fault, a stable code and, for a dependency that is down, when to retry. Its class says what kind
of failure it is; `serve_app/errors.py` maps each kind to OpenAI's error type and an HTTP status.
Ray wraps an exception raised in another process; `unwrap_remote_error` and `cause_chain` find
the original behind its wrappers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

MAX_CAUSES = 8  # how deep a cause chain is followed (it is short; a cycle must not hang us)


class APIError(Exception):
    """An error the client should see as it is. Subclasses say what kind of failure it is."""

    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments need this to survive pickling between Ray processes.
        return (_rebuild_api_error, (type(self), self.message, self.param, self.code, self.retry_after_s))


def _rebuild_api_error(
    cls: type[APIError], message: str, param: str | None, code: str | None, retry_after_s: float | None
) -> APIError:
    return cls(message, param=param, code=code, retry_after_s=retry_after_s)


class ClientError(APIError):
    """The request is at fault: sent again unchanged, it fails again."""


class InvalidRequestError(ClientError):
    """A field, an upload or the body is invalid (``param`` names what)."""


class UnsupportedMediaTypeError(ClientError):
    """The body or an upload is of a type the service does not read."""

    default_code = "unsupported_media_type"


class ServiceUnavailableError(APIError):
    """A dependency is down: the same request may well succeed after ``retry_after_s``."""

    default_code = "service_unavailable"


class StorageUnavailableError(ServiceUnavailableError):
    default_code = "storage_unavailable"


class UpstreamTimeoutError(ServiceUnavailableError):
    """A stage did not answer within its bound: the work was cancelled; retrying may work."""

    default_code = "upstream_timeout"


def unwrap_remote_error(exc: BaseException) -> BaseException:
    """The original exception behind Ray's task wrappers (a stage's error keeps its own type)."""
    for _ in range(MAX_CAUSES):
        if getattr(exc, "cause", None) is None or not type(exc).__name__.startswith("RayTaskError"):
            break
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


def cause_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and each ``__cause__`` behind it, every one unwrapped from Ray's task wrappers."""
    cause: BaseException | None = error
    for _ in range(MAX_CAUSES):
        if cause is None:
            return
        cause = unwrap_remote_error(cause)
        yield cause
        cause = cause.__cause__


def is_storage_failure(error: BaseException) -> bool:
    """The object store failed (or its circuit is open): worth retrying once the store is back."""
    return isinstance(unwrap_remote_error(error), StorageUnavailableError)


def is_replica_failure(error: BaseException) -> bool:
    """A replica died or became unreachable: the work itself may well succeed elsewhere.

    Serve reports a dead upstream stage as a RayServeException whose ``__cause__`` is Ray's
    actor error, so the whole cause chain is searched.
    """
    from ray import exceptions as ray_exceptions

    dead = ray_exceptions.RayActorError | ray_exceptions.ActorUnavailableError
    return any(isinstance(cause, dead) for cause in cause_chain(error))


class ClientErrorLogFilter(logging.Filter):
    """Drops Serve's "Request failed." traceback when the failure is the client's (a ClientError).

    A stage that rejects bad input raises, and Serve logs every raised exception with its
    traceback; without this, each hostile upload would write one. Access logs still show them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ClientError)


class AccessLogOffTheConsole(logging.Filter):
    """Keeps Serve's access log (a line per call, in every replica a request crosses) off stderr.

    Ray forwards each replica's stderr to the console of ``imagegen serve`` through its log
    monitor, the GCS and the driver: four lines per image on the console, and about 1 core-ms per
    image in those three processes (benchmarks/frontend_cpu.py, A B A B: log monitor 1.2 -> 0.9,
    driver 1.0 -> 0.5, GCS 2.1-2.3 -> 1.5-1.9). The access log stays in Serve's log files
    (``logs/serve/`` of the Ray session); warnings and errors still reach the console.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "serve_access_log", False)


def quiet_serve_logs() -> None:
    """Install this process's filters on Serve's logger (once): no tracebacks for the client's
    errors, and the access log in Serve's files only."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(existing, ClientErrorLogFilter) for existing in serve_logger.filters):
        serve_logger.addFilter(ClientErrorLogFilter())
    for handler in serve_logger.handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue  # Serve's files keep everything
        if not any(isinstance(existing, AccessLogOffTheConsole) for existing in handler.filters):
            handler.addFilter(AccessLogOffTheConsole())
