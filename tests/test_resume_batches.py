"""What a resume redoes, and says: whole batches as the run grouped them, nothing for a finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flux_sharded import runner
from flux_sharded.cli import main
from flux_sharded.stages import decode

from .conftest import assert_same_pixels

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]
PROMPTS = ("a dog", "a cat", "a red car")


def invoke(args):
    return CliRunner().invoke(main, args)


def first_run(checkpoint: Path, out: Path, *extra):
    args = ["--model", str(checkpoint), *COMMON, "--out", str(out), *extra]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (out / ".flux-sharded").iterdir()
    return args, run_dir, sorted(out.glob("*.png"))


def test_a_missing_image_is_decoded_again_with_its_batch_mates(tiny_checkpoint, tmp_path, monkeypatch):
    """Batched decoding rounds differently from single decoding: the image redone alone could differ."""
    args, run_dir, images = first_run(tiny_checkpoint, tmp_path / "out", "--batch-size", "2")
    original = tmp_path / "original.png"
    shutil.copy(images[1], original)
    images[1].unlink()
    untouched = images[0].stat().st_mtime_ns, images[2].stat().st_mtime_ns
    decoded = []
    monkeypatch.setattr(decode, "run", lambda vae, handoff, *a, _real=decode.run, **k:
                        decoded.append(handoff.settings.prompts) or _real(vae, handoff, *a, **k))
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert decoded == [("a dog", "a cat")]  # the first batch, as the run grouped it
    assert_same_pixels(np.asarray(Image.open(images[1])), np.asarray(Image.open(original)))
    assert (images[0].stat().st_mtime_ns, images[2].stat().st_mtime_ns) == untouched
    assert [line for line in result.stdout.splitlines() if line.startswith("wrote ")] == [f"wrote {images[1]}"]


def test_finished_runs_say_so(tiny_checkpoint, tmp_path):
    args, run_dir, images = first_run(tiny_checkpoint, tmp_path / "out")
    again = invoke(args)
    assert again.exit_code == 2
    (line,) = [line for line in again.output.splitlines() if line.startswith("Error: ")]
    assert f"the run in {run_dir} finished: its 3 image(s) exist, nothing is left to resume" in line
    assert "pass --overwrite to make them again" in line
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "wrote " not in resumed.output
    assert f"nothing to do: every image of the run in {run_dir} exists" in resumed.output


@pytest.mark.parametrize(
    "environment, command",
    [
        ({}, "flux-sharded --resume /runs/r"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"},
         "torchrun --nproc-per-node 2 -m flux_sharded --resume /runs/r"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"},
         "torchrun --nnodes 2 --nproc-per-node 2 -m flux_sharded --resume /runs/r"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"},
         "accelerate launch --num-processes 2 -m flux_sharded --resume /runs/r"),
    ],
)
def test_the_resume_command_repeats_the_launcher(monkeypatch, environment, command):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    request = runner.RunRequest(checkpoint=None, settings=None, budget={}, out_dir=Path("/out"), run_dir=Path("/runs/r"))
    assert request.resume_command.startswith(command)
