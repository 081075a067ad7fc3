"""Nothing lost: stage checkpoints, resume after a failure or a kill, safe names, bad weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flux_sharded import interrupt, runner
from flux_sharded.files import atomic_write
from flux_sharded.images import SLUG_MAX_CHARS, slugify
from flux_sharded.stages import STAGES, decode, denoise

from .conftest import assert_same_pixels, error_lines, invoke

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-memory", "cpu=2GB", "--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def reference_images(checkpoint, tmp_path, prompts, *extra) -> list[Path]:
    out = tmp_path / "reference"
    args = ["--model", str(checkpoint), *COMMON, "--out", str(out), *extra]
    for prompt in prompts:
        args += ["--prompt", prompt]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*.png"))


def test_out_of_memory_in_denoise_then_resume_gives_the_same_images(tiny_checkpoint, tmp_path, monkeypatch):
    prompts = ["a photo of a dog", "a red car"]
    expected = reference_images(tiny_checkpoint, tmp_path, prompts)
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--prompt", prompts[0], "--prompt", prompts[1]]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.6 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(denoise, "run", out_of_memory)
        failed = invoke(args)
    assert failed.exit_code == 3, failed.output
    (line,) = error_lines(failed.output)
    run_dir = next((out / ".flux-sharded").iterdir())
    assert "denoise ran out of memory on GPU 0 (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has" in line
    assert "under --max-memory cpu=2.00 GB; the plan was cpu=" in line
    assert f"{run_dir / 'encode'}.safetensors holds the work before it" in line
    assert f"continue with: flux-sharded --resume {run_dir}" in line
    assert not list(out.glob("*.png"))

    loads = []
    for stage in STAGES:
        monkeypatch.setattr(stage, "load", lambda *a, _real=stage.load, _name=stage.NAME, **k: loads.append(_name)
                            or _real(*a, **k))
    resumed = invoke(["--resume", str(run_dir), "--max-memory", "cpu=3GB"])
    assert resumed.exit_code == 0, resumed.output
    assert loads == ["denoise", "decode"]  # encode's work was kept
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == [p.name for p in expected]
    for image, reference in zip(images, expected):
        assert_same_pixels(pixels(image), pixels(reference))
    assert resumed.stdout.count("wrote ") == 2
    again = invoke(["--resume", str(run_dir)])  # a finished run: nothing left to do, nothing rewritten
    assert again.exit_code == 0 and f"nothing to do: every image of the run in {run_dir} exists" in again.output
    assert "wrote " not in again.stdout
    assert "stage  device" not in again.stdout  # no empty table either


def test_a_full_disk_while_writing_an_image_then_resume(tiny_checkpoint, tmp_path, monkeypatch):
    """The second PNG cannot be written: one Error line with the way on (exit 4), no partial file;
    after space is freed, --resume decodes only that image, from the denoise checkpoint."""
    prompts = ["a photo of a dog", "a red car"]
    expected = reference_images(tiny_checkpoint, tmp_path, prompts)
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--prompt", prompts[0], "--prompt", prompts[1]]
    real_save_png = runner.save_png
    written = []

    def disk_full_at_the_second_image(image, path, metadata):
        if written:  # what a full disk does to an atomic write: part of the temporary file, then ENOSPC
            atomic_write(path, _write_part_then_run_out_of_space)
        real_save_png(image, path, metadata)
        written.append(path)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "save_png", disk_full_at_the_second_image)
        failed = invoke(args)
    assert failed.exit_code == 4, failed.output
    (line,) = error_lines(failed.output)
    run_dir = next((out / ".flux-sharded").iterdir())
    assert line.startswith(f"Error: could not write {out / expected[1].name} (No space left on device); ")
    assert f"{run_dir / 'denoise'}.safetensors holds the work before it" in line
    assert line.endswith(f"continue with: flux-sharded --resume {run_dir}")
    assert "Traceback" not in failed.output
    assert sorted(path.name for path in out.iterdir()) == [".flux-sharded", expected[0].name]  # no partial file

    loads = []
    monkeypatch.setattr(decode, "load", lambda *a, _real=decode.load, **k: loads.append("decode") or _real(*a, **k))
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert loads == ["decode"]
    for image, reference in zip(sorted(out.glob("*.png")), expected, strict=True):
        assert_same_pixels(pixels(image), pixels(reference))


def _write_part_then_run_out_of_space(tmp: str) -> None:
    Path(tmp).write_bytes(b"\x89PNG, the first bytes")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# Runs flux-sharded with the scheduler's step announcing itself on stdout and then waiting on
# stdin, which never answers, at the first step of the second image (COMMON's 2 steps per image):
# the test kills the process at that moment, whatever the machine's speed.
PAUSE_IN_DENOISE = """
import sys
from diffusers import FlowMatchEulerDiscreteScheduler
from flux_sharded.cli import main

real_step = FlowMatchEulerDiscreteScheduler.step
calls = []

def step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        print("denoising the second image", flush=True)
        sys.stdin.readline()
    return real_step(self, *args, **kwargs)

FlowMatchEulerDiscreteScheduler.step = step
main(sys.argv[1:])
"""


def test_a_killed_run_resumes_to_identical_images(tiny_checkpoint, tmp_path):
    """SIGKILL while denoising the second image, then --resume in a new process: the first image's
    latents were kept, the rest is redone, and the images equal an uninterrupted run's."""
    prompts = ["a photo of a dog", "a red car", "night city street"]
    out = tmp_path / "out"
    command = [sys.executable, "-c", PAUSE_IN_DENOISE, "--model", str(tiny_checkpoint), *COMMON, "--out", str(out)]
    for prompt in prompts:
        command += ["--prompt", prompt]
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline() == "denoising the second image\n", "the run ended before it got there"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stdin.close()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    assert not list(out.glob("*.png"))
    (run_dir,) = out.glob(".flux-sharded/run-*")
    assert (run_dir / "encode.safetensors").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("denoise") or ".tmp-" in p.name) == [
        "denoise-batch-from-image-0.safetensors"]

    resumed = subprocess.run([sys.executable, "-m", "flux_sharded", "--resume", str(run_dir)], cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "encode: finished earlier" in resumed.stderr
    assert "denoise: 1 of 3 image(s) finished earlier" in resumed.stderr
    assert not list(run_dir.glob("denoise-batch-*")), "the kept batches outlived the denoise handoff"
    expected = reference_images(tiny_checkpoint, tmp_path, prompts)
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == [p.name for p in expected]
    for image, reference in zip(images, expected):
        assert_same_pixels(pixels(image), pixels(reference))


def test_interrupt_prints_the_resume_command(tiny_checkpoint, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(denoise, "run", interrupted)
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog"])
    assert result.exit_code == 130
    run_dir = next((tmp_path / ".flux-sharded").iterdir())
    assert f"Interrupted. Continue with: flux-sharded --resume {run_dir}" in result.output
    assert (run_dir / "encode.safetensors").exists() and (run_dir / "run.json").exists()


class _SwallowsCtrlC:
    """An object whose finalizer is running when Ctrl-C arrives: Python prints "Exception ignored
    in ..." and drops the KeyboardInterrupt (os.kill checks for signals before it returns)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def python_ctrl_c():
    """SIGINT handled as Python starts a process (an interrupted in-process run leaves it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finalizer's
def test_a_ctrl_c_that_a_finalizer_swallowed_is_raised_again_by_check(python_ctrl_c):
    with interrupt.remembered():
        interrupt.check()  # nothing pressed yet
        _SwallowsCtrlC()  # dropped at once
        assert interrupt.pressed()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finalizer's
def test_a_ctrl_c_swallowed_in_a_stage_still_stops_the_run_at_the_next_step(tiny_checkpoint, tmp_path, monkeypatch,
                                                                            python_ctrl_c):
    real_run = denoise.run

    def swallowing(*args, **kwargs):
        _SwallowsCtrlC()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(denoise, "run", swallowing)
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog"])
    assert result.exit_code == 130, result.output
    run_dir = next((tmp_path / ".flux-sharded").iterdir())
    assert f"Interrupted. Continue with: flux-sharded --resume {run_dir}" in result.output
    assert not list(tmp_path.glob("*.png")) and not (run_dir / "denoise.safetensors").exists()
    assert (run_dir / "encode.safetensors").exists()


def test_a_ctrl_c_that_a_library_wrapped_in_its_own_error_reads_as_an_interruption(tiny_checkpoint, tmp_path,
                                                                                   monkeypatch, python_ctrl_c):
    def wrapping(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException as error:  # what a library that catches too much does
            raise RuntimeError("the library's own failure") from error

    monkeypatch.setattr(denoise, "run", wrapping)
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog"])
    assert result.exit_code == 130, result.output
    run_dir = next((tmp_path / ".flux-sharded").iterdir())
    assert f"Interrupted. Continue with: flux-sharded --resume {run_dir}" in result.output
    assert "Error:" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "3"], "--resume: --steps 3 conflicts with the saved run's 2"),
        (["--height", "64"], "--resume: --height 64 conflicts with the saved run's 32"),
        # named as the option the user types (it said --out-dir)
        (["--out", "elsewhere"], "--resume: --out elsewhere conflicts with the saved run's /"),
        (["--prompt", "another"], "the prompts or seeds given differ from the saved run's"),
        (["--dry-run"], "--resume and --dry-run cannot go together"),
    ],
)
def test_resume_refuses_changed_settings(tiny_checkpoint, tmp_path, extra, message):
    first = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog"])
    assert first.exit_code == 0, first.output
    run_dir = next((tmp_path / ".flux-sharded").iterdir())
    result = invoke(["--resume", str(run_dir), *extra])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert message in line
    same = invoke(["--resume", str(run_dir), "--steps", "2", "--prompt", "a dog"])  # repeating is fine
    assert same.exit_code == 0, same.output


def test_same_command_twice_needs_resume_or_overwrite(tiny_checkpoint, tmp_path):
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog"]
    assert invoke(args).exit_code == 0
    (image,) = tmp_path.glob("*.png")
    image.unlink()
    again = invoke(args)
    assert again.exit_code == 2
    assert "already holds a run; continue it with `flux-sharded --resume" in again.output
    image.write_bytes(b"not a png")
    overwritten = invoke([*args, "--overwrite"])
    assert overwritten.exit_code == 0, overwritten.output
    assert Image.open(image).size == (32, 32)


@pytest.mark.parametrize(
    "prompt",
    ["../../etc/passwd", "/absolute/path", "a\x00nul and \x07bell", "..", "x" * 5000, "日本語のプロンプト", "CON", "a/b\\c:d*e?f"],
)
def test_no_prompt_can_name_a_file_outside_out(prompt):
    slug = slugify(prompt)
    assert slug and len(slug) <= SLUG_MAX_CHARS
    assert set(slug) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert ".." not in slug and "/" not in slug


def test_hostile_prompts_from_a_file_stay_inside_out(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    hostile = ["../../escape", "/etc/passwd", "nul\u0000inside", "y" * 3000]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in hostile))
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--steps", "1", "--out", str(out),
                     "--prompts-file", str(prompts)])
    assert result.exit_code == 0, result.output
    written = sorted(p for p in tmp_path.rglob("*.png"))
    assert all(p.parent == out for p in written)
    assert [p.name for p in written] == [
        "0000-0-escape.png", "0001-1-etc-passwd.png", "0002-2-nul-inside.png", f"0003-3-{'y' * SLUG_MAX_CHARS}.png"
    ]


def test_png_metadata_records_the_settings(tiny_checkpoint, tmp_path):
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), "--prompt", "a dog",
                     "--seed", "7", "--guidance", "2.5"])
    assert result.exit_code == 0, result.output
    (image,) = tmp_path.glob("*.png")
    text = Image.open(image).text
    assert {key: text[key] for key in ("prompt", "seed", "steps", "guidance", "size", "dtype", "max_memory")} == {
        "prompt": "a dog", "seed": "7", "steps": "2", "guidance": "2.5", "size": "32x32", "dtype": "float32",
        "max_memory": "cpu=2.00 GB",
    }
    assert text["model"] == str(tiny_checkpoint)


def damaged(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"damaged-{how}"
    shutil.copytree(checkpoint, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) - 100])
    elif how == "garbage-header":
        weights.write_bytes(b"\xff" * 8 + data[8:])
    elif how == "pickle-only":
        weights.unlink()
        torch.save({"x": torch.zeros(1)}, copy / "transformer" / "diffusion_pytorch_model.bin")
    elif how == "no-weights":
        weights.unlink()
    elif how == "missing-shard":  # a sharded component whose second shard never arrived
        first = weights.rename(weights.with_name("diffusion_pytorch_model-00001-of-00002.safetensors"))
        with safe_open(first, "pt") as shard:
            names = list(shard.keys())
        weight_map = {name: f"diffusion_pytorch_model-0000{1 + position % 2}-of-00002.safetensors"
                      for position, name in enumerate(names)}
        (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return copy


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "diffusion_pytorch_model.safetensors is truncated or corrupt (its tensors need"),
        ("garbage-header", "diffusion_pytorch_model.safetensors is truncated or corrupt (its header claims"),
        ("pickle-only", "transformer has only pickle weights (diffusion_pytorch_model.bin)"),
        ("no-weights", "transformer has no weights"),
        ("missing-shard", "transformer lacks diffusion_pytorch_model-00002-of-00002.safetensors (listed in "
                          "diffusion_pytorch_model.safetensors.index.json)"),
    ],
)
def test_bad_weight_files_fail_before_the_first_stage(tiny_checkpoint, tmp_path, monkeypatch, how, message):
    loads = []
    for stage in STAGES:
        monkeypatch.setattr(stage, "load", lambda *a, _name=stage.NAME, **k: loads.append(_name))
    out = tmp_path / "out"
    result = invoke(["--model", str(damaged(tiny_checkpoint, tmp_path, how)), *COMMON, "--out", str(out),
                     "--prompt", "a dog"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert message in line
    assert loads == []
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "is not a folder; give the run folder a run printed"),
        ("empty", "is not a flux-sharded run folder (no run.json)"),
        ("garbage", "run.json cannot be read"),
    ],
)
def test_resume_of_something_that_is_not_a_run(tmp_path, setup, message):
    folder = tmp_path / "run"
    if setup != "missing":
        folder.mkdir()
    if setup == "garbage":
        (folder / "run.json").write_text("{not json")
    result = invoke(["--resume", str(folder)])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert message in line


def test_non_finite_latents_are_named_before_decode(tiny_checkpoint, tmp_path, monkeypatch):
    """A float16 overflow in the denoiser gives NaN latents and a black image: say so, and the fix."""
    real_run = denoise.run

    def overflowing(pipeline, handoff, *args, **kwargs):
        result = real_run(pipeline, handoff, *args, **kwargs)
        result.latents[1] = float("nan")
        return result

    monkeypatch.setattr(denoise, "run", overflowing)
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_checkpoint), *with_dtype(COMMON, "float16"), "--out", str(out),
                     "--prompt", "a dog", "--prompt", "a cat"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: the latents of")]
    assert notes == ["note: the latents of 0001-1-a-cat.png hold NaN or infinite values, so the image will be black; "
                     "float16 overflows where bfloat16, with float32's range, does not: use --dtype bfloat16"]


def with_dtype(args, dtype):
    args = list(args)
    args[args.index("--dtype") + 1] = dtype
    return args


def _stopped_before_decode(checkpoint: Path, out: Path) -> tuple[Path, np.ndarray, Path]:
    """A one-image run into `out`, its image then removed (a run stopped before decode wrote it):
    (the image's path, its pixels, the run folder)."""
    first = invoke(["--model", str(checkpoint), *COMMON, "--out", str(out), "--prompt", "a dog"])
    assert first.exit_code == 0, first.output
    (image,) = out.glob("*.png")
    expected = pixels(image)
    image.unlink()
    return image, expected, next((out / ".flux-sharded").iterdir())


def test_a_run_another_process_is_running_is_refused_until_it_ends(tiny_checkpoint, tmp_path):
    """Two resumes of one run (or a resume and the same command with --overwrite) wrote over each
    other's handoffs and images. While another process holds the run folder's lock (an flock on the
    folder, as a running flux-sharded holds it), a resume and a new run into that folder are each
    refused with one line, nothing written; once it is let go, the resume makes the same image."""
    import fcntl

    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--prompt", "a dog"]
    image, expected, run_dir = _stopped_before_decode(tiny_checkpoint, out)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    other = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)  # the other process's hold
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the same command (it said "--run-dir ... already holds a run ... start it again with --overwrite")
        for attempt, option in ((["--resume", str(run_dir)], "--resume"), ([*args, "--overwrite"], "--out"),
                                (args, "--out")):
            refused = invoke(attempt)
            assert refused.exit_code == 2, refused.output
            assert error_lines(refused.output) == [
                f"Error: {option}: the run in {run_dir} is being run right now by another flux-sharded process; two "
                "would write over each other's files: let that one finish or stop it, then continue with: "
                f"flux-sharded --resume {run_dir}"]
            assert "Traceback" not in refused.output and not list(out.glob("*.png"))
            assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before
    finally:
        os.close(other)
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(pixels(image), expected)


def test_a_resume_under_a_smaller_budget_plans_only_the_stages_left(tiny_checkpoint, tmp_path):
    """A run stopped before decode, resumed with a budget that encode (24 MB of activations) would
    not fit but decode does: it was refused for encode, which it does not run again."""
    image, expected, run_dir = _stopped_before_decode(tiny_checkpoint, tmp_path / "out")
    new_run = invoke(["--model", str(tiny_checkpoint), *COMMON, "--max-memory", "cpu=10MB", "--prompt", "a dog",
                      "--dry-run"])
    assert new_run.exit_code == 2 and "Error: encode (" in new_run.output, new_run.output  # encode: no room
    resumed = invoke(["--resume", str(run_dir), "--max-memory", "cpu=10MB"])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(pixels(image), expected)


def test_a_decode_left_under_too_small_a_budget_is_told_what_decode_needs(tiny_checkpoint, tmp_path):
    """The ways out of a resume's refusal fit the stages it still runs: it suggested encode's 17 MB
    for a resume that only decodes (found by the fresh-clone tester)."""
    import re

    image, expected, run_dir = _stopped_before_decode(tiny_checkpoint, tmp_path / "out")
    refused = invoke(["--resume", str(run_dir), "--max-memory", "cpu=100KB"])
    assert refused.exit_code == 2, refused.output
    (line,) = error_lines(refused.output)
    assert line.startswith("Error: decode (vae: ")
    suggested = re.search(r"Ways out: --max-memory (cpu=[0-9.]+[KM]B)", line).group(1)
    assert suggested.endswith("KB"), line  # decode's few hundred KB, not encode's MB
    resumed = invoke(["--resume", str(run_dir), "--max-memory", suggested])
    assert resumed.exit_code == 0, resumed.output
    assert_same_pixels(pixels(image), expected)
