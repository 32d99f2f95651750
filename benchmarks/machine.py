"""How busy the machine was with work that is not the benchmark's, so a report can say it.

On a shared box the numbers only mean something next to this: the CPU share that processes
outside the benchmark (its own process and each server's session) used while a system ran, and
the share the hypervisor stole. Linux only (``/proc``); elsewhere the figures are absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from deployments.model_replica import LANE_THREAD_PREFIX

PROC = Path("/proc")
MODEL_PASSES = "model passes"
"""In a `session_cpu` label: the forward passes' threads; everything else is outside the model."""


def _stat(folder: Path) -> tuple[int, float]:
    """The session and the CPU seconds so far (user + system) in a process's or thread's ``stat``
    under ``folder``; OSError or IndexError where it is gone or not readable."""
    fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes() -> Iterator[tuple[int, int, float, Path]]:
    """(pid, session, CPU seconds so far, its /proc folder) of every process still readable."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            session, cpu = _stat(entry)
        except (OSError, IndexError):
            continue  # gone, or not readable
        yield int(entry.name), session, cpu, entry


def _process_cpu(own_sessions: set[int]) -> dict[int, float]:
    """CPU seconds so far of every process whose session is not one of ``own_sessions``."""
    return {pid: cpu for pid, session, cpu, _ in _processes() if session not in own_sessions}


def process_label(cmdline: list[str]) -> str:
    """Ray's actor title (``ray::ServeReplica:app:Ingress``), else the program or script run."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):  # Ray appends the running method: ray::ServeController.run
        return cmdline[0].split(" ")[0].split(".")[0]
    program = Path(cmdline[0]).name
    if "-m" in cmdline[1:-1]:
        return f"{program} -m {cmdline[cmdline.index('-m') + 1]}"
    scripts = [Path(arg).name for arg in cmdline[1:] if arg.endswith(".py")]
    return f"{program} {scripts[0]}" if program.startswith("python") and scripts else program


def _model_threads_cpu(entry: Path) -> float | None:
    """CPU seconds so far of the model's compute threads in the process at ``entry`` (each lane's
    thread and the OpenMP team it started, which inherits its name); None where it has none."""
    total: float | None = None
    with suppress(OSError):
        for task in (entry / "task").iterdir():
            with suppress(OSError, IndexError):
                if (task / "comm").read_text().startswith(LANE_THREAD_PREFIX):
                    total = (total or 0.0) + _stat(task)[1]
    return total


def session_cpu(session: int) -> dict[int, tuple[str, float]]:
    """A label and the CPU seconds so far of every process in ``session``. A process that runs
    the model's forward passes (a model replica, or an ingress that holds the models) counts as
    two: its compute threads, labelled ``<process>: MODEL_PASSES`` under the negative pid, and
    the rest of it (request handling, Ray's threads) under its own."""
    usage: dict[int, tuple[str, float]] = {}
    for pid, own_session, cpu, entry in _processes():
        if own_session == session:
            with suppress(OSError):
                label = process_label((entry / "cmdline").read_text().split("\0"))
                passes = _model_threads_cpu(entry)
                if passes is None:
                    usage[pid] = (label, cpu)
                else:
                    usage[pid] = (label, cpu - passes)
                    usage[-pid] = (f"{label}: {MODEL_PASSES}", passes)
    return usage


def signal_session(session: int, signum: int) -> None:
    """Send ``signum`` to every process of ``session``: with SIGSTOP and SIGCONT, pause and resume
    a whole server, whose processes need not share one process group (Ray's do not)."""
    for pid, own_session, _, _ in _processes():
        if own_session == session:
            with suppress(ProcessLookupError):
                os.kill(pid, signum)


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    label: str
    share: float  # of one core over the window


def measure_idle(session: int, window_s: float) -> tuple[float, list[ProcessCpu]]:
    before = session_cpu(session)
    time.sleep(window_s)  # the measurement itself: the service is left alone for the window
    after = session_cpu(session)
    rows = [
        ProcessCpu(pid, label, (seconds - before[pid][1]) / window_s)
        for pid, (label, seconds) in after.items()
        if pid in before
    ]
    rows.sort(key=lambda row: row.share, reverse=True)
    return sum(row.share for row in rows), rows


def _steal_seconds() -> float:
    fields = (PROC / "stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


@dataclass
class ForeignLoad:
    """CPU used by others over one phase, as a share of every core's time."""

    other_processes: float
    stolen: float

    def describe(self) -> str:
        return f"others {self.other_processes:.0%}, stolen {self.stolen:.0%}"


class ForeignLoadMeter:
    """``start()`` then ``stop()`` around a phase; ``own_sessions`` are the benchmark's sessions."""

    def __init__(self) -> None:
        self.available = (PROC / "stat").exists()
        self.own_sessions = {os.getsid(0)}

    def start(self, *extra_sessions: int) -> None:
        self.own_sessions |= set(extra_sessions)
        if self.available:
            self._started = time.monotonic()
            self._cpu = _process_cpu(self.own_sessions)
            self._steal = _steal_seconds()

    def stop(self) -> ForeignLoad | None:
        if not self.available:
            return None
        elapsed = (time.monotonic() - self._started) * (os.cpu_count() or 1)
        now = _process_cpu(self.own_sessions)
        used = sum(seconds - self._cpu.get(pid, 0.0) for pid, seconds in now.items())
        return ForeignLoad(max(used, 0.0) / elapsed, (_steal_seconds() - self._steal) / elapsed)


@contextmanager
def noisy_neighbour(cores: int) -> Iterator[None]:
    """``cores`` processes that each burn one core while the block runs: the busy neighbour a
    shared machine has. Each is a session of its own, so the report counts it as foreign load."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(cores)
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
