"""The idle-CPU benchmark names each process the way an operator recognises it."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from benchmarks.idle_cpu import parse_env
from benchmarks.machine import MODEL_PASSES, noisy_neighbour, process_label, session_cpu
from deployments.model_replica import LANE_THREAD_NAME, name_os_thread
from tests.polling import wait_until


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


def test_session_cpu_counts_a_model_lanes_threads_apart_from_the_rest_of_its_process() -> None:
    pid = os.getpid()
    before = session_cpu(os.getsid(0))
    assert -pid not in before  # no lane here yet

    def lane() -> None:
        name_os_thread(LANE_THREAD_NAME.format(lane=0))  # as a model replica names its lanes
        started = time.thread_time()
        while time.thread_time() - started < 0.3:  # a forward pass's worth of CPU
            pass
        done.wait()

    done = threading.Event()
    worker = threading.Thread(target=lane)
    worker.start()
    try:
        wait_until(lambda: session_cpu(os.getsid(0)).get(-pid, ("", 0.0))[1] >= 0.25, "no lane CPU")
        after = session_cpu(os.getsid(0))
    finally:
        done.set()
        worker.join()
    label, passes = after[-pid]
    assert label == f"{process_label(psutil.Process(pid).cmdline())}: {MODEL_PASSES}"
    # The lane's CPU is its own: the rest of the process (this thread, polling) grew by far less.
    assert after[pid][1] - before[pid][1] < passes - 0.1


def test_env_settings_must_name_a_variable() -> None:
    assert parse_env(["A=1", "B="]) == {"A": "1", "B": ""}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_env(["=1"])


def test_a_noisy_neighbour_burns_cpu_in_its_own_session_until_the_run_ends() -> None:
    own = os.getpid()
    with noisy_neighbour(1):
        burners = [
            child for child in psutil.Process(own).children() if child.cmdline()[-1] == "while True: pass"
        ]
        assert len(burners) == 1
        assert os.getsid(burners[0].pid) != os.getsid(0)  # counted as foreign load
        wait_until(lambda: burners[0].cpu_times().user > 0.2, "the neighbour never used the CPU")
    assert not psutil.pid_exists(burners[0].pid) or burners[0].status() == psutil.STATUS_ZOMBIE
