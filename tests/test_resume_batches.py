"""What a resume redoes, and says: whole batches as the run grouped them, nothing for a finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_sharded import runner
from flux_sharded.stages import decode

from .conftest import assert_same_pixels, invoke

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]
PROMPTS = ("a dog", "a cat", "a red car")


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


def test_a_resume_reads_only_the_rows_of_the_images_it_makes(tiny_checkpoint, tmp_path):
    """A process of a resume with more processes than the run had keeps only its images' rows of
    the share that saved them, not the whole share."""
    from flux_sharded.checkpoint import fingerprint_digest, resolve_checkpoint
    from flux_sharded.rundir import read_run, saved_handoffs

    args, run_dir, images = first_run(tiny_checkpoint, tmp_path / "out")
    run = read_run(run_dir)
    checkpoint, weights = resolve_checkpoint(str(tiny_checkpoint), need_weights=False), fingerprint_digest(run.weights)
    (handoff,) = saved_handoffs(run_dir, run.process_counts, run.settings, [1, 2], checkpoint, weights)
    assert handoff.settings == run.settings.subset([1, 2])
    assert handoff.finished_stages == ("encode", "denoise")
    assert [tuple(tensor.shape)[0] for name, tensor in handoff.tensors().items() if name != "text_ids"] == [2, 2, 2]
    (whole,) = saved_handoffs(run_dir, run.process_counts, run.settings, [0, 1, 2], checkpoint, weights)
    assert torch.equal(handoff.latents, whole.latents[1:])
    assert saved_handoffs(run_dir, run.process_counts, run.settings, [], checkpoint, weights) == []


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


TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
TWO_MACHINES = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
ACCELERATE = {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}


@pytest.mark.parametrize(
    "environment, launcher, command",
    [
        ({}, [], "flux-sharded --resume /runs/r"),
        # the launcher's command line (this process's parent), its options verbatim
        (TORCHRUN, ["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "-m", "flux_sharded",
                    "--prompt", "a dog"],
         "torchrun --nproc_per_node 2 -m flux_sharded --resume /runs/r"),
        (TWO_MACHINES, ["python3", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=2",
                        "--master_addr=10.0.0.1", "--master_port=29500", "-m", "flux_sharded", "--prompt", "a"],
         "torchrun --nnodes=2 --node_rank=1 --nproc_per_node=2 --master_addr=10.0.0.1 --master_port=29500 "
         "-m flux_sharded --resume /runs/r"),
        (TWO_MACHINES, ["/venv/bin/torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-id", "job 7",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "/venv/bin/flux-sharded", "--prompt",
                        "a"],
         "torchrun --nnodes 2 --nproc-per-node 2 --rdzv-id 'job 7' --rdzv-backend c10d --rdzv-endpoint head:29400 "
         "-m flux_sharded --resume /runs/r"),
        (TORCHRUN, ["/venv/bin/python", "/venv/bin/torchrun", "--nproc-per-node", "2", "--no-python", "flux-sharded",
                    "--prompt", "a"],
         "torchrun --nproc-per-node 2 -m flux_sharded --resume /runs/r"),
        (TORCHRUN, ["/venv/bin/python", "-m", "flux_sharded.launch", "--standalone", "--nproc_per_node=2", "-m",
                    "flux_sharded", "--prompt", "a"],
         "python -m flux_sharded.launch --standalone --nproc_per_node=2 -m flux_sharded --resume /runs/r"),
        ({**TWO_MACHINES, "ACCELERATE_MIXED_PRECISION": "no"},
         ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
          "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500", "--num_processes", "4", "-m",
          "flux_sharded", "--prompt", "a"],
         "accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 "
         "--main_process_port 29500 --num_processes 4 -m flux_sharded --resume /runs/r"),
        # the launcher's command line unreadable: rebuilt from the variables it set for its processes
        (TORCHRUN, [], "torchrun --nproc-per-node 2 -m flux_sharded --resume /runs/r"),
        (TWO_MACHINES, [], "torchrun --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 "
                           "--nproc-per-node 2 -m flux_sharded --resume /runs/r"),
        (ACCELERATE, ["bash"], "accelerate launch --multi_gpu --num_processes 2 -m flux_sharded --resume /runs/r"),
        ({**TWO_MACHINES, "ACCELERATE_MIXED_PRECISION": "no"}, [],
         "accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 "
         "--main_process_port 29500 --num_processes 4 -m flux_sharded --resume /runs/r"),
    ],
)
def test_the_resume_command_repeats_the_launcher(monkeypatch, environment, launcher, command):
    from flux_sharded import distributed

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_parent_command_line", lambda: launcher)
    request = runner.RunRequest(checkpoint=None, settings=None, budget={}, out_dir=Path("/out"), run_dir=Path("/runs/r"))
    assert request.resume_command == command
