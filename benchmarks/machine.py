"""How busy the machine was with work that is not the benchmark's, so a report can say it.

On a shared box the numbers only mean something next to this: the CPU share that processes
outside the benchmark (its own process and each server's session) used while a system ran, and
the share the hypervisor stole. Linux only (``/proc``); elsewhere the figures are absent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _process_cpu(own_sessions: set[int]) -> dict[int, float]:
    """CPU seconds so far of every process whose session is not one of ``own_sessions``."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[int, float] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone, or not readable
        session, utime, stime = int(fields[3]), int(fields[11]), int(fields[12])
        if session not in own_sessions:
            usage[int(entry.name)] = (utime + stime) / ticks
    return usage


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
