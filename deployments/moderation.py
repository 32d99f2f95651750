"""Moderation checks: a prompt and images in, a verdict out. Used by the preprocess stage (input:
the prompt and the decoded uploads, before any model work) and the postprocess stage (output: each
generated image, before it is stored or returned).

Checks are configured by name under ``moderation.checks`` and picked per tier and per variant
(``moderation.tiers`` / ``moderation.variants``); none run unless configured. Three kinds:

- ``keywords``: regular expressions matched against the prompt (input only; images pass).
- ``callable``: any Python function, ``"package.module:function"``, taking a `ModerationInput` and
  returning a `ModerationVerdict` (or an awaitable of one).
- ``http``: a classifier service. It receives a POST of
  ``{"stage", "level", "prompt", "images": [<base64 PNG>, ...]}`` and answers
  ``{"flagged": bool, "categories": [str, ...]}``.

A request's ``moderation: low`` reaches a check only where its config says ``relax_on_low: true``:
a keyword check is then skipped, a callable or classifier gets ``level="low"`` and decides what
to relax. Everywhere else a check sees ``level="auto"``.

This module is below the HTTP face: it raises `ModerationBlocked` / `ModerationUnavailable`, and
serve_app/errors.py maps them to OpenAI's errors.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import io
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.contracts import ModerationLevel

ModerationStage = Literal["input", "output"]
logger = logging.getLogger("imagegen.moderation")


@dataclass(frozen=True)
class ModerationInput:
    """What one check sees: the stage, the level it may apply, the prompt and uint8 (H, W, C) images."""

    stage: ModerationStage
    level: ModerationLevel
    prompt: str
    images: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class ModerationVerdict:
    flagged: bool
    categories: tuple[str, ...] = ()


class ModerationBlocked(Exception):
    """A check flagged the request. ``stage`` and ``check`` say where; ``categories`` say why."""

    def __init__(self, request_id: str, stage: ModerationStage, check: str, categories: tuple[str, ...]):
        super().__init__(f"request {request_id} blocked at {stage} by {check}: {', '.join(categories)}")
        self.request_id = request_id
        self.stage = stage
        self.check = check
        self.categories = categories

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.stage, self.check, self.categories))


class ModerationUnavailable(Exception):
    """A check could not give a verdict (a classifier down): the request fails closed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckConfigBase(StrictModel):
    stages: list[ModerationStage] = Field(
        ["input", "output"], min_length=1, description="Where the check runs: 'input', 'output' or both."
    )
    relax_on_low: bool = Field(
        False,
        description="Let a request's `moderation: low` relax this check (a keyword check is then "
        "skipped; a callable or classifier receives level 'low'). Off: the check always applies fully.",
    )


class KeywordCheckConfig(CheckConfigBase):
    """Regular expressions (Python syntax, case-insensitive) matched anywhere in the prompt."""

    kind: Literal["keywords"]
    patterns: list[str] = Field(min_length=1, description="Regular expressions; any match blocks.")
    category: str = Field("blocklist", description="The category a match reports.")

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as invalid:
                raise ValueError(f"pattern {pattern!r} is not a regular expression: {invalid}") from None
        return patterns


class CallableCheckConfig(CheckConfigBase):
    kind: Literal["callable"]
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'package.module:function': takes a ModerationInput, returns a ModerationVerdict.",
    )


class HttpCheckConfig(CheckConfigBase):
    kind: Literal["http"]
    url: str = Field(pattern=r"^https?://", description="The classifier's endpoint (POST, JSON).")
    timeout_s: float = Field(5.0, gt=0, le=60, description="Per call; a timeout fails the request closed.")


CheckConfig = Annotated[
    KeywordCheckConfig | CallableCheckConfig | HttpCheckConfig, Field(discriminator="kind")
]


class ModerationConfig(StrictModel):
    """Named checks, and which of them apply to each tier and each variant (off by default)."""

    checks: dict[str, CheckConfig] = Field(default_factory=dict, description="Checks by name.")
    tiers: dict[str, list[str]] = Field(
        default_factory=dict, description="Checks every request of a tier runs, by tier name."
    )
    variants: dict[str, list[str]] = Field(
        default_factory=dict, description="Checks every request for a variant runs, by variant name."
    )

    def checks_for(self, tier: str, variant: str) -> tuple[str, ...]:
        """The checks a request of ``tier`` for ``variant`` runs: the tier's, then the variant's."""
        names = [*self.tiers.get(tier, []), *self.variants.get(variant, [])]
        return tuple(dict.fromkeys(names))

    def undefined_checks(self) -> list[str]:
        used = {name for names in (*self.tiers.values(), *self.variants.values()) for name in names}
        return sorted(used - set(self.checks))


Check = Callable[[ModerationInput], Awaitable[ModerationVerdict]]


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def keyword_check(config: KeywordCheckConfig) -> Check:
    pattern = re.compile("|".join(f"(?:{p})" for p in config.patterns), re.IGNORECASE)

    async def check(subject: ModerationInput) -> ModerationVerdict:
        if subject.level == "low" or not pattern.search(subject.prompt):
            return ModerationVerdict(False)
        return ModerationVerdict(True, (config.category,))

    return check


def callable_check(config: CallableCheckConfig) -> Check:
    module_name, _, attribute = config.function.partition(":")
    function = getattr(importlib.import_module(module_name), attribute)

    async def check(subject: ModerationInput) -> ModerationVerdict:
        if inspect.iscoroutinefunction(function):
            verdict = await function(subject)
        else:  # a synchronous classifier may be CPU work: keep the replica's loop free
            verdict = await asyncio.to_thread(function, subject)
        if not isinstance(verdict, ModerationVerdict):
            raise TypeError(f"{config.function} returned {type(verdict).__name__}, not a ModerationVerdict")
        return verdict

    return check


def http_check(config: HttpCheckConfig) -> Check:
    async def check(subject: ModerationInput) -> ModerationVerdict:
        images = await asyncio.to_thread(lambda: [png_base64(image) for image in subject.images])
        body = {"stage": subject.stage, "level": subject.level, "prompt": subject.prompt, "images": images}
        try:
            async with httpx.AsyncClient(timeout=config.timeout_s) as client:
                answer = await client.post(config.url, json=body)
                answer.raise_for_status()
                result = answer.json()
            return ModerationVerdict(bool(result["flagged"]), tuple(result.get("categories") or ()))
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as failure:
            raise ModerationUnavailable(f"moderation classifier {config.url} failed: {failure!r}") from None

    return check


CHECK_BUILDERS: dict[str, Callable[[Any], Check]] = {
    "keywords": keyword_check,
    "callable": callable_check,
    "http": http_check,
}


class Moderator:
    """The configured checks of one stage replica; `screen` runs the ones a request names."""

    def __init__(
        self,
        config: ModerationConfig,
        on_block: Callable[[ModerationStage, str], None] = lambda stage, check: None,
    ) -> None:
        self.config = config
        self.on_block = on_block
        self.checks = {name: CHECK_BUILDERS[check.kind](check) for name, check in config.checks.items()}

    def applies(self, names: tuple[str, ...], stage: ModerationStage) -> bool:
        return any(stage in self.config.checks[name].stages for name in names)

    async def screen(
        self,
        request_id: str,
        names: tuple[str, ...],
        stage: ModerationStage,
        level: ModerationLevel,
        prompt: str,
        images: tuple[np.ndarray, ...] = (),
    ) -> None:
        """Run the named checks that apply at ``stage``, in order; raises ModerationBlocked on a flag."""
        for name in names:
            config = self.config.checks[name]
            if stage not in config.stages:
                continue
            granted = level if config.relax_on_low else "auto"
            verdict = await self.checks[name](ModerationInput(stage, granted, prompt, images))
            if verdict.flagged:
                categories = verdict.categories or ("unspecified",)
                logger.warning(
                    "moderation: request %s blocked at %s by check %r (%s)",
                    request_id,
                    stage,
                    name,
                    ", ".join(categories),
                )
                self.on_block(stage, name)
                raise ModerationBlocked(request_id, stage, name, categories)
