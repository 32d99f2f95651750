"""The idle-CPU benchmark names each process the way an operator recognises it."""

from __future__ import annotations

import os

import pytest

from benchmarks.idle_cpu import parse_env
from benchmarks.machine import process_label, session_cpu


@pytest.mark.parametrize(
    ("cmdline", "label"),
    [
        (["ray::ServeReplica:imagegen:Ingress", ""], "ray::ServeReplica:imagegen:Ingress"),
        (["ray::ServeController.listen_for_change", ""], "ray::ServeController"),
        (["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py", "--x"], "python log_monitor.py"),
        (["/venv/bin/python", "-m", "serve_app.cli", "serve"], "python -m serve_app.cli"),
        (["/venv/ray/core/src/ray/raylet/raylet", "--flag"], "raylet"),
        ([], "?"),
    ],
)
def test_process_labels(cmdline: list[str], label: str) -> None:
    assert process_label(cmdline) == label


def test_session_cpu_finds_this_process_in_its_own_session() -> None:
    assert os.getpid() in session_cpu(os.getsid(0))


def test_env_settings_must_name_a_variable() -> None:
    assert parse_env(["A=1", "B="]) == {"A": "1", "B": ""}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_env(["=1"])
