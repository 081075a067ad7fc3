"""The activation estimates against measurement: every stage run under TensorBytesTracker (exact
bytes of the tensors the forward passes create) on tiny and wider random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux_sharded import runner
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.handoff import GenerationSettings, Handoff
from flux_sharded.memory import TensorBytesTracker
from flux_sharded.plan import plan_run
from flux_sharded.stages import decode, denoise, encode
from flux_sharded.tiny import build_tiny_checkpoint

# An estimate may exceed the measured peak by the GPU margin and some slack, never fall below it.
MOST_OVER = 1.6


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", preset="small", seed=2)


def measured_and_planned(checkpoint_path: Path, dtype: str, height: int, width: int, sequence: int):
    settings = GenerationSettings(str(checkpoint_path), ("a photo of a dog",), (0,), 1, 3.5, height, width, sequence, dtype)
    checkpoint = resolve_checkpoint(str(checkpoint_path))
    request = runner.RunRequest(checkpoint, settings, {"cpu": 10**10}, Path("unused"))
    plan = plan_run(runner.plan_inputs(request), request.budget)
    handoff, results = Handoff(settings), {}
    for stage in (encode, denoise, decode):
        loaded = stage.load(checkpoint, plan.stage(stage.NAME), settings.torch_dtype)
        models = [loaded] if isinstance(loaded, torch.nn.Module) else list(loaded.components.values())
        existing = [t for model in models if isinstance(model, torch.nn.Module)
                    for t in (*model.parameters(), *model.buffers())]
        with TensorBytesTracker(existing=existing + list(handoff.tensors().values())) as tracker:
            output = stage.run(loaded, handoff)
        results[stage.NAME] = (tracker.peak_bytes, plan.stage(stage.NAME).activation_bytes["cpu"])
        handoff = output if stage is not decode else handoff
    return results


@pytest.mark.parametrize(
    "fixture, dtype, height, width, sequence",
    [
        ("tiny_checkpoint", "float32", 128, 128, 128),
        ("small_checkpoint", "float32", 256, 192, 128),
        ("small_checkpoint", "float32", 128, 128, 512),
        ("small_checkpoint", "bfloat16", 256, 256, 256),
    ],
)
def test_activation_estimates_bound_the_measured_peaks(request, fixture, dtype, height, width, sequence):
    results = measured_and_planned(request.getfixturevalue(fixture), dtype, height, width, sequence)
    for stage, (measured, planned) in results.items():
        assert measured > 0
        assert measured <= planned <= MOST_OVER * measured, (
            f"{stage}: planned {planned} vs measured {measured} ({planned / measured:.2f}x)"
        )
