"""The Serve config of `imagegen config build` as Serve reads it: which edits roll the application
out (a new code version) and which are applied in place, and the routing the ingress is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.aliases import Routing
from serve_app.config import CONFIG_DIR
from serve_app.deploy import (
    DIRECT_INGRESS_VARIABLE,
    carried_variants,
    retiring,
    runs_direct_ingress,
    serve_config,
)
from serve_app.replica_environment import REPLICA_ENVIRONMENT

VARIANTS = CONFIG_DIR / "variants"
SHIPPED_SERVE_CONFIG = CONFIG_DIR / "serve_config.yaml"


def write_config(directory: Path, variants: list[str], aliases: dict[str, dict[str, float]]) -> Path:
    """A config naming shipped variant files (read in by `serve_config`) and ``aliases``."""
    for name in variants:
        (directory / f"{name}.yaml").write_text((VARIANTS / f"{name}.yaml").read_text())
    path = directory / "imagegen.yaml"
    path.write_text(yaml.safe_dump({"variants": [f"{name}.yaml" for name in variants], "aliases": aliases}))
    return path


def application(path: Path) -> dict[str, Any]:
    built = serve_config(path)
    ServeDeploySchema(**built)  # Serve accepts it
    entry: dict[str, Any] = built["applications"][0]
    return entry


def code_version(entry: dict[str, Any]) -> str:
    return get_app_code_version(ServeApplicationSchema(**entry))


def ingress_routing(entry: dict[str, Any]) -> dict[str, Any]:
    user_config: dict[str, Any] = next(d for d in entry["deployments"] if d["name"] == "Ingress")[
        "user_config"
    ]
    return user_config


def test_the_config_travels_in_the_serve_config_so_editing_a_variant_file_is_a_change(tmp_path: Path) -> None:
    before = application(write_config(tmp_path, ["digits"], {}))
    assert before["import_path"] == "serve_app.app:app_builder"
    assert carried_variants(before) == {"digits"}
    variant_file = tmp_path / "digits.yaml"
    variant_file.write_text(variant_file.read_text().replace("guidance_scale: 4.0", "guidance_scale: 5.0"))
    after = application(tmp_path / "imagegen.yaml")
    assert code_version(after) != code_version(before)  # Serve rolls the application out


def test_adding_a_variant_rolls_the_application_out(tmp_path: Path) -> None:
    before = application(write_config(tmp_path, ["digits"], {}))
    after = application(write_config(tmp_path, ["digits", "digits-ar"], {}))
    assert code_version(after) != code_version(before)
    assert carried_variants(after) == {"digits", "digits-ar"}


def test_reweighting_an_alias_changes_only_the_ingress_user_config(tmp_path: Path) -> None:
    before = application(
        write_config(tmp_path, ["digits", "digits-ar"], {"imagegen-1": {"digits": 9, "digits-ar": 1}})
    )
    after = application(
        write_config(tmp_path, ["digits", "digits-ar"], {"imagegen-1": {"digits": 1, "digits-ar": 1}})
    )
    assert code_version(after) == code_version(before)  # Serve reconfigures in place
    assert ingress_routing(after) == {"aliases": {"imagegen-1": {"digits": 1, "digits-ar": 1}}, "retired": []}


def test_retiring_a_variant_keeps_the_code_version_and_drops_it_from_aliases(tmp_path: Path) -> None:
    running = application(
        write_config(
            tmp_path, ["digits", "digits-ar"], {"one": {"digits": 1, "digits-ar": 1}, "ar": {"digits-ar": 1}}
        )
    )
    retired = retiring(running, ["digits-ar"])
    assert code_version(retired) == code_version(running)
    assert ingress_routing(retired) == {"aliases": {"one": {"digits": 1}}, "retired": ["digits-ar"]}
    assert ingress_routing(running)["retired"] == []  # the running entry is left as it was


def test_routing_is_checked_against_the_deployed_variants() -> None:
    variants = ["digits", "digits-ar"]
    routing = Routing.from_user_config(
        {"aliases": {"one": {"digits": 2}}, "retired": ["digits-ar"]}, variants
    )
    assert routing.serving(variants) == ["digits"]
    with pytest.raises(ValueError, match="unknown variants"):  # an alias may not pick a retired variant
        Routing.from_user_config({"aliases": {"one": {"digits-ar": 1}}, "retired": ["digits-ar"]}, variants)
    with pytest.raises(ValueError, match="not deployed"):
        Routing.from_user_config({"retired": ["tiny-sd"]}, variants)
    with pytest.raises(ValueError, match="retierd"):  # a typo in the Serve config fails loudly
        Routing.from_user_config({"retierd": ["digits"]}, variants)


def test_replicas_anywhere_get_serves_settings_for_them_and_a_value_set_now_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, ["digits"], {})
    for name in REPLICA_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert REPLICA_ENVIRONMENT.items() <= application(path)["runtime_env"]["env_vars"].items()
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    monkeypatch.setenv("IMAGEGEN_PORT", "8123")
    env_vars = application(path)["runtime_env"]["env_vars"]
    assert env_vars["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"
    assert env_vars["IMAGEGEN_PORT"] == "8123"


def test_the_shipped_serve_config_gives_replicas_the_same_settings() -> None:
    shipped = yaml.safe_load(SHIPPED_SERVE_CONFIG.read_text())
    assert shipped["applications"][0]["runtime_env"]["env_vars"] == REPLICA_ENVIRONMENT


def write_direct_config(directory: Path, direct: bool, colocate_models: bool = False) -> Path:
    path = write_config(directory, ["digits"], {})
    data = yaml.safe_load(path.read_text())
    ingress = {"direct": direct, "colocate_models": colocate_models}
    path.write_text(
        yaml.safe_dump({**data, "stages": {"ingress": ingress}, "scheduler": {"colocate": colocate_models}})
    )
    return path


def test_models_in_the_ingress_are_no_deployments_of_their_own(tmp_path: Path) -> None:
    built = serve_config(write_direct_config(tmp_path, direct=True, colocate_models=True), proxy_port=41234)
    ServeDeploySchema(**built)
    assert [deployment["name"] for deployment in built["applications"][0]["deployments"]] == ["Ingress"]
    apart = serve_config(write_direct_config(tmp_path, direct=True), proxy_port=41234)
    assert [deployment["name"] for deployment in apart["applications"][0]["deployments"]] == [
        "Ingress",
        "ModelReplica-digits",
    ]


def test_a_direct_ingress_gets_the_port_and_serves_proxy_another_only_under_imagegen_serve(
    tmp_path: Path,
) -> None:
    path = write_direct_config(tmp_path, direct=True)
    with pytest.raises(ValueError, match="imagegen serve"):  # `config build`, `config apply`
        serve_config(path)
    built = serve_config(path, proxy_port=41234)  # `imagegen serve`, which starts its own Ray
    ServeDeploySchema(**built)
    assert built["http_options"] == {"host": "127.0.0.1", "port": 41234}
    # The port asked for, direct or not (`imagegen serve` asks only for a direct ingress).
    behind_the_proxy = serve_config(write_direct_config(tmp_path, direct=False), proxy_port=41234)
    assert behind_the_proxy["http_options"]["port"] == 41234


@pytest.mark.parametrize(
    ("in_file", "variable", "direct"),
    [
        (True, None, True),
        (False, None, False),
        (False, "true", True),
        (True, "false", False),
        (True, "0", False),
    ],
)
def test_a_running_direct_ingress_is_read_from_its_config_or_the_variable_that_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_file: bool, variable: str | None, direct: bool
) -> None:
    if variable is not None:
        monkeypatch.setenv(DIRECT_INGRESS_VARIABLE, variable)
    entry = serve_config(write_direct_config(tmp_path, in_file), proxy_port=41234)["applications"][0]
    assert runs_direct_ingress(entry) is direct
