"""What a new user meets in the first runs: the first screen, a plan they cannot run, the same
command again, a resume from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import invoke

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


def first_image_gone(out: Path) -> None:
    min(out.glob("*.png")).unlink()


def last_image_gone(out: Path) -> None:
    max(out.glob("*.png")).unlink()


def decode_undone(out: Path) -> None:
    for image in out.glob("*.png"):
        image.unlink()
    (run_dir,) = (out / ".flux-sharded").iterdir()
    for name in ("decode.json", "decode.safetensors"):
        (run_dir / name).unlink(missing_ok=True)


@pytest.mark.parametrize(
    "interrupt, exit_code, message",
    [
        # an image of the run is still there: the run folder, not the image, is what to talk about
        (last_image_gone, 2, "already holds a run; continue it with `flux-sharded --resume "),
        (first_image_gone, 2, "already holds a run; continue it with `flux-sharded --resume "),
        (decode_undone, 2, "already holds a run; continue it with `flux-sharded --resume "),
        (lambda out: None, 2, "finished: its 2 image(s) exist, nothing is left to resume; pass --overwrite"),
    ],
)
def test_the_same_command_after_an_unfinished_run_names_the_resume(tiny_checkpoint, tmp_path, interrupt, exit_code,
                                                                  message):
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--prompt", "a dog", "--prompt", "a cat", "--out", str(out)]
    assert invoke(args).exit_code == 0
    interrupt(out)
    kept = {image.name: image.read_bytes() for image in out.glob("*.png")}
    again = invoke(args)
    assert again.exit_code == exit_code, again.output
    (line,) = error_lines(again)
    assert message in line, line
    assert {image.name: image.read_bytes() for image in out.glob("*.png")} == kept  # nothing touched
    resumed = invoke(["--resume", line.split("--resume ")[1].split("`")[0]]) if "--resume " in line else None
    assert resumed is None or resumed.exit_code == 0, resumed.output
    assert len(list(out.glob("*.png"))) == 2


@pytest.mark.parametrize(
    "given_model, resume_from, exit_code, message",
    [
        ("tiny", "elsewhere", 0, None),  # run.json names the folder absolutely: found from anywhere
        ("./tiny", "work", 0, None),
        ("tiny", "work", 0, None),
        # repeating the model on a resume, as a relative path from another folder, is not a change
        ("tiny", "work-with-model", 0, None),
        ("tiny", "work-with-other-model", 2, "--model other conflicts with the saved run's"),
    ],
)
def test_a_run_of_a_relative_model_folder_resumes_from_any_folder(tiny_checkpoint, tmp_path, monkeypatch, given_model,
                                                                  resume_from, exit_code, message):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_checkpoint, work / "tiny")
    shutil.copytree(tiny_checkpoint, work / "other")
    monkeypatch.chdir(work)
    assert invoke(["--model", given_model, *COMMON, "--prompt", "a dog", "--out", "out"]).exit_code == 0
    (run_dir,) = (work / "out" / ".flux-sharded").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["settings"]["model"] == str(work / "tiny")
    (image,) = (work / "out").glob("*.png")
    image.unlink()
    extra = {"work-with-model": ["--model", "tiny"], "work-with-other-model": ["--model", "other"]}.get(resume_from, [])
    monkeypatch.chdir(elsewhere if resume_from == "elsewhere" else work)
    resumed = invoke(["--resume", str(run_dir), *extra])
    assert resumed.exit_code == exit_code, resumed.output
    if message:
        (line,) = error_lines(resumed)
        assert message in line, line
    else:
        assert error_lines(resumed) == [] and image.exists()


# CPUs the suite must pass on, as the environment a subprocess gets: this machine's own, and one
# whose bitsandbytes believes the CPU has AVX512-BF16 (tests/avx512_bf16/sitecustomize.py), which
# makes bitsandbytes log a kernels-community failure at import on every command.
CPUS = {"this CPU": {}, "AVX512-BF16": {"PYTHONPATH": os.pathsep.join((str(Path(__file__).parent / "avx512_bf16"),
                                                                        str(Path(__file__).parents[1])))}}


@pytest.mark.parametrize("cpu", CPUS)
def test_the_tiny_builder_prints_one_line_and_no_library_noise(tmp_path, cpu):
    """`make demo` starts with it: torchao's missing CUDA kernels, torch's enum warnings and
    bitsandbytes' kernels-community line, printed at diffusers' import, are not a new user's
    concern (a run of flux-sharded silences them too)."""
    built = subprocess.run([sys.executable, "-m", "flux_sharded.tiny", str(tmp_path / "tiny")], capture_output=True,
                           text=True, check=False, env={**os.environ, **CPUS[cpu]})
    assert built.returncode == 0, built.stderr
    assert built.stderr == ""
    (line,) = built.stdout.splitlines()
    assert line.endswith(f"written to {tmp_path / 'tiny'}"), line


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("family", ["FLUX.1", "FLUX.2-klein"])
def test_a_dry_run_prints_no_library_noise(tiny_checkpoint, tiny_klein, family, cpu):
    """Reading a FLUX.2 checkpoint imports diffusers before the run's own quieting did: torchao's
    missing CUDA kernels and torch's enum warnings came first on every FLUX.2 command."""
    checkpoint = {"FLUX.1": tiny_checkpoint, "FLUX.2-klein": tiny_klein}[family]
    planned = subprocess.run([sys.executable, "-m", "flux_sharded", "--model", str(checkpoint), "--prompt", "a dog",
                              "--height", "32", "--width", "32", "--max-memory", "cpu=1GB", "--dry-run"],
                             capture_output=True, text=True, check=False, env={**os.environ, **CPUS[cpu]})
    assert planned.returncode == 0, planned.stderr
    assert planned.stderr == ""


NO_GPU = "the nf4 transformer runs on a GPU only"


@pytest.mark.parametrize(
    "quantize, budget, exit_code, message",
    [
        ("nf4", "cpu=30GB", 2, NO_GPU),  # it fitted "on cpu", which a run then refused
        ("transformer=nf4", "cpu=30GB,disk=30GB", 2, NO_GPU),
        ("transformer=nf4", "0=100MB,cpu=30GB", 2, "Ways out: --max-memory 0=7.3GB,cpu=30GB"),  # not "fits on cpu"
        ("nf4", "0=8GB", 0, None),
        ("text_encoder_2=nf4", "cpu=30GB", 0, None),  # transformers runs 4-bit text encoders on the CPU
    ],
)
def test_a_dry_run_never_plans_an_nf4_transformer_off_the_gpus(quantize, budget, exit_code, message):
    result = invoke(["--prompt", "a dog", "--dry-run", "--quantize", quantize, "--max-memory", budget])
    assert result.exit_code == exit_code, result.output
    lines = error_lines(result)
    if message:
        (line,) = lines
        assert message in line, line
    else:
        assert lines == []


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "cpu=4GB,"], "Error: --max-memory 'cpu=4GB,' has an empty entry; remove the extra comma"),
    (["--max-memory", "cpu=4XB"], "Error: --max-memory: cpu=4XB: 'XB' is an unknown unit"),
    (["--steps", "abc"], "Error: --steps: 'abc' is not a valid integer."),
    (["--dtype", "float8"], "Error: --dtype: 'float8' is not one of 'bfloat16', 'float16', 'float32'."),
])
def test_a_bad_option_value_names_the_option_once(args, message):
    result = invoke(["--prompt", "a dog", "--dry-run", *args])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert line.startswith(message) and "Invalid value" not in line
