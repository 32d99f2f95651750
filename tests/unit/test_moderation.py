"""Moderation checks (deployments/moderation.py), their config and their OpenAI error, without Ray."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.moderation import (
    ModerationBlocked,
    ModerationConfig,
    ModerationInput,
    ModerationUnavailable,
    ModerationVerdict,
    Moderator,
)
from serve_app.config import AppConfig
from serve_app.errors import as_api_error, error_response, http_status

IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)
SEEN: list[ModerationInput] = []


def flag_dark_images(subject: ModerationInput) -> ModerationVerdict:
    """A callable check (imported by path below): flags all-black images, records what it saw."""
    SEEN.append(subject)
    flagged = any(int(image.max()) == 0 for image in subject.images)
    return ModerationVerdict(flagged, ("dark",) if flagged else ())


async def flag_everything_async(subject: ModerationInput) -> ModerationVerdict:
    return ModerationVerdict(True, ("everything",))


def not_a_verdict(subject: ModerationInput) -> bool:
    return True


def moderator(checks: dict[str, Any], blocks: list[tuple[str, str]] | None = None) -> Moderator:
    config = ModerationConfig.model_validate({"checks": checks})
    return Moderator(
        config, lambda stage, check: (blocks if blocks is not None else []).append((stage, check))
    )


def screen(moderator: Moderator, names: tuple[str, ...], **overrides: Any) -> None:
    arguments: dict[str, Any] = {"stage": "input", "level": "auto", "prompt": "a cat", "images": ()}
    arguments.update(overrides)
    asyncio.run(moderator.screen("req_1", names, **arguments))


KEYWORDS = {"kind": "keywords", "patterns": [r"\bforbidden\b", "bad+word"], "category": "blocklist"}


def test_a_keyword_blocks_the_prompt_case_insensitively_and_is_counted() -> None:
    blocks: list[tuple[str, str]] = []
    checks = moderator({"words": KEYWORDS}, blocks)
    with pytest.raises(ModerationBlocked) as blocked:
        screen(checks, ("words",), prompt="A FORBIDDEN fruit")
    assert (blocked.value.stage, blocked.value.check, blocked.value.categories) == (
        "input",
        "words",
        ("blocklist",),
    )
    assert blocks == [("input", "words")]
    screen(checks, ("words",), prompt="forbiddenness is a different word")  # \b: no match
    screen(checks, (), prompt="forbidden")  # a check this request does not name does not run


def test_moderation_low_relaxes_only_checks_configured_to_relax() -> None:
    strict = moderator({"words": KEYWORDS})
    with pytest.raises(ModerationBlocked):
        screen(strict, ("words",), prompt="forbidden", level="low")
    relaxed = moderator({"words": {**KEYWORDS, "relax_on_low": True}})
    screen(relaxed, ("words",), prompt="forbidden", level="low")
    with pytest.raises(ModerationBlocked):
        screen(relaxed, ("words",), prompt="forbidden", level="auto")


def test_a_check_runs_only_at_its_stages() -> None:
    checks = moderator({"words": {**KEYWORDS, "stages": ["output"]}})
    screen(checks, ("words",), prompt="forbidden", stage="input")
    with pytest.raises(ModerationBlocked):
        screen(checks, ("words",), prompt="forbidden", stage="output")
    assert checks.applies(("words",), "output") and not checks.applies(("words",), "input")


def test_a_callable_check_sees_the_images_and_the_granted_level() -> None:
    SEEN.clear()
    checks = moderator({"dark": {"kind": "callable", "function": f"{__name__}:flag_dark_images"}})
    screen(checks, ("dark",), images=(IMAGE + 1,), level="low")
    assert SEEN[0].level == "auto"  # relax_on_low is off: the check never sees 'low'
    assert SEEN[0].images[0].shape == (8, 8, 3)
    with pytest.raises(ModerationBlocked) as blocked:
        screen(checks, ("dark",), images=(IMAGE,), stage="output")
    assert blocked.value.categories == ("dark",)


def test_async_callables_work_and_a_wrong_return_type_is_an_error() -> None:
    flagging = moderator({"all": {"kind": "callable", "function": f"{__name__}:flag_everything_async"}})
    with pytest.raises(ModerationBlocked):
        screen(flagging, ("all",))
    broken = moderator({"broken": {"kind": "callable", "function": f"{__name__}:not_a_verdict"}})
    with pytest.raises(TypeError, match="not a ModerationVerdict"):
        screen(broken, ("broken",))


class Classifier(BaseHTTPRequestHandler):
    """A classifier service: flags prompts containing 'storm' and records each body."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Classifier.bodies.append(body)
        flagged = "storm" in body["prompt"]
        answer = json.dumps({"flagged": flagged, "categories": ["weather"] if flagged else []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def classifier_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Classifier)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/classify"
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_classifier_gets_the_prompt_and_images_and_its_verdict_counts(classifier_url: str) -> None:
    Classifier.bodies.clear()
    checks = moderator({"remote": {"kind": "http", "url": classifier_url, "relax_on_low": True}})
    screen(checks, ("remote",), prompt="a calm sea", images=(IMAGE,), level="low")
    body = Classifier.bodies[0]
    assert (body["stage"], body["level"], body["prompt"], len(body["images"])) == (
        "input",
        "low",
        "a calm sea",
        1,
    )
    with pytest.raises(ModerationBlocked) as blocked:
        screen(checks, ("remote",), prompt="a storm")
    assert blocked.value.categories == ("weather",)


def test_an_unreachable_classifier_fails_closed() -> None:
    checks = moderator({"remote": {"kind": "http", "url": "http://127.0.0.1:9/classify", "timeout_s": 1}})
    with pytest.raises(ModerationUnavailable):
        screen(checks, ("remote",))
    error = as_api_error(ModerationUnavailable("down"))
    assert (http_status(error), error.code) == (503, "moderation_unavailable")


@pytest.mark.parametrize(
    ("moderation", "message"),
    [
        ({"checks": {"w": {"kind": "keywords", "patterns": ["(unclosed"]}}}, "not a regular expression"),
        ({"checks": {"w": {"kind": "keywords", "patterns": ["x"], "typo": 1}}}, "typo"),
        ({"checks": {"w": {"kind": "callable", "function": "no colon"}}}, "function"),
        ({"tiers": {"free": ["missing"]}}, "used but not defined"),
        ({"checks": {"w": KEYWORDS}, "tiers": {"gold": ["w"]}}, "unknown tiers"),
        ({"checks": {"w": KEYWORDS}, "variants": {"sdxl": ["w"]}}, "unknown variants"),
    ],
)
def test_moderation_config_fails_when_read(
    config: AppConfig, moderation: dict[str, Any], message: str
) -> None:
    data = config.model_dump()
    data["moderation"] = moderation
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate(data)


def test_checks_for_a_request_are_its_tiers_then_its_variants_without_repeats() -> None:
    config = ModerationConfig.model_validate(
        {
            "checks": {"a": KEYWORDS, "b": KEYWORDS},
            "tiers": {"free": ["a", "b"]},
            "variants": {"tiny-sd": ["b"]},
        }
    )
    assert config.checks_for("free", "tiny-sd") == ("a", "b")
    assert config.checks_for("paid", "tiny-sd") == ("b",)
    assert config.checks_for("paid", "other") == ()
    assert ModerationConfig().checks_for("free", "tiny-sd") == ()  # off by default


def test_a_block_is_openai_moderation_blocked_and_survives_pickling() -> None:
    blocked = pickle.loads(pickle.dumps(ModerationBlocked("req_9", "output", "dark", ("dark", "violence"))))
    error = as_api_error(blocked)
    response = error_response(pickle.loads(pickle.dumps(error)))
    assert response.status_code == 400
    body = json.loads(bytes(response.body))["error"]
    assert body["type"] == "image_generation_user_error"
    assert body["code"] == "moderation_blocked"
    assert body["param"] is None
    assert "rejected by the safety system" in body["message"] and "req_9" in body["message"]
    assert body["message"].endswith("safety_violations=[dark, violence].")
    assert body["moderation_details"] == {"moderation_stage": "output", "categories": ["dark", "violence"]}
    other = json.loads(bytes(error_response(as_api_error(ValueError("x"))).body))["error"]
    assert "moderation_details" not in other
