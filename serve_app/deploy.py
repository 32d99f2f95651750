"""The service as a Serve config: what ``serve deploy`` takes, and how ``imagegen serve`` deploys.

Ray Serve 2.60 accepts an application-level autoscaling policy only in a Serve config
(``applications[].autoscaling_policy``); ``serve.run`` has no such argument. So an autoscaled
service is deployed from a config built here, and `serve_app.app:app` builds the application
from the same ``IMAGEGEN_*`` settings inside the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from serve_app.app import application_autoscaling_policy
from serve_app.config import AppConfig

APP_NAME = "imagegen"


def serve_config(config: AppConfig, config_path: Path, app_name: str = APP_NAME) -> dict[str, Any]:
    """A Serve config (``ServeDeploySchema``) for the service that ``config_path`` configures.

    The application reads its settings from ``IMAGEGEN_CONFIG`` and any other ``IMAGEGEN_*``
    variable set now, passed on in its runtime environment.
    """
    env_vars = {name: value for name, value in os.environ.items() if name.startswith("IMAGEGEN_")}
    env_vars["IMAGEGEN_CONFIG"] = str(config_path.resolve())
    application: dict[str, Any] = {
        "name": app_name,
        "route_prefix": "/",
        "import_path": "serve_app.app:app",
        "runtime_env": {"env_vars": env_vars},
    }
    if (policy := application_autoscaling_policy(config)) is not None:
        application["autoscaling_policy"] = policy
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [application],
    }


def deploy(config: AppConfig, config_path: Path, app_name: str = APP_NAME) -> None:
    """Deploy on the connected Ray cluster, as ``serve run <serve config>`` does; returns at once."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**serve_config(config, config_path, app_name))
    client = serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema)
