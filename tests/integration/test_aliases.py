"""An alias splitting traffic between two variants, through the real service and the openai client."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from openai import OpenAI
from ray import serve

from deployments.config import GenerationLogConfig
from deployments.storage import ObjectStore
from serve_app.aliases import caller_identity, choose_variant
from serve_app.config import AppConfig
from serve_app.log_report import read_generation_log
from tests.integration.conftest import RunningService

APP_NAME = "imagegen-aliases"
ROUTE = "/aliases"
ALIAS = "imagegen-1"
WEIGHTS = {"tiny-sd": 3.0, "tiny-sd-b": 1.0}
CALLERS = 12
LOG_DEADLINE_S = 60.0


@dataclass(frozen=True)
class AliasService:
    client: OpenAI
    config: AppConfig


@pytest.fixture(scope="module")
def alias_service(service: RunningService) -> Iterator[AliasService]:
    from serve_app.app import build_app

    tiny = service.config.variants[0]
    resources = tiny.resources.model_copy(update={"num_cpus": 0.25})
    variants = [
        tiny.model_copy(update={"resources": resources}),
        tiny.model_copy(update={"name": "tiny-sd-b", "resources": resources}),
    ]
    storage = service.config.storage.model_copy(
        update={"log": GenerationLogConfig(flush_rows=1, flush_interval_s=0.5, include_prompt=True)}
    )
    data = service.config.model_dump()
    data.update(variants=variants, storage=storage, aliases={ALIAS: WEIGHTS})
    config = AppConfig.model_validate(data)  # validated: model_copy would skip the alias checks
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    client = OpenAI(base_url=f"{service.base_url}{ROUTE}/v1", api_key="sk-test", max_retries=0, timeout=120)
    try:
        yield AliasService(client, config)
    finally:
        serve.delete(APP_NAME)


def generate(client: OpenAI, prompt: str, **extra: str) -> tuple[str, dict[str, object]]:
    raw = client.images.with_raw_response.generate(
        model=ALIAS,
        prompt=prompt,
        size="64x64",
        quality="low",
        **extra,  # type: ignore[arg-type]
    )
    body = raw.parse().model_dump()
    assert raw.headers["x-model-alias"] == ALIAS
    return raw.headers["x-model-variant"], body


def test_models_list_aliases_and_variants_with_family(alias_service: AliasService) -> None:
    cards = {card.id: card.model_dump() for card in alias_service.client.models.list()}
    assert cards["tiny-sd"]["family"] == cards["tiny-sd-b"]["family"] == "diffusion"
    assert cards[ALIAS]["variants"] == WEIGHTS
    assert set(cards) == {"tiny-sd", "tiny-sd-b", ALIAS}


def test_alias_splits_sticky_per_caller(alias_service: AliasService) -> None:
    client = alias_service.client
    served: dict[str, str] = {}
    for i in range(CALLERS):
        user = f"caller-{i}"
        variant, body = generate(client, f"caller {i}", user=user)
        assert variant == choose_variant(ALIAS, WEIGHTS, caller_identity(user, "local"))
        assert body["variant"] == variant and body["alias"] == ALIAS
        served[user] = variant
    assert set(served.values()) == set(WEIGHTS)  # both sides of the split served someone
    # Asked again, in another order, every caller stays on its variant; a safety_identifier wins over user.
    for user in reversed(served):
        assert generate(client, "again", user=user)[0] == served[user]
        assert generate(client, "again", user="someone-else", safety_identifier=user)[0] == served[user]
    # Without an end user the tenant is the caller.
    tenant_variant = choose_variant(ALIAS, WEIGHTS, caller_identity(None, "local"))
    assert {generate(client, "no user")[0] for _ in range(3)} == {tenant_variant}
    # A variant named directly is served as named, with no alias.
    raw = client.images.with_raw_response.generate(model="tiny-sd-b", prompt="direct", size="64x64")
    assert raw.headers["x-model-variant"] == "tiny-sd-b" and "x-model-alias" not in raw.headers


def test_generation_log_records_variant_and_alias(alias_service: AliasService) -> None:
    variant, _ = generate(alias_service.client, "logged through the alias", user="logged-caller")
    store = ObjectStore(alias_service.config.storage)
    deadline = time.monotonic() + LOG_DEADLINE_S
    while True:
        log = read_generation_log(store)
        rows = log.filter(pc.equal(log["prompt"], "logged through the alias")).to_pylist()
        if rows:
            break
        assert time.monotonic() < deadline, "the generation log row never arrived"
        time.sleep(0.2)  # polling the store for the flusher's file
    assert Counter((row["variant"], row["alias"]) for row in rows) == {(variant, ALIAS): 1}


def test_eval_compares_a_variant_and_an_alias_online(alias_service: AliasService, tmp_path: Path) -> None:
    from benchmarks.compare import run_online, write_comparison
    from benchmarks.quality import digit_reader, prompt_set

    base_url = str(alias_service.client.base_url).removesuffix("/v1/")
    cases, reader = prompt_set(per_digit=1), digit_reader()
    rows = [run_online(base_url, model, cases, reader, 4, 1) for model in ("tiny-sd-b", ALIAS)]
    assert [(row.model, row.mode, row.images) for row in rows] == [
        ("tiny-sd-b", "online", 10),
        (ALIAS, "online", 10),
    ]
    assert rows[0].served_by == "tiny-sd-b 100%"
    expected = Counter(
        choose_variant(ALIAS, WEIGHTS, caller_identity(f"eval-{i}", "local")) for i in range(10)
    )
    assert rows[1].served_by == ", ".join(
        f"{name} {count / 10:.0%}" for name, count in sorted(expected.items())
    )
    assert all(0 <= row.correct_share <= 1 and row.images_per_s > 0 and row.p50_latency_s > 0 for row in rows)
    write_comparison(rows, tmp_path, "imagegen eval --url ...")
    table = pq.read_table(tmp_path / "comparison.parquet").to_pylist()
    assert [row["model"] for row in table] == ["tiny-sd-b", ALIAS]
    assert "| imagegen-1 | online | 1 | 10 |" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "comparison.png").stat().st_size > 0
