"""The load generator against in-process fake servers (httpx.MockTransport): what it sends and records."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks.loadgen import (
    parse_batch_sizes,
    parse_server_timing,
    run_closed_loop,
    run_open_loop,
)
from benchmarks.workload import RequestSpec

SSE_BODY = (
    "event: image_generation.partial_image\n"
    'data: {"type": "image_generation.partial_image", "b64_json": "AA"}\n\n'
    "event: image_generation.completed\n"
    'data: {"type": "image_generation.completed", "b64_json": "AAAA"}\n\n'
)


def spec(index: int, endpoint: str = "generations", stream: bool = False) -> RequestSpec:
    return RequestSpec(
        index=index, endpoint=endpoint, size="64x64", n=2, stream=stream, tier="paid", api_key="sk-paid",
        prompt="a lighthouse", model="tiny-sd",
    )  # fmt: skip


def fake_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/images/variations":
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        if b'"stream": true' in request.content or b'"stream":true' in request.content:
            return httpx.Response(200, text=SSE_BODY, headers={"content-type": "text/event-stream"})
        headers = {"x-imagegen-batch-size": "4,4", "server-timing": "queue;dur=12.5, model;dur=200.0"}
        return httpx.Response(200, json={"data": [{"b64_json": "AAAA"}] * 2}, headers=headers)

    return httpx.MockTransport(handle)


def test_headers_parse_into_batch_sizes_and_stage_times() -> None:
    assert parse_batch_sizes("8,8,3") == [8, 8, 3]
    assert parse_batch_sizes(None) == [] and parse_batch_sizes("x") == []
    assert parse_server_timing("preprocess;dur=0.1, queue;dur=10.9, model;dur=242.0") == {
        "preprocess": 0.1, "queue": 10.9, "model": 242.0,
    }  # fmt: skip
    assert parse_server_timing("cache;desc=hit, bad;dur=x") == {}


def test_open_loop_records_every_request_with_what_the_server_said() -> None:
    seen: list[httpx.Request] = []
    arrivals = [(0.0, spec(0)), (0.0, spec(1, stream=True)), (0.0, spec(2, endpoint="edits"))]
    arrivals.append((0.0, spec(3, endpoint="variations")))
    records = asyncio.run(
        run_open_loop(
            "http://bench", arrivals, system="fake", scenario="open", transport=fake_server(seen),
        )
    )  # fmt: skip
    assert [r.index for r in records] == [0, 1, 2, 3]
    plain, streamed, edit, variation = records
    assert plain.ok and plain.batch_sizes == [4, 4] and plain.server_queue_ms == 12.5
    assert plain.server_model_ms == 200.0 and plain.first_partial_s is None and plain.bytes > 0
    assert plain.scheduled_s == 0.0 and plain.latency_s >= 0
    assert streamed.ok and streamed.first_partial_s is not None and streamed.bytes >= len(SSE_BODY) - 2
    assert edit.ok and variation.status == 429 and variation.images == 0
    body = json.loads(seen[0].content)
    assert body == {"size": "64x64", "n": 2, "prompt": "a lighthouse", "model": "tiny-sd"}
    assert all(request.headers["authorization"] == "Bearer sk-paid" for request in seen)
    edit_request = next(r for r in seen if r.url.path == "/v1/images/edits")
    assert edit_request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="image"; filename="image.png"' in edit_request.content
    assert b"\x89PNG" in edit_request.content


def test_closed_loop_stops_at_the_request_bound() -> None:
    seen: list[httpx.Request] = []
    records = asyncio.run(
        run_closed_loop(
            "http://bench", (spec(i) for i in range(100)), system="fake", scenario="closed", clients=3,
            duration_s=60.0, max_requests=7, transport=fake_server(seen),
        )
    )  # fmt: skip
    assert [r.index for r in records] == list(range(7))
    assert len(seen) == 7 and all(r.scheduled_s is None and r.ok for r in records)


def test_transport_failures_become_status_zero() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    records = asyncio.run(
        run_closed_loop(
            "http://bench", [spec(0)], system="fake", scenario="closed", clients=1, duration_s=60.0,
            transport=httpx.MockTransport(refuse),
        )
    )  # fmt: skip
    assert records[0].status == 0 and records[0].error is not None and "ConnectError" in records[0].error


@pytest.mark.parametrize("endpoint", ["generations", "edits", "variations"])
def test_every_endpoint_has_a_request_shape(endpoint: str) -> None:
    from benchmarks.loadgen import build_http_request

    async def build() -> httpx.Request:
        async with httpx.AsyncClient(base_url="http://bench") as client:
            return build_http_request(client, spec(0, endpoint=endpoint))

    assert asyncio.run(build()).url.path == f"/v1/images/{endpoint}"


def test_requests_unanswered_at_the_deadline_fail_with_status_zero() -> None:
    async def never_answer(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    records = asyncio.run(
        run_open_loop(
            "http://bench",
            [(0.0, spec(0))],
            system="fake",
            scenario="open",
            drain_s=0.05,
            transport=httpx.MockTransport(never_answer),
        )
    )
    assert records[0].status == 0 and records[0].error == "no answer before the scenario's deadline"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('event: error\ndata: {"error": {"message": "boom"}}\n\n', "the stream sent an error event"),
        (
            SSE_BODY.split("event: image_generation.completed")[0],
            "the stream ended without a completed image",
        ),
    ],
)
def test_broken_streams_are_failures(body: str, error: str) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    records = asyncio.run(
        run_open_loop(
            "http://bench",
            [(0.0, spec(0, stream=True))],
            system="fake",
            scenario="open",
            transport=httpx.MockTransport(handle),
        )
    )
    assert records[0].status == 200 and records[0].error == error and not records[0].ok
    assert json.loads(seen[0].content)["partial_images"] == 0
