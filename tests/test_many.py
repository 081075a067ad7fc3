"""Many prompts per run: each component loaded once, seeds by global index, batches, processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flux_sharded.cli import main
from flux_sharded.stages import STAGES

from .conftest import assert_same_pixels, one_piece_pixels

ROOT = Path(__file__).resolve().parents[1]  # this checkout, for the scripts the launchers run

PROMPTS = ["a photo of a dog", "a red car under the sky", "watercolor portrait of a cat", "night city street",
           "bird flying over a river"]
COMMON = ["--max-memory", "cpu=2GB", "--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32"]


def run(checkpoint, out: Path, *extra):
    result = CliRunner().invoke(main, ["--model", str(checkpoint), *COMMON, "--out", str(out),
                                       "--report", str(out / "report.json"), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_each_component_loads_once_for_many_prompts_and_seeds_follow_the_index(tiny_checkpoint, tmp_path, monkeypatch):
    loads = {stage.NAME: 0 for stage in STAGES}
    for stage in STAGES:
        def load(*args, _real=stage.load, _name=stage.NAME, **kwargs):
            loads[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(stage, "load", load)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "a red car under the sky"}\n{"prompt": "night city street", "seed": 99}\n')
    report = run(tiny_checkpoint, tmp_path / "out", "--prompt", PROMPTS[0], "--prompts-file", str(prompts_file),
                 "--num-images-per-prompt", "2", "--seed", "5")
    assert loads == {"upsample": 0, "encode": 1, "encode_image": 0, "denoise": 1, "decode": 1}  # no --image, no upsampler
    names = [Path(path).name for path in report["images"]]
    assert names == [
        "0000-5-a-photo-of-a-dog.png", "0001-6-a-photo-of-a-dog.png",
        "0002-7-a-red-car-under-the-sky.png", "0003-8-a-red-car-under-the-sky.png",
        "0004-99-night-city-street.png", "0005-100-night-city-street.png",
    ]
    # each image is the single-prompt one-piece image of its seed
    for path, prompt, seed in [(report["images"][1], PROMPTS[0], 6), (report["images"][5], "night city street", 100)]:
        assert_same_pixels(pixels(path), one_piece_pixels(tiny_checkpoint, prompt, seed, 2, 32, 32))
    assert [stage["images"] for stage in report["stages"]] == [6, 6, 6]
    encode, denoise = report["stages"][0], report["stages"][1]
    # the handoff kept in RAM between stages: 6 images of T5 (512 x 32) and CLIP (32) float32 embeddings, ...
    assert encode["handoff_bytes"] == 6 * (512 * 32 + 32) * 4 + 512 * 3 * 4
    assert denoise["handoff_bytes"] == encode["handoff_bytes"] + 6 * 4 * 16 * 4  # ... plus 2x2 tokens x 16 latents


def test_a_batch_of_four_equals_four_single_runs(tiny_checkpoint, tmp_path):
    """Batching changes only float rounding (matrix kernels block differently for other shapes):
    at most one level in a few pixel values, never a different image."""
    args = [arg for prompt in PROMPTS[:4] for arg in ("--prompt", prompt)]
    batched = run(tiny_checkpoint, tmp_path / "batched", *args, "--batch-size", "4")
    single = run(tiny_checkpoint, tmp_path / "single", *args)
    assert [Path(p).name for p in batched["images"]] == [Path(p).name for p in single["images"]]
    for batched_path, single_path in zip(batched["images"], single["images"]):
        difference = np.abs(pixels(batched_path).astype(int) - pixels(single_path).astype(int))
        assert difference.max() <= 1, f"max {difference.max()}, mean {difference.mean():.5f}"
        assert (difference > 0).mean() < 0.01, f"{(difference > 0).mean():.2%} of values differ"


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    # accelerate's torchrun-based launcher; on a machine without GPUs it must be asked for by name
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                   "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_equal_one_process(tiny_checkpoint, tmp_path, launcher):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    one = run(tiny_checkpoint, tmp_path / "one", "--prompts-file", str(prompts_file))
    result = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], "-m", "flux_sharded",
         "--model", str(tiny_checkpoint), *COMMON, "--prompts-file", str(prompts_file), "--out", str(tmp_path / "two"),
         "--report", str(tmp_path / "two" / "report.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [Path(p).name for p in two["images"]] == [Path(p).name for p in one["images"]]
    assert len(two["images"]) == 5
    for path_two, path_one in zip(two["images"], one["images"]):
        assert_same_pixels(pixels(path_two), pixels(path_one))
    assert [(stage["process"], stage["name"], stage["images"]) for stage in two["stages"]] == [
        (0, "encode", 3), (0, "denoise", 3), (0, "decode", 3), (1, "encode", 2), (1, "denoise", 2), (1, "decode", 2)
    ]
    assert result.stdout.count("wrote ") == 5  # the main process alone prints the table and the paths


def test_a_user_error_under_torchrun_stops_every_process_with_its_message(tiny_checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, *LAUNCHERS["torchrun"], "-m", "flux_sharded", "--model", str(tiny_checkpoint), *COMMON,
         "--steps", "0", "--prompt", "a dog", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"Error: [process {rank}] --steps 0: use 1 to 100000 steps" in result.stderr
    # torchrun prints its own report of the failed workers; no frame of ours is in it
    assert "flux_sharded/" not in result.stderr.replace("-m flux_sharded", "")
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_two_machines(tmp_path: Path, args: list[str]) -> None:
    """torchrun on two "machines" of one process each: two launchers meeting at a rendezvous on this
    host, each in its own working folder, so that a relative --out lands on each one's own disk."""
    port = _free_port()
    launchers = []
    for machine in (0, 1):
        (tmp_path / f"machine{machine}").mkdir(exist_ok=True)
        launchers.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={machine}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "flux_sharded", *args],
            cwd=tmp_path / f"machine{machine}", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ))
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    for machine, launcher in enumerate(launchers):
        assert launcher.returncode == 0, f"machine {machine}:\n{outputs[machine]}"


def test_two_machines_with_their_own_disks_run_and_resume(tiny_checkpoint, tmp_path):
    """Multi-node torchrun: each machine writes its share of the images and its own run folder
    (run.json included), so that either can resume; the images equal the one-process run's."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:3]) + "\n")
    one = run(tiny_checkpoint, tmp_path / "one", "--prompts-file", str(prompts_file))
    args = ["--model", str(tiny_checkpoint), *COMMON, "--prompts-file", str(prompts_file), "--out", "out",
            "--report", "report.json"]
    _launch_two_machines(tmp_path, args)

    shares = {machine: sorted((tmp_path / f"machine{machine}" / "out").glob("*.png")) for machine in (0, 1)}
    assert [path.name for path in shares[0] + shares[1]] == [Path(path).name for path in one["images"]]
    assert len(shares[0]) == 2 and len(shares[1]) == 1
    for path, expected in zip(shares[0] + shares[1], one["images"], strict=True):
        assert_same_pixels(pixels(path), pixels(expected))
    report = json.loads((tmp_path / "machine0" / "report.json").read_text())
    assert report["images"] == [str(path) for path in shares[0] + shares[1]]  # absolute, as each machine names them
    run_folders = {machine: list((tmp_path / f"machine{machine}" / "out" / ".flux-sharded").iterdir())
                   for machine in (0, 1)}
    assert all(len(folders) == 1 and (folders[0] / "run.json").is_file() for folders in run_folders.values())

    # The second machine loses its image: resuming both redoes only that one, from its own run folder.
    lost = shares[1][0]
    lost.unlink()
    relative_run_folder = run_folders[1][0].relative_to(tmp_path / "machine1")
    assert relative_run_folder == run_folders[0][0].relative_to(tmp_path / "machine0")
    _launch_two_machines(tmp_path, ["--resume", str(relative_run_folder)])
    assert_same_pixels(pixels(lost), pixels(one["images"][2]))


# bfloat16 and batches of two: a batch grouped otherwise (shares of single images) rounds a few
# pixels a level differently, so these runs fail if a share's batches depend on the process count.
RESUMABLE = ["--max-memory", "cpu=2GB", "--height", "32", "--width", "32", "--dtype", "bfloat16", "--batch-size", "2",
             *(arg for prompt in PROMPTS for arg in ("--prompt", prompt))]


def png_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


# flux-sharded whose processes each stop (SIGSTOP) right after keeping their first batch of
# latents: the test then kills them mid-denoise at a known point, however fast or slow they ran.
STOP_AFTER_FIRST_BATCH = """
import os, signal, sys
from flux_sharded import runner
from flux_sharded.cli import main

def save_then_stop(*args, _real=runner.save_batch_latents, **kwargs):
    _real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSTOP)

runner.save_batch_latents = save_then_stop
main(sys.argv[1:])
"""


def test_a_run_of_two_processes_killed_in_denoise_resumes_with_one(tiny_checkpoint, tmp_path):
    """Killed once both encode handoffs and each process's first batch of latents are saved (process
    0 shares batches 0 and 1, process 1 batch 2): one process takes the embeddings of both shares
    and the kept batches, redoes batch 1, and every PNG equals an uninterrupted run's."""
    import signal

    import psutil

    args = ["--model", str(tiny_checkpoint), *RESUMABLE, "--steps", "20"]
    reference = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    out = tmp_path / "out"
    script = tmp_path / "stop_after_first_batch.py"
    script.write_text(STOP_AFTER_FIRST_BATCH)
    launch = subprocess.Popen([sys.executable, *LAUNCHERS["torchrun"], str(script), *args, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        wanted = ["encode-process-0-of-2.json", "encode-process-1-of-2.json", "denoise-batch-from-image-0.safetensors",
                  "denoise-batch-from-image-4.safetensors"]
        while not all(list(out.glob(f".flux-sharded/run-*/{name}")) for name in wanted):
            with contextlib.suppress(subprocess.TimeoutExpired):  # waits on the files, without spinning
                launch.wait(timeout=0.05)
            assert launch.poll() is None, launch.communicate()[0]
    finally:  # the workers run in sessions of their own: each is killed by its process id
        if launch.poll() is None:
            for process in [*psutil.Process(launch.pid).children(recursive=True), psutil.Process(launch.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
        launch.communicate()
    (run_dir,) = (out / ".flux-sharded").iterdir()
    assert not list(out.glob("*.png")) and not list(run_dir.glob("denoise-process-*")), "killed after denoise"
    resumed = CliRunner().invoke(main, ["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert f"encode: finished earlier, its handoff is in {run_dir}" in resumed.output
    assert "denoise: 3 of 5 image(s) finished earlier" in resumed.output
    assert png_bytes(out) == png_bytes(tmp_path / "reference")
    assert json.loads((run_dir / "run.json").read_text())["resumed_processes"] == [1]
    # the two processes' handoffs are superseded by the one process's, which holds every image
    assert not list(run_dir.glob("*-process-*")), sorted(path.name for path in run_dir.iterdir())
    assert (run_dir / "denoise.json").exists()


def test_a_run_of_one_process_interrupted_after_a_batch_resumes_with_two(tiny_checkpoint, tmp_path, monkeypatch):
    from flux_sharded import runner

    args = ["--model", str(tiny_checkpoint), *RESUMABLE, "--steps", "2"]
    reference = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output

    def interrupted(*a, _real=runner.save_batch_latents, **k):  # Ctrl-C once the first batch is kept
        _real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_batch_latents", interrupted)
    out = tmp_path / "out"
    first = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert first.exit_code == 130, first.output
    monkeypatch.undo()
    (run_dir,) = (out / ".flux-sharded").iterdir()
    assert {path.name for path in run_dir.iterdir()} == {"run.json", "encode.safetensors", "encode.json",
                                                          "denoise-batch-from-image-0.safetensors"}
    result = subprocess.run([sys.executable, *LAUNCHERS["torchrun"], "-m", "flux_sharded", "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "denoise: 2 of 4 image(s) finished earlier" in result.stdout + result.stderr  # process 0: batch 0 kept
    # Each process says once what it takes over, after the main one's budget line, named as its errors are.
    # (A line of process 1 may land after the main process's bar, which shares the terminal.)
    said = [match.group(0) for match in re.finditer(r"(\[process \d\] )?encode: finished earlier", result.stderr)]
    assert sorted(said) == ["[process 1] encode: finished earlier", "encode: finished earlier"], result.stderr
    assert result.stderr.index("budget: ") < result.stderr.index("encode: finished earlier"), result.stderr
    assert {path.name for path in run_dir.glob("*.json")} == {  # the one process's handoffs are superseded
        "run.json", "encode-process-0-of-2.json", "encode-process-1-of-2.json", "denoise-process-0-of-2.json",
        "denoise-process-1-of-2.json"}
    assert not (run_dir / "encode.safetensors").exists()
    assert png_bytes(out) == png_bytes(tmp_path / "reference")
