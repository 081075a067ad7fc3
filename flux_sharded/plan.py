"""Who goes where: one StagePlan per stage, computed before any weight is read.

The runner executes exactly these objects: each stage's `device_map` and `max_memory` are what
its `from_pretrained` receives. encode places whole text encoders with diffusers' pipeline-level
"balanced" strategy, denoise lets accelerate split the transformer block-wise ("auto"), and decode
puts the VAE on the device with the largest budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget import Budget


@dataclass(frozen=True)
class StagePlan:
    name: str  # "encode" | "denoise" | "decode"
    device_map: str | dict  # given to from_pretrained as device_map
    max_memory: Budget  # given to from_pretrained as max_memory

    @property
    def gpu_indices(self) -> list[int]:
        return sorted(key for key in self.max_memory if isinstance(key, int))


@dataclass(frozen=True)
class RunPlan:
    budget: Budget
    stages: tuple[StagePlan, ...]

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)

    @property
    def gpu_indices(self) -> list[int]:
        return sorted(key for key in self.budget if isinstance(key, int))


def decode_device(budget: Budget) -> str:
    """The GPU with the largest budget (lowest index on ties); the CPU when no GPU is budgeted."""
    gpus = [key for key in budget if isinstance(key, int)]
    if not gpus:
        return "cpu"
    return f"cuda:{max(gpus, key=lambda index: (budget[index], -index))}"


def plan_run(budget: Budget) -> RunPlan:
    device = decode_device(budget)
    decode_memory = {_key(device): budget[_key(device)]}
    return RunPlan(
        budget=budget,
        stages=(
            StagePlan("encode", device_map="balanced", max_memory=dict(budget)),
            StagePlan("denoise", device_map="auto", max_memory=dict(budget)),
            StagePlan("decode", device_map={"": device}, max_memory=decode_memory),
        ),
    )


def _key(device: str) -> int | str:
    return "cpu" if device == "cpu" else int(device.split(":")[1])
