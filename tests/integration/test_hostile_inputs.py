"""Hostile and careless clients against the running service: each mistake is a 4xx in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.conftest import RunningService

GENERATIONS = "/v1/images/generations"
ASYNC = {"prefer": "respond-async"}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_a_json_body_over_the_limit_is_refused_as_it_arrives(
    http: httpx.Client, service: RunningService
) -> None:
    limit = service.config.limits.max_request_bytes
    body = b'{"prompt": "x", "negative_prompt": "' + b"n" * (5 * limit) + b'"}'

    def chunks() -> object:  # no Content-Length: the limit is counted while the body streams in
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = http.post(GENERATIONS, content=chunks(), headers={"content-type": "application/json"})
    assert assert_openai_error(response, 413)["code"] == "payload_too_large"
    declared = http.post(GENERATIONS, content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(declared, 413)["code"] == "payload_too_large"


def test_every_text_field_has_a_length_limit(http: httpx.Client, service: RunningService) -> None:
    too_long = "n" * (service.config.limits.max_prompt_chars + 1)
    response = http.post(GENERATIONS, json={"prompt": "x", "negative_prompt": too_long, "size": "64x64"})
    assert assert_openai_error(response, 400)["param"] == "negative_prompt"
    user = http.post(GENERATIONS, json={"prompt": "x", "user": "u" * 257})
    assert assert_openai_error(user, 400)["param"] == "user"


@pytest.mark.parametrize(
    "webhook_url",
    [
        "https://example.com:99999/hook",  # the port is out of range
        "https://example.com:http/hook",  # the port is not a number
        "http://[::1/hook",  # an unclosed IPv6 literal
        f"https://{'a' * 64}.example.com/hook",  # a DNS label too long to encode
        "https://no-such-host.invalid/hook",
        "ftp://example.com/hook",
    ],
)
def test_a_bad_webhook_url_is_a_400(http: httpx.Client, webhook_url: str) -> None:
    body = {"prompt": "x", "size": "64x64", "webhook_url": webhook_url}
    response = http.post(GENERATIONS, json=body, headers=ASYNC)
    assert assert_openai_error(response, 400)["param"] == "webhook_url"


def test_a_webhook_without_a_configured_secret_is_a_400(http: httpx.Client) -> None:
    # A public address (a literal: no DNS here); the shared service configures no webhook secret.
    body = {"prompt": "x", "size": "64x64", "webhook_url": "https://93.184.215.14/hook"}
    response = http.post(GENERATIONS, json=body, headers=ASYNC)
    assert assert_openai_error(response, 400)["code"] == "webhooks_disabled"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "n": 10**30}, "n"),
        ({"prompt": "x", "size": "99999999999999999999x64"}, "size"),
        ({"prompt": "x", "output_compression": -1}, "output_compression"),
    ],
)
def test_out_of_range_numbers_are_a_400(http: httpx.Client, body: dict[str, object], param: str) -> None:
    content = json.dumps(body)  # Python writes inf as Infinity, as a careless client might
    response = http.post(GENERATIONS, content=content, headers={"content-type": "application/json"})
    assert assert_openai_error(response, 400)["param"] == param


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),  # deep nesting
        (b'{"prompt": "\xff\xfe"}', "application/json", 400),  # not UTF-8
        (b"[]", "application/json", 400),
        (b"prompt=x", "application/x-www-form-urlencoded", 415),
        (b"", "application/json", 400),
    ],
)
def test_malformed_json_bodies_are_4xx(
    http: httpx.Client, content: bytes, content_type: str, status: int
) -> None:
    response = http.post(GENERATIONS, content=content, headers={"content-type": content_type})
    assert_openai_error(response, status)


@pytest.mark.parametrize("job_id", ["..", "job_" + "z" * 32, "x" * 5000, "job_%00"])
def test_job_ids_we_never_issued_are_404(http: httpx.Client, job_id: str) -> None:
    assert_openai_error(http.get(f"/v1/images/jobs/{job_id}"), 404)
    assert_openai_error(http.delete(f"/v1/images/jobs/{job_id}"), 404)
