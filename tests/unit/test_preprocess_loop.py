"""Preprocess keeps its event loop free while it normalises a prompt at the length limit: a cheap
call on the same replica completes meanwhile. The normaliser is held at a gate, so the test
needs no timing: on the loop, the gate could not be opened until it gave up waiting."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from deployments import preprocess
from deployments.preprocess import Preprocess
from serve_app.planning import PlanTarget, plan_generation
from serve_app.protocol import ImageGenerationRequest
from tests.conftest import make_test_config

PreprocessClass: Any = Preprocess.func_or_class  # type: ignore[attr-defined]
GATE_GUARD_S = 10.0  # how long a normaliser stuck on the loop waits before the test fails


def test_a_max_length_prompt_is_normalised_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_test_config(tmp_path)
    prompt = "seven " * (config.limits.max_prompt_chars // 6)
    entered, gate = threading.Event(), threading.Event()
    gate_opened: list[bool] = []
    normalize = preprocess.normalize_prompt

    def gated_normalize(text: str) -> str:
        if text == prompt:
            entered.set()
            gate_opened.append(gate.wait(GATE_GUARD_S))
        return normalize(text)

    monkeypatch.setattr(preprocess, "normalize_prompt", gated_normalize)
    target = PlanTarget(config.variants[0], config.limits, request_id="req_1", tenant="local")
    request, _ = plan_generation(ImageGenerationRequest(prompt=prompt, size="64x64"), target)

    async def scenario() -> None:
        stage = PreprocessClass(config.limits, config.storage)
        preparing = asyncio.ensure_future(stage.prepare(request))
        await asyncio.to_thread(entered.wait, GATE_GUARD_S)
        assert await stage.ready()  # the same replica answers while the prompt is being normalised
        gate.set()
        tasks = await preparing
        assert tasks[0].prompt == prompt.strip()

    asyncio.run(scenario())
    assert gate_opened == [True]
