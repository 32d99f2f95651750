"""The service as a Serve config: what ``serve deploy`` takes, and how a running service changes.

`serve_config` (``imagegen config build``) writes the configuration itself into the Serve config,
so that ``serve deploy`` of an updated one is a change Serve sees:

- the config file, its variant files read in, is the application's ``args``
  (`serve_app.app:app_builder` builds the application from them). A change there (a variant added
  or removed, any setting) rolls the application out: Serve starts new replicas of every
  deployment, each model loading its weights again, and stops the old ones once their calls end.
- the routing (aliases and their weights) is the ingress's ``user_config``: a change there is
  applied to the running ingress replicas in place; nothing restarts.
- each variant's batching is its model replica's ``user_config`` and a deployment's replica bounds
  are Serve options: edited in the Serve config's ``deployments`` entries, Serve applies them to
  the running replicas in place.

`apply` (``imagegen config apply``) deploys an updated config on a running service, and removes a
variant only once its work is done: it first retires it (no new work; the same application, so
nothing restarts), waits until the scheduler holds no queued or running work for it, then deploys
the config without it.

Ray Serve 2.60 accepts an application-level autoscaling policy only in a Serve config
(``applications[].autoscaling_policy``), so an autoscaled service is always deployed from one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from serve_app.aliases import Routing
from serve_app.app import application_autoscaling_policy
from serve_app.config import AppConfig, read_config_data
from serve_app.replica_environment import REPLICA_ENVIRONMENT

APP_NAME = "imagegen"
INGRESS = "Ingress"
SCHEDULER = "Scheduler"
DIRECT_INGRESS_VARIABLE = "IMAGEGEN_STAGES__INGRESS__DIRECT"
POLL_INTERVAL_S = 0.5
logger = logging.getLogger("imagegen.deploy")


def serve_config(
    config_path: Path | None = None, app_name: str = APP_NAME, proxy_port: int | None = None
) -> dict[str, Any]:
    """A Serve config (``ServeDeploySchema``) for the service that ``config_path`` configures.

    Every ``IMAGEGEN_*`` variable set now (settings, secrets) is passed on in the application's
    runtime environment, where it overrides the carried config as it overrides the file, and so
    are Serve's settings for our replicas (``REPLICA_ENVIRONMENT``; a value set now wins).

    Serve's proxy listens on the config's port, or on ``proxy_port`` where `imagegen serve` runs a
    direct ingress (``stages.ingress.direct``) on its own Ray; a Serve config for anything else
    cannot hold a direct ingress (ValueError).
    """
    data = read_config_data(config_path)
    config = AppConfig(**data)  # checked here, before anything is deployed
    if config.stages.ingress.direct and proxy_port is None:
        raise ValueError(
            "stages.ingress.direct is for `imagegen serve` on a Ray of its own, which it starts; "
            "a Serve config runs the ingress behind Serve's proxies: drop the setting"
        )
    env_vars = {name: os.environ.get(name, value) for name, value in REPLICA_ENVIRONMENT.items()}
    env_vars.update(
        (name, value)
        for name, value in os.environ.items()
        if name.startswith("IMAGEGEN_") and name != "IMAGEGEN_CONFIG"
    )
    routing = Routing(config.aliases)
    models = [  # none where they live in the ingress (stages.ingress.colocate_models)
        {"name": variant.deployment_name, "user_config": variant.batching.model_dump()}
        for variant in config.variants
        if not config.stages.ingress.colocate_models
    ]
    application: dict[str, Any] = {
        "name": app_name,
        "route_prefix": "/",
        "import_path": "serve_app.app:app_builder",
        "args": {"config": {key: value for key, value in data.items() if key != "aliases"}},
        "runtime_env": {"env_vars": env_vars},
        "deployments": [{"name": INGRESS, "user_config": routing.user_config()}, *models],
    }
    if (policy := application_autoscaling_policy(config)) is not None:
        application["autoscaling_policy"] = policy
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": proxy_port or config.port},
        "applications": [application],
    }


def deploy_serve_config(serve_config: dict[str, Any]) -> None:
    """Deploy a Serve config on the connected Ray cluster, as ``serve deploy`` does; returns at
    once. Applications the config does not name are deleted (Serve's declarative API)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**serve_config)
    client = serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema)


def deploy(config_path: Path | None = None, app_name: str = APP_NAME, proxy_port: int | None = None) -> None:
    """Deploy the service ``config_path`` configures on the connected Ray cluster; returns at
    once. ``proxy_port``: see `serve_config`."""
    deploy_serve_config(serve_config(config_path, app_name, proxy_port))


def apply(config_path: Path | None = None, app_name: str = APP_NAME, timeout_s: float = 1800.0) -> list[str]:
    """Bring the running service to ``config_path``'s config without dropping work, and wait
    until it runs; returns the variants removed.

    A variant the new config drops is first retired, in place (new requests for it get 404, the
    aliases stop choosing it), and removed only once the scheduler holds no queued or running work
    for it: its queued jobs and requests finish first.
    """
    target = serve_config(config_path, app_name)
    running = deployed_application(app_name)
    if runs_direct_ingress(running):
        raise ValueError(
            f"application {app_name!r} runs a direct ingress (stages.ingress.direct), which holds "
            "the port: a new ingress could not start beside it. Restart `imagegen serve` with the "
            "new config instead"
        )
    removed = sorted(carried_variants(running) - carried_variants(target["applications"][0]))
    if removed:
        logger.info("retiring %s: no new work; waiting for their queued and running work", removed)
        deploy_serve_config({**target, "applications": [retiring(running, removed)]})
        wait_for(lambda: application_running(app_name), "the retirement", timeout_s)
        wait_for(lambda: drained(app_name, removed), f"the work of {removed} to finish", timeout_s)
    deploy_serve_config(target)
    wait_for(lambda: application_running(app_name), "the new configuration", timeout_s)
    return removed


def deployed_application(app_name: str) -> dict[str, Any]:
    """The Serve config entry ``app_name`` runs now (it must have been deployed from a config)."""
    from ray.serve.context import _connect

    details = _connect().get_serve_details()
    application = details.get("applications", {}).get(app_name)
    deployed = application and application.get("deployed_app_config")
    if not deployed or "config" not in (deployed.get("args") or {}):
        raise RuntimeError(
            f"application {app_name!r} is not running from a Serve config of `imagegen config build`; "
            "deploy one first (`imagegen serve` or `imagegen config apply`)"
        )
    return dict(deployed)


def runs_direct_ingress(application: dict[str, Any]) -> bool:
    """Whether a Serve config entry from `serve_config` runs a direct ingress: set in its config,
    or by the ``IMAGEGEN_`` variable it carries, which wins as it does in the replicas."""
    env_vars = (application.get("runtime_env") or {}).get("env_vars") or {}
    ingress = application["args"]["config"].get("stages", {}).get("ingress", {})
    setting = env_vars.get(DIRECT_INGRESS_VARIABLE, ingress.get("direct", False))
    return TypeAdapter(bool).validate_python(setting)


def carried_variants(application: dict[str, Any]) -> set[str]:
    """The names of the variants a Serve config entry from `serve_config` deploys."""
    return {variant["name"] for variant in application["args"]["config"]["variants"]}


def retiring(application: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """``application`` (a deployed Serve config entry) with ``variants`` retired in its ingress's
    routing: the same code version, so Serve reconfigures the ingress and restarts nothing."""
    deployments = [dict(entry) for entry in application.get("deployments") or []]
    ingress = next((entry for entry in deployments if entry["name"] == INGRESS), None)
    if ingress is None:
        ingress = {"name": INGRESS}
        deployments.append(ingress)
    routing = Routing.from_user_config(ingress.get("user_config") or {}, carried_variants(application))
    ingress["user_config"] = routing.retiring(variants).user_config()
    return {**application, "deployments": deployments}


def application_running(app_name: str) -> bool:
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is not None and application.status == "DEPLOY_FAILED":
        # Serve's application message names the deployments; theirs end with the error itself.
        causes = [
            f"\n  {name}: {deployment.message.strip().splitlines()[-1]}"
            for name, deployment in application.deployments.items()
            if deployment.status == "DEPLOY_FAILED" and deployment.message.strip()
        ]
        raise RuntimeError(
            f"application {app_name!r} failed to deploy: {application.message}{''.join(causes)}"
        )
    return application is not None and application.status == "RUNNING"


def wait_until_running(app_name: str, stop: threading.Event) -> bool:
    """Wait for the application to run (True), or for ``stop`` (False); raises, with Serve's
    message, if it fails to deploy (a replica that cannot start, e.g. weights that do not load)."""
    while not application_running(app_name):
        if stop.wait(POLL_INTERVAL_S):
            return False
    return True


def drained(app_name: str, variants: list[str]) -> bool:
    """Whether the scheduler holds no queued or running work for any of ``variants``."""
    from ray import serve

    stats = serve.get_deployment_handle(SCHEDULER, app_name).stats.remote().result()
    queues = [stats["variants"].get(variant, {}) for variant in variants]
    return not any(count for queue in queues for key, count in queue.items() if key != "capacity")


def wait_for(condition: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)  # the pace of the polling: Serve has no event for these
