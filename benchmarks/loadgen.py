"""The load generator: sends requests to an OpenAI-compatible images server and records each one.

Two ways to drive load:

- **open loop** (`run_open_loop`): arrivals are scheduled ahead of time and fired without waiting
  for earlier answers, the way independent users arrive. Latency counts from the *scheduled*
  arrival, so a generator that falls behind cannot hide queueing (no coordinated omission).
- **closed loop** (`run_closed_loop`): N clients, each sending its next request when the last one
  is answered. It finds saturated throughput and measures latency at a fixed concurrency.

Every request becomes one `RequestRecord`: when it started and ended, its status, the bytes
received, the time to the first partial image (streams only), and what the server said in its
``x-imagegen-batch-size`` and ``server-timing`` headers when it sent them.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import httpx

from benchmarks.workload import ENDPOINT_PATHS, RequestMix, RequestSpec, iter_requests

BATCH_SIZE_HEADER = "x-imagegen-batch-size"
# OpenAI's stream events: `image_generation.partial_image`, `image_edit.completed`, `error`, ...
PARTIAL_IMAGE_EVENT = "partial_image"
COMPLETED_EVENT = ".completed"
ERROR_EVENT = "event: error"
ProgressFactory = Callable[[int | None, str], AbstractContextManager[Any]]


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds from the start of its scenario."""

    system: str
    scenario: str
    index: int
    endpoint: str
    size: str
    n: int
    stream: bool
    tier: str
    scheduled_s: float | None  # planned arrival (open loop); None in a closed loop
    start_s: float  # when it was actually sent
    end_s: float
    status: int  # HTTP status; 0 when no response came (timeout, refused connection)
    bytes: int
    first_partial_s: float | None = None  # from the start of the request to its first partial image
    batch_sizes: list[int] = field(default_factory=list)
    server_queue_ms: float | None = None
    server_model_ms: float | None = None
    error: str | None = None
    round: int = 0  # which round of an interleaved comparison (A B A B) it ran in

    @property
    def latency_s(self) -> float:
        """From the scheduled arrival when there was one, else from the send."""
        return self.end_s - (self.scheduled_s if self.scheduled_s is not None else self.start_s)

    @property
    def ok(self) -> bool:
        """Answered in full: status 200, and a stream that ended with its completed image."""
        return self.status == 200 and self.error is None

    @property
    def images(self) -> int:
        return self.n if self.ok else 0

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "latency_s": self.latency_s}


def parse_batch_sizes(header: str | None) -> list[int]:
    """``"8,8,3"`` -> ``[8, 8, 3]``; absent or malformed -> ``[]``."""
    if not header:
        return []
    try:
        return [int(part) for part in header.split(",")]
    except ValueError:
        return []


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``"queue;dur=10.9, model;dur=242.0"`` -> ``{"queue": 10.9, "model": 242.0}`` (ms)."""
    timings: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key == "dur":
                with suppress(ValueError):
                    timings[name] = float(value)
    return timings


@cache
def input_png(size: str) -> bytes:
    """A deterministic gradient PNG of ``size``, the input image of edits and variations."""
    import numpy as np
    from PIL import Image

    width, height = (int(part) for part in size.split("x"))
    red = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    green = np.tile(np.linspace(0, 255, height).astype(np.uint8)[:, None], (1, width))
    pixels = np.stack([red, green, np.full_like(red, 128)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_http_request(client: httpx.AsyncClient, spec: RequestSpec) -> httpx.Request:
    """The HTTP request for ``spec``: JSON for generations, multipart for edits and variations."""
    url = ENDPOINT_PATHS[spec.endpoint]
    headers = {"authorization": f"Bearer {spec.api_key}"}
    fields: dict[str, Any] = {"size": spec.size, "n": spec.n}
    if spec.endpoint != "variations":
        fields["prompt"] = spec.prompt
    if spec.model is not None:
        fields["model"] = spec.model
    if spec.stream:
        fields["stream"] = True
        fields["partial_images"] = spec.partial_images
    if spec.endpoint == "generations":
        return client.build_request("POST", url, json=fields, headers=headers)
    form = {
        key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fields.items()
    }
    files = {"image": ("image.png", input_png(spec.size), "image/png")}
    return client.build_request("POST", url, data=form, files=files, headers=headers)


async def send(
    client: httpx.AsyncClient,
    spec: RequestSpec,
    *,
    system: str,
    scenario: str,
    origin: float,
    scheduled_s: float | None,
    deadline: float | None = None,
) -> RequestRecord:
    """Send one request and record it; never raises for an HTTP or transport failure.

    A request still unanswered at ``deadline`` (event-loop time) is abandoned with status 0.
    """
    start = time.perf_counter()
    status, received, first_partial, error = 0, 0, None, None
    headers: httpx.Headers = httpx.Headers()
    try:
        async with asyncio.timeout_at(deadline):
            response = await client.send(build_http_request(client, spec), stream=True)
            try:
                status, headers = response.status_code, response.headers
                if spec.stream and status == 200:
                    completed = False
                    async for line in response.aiter_lines():
                        received += len(line) + 1
                        head = line[:200]
                        if first_partial is None and PARTIAL_IMAGE_EVENT in head:
                            first_partial = time.perf_counter() - start
                        completed = completed or (head.startswith("event:") and COMPLETED_EVENT in head)
                        if head.startswith(ERROR_EVENT):
                            error = "the stream sent an error event"
                    if error is None and not completed:
                        error = "the stream ended without a completed image"
                else:
                    async for chunk in response.aiter_bytes():
                        received += len(chunk)
            finally:
                await response.aclose()
    except TimeoutError:
        status, error = 0, "no answer before the scenario's deadline"
    except httpx.HTTPError as exc:
        status, error = 0, f"{type(exc).__name__}: {exc}"[:200]
    end = time.perf_counter()
    timings = parse_server_timing(headers.get("server-timing"))
    return RequestRecord(
        system=system,
        scenario=scenario,
        index=spec.index,
        endpoint=spec.endpoint,
        size=spec.size,
        n=spec.n,
        stream=spec.stream,
        tier=spec.tier,
        scheduled_s=scheduled_s,
        start_s=start - origin,
        end_s=end - origin,
        status=status,
        bytes=received,
        first_partial_s=first_partial,
        batch_sizes=parse_batch_sizes(headers.get(BATCH_SIZE_HEADER)),
        server_queue_ms=timings.get("queue"),
        server_model_ms=timings.get("model"),
        error=error,
    )


def http_client(
    base_url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    # Open loops keep many requests in flight: the pool must never be what queues them.
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, transport=transport)


def tqdm_progress(total: int | None, description: str) -> AbstractContextManager[Any]:
    """A progress bar on stderr when it is a terminal (tqdm turns itself off otherwise)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="req", leave=False, disable=None)


async def run_open_loop(
    base_url: str,
    arrivals: Sequence[tuple[float, RequestSpec]],
    *,
    system: str,
    scenario: str,
    timeout_s: float = 60.0,
    drain_s: float | None = None,
    progress: ProgressFactory = tqdm_progress,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[RequestRecord]:
    """Fire each request at its offset, without waiting for earlier ones; wait for all to end.

    With ``drain_s``, requests unanswered ``drain_s`` after the last arrival fail with status 0,
    which bounds the time an overloaded server can take.
    """
    async with http_client(base_url, timeout_s, transport) as client:
        with progress(len(arrivals), f"{system} {scenario}") as bar:

            async def fire(spec: RequestSpec, offset: float) -> RequestRecord:
                record = await send(
                    client,
                    spec,
                    system=system,
                    scenario=scenario,
                    origin=origin,
                    scheduled_s=offset,
                    deadline=deadline,
                )
                bar.update(1)
                return record

            last_offset = max((offset for offset, _ in arrivals), default=0.0)
            loop_now = asyncio.get_running_loop().time()
            deadline = None if drain_s is None else loop_now + last_offset + drain_s
            origin = time.perf_counter()
            in_flight = []
            for offset, spec in arrivals:
                delay = origin + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                in_flight.append(asyncio.create_task(fire(spec, offset)))
            return list(await asyncio.gather(*in_flight))


async def run_closed_loop(
    base_url: str,
    requests: Iterable[RequestSpec],
    *,
    system: str,
    scenario: str,
    clients: int,
    duration_s: float,
    max_requests: int | None = None,
    timeout_s: float = 60.0,
    drain_s: float | None = None,
    progress: ProgressFactory = tqdm_progress,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[RequestRecord]:
    """``clients`` concurrent loops, each sending its next request when its last one is answered.

    Stops sending after ``duration_s`` or ``max_requests``, whichever comes first; with
    ``drain_s``, requests unanswered ``drain_s`` after that fail with status 0.
    """
    supply: Iterator[RequestSpec] = iter(requests)
    if max_requests is not None:
        supply = itertools.islice(supply, max_requests)
    records: list[RequestRecord] = []
    async with http_client(base_url, timeout_s, transport) as client:
        with progress(max_requests, f"{system} {scenario}") as bar:
            loop_now = asyncio.get_running_loop().time()
            deadline = None if drain_s is None else loop_now + duration_s + drain_s
            origin = time.perf_counter()
            stop_sending = origin + duration_s

            async def client_loop() -> None:
                while time.perf_counter() < stop_sending:
                    spec = next(supply, None)
                    if spec is None:
                        return
                    records.append(
                        await send(
                            client,
                            spec,
                            system=system,
                            scenario=scenario,
                            origin=origin,
                            scheduled_s=None,
                            deadline=deadline,
                        )
                    )
                    bar.update(1)

            await asyncio.gather(*(client_loop() for _ in range(clients)))
    return sorted(records, key=lambda record: record.index)


async def warm_up(
    base_url: str, mix: RequestMix, bursts: Sequence[int], *, system: str, timeout_s: float, **options: Any
) -> None:
    """Bursts of concurrent requests, not recorded: a CPU forward pass at a batch size it has not
    seen before sets up its kernels first, which costs up to seconds."""
    for burst in bursts:
        await run_closed_loop(
            base_url,
            iter_requests(mix, random.Random(-burst)),
            system=system,
            scenario="warm-up",
            clients=burst,
            duration_s=timeout_s,
            max_requests=burst,
            timeout_s=timeout_s,
            **options,
        )
