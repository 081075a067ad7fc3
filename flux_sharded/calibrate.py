"""Measure each stage's activation peak and set it beside the plan's estimate.

Runs the real stages (as the runner loads and runs them) on one image under
`memory.TensorBytesTracker`, which counts the exact bytes of every tensor the stage creates, the
weights and the incoming handoff excluded. Used by tests/test_activations.py to bound the
formulas of activations.py, and by benchmarks/activations.py to record the ratios. On a GPU the
same comparison is made with the CUDA allocator's peaks (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import runner
from .checkpoint import resolve_checkpoint
from .handoff import GenerationSettings, Handoff
from .memory import TensorBytesTracker
from .plan import plan_run
from .stages import STAGES


@dataclass(frozen=True)
class StageActivation:
    stage: str
    measured_bytes: int
    planned_bytes: int

    @property
    def ratio(self) -> float:
        return self.planned_bytes / self.measured_bytes


def measure_activations(checkpoint_path: Path, dtype: str, height: int, width: int,
                        max_sequence_length: int) -> list[StageActivation]:
    """Plan for the CPU, run the three stages on one prompt, return measured vs planned per stage."""
    settings = GenerationSettings(
        str(checkpoint_path), ("a photo of a dog",), (0,), 1, 3.5, height, width, max_sequence_length, dtype
    )
    checkpoint = resolve_checkpoint(str(checkpoint_path))
    request = runner.RunRequest(checkpoint, settings, {"cpu": 10**12}, Path("unused"))
    plan = plan_run(runner.plan_inputs(request), request.budget)
    handoff, results = Handoff(settings), []
    for stage in (stage for stage in STAGES if stage.NAME in settings.stages):
        loaded = stage.load(checkpoint, plan.stage(stage.NAME), settings.torch_dtype)
        modules = [loaded] if isinstance(loaded, torch.nn.Module) else list(loaded.components.values())
        existing = [tensor for module in modules if isinstance(module, torch.nn.Module)
                    for tensor in (*module.parameters(), *module.buffers())]
        with TensorBytesTracker(existing=existing + list(handoff.tensors().values())) as tracker:
            handoff = stage.run(loaded, handoff)
        results.append(StageActivation(stage.NAME, tracker.peak_bytes, plan.stage(stage.NAME).activation_bytes["cpu"]))
    return results
