"""The error mapping and image encoding, without HTTP or Ray."""

from __future__ import annotations

import io
import logging
import logging.handlers
import pickle
from pathlib import Path

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from PIL import Image
from ray.serve._private.common import ServeComponentType
from ray.serve._private.logging_utils import configure_component_logger
from ray.serve.schema import LoggingConfig

from deployments.errors import (
    APIError,
    ClientErrorLogFilter,
    InvalidRequestError,
    quiet_serve_logs,
    unwrap_remote_error,
)
from deployments.images import encode_image, to_uint8
from serve_app.errors import (
    NotFoundError,
    OverloadedError,
    as_api_error,
    error_headers,
    http_status,
    validation_error,
)


def test_api_errors_survive_pickling_between_processes() -> None:
    error = NotFoundError("gone", param="model", code="model_not_found", retry_after_s=2.5)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, NotFoundError)
    assert (copy.message, copy.param, copy.code, copy.retry_after_s) == (
        "gone",
        "model",
        "model_not_found",
        2.5,
    )
    limited = pickle.loads(
        pickle.dumps(OverloadedError("shed", retry_after_s=3.2, rate_limit_headers={"x": "1"}))
    )
    assert error_headers(limited) == {"x": "1", "retry-after": "4", "x-should-retry": "true"}


def test_ray_task_errors_unwrap_to_the_stage_error() -> None:
    from ray.exceptions import RayTaskError

    cause = InvalidRequestError("bad image", param="image")
    wrapped = RayTaskError("prepare", "traceback", cause)
    assert unwrap_remote_error(wrapped) is cause
    assert as_api_error(wrapped) is cause


def test_a_replica_that_died_behind_serve_is_a_503() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import RayServeException

    dead = ActorDiedError()
    wrapped = RayServeException("the upstream replica died")
    wrapped.__cause__ = dead  # how Serve reports a dead stage to the caller of the next one
    for failure in (dead, wrapped):
        error = as_api_error(failure)
        assert http_status(error) == 503 and error_headers(error)["retry-after"] == "1"
        assert error.message == "A model replica became unavailable; retry shortly."


def test_unknown_exceptions_become_a_generic_500() -> None:
    error = as_api_error(RuntimeError("secret internals"))
    assert type(error) is APIError and http_status(error) == 500
    assert "secret" not in error.message


@pytest.mark.parametrize(
    ("errors", "content_type", "status", "param"),
    [
        ([{"type": "json_invalid", "loc": ("body", 3), "msg": "bad"}], "application/json", 400, None),
        ([{"type": "model_attributes_type", "loc": ("body",), "msg": "x"}], "text/plain", 415, None),
        ([{"type": "extra_forbidden", "loc": ("body", "foo"), "msg": "x"}], None, 400, "foo"),
        ([{"type": "int_parsing", "loc": ("body", "n"), "msg": "not int"}], "application/json", 400, "n"),
    ],
)
def test_validation_errors_map(
    errors: list[dict[str, object]], content_type: str | None, status: int, param: str | None
) -> None:
    error = validation_error(RequestValidationError(errors), content_type)
    assert http_status(error) == status
    assert error.param == param


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_encode_decodes_as_the_format(output_format: str, pil_format: str) -> None:
    pixels = to_uint8(np.random.default_rng(0).random((32, 48, 3)))
    assert pixels.dtype == np.uint8 and pixels.flags["C_CONTIGUOUS"]
    data = encode_image(pixels, output_format, compression=30)  # type: ignore[arg-type]
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format
    assert image.size == (48, 32)
    assert "exif" not in image.info


def test_compression_changes_lossy_size() -> None:
    pixels = to_uint8(np.random.default_rng(1).random((64, 64, 3)))
    assert len(encode_image(pixels, "jpeg", 90)) < len(encode_image(pixels, "jpeg", 0))


def test_png_is_lossless() -> None:
    pixels = to_uint8(np.random.default_rng(2).random((16, 16, 3)))
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels, "png", None))))
    assert np.array_equal(decoded, pixels)


@pytest.mark.parametrize(
    ("error", "logged"),
    [(InvalidRequestError("bad upload"), False), (APIError("crash"), True), (RuntimeError("crash"), True)],
)
def test_only_client_errors_are_kept_out_of_the_error_log(error: Exception, logged: bool) -> None:
    record = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None, None)
    record.exc_info = (type(error), error, None)
    assert ClientErrorLogFilter().filter(record) is logged


def test_the_access_log_goes_to_serve_files_but_not_to_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve's own logger set-up for a replica (its stderr handler and its log file), then ours."""
    serve_logger = logging.getLogger("ray.serve")
    saved = serve_logger.handlers[:], serve_logger.filters[:], serve_logger.level, serve_logger.propagate
    try:
        configure_component_logger(
            component_name="Ingress",
            component_id="replica-1",
            logging_config=LoggingConfig(logs_dir=str(tmp_path)),
            component_type=ServeComponentType.REPLICA,
            max_bytes=2**20,
            backup_count=1,
        )
        quiet_serve_logs()
        quiet_serve_logs()  # once is enough: nothing is installed twice
        # As Serve's replica logs each call (the extra it passes with its access log lines).
        serve_logger.info("POST /v1/images/generations 200 12.0ms", extra={"serve_access_log": True})
        serve_logger.warning("the store is slow")
        for handler in serve_logger.handlers:
            handler.flush()
    finally:
        handlers, filters, level, propagate = saved
        for handler in serve_logger.handlers:
            if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None:
                handler.flush()
                handler.target.close()  # Serve buffers its file behind a MemoryHandler
            handler.close()
        serve_logger.handlers[:], serve_logger.filters[:] = handlers, filters
        serve_logger.setLevel(level)
        serve_logger.propagate = propagate
    console = capsys.readouterr().err
    assert "the store is slow" in console
    assert "/v1/images/generations" not in console
    files = "".join(path.read_text() for path in tmp_path.glob("*.log"))
    assert "POST /v1/images/generations 200" in files and "the store is slow" in files
