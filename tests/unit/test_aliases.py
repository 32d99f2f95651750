"""Aliases: weighted, sticky splits as a pure function, and their strict configuration."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.aliases import ModelChoice, caller_identity, choose_variant, resolve_model
from serve_app.config import AppConfig, load_config
from tests.conftest import load_variant

CALLERS = 20_000
# Binomial sd of a 10% share over 20,000 callers is 0.21 points: 1 point is ~5 sd.
SHARE_TOLERANCE = 0.01


def shares(alias: str, weights: dict[str, float], callers: int = CALLERS) -> dict[str, float]:
    counts = Counter(choose_variant(alias, weights, f"user:caller-{i}") for i in range(callers))
    return {variant: counts[variant] / callers for variant in weights}


@pytest.mark.parametrize(
    "weights",
    [{"digits": 90, "digits-fast": 10}, {"a": 1, "b": 1, "c": 2}, {"only": 5}, {"x": 0.5, "y": 99.5}],
)
def test_split_matches_weights_within_tolerance(weights: dict[str, float]) -> None:
    total = sum(weights.values())
    for variant, share in shares("imagegen-1", weights).items():
        assert share == pytest.approx(weights[variant] / total, abs=SHARE_TOLERANCE), variant


def test_caller_is_sticky_and_aliases_split_independently() -> None:
    weights = {"a": 1.0, "b": 1.0}
    for i in range(200):
        caller = f"user:caller-{i}"
        assert len({choose_variant("alias-1", weights, caller) for _ in range(5)}) == 1
    # Two aliases over the same variants do not put the same callers on the same side.
    same = sum(
        choose_variant("alias-1", weights, f"user:{i}") == choose_variant("alias-2", weights, f"user:{i}")
        for i in range(CALLERS)
    )
    assert same / CALLERS == pytest.approx(0.5, abs=SHARE_TOLERANCE)


def test_raising_a_canary_moves_only_callers_onto_it() -> None:
    before = {"stable": 90.0, "canary": 10.0}
    after = {"stable": 70.0, "canary": 30.0}
    moved = Counter(
        (choose_variant("m", before, caller), choose_variant("m", after, caller))
        for caller in (f"user:{i}" for i in range(CALLERS))
    )
    assert moved[("canary", "stable")] == 0
    assert moved[("stable", "canary")] / CALLERS == pytest.approx(0.2, abs=SHARE_TOLERANCE)


def test_caller_identity_prefers_the_end_user() -> None:
    assert caller_identity("alice", "acme") == "user:alice"
    assert caller_identity(None, "acme") == caller_identity("", "acme") == "tenant:acme"
    # An end user named like a tenant is still another caller.
    assert caller_identity("acme", "acme") != caller_identity(None, "acme")


def test_resolve_model() -> None:
    aliases = {"imagegen-1": {"a": 1.0, "b": 3.0}}
    assert resolve_model("a", ["a", "b"], aliases, "user:x") == ModelChoice("a")
    choice = resolve_model("imagegen-1", ["a", "b"], aliases, "user:x")
    assert choice == ModelChoice(choose_variant("imagegen-1", aliases["imagegen-1"], "user:x"), "imagegen-1")
    assert resolve_model("nope", ["a", "b"], aliases, "user:x") is None


def config_with_aliases(aliases: object) -> AppConfig:
    data = load_config().model_dump(mode="json")
    data["variants"] = [load_variant("tiny-sd").model_dump(), load_variant("digits").model_dump()]
    data["default_model"] = "tiny-sd"
    return AppConfig(**{**data, "aliases": aliases})


def test_valid_aliases_load() -> None:
    config = config_with_aliases({"imagegen-1": {"tiny-sd": 90, "digits": 10}})
    assert config.aliases == {"imagegen-1": {"tiny-sd": 90.0, "digits": 10.0}}


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ({"imagegen-1": {"tiny-sd": 90, "digits-fast": 10}}, "unknown variants ['digits-fast']"),
        ({"imagegen-1": {"tiny-sd": 0, "digits": 10}}, "weights must be positive, got ['tiny-sd']"),
        ({"imagegen-1": {"tiny-sd": -1}}, "weights must be positive"),
        ({"imagegen-1": {}}, "names no variants"),
        ({"digits": {"tiny-sd": 1}}, "alias 'digits' has the name of a variant"),
        ({"imagegen-1": {"tiny-sd": "lots"}}, "valid number"),
    ],
)
def test_broken_aliases_fail_at_load(aliases: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_with_aliases(aliases)


def test_aliases_from_their_own_file(tmp_path: Path) -> None:
    (tmp_path / "aliases.yaml").write_text(yaml.safe_dump({"imagegen-1": {"digits": 9, "digits-ar": 1}}))
    base = yaml.safe_load(Path("serve_app/configs/default.yaml").read_text())
    variants = [str(Path("serve_app/configs").resolve() / entry) for entry in base["variants"]]
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({**base, "variants": variants, "aliases": "aliases.yaml"})
    )
    assert load_config(tmp_path / "config.yaml").aliases == {"imagegen-1": {"digits": 9.0, "digits-ar": 1.0}}


def test_choice_ignores_the_order_weights_are_written_in() -> None:
    forward = {"stable": 90.0, "canary": 10.0}
    backward = dict(reversed(forward.items()))
    assert all(
        choose_variant("m", forward, f"user:{i}") == choose_variant("m", backward, f"user:{i}")
        for i in range(500)
    )
