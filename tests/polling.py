"""Waiting for state that changes elsewhere (a cluster, a replica, a subprocess): poll it with a
deadline, never sleep for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ray import serve

T = TypeVar("T")
DEADLINE_S = 300.0  # generous: a loaded 2-core machine is slow; passing tests never wait it out


def wait_until(
    condition: Callable[[], T | None], what: str, deadline_s: float = DEADLINE_S, interval_s: float = 0.5
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + deadline_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval_s)  # the pace of the polling, not a guess at when the state changes
    return result


def application_running(app_name: str) -> bool:
    """Whether Serve says ``app_name`` is RUNNING; a failed deploy fails the test at once."""
    application = serve.status().applications.get(app_name)
    if application is not None and application.status == "DEPLOY_FAILED":
        raise AssertionError(application.message)
    return application is not None and application.status == "RUNNING"
