"""`imagegen serve`'s wait for the application (serve_app/deploy.py): it ends when the application
runs, when the user stops it, or, with the failing replica's own error, when Serve gives up on it.
Serve's status is read through `serve.status`; here it returns Serve's own status structures."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from ray import serve
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
from ray.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ServeStatus,
)

from serve_app import deploy
from serve_app.deploy import wait_until_running

APP = "imagegen"
CONSTRUCTOR_ERROR = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor "
    "or initial health check failing. See controller logs for details. Error:\n"
    'Traceback (most recent call last):\n  File "model_replica.py", line 1, in __init__\n'
    'ValueError: The provided pretrained_model_name_or_path "/no/weights" is neither a valid local path '
    "nor a valid repo id. Please check the parameter.\n"
)


def status(
    app: ApplicationStatus, model: DeploymentStatus = DeploymentStatus.UPDATING, message: str = ""
) -> ServeStatus:
    deployments = {
        "Ingress": DeploymentStatusOverview(
            DeploymentStatus.HEALTHY, DeploymentStatusTrigger.UNSPECIFIED, {}, ""
        ),
        "ModelReplica-tiny-sd": DeploymentStatusOverview(
            model, DeploymentStatusTrigger.UNSPECIFIED, {}, message
        ),
    }
    overview = ApplicationStatusOverview(
        app, "Failed to update the deployments ['ModelReplica-tiny-sd'].", 0.0, deployments
    )
    return ServeStatus(applications={APP: overview})


@pytest.fixture
def statuses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServeStatus]]:
    """Serve's answers, one per poll (the last one repeats); the poll itself does not wait."""
    answers: list[ServeStatus] = []
    monkeypatch.setattr(serve, "status", lambda: answers.pop(0) if len(answers) > 1 else answers[0])
    monkeypatch.setattr(deploy, "POLL_INTERVAL_S", 0.0)
    yield answers


def test_the_wait_ends_when_the_application_runs(statuses: list[ServeStatus]) -> None:
    statuses += [status(ApplicationStatus.DEPLOYING)] * 3 + [
        status(ApplicationStatus.RUNNING, DeploymentStatus.HEALTHY)
    ]
    assert wait_until_running(APP, threading.Event()) is True
    assert len(statuses) == 1  # it polled until RUNNING


def test_a_replica_that_cannot_start_ends_the_wait_with_its_own_error(statuses: list[ServeStatus]) -> None:
    statuses += [
        status(ApplicationStatus.DEPLOYING),
        status(ApplicationStatus.DEPLOY_FAILED, DeploymentStatus.DEPLOY_FAILED, CONSTRUCTOR_ERROR),
    ]
    with pytest.raises(RuntimeError) as failure:
        wait_until_running(APP, threading.Event())
    lines = str(failure.value).splitlines()
    assert lines[0] == (
        "application 'imagegen' failed to deploy: Failed to update the deployments ['ModelReplica-tiny-sd']."
    )
    assert lines[1:] == [f"  ModelReplica-tiny-sd: {CONSTRUCTOR_ERROR.strip().splitlines()[-1]}"]


def test_stopping_ends_the_wait_without_claiming_the_application_runs(statuses: list[ServeStatus]) -> None:
    statuses.append(status(ApplicationStatus.DEPLOYING))
    stop = threading.Event()
    stop.set()
    assert wait_until_running(APP, stop) is False
