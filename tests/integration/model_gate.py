"""A gate in front of every forward pass, so a test decides when a pass may compute.

`GatedDiffusion` is the real diffusion family (the real tiny model computes every image); it
only waits, before each forward pass, until the test's `ModelGate` actor is open. While the
gate is closed a pass is held in the replica with its tasks counted as ``running``, which makes
"while the model is busy" a state a test sets up instead of a race it hopes to win.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import ray

from deployments.contracts import ImageTask
from deployments.models.diffusion import DiffusionFamily
from deployments.models.registry import DenoisingHooks

GATE_NAME = "imagegen-test-model-gate"
GATE_NAMESPACE = "imagegen-tests"
GATED_FAMILY = f"{__name__}:GatedDiffusion"


@ray.remote(num_cpus=0)
class ModelGate:
    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()

    async def pass_through(self) -> None:
        await self.opened.wait()

    async def close(self) -> None:
        self.opened.clear()

    async def open(self) -> None:
        self.opened.set()


class GatedDiffusion(DiffusionFamily):
    def generate(self, tasks: Sequence[ImageTask], hooks: DenoisingHooks | None = None) -> list[np.ndarray]:
        gate = ray.get_actor(GATE_NAME, namespace=GATE_NAMESPACE)
        ray.get(gate.pass_through.remote())
        return super().generate(tasks, hooks)


def start_gate() -> ray.actor.ActorHandle:
    return ModelGate.options(name=GATE_NAME, namespace=GATE_NAMESPACE).remote()  # type: ignore[attr-defined]


@contextmanager
def closed(gate: ray.actor.ActorHandle) -> Iterator[None]:
    """Hold every forward pass until the block ends (or the test opens the gate itself)."""
    ray.get(gate.close.remote())
    try:
        yield
    finally:
        ray.get(gate.open.remote())
