"""Today's OpenAI Images API through the official client on real Ray Serve: the fields the installed
SDK sends, usage on every response, and moderation stages (a keyword list before the model, an HTTP
classifier on each output image) that answer OpenAI's ``moderation_blocked``."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import openai
import pytest
from openai import OpenAI
from PIL import Image
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.model_replica import ReplicaStats
from deployments.moderation import ModerationConfig
from serve_app.app import build_app
from tests.integration.conftest import RunningService

APP_NAME = "imagegen-moderated"
ROUTE = "/moderated"
OUTPUT_MARKER = "block-this-output"


def png(size: tuple[int, int] = (64, 64)) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buffer, format="PNG")
    return ("image.png", buffer.getvalue(), "image/png")


def extra_fields(model: BaseModel, path: str = "") -> set[str]:
    """Dotted names of the fields an SDK model got that its type does not declare."""
    extras = {f"{path}{name}" for name in (model.model_extra or {})}
    for name in type(model).model_fields:
        value = getattr(model, name)
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, BaseModel):
                extras |= extra_fields(child, f"{path}{name}.")
    return extras


class Classifier(BaseHTTPRequestHandler):
    """An HTTP moderation classifier: flags output images of prompts carrying OUTPUT_MARKER."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Classifier.calls.append(body)
        flagged = body["stage"] == "output" and OUTPUT_MARKER in body["prompt"]
        answer = json.dumps({"flagged": flagged, "categories": ["test-output"] if flagged else []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class ModeratedService:
    client: OpenAI
    storage_dir: Path
    model_replica: DeploymentHandle

    def received(self) -> int:
        stats: ReplicaStats = self.model_replica.stats.remote().result()
        return stats.received

    def stored_images(self) -> set[Path]:
        return {path for path in self.storage_dir.rglob("*") if path.suffix in (".png", ".webp", ".jpeg")}


@pytest.fixture(scope="module")
def moderated(
    service: RunningService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModeratedService]:
    classifier = ThreadingHTTPServer(("127.0.0.1", 0), Classifier)
    threading.Thread(target=classifier.serve_forever, daemon=True).start()
    moderation = ModerationConfig.model_validate(
        {
            "checks": {
                "blocklist": {"kind": "keywords", "patterns": [r"\bforbidden\b"], "stages": ["input"]},
                "relaxable": {
                    "kind": "keywords",
                    "patterns": [r"\bedgy\b"],
                    "stages": ["input"],
                    "relax_on_low": True,
                },
                "classifier": {
                    "kind": "http",
                    "url": f"http://127.0.0.1:{classifier.server_address[1]}/classify",
                    "stages": ["output"],
                },
            },
            "tiers": {"paid": ["blocklist", "relaxable"]},
            "variants": {"tiny-sd": ["classifier"]},
        }
    )
    storage_dir = tmp_path_factory.mktemp("moderated-store")
    storage = service.config.storage.model_copy(update={"url": f"file://{storage_dir}"})
    config = service.config.model_copy(update={"moderation": moderation, "storage": storage})
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    client = OpenAI(base_url=f"{service.base_url}{ROUTE}/v1", api_key="sk-test", max_retries=0, timeout=60)
    try:
        replica = serve.get_deployment_handle("ModelReplica-tiny-sd", app_name=APP_NAME)
        yield ModeratedService(client, storage_dir, replica)
    finally:
        serve.delete(APP_NAME)
        classifier.shutdown()
        classifier.server_close()


def blocked_error(raised: pytest.ExceptionInfo[openai.BadRequestError]) -> dict[str, Any]:
    error = raised.value
    assert error.status_code == 400 and error.code == "moderation_blocked"
    assert error.type == "image_generation_user_error"
    body = error.body
    assert isinstance(body, dict)
    assert "rejected by the safety system" in body["message"]
    return body


def test_todays_sdk_fields_succeed_with_usage_and_echoes(openai_client: OpenAI) -> None:
    result = openai_client.images.generate(
        prompt="a lighthouse",
        size="64x64",
        n=2,
        quality="xhigh",
        moderation="low",
        safety_identifier="hash-of-user-1",
        output_format="webp",
        output_compression=70,
    )
    assert result.data is not None and len(result.data) == 2
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or ""))).format == "WEBP"
    assert (result.quality, result.size, result.output_format, result.background) == (
        "xhigh",
        "64x64",
        "webp",
        "opaque",
    )
    assert result.safety_identifier == "hash-of-user-1"
    usage = result.usage
    assert usage is not None and usage.output_tokens_details is not None
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens == usage.output_tokens_details.image_tokens == 2 * (64 // 8) ** 2
    assert usage.input_tokens == usage.input_tokens_details.text_tokens > 0
    assert extra_fields(result) <= {"data.seed", "variant", "alias"}  # documented extensions


def test_usage_on_edits_counts_the_uploaded_images(openai_client: OpenAI) -> None:
    result = openai_client.images.edit(image=[png(), png()], prompt="repaint", size="64x64", user="u-2")
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == 2 * (64 // 8) ** 2
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert result.safety_identifier == "u-2"  # `user` when no safety_identifier is sent


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif", "frame_count": 4}, "frame_count"),
        ({"output_format": "svg"}, "output_format"),
        ({"complexity": "high"}, "complexity"),
    ],
)
def test_fields_no_variant_honours_are_a_400_naming_them(
    openai_client: OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.images.generate(prompt="a lighthouse", size="64x64", **fields)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["param"] == param
    assert param in raised.value.body["message"] and "Unrecognized" not in raised.value.body["message"]


def test_a_block_listed_prompt_is_refused_before_any_model_work(moderated: ModeratedService) -> None:
    before = moderated.received()
    with pytest.raises(openai.BadRequestError) as raised:
        moderated.client.images.generate(prompt="something Forbidden here", size="64x64")
    body = blocked_error(raised)
    assert body["moderation_details"] == {"moderation_stage": "input", "categories": ["blocklist"]}
    with pytest.raises(openai.BadRequestError) as edit_raised:
        moderated.client.images.edit(image=png(), prompt="a forbidden edit", size="64x64")
    blocked_error(edit_raised)
    assert moderated.received() == before  # the model replica was never handed a task


def test_moderation_low_relaxes_only_the_checks_allowed_to_relax(moderated: ModeratedService) -> None:
    with pytest.raises(openai.BadRequestError):
        moderated.client.images.generate(prompt="an edgy poster", size="64x64")
    relaxed = moderated.client.images.generate(prompt="an edgy poster", size="64x64", moderation="low")
    assert relaxed.data is not None and len(relaxed.data) == 1
    with pytest.raises(openai.BadRequestError):
        moderated.client.images.generate(prompt="a forbidden poster", size="64x64", moderation="low")


def test_an_image_blocked_at_output_is_never_stored(moderated: ModeratedService) -> None:
    Classifier.calls.clear()
    stored_before, received_before = moderated.stored_images(), moderated.received()
    with pytest.raises(openai.BadRequestError) as raised:
        moderated.client.images.generate(
            prompt=f"a harbour {OUTPUT_MARKER}", size="64x64", n=2, response_format="url"
        )
    body = blocked_error(raised)
    assert body["moderation_details"]["moderation_stage"] == "output"
    assert moderated.received() == received_before + 2  # the model ran; its images were screened
    assert moderated.stored_images() == stored_before
    screened = [call for call in Classifier.calls if call["stage"] == "output"]
    assert screened and all(len(call["images"]) == 1 for call in screened)
    kept = moderated.client.images.generate(prompt="a harbour", size="64x64", response_format="url")
    assert kept.data is not None and len(moderated.stored_images() - stored_before) == 1


def test_a_streamed_image_blocked_at_output_sends_no_pixels(moderated: ModeratedService) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        moderated.client.images.generate(
            prompt=f"a storm {OUTPUT_MARKER}", size="64x64", stream=True, partial_images=1
        )
    blocked_error(raised)
