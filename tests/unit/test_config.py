"""Configuration: the embedded default loads, the environment overrides, typos fail at load time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import VariantConfig, parse_size
from deployments.model_replica import ColocatedModel
from serve_app.app import build_app
from serve_app.config import AppConfig, load_config, read_config_data


def test_default_config_loads() -> None:
    config = load_config()
    assert [variant.name for variant in config.variants] == ["digits", "digits-ar"]
    assert config.variant(None) is config.variants[0]
    assert config.variant("missing") is None
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.storage.url.startswith("file:///")


def test_environment_overrides_nested_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGEGEN_STORAGE__URL", f"file://{tmp_path}")
    monkeypatch.setenv("IMAGEGEN_PORT", "9123")
    config = load_config()
    assert config.storage.url == f"file://{tmp_path}"
    assert config.port == 9123
    assert config.storage.url_ttl_s == 3600


def test_config_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    variant = (Path(load_config.__code__.co_filename).parent / "configs/variants/tiny-sd.yaml").read_text()
    (tmp_path / "v.yaml").write_text(variant.replace("name: tiny-sd", "name: other"))
    (tmp_path / "app.yaml").write_text("port: 8100\nvariants: [v.yaml]\n")
    monkeypatch.setenv("IMAGEGEN_CONFIG", str(tmp_path / "app.yaml"))
    config = load_config()
    assert config.port == 8100 and config.variants[0].name == "other"


@pytest.mark.parametrize(
    "yaml_text",
    [
        "variants: []\n",
        "prot: 1\nvariants: [variants/tiny-sd.yaml]\n",
        "storage: {url: ./relative}\nvariants: [variants/tiny-sd.yaml]\n",
        "default_model: nope\nvariants: [variants/tiny-sd.yaml]\n",
    ],
)
def test_bad_configs_fail_when_read(tmp_path: Path, yaml_text: str) -> None:
    configs = Path(load_config.__code__.co_filename).parent / "configs"
    (tmp_path / "variants").mkdir()
    (tmp_path / "variants/tiny-sd.yaml").write_text((configs / "variants/tiny-sd.yaml").read_text())
    (tmp_path / "app.yaml").write_text(yaml_text)
    with pytest.raises(ValidationError):
        load_config(tmp_path / "app.yaml")


def test_variant_typos_and_bad_sizes_fail(tmp_path: Path) -> None:
    configs = Path(load_config.__code__.co_filename).parent / "configs"
    text = (configs / "variants/tiny-sd.yaml").read_text()
    for broken in (text + "max_batch: 4\n", text.replace('"64x64"', '"63x63"'), text + "family_x: 1\n"):
        (tmp_path / "v.yaml").write_text(broken)
        (tmp_path / "app.yaml").write_text("variants: [v.yaml]\n")
        with pytest.raises(ValidationError):
            load_config(tmp_path / "app.yaml")


def test_parse_size() -> None:
    assert parse_size("640x480") == (640, 480)
    with pytest.raises(ValueError, match="size"):
        parse_size("640 x 480")


@pytest.mark.parametrize(
    ("cpu_threads", "valid"), [(None, True), (2, True), ("all", True), (0, False), ("many", False)]
)
def test_cpu_threads_is_a_count_or_all(cpu_threads: object, valid: bool) -> None:
    variant = {**load_config().variants[0].model_dump(), "cpu_threads": cpu_threads}
    if valid:
        assert VariantConfig(**variant).cpu_threads == cpu_threads
    else:
        with pytest.raises(ValidationError, match="cpu_threads"):
            VariantConfig(**variant)


def test_all_cpu_threads_means_every_core_this_process_may_use() -> None:
    from deployments.models.diffusion import cpu_thread_count

    assert cpu_thread_count(3) == 3
    assert 1 <= cpu_thread_count("all") <= (os.cpu_count() or 1)


def test_benchmark_configs_load() -> None:
    configs = sorted((Path(__file__).parents[2] / "benchmarks" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert load_config(path).variants


@pytest.mark.parametrize(
    "ingress",
    [{"direct": True, "num_replicas": 2}, {"direct": True, "autoscaling": {"target_ongoing_requests": 8}}],
)
def test_a_direct_ingress_is_one_fixed_replica(ingress: dict[str, object]) -> None:
    data = read_config_data()  # the embedded default
    with pytest.raises(ValidationError, match="direct ingress"):
        AppConfig(**{**data, "stages": {"ingress": ingress}})
    assert AppConfig(**{**data, "stages": {"ingress": {"direct": True}}}).stages.ingress.direct


def test_a_colocated_scheduler_lives_only_in_a_direct_ingress_and_without_autoscaling() -> None:
    data = read_config_data()  # the embedded default
    direct = {"ingress": {"direct": True}}
    with pytest.raises(ValidationError, match=r"needs stages\.ingress\.direct"):
        AppConfig(**{**data, "scheduler": {"colocate": True}})
    scaled_stage = {**direct, "postprocess": {"autoscaling": {"target_ongoing_requests": 8}}}
    with pytest.raises(ValidationError, match=r"autoscaling \(postprocess\)"):
        AppConfig(**{**data, "stages": scaled_stage, "scheduler": {"colocate": True}})
    config = AppConfig(**{**data, "stages": direct, "scheduler": {"colocate": True}})
    assert config.scheduler.colocate


# The whole service in the direct ingress's process: scheduler and model replicas too.
ONE_SERVER = {
    "stages": {"ingress": {"direct": True, "colocate_models": True}},
    "scheduler": {"colocate": True},
}


def test_models_live_in_the_ingress_only_beside_a_colocated_scheduler_and_stages_with_one_replica() -> None:
    data = read_config_data()  # the embedded default: two variants
    with pytest.raises(ValidationError, match=r"needs scheduler\.colocate"):
        AppConfig(**{**data, "stages": {"ingress": {"direct": True, "colocate_models": True}}})
    apart = {"ingress": {"direct": True, "colocate_models": True}, "postprocess": {"colocate": False}}
    with pytest.raises(ValidationError, match=r"needs stages\.postprocess\.colocate"):
        AppConfig(**{**data, "stages": apart, "scheduler": {"colocate": True}})
    two_replicas = [{**data["variants"][0], "resources": {"num_replicas": 2}}, *data["variants"][1:]]
    with pytest.raises(ValidationError, match="several replicas"):
        AppConfig(**{**data, **ONE_SERVER, "variants": two_replicas})
    assert AppConfig(**{**data, **ONE_SERVER}).stages.ingress.colocate_models


def test_an_ingress_that_holds_the_models_asks_for_their_resources_too() -> None:
    data = read_config_data()  # the embedded default: two variants
    config = AppConfig(**{**data, **ONE_SERVER})
    ingress = build_app(config)._bound_deployment
    chain = ingress.init_args[1]
    assert all(isinstance(model, ColocatedModel) for model in chain.models.values())
    wanted = config.stages.ingress.num_cpus + sum(variant.resources.num_cpus for variant in config.variants)
    assert ingress.ray_actor_options["num_cpus"] == pytest.approx(wanted)
