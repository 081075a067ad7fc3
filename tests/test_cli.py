"""The command line: help, the README's usage block, and one `Error: ...` line per user mistake."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux_sharded.cli import main

# The README's usage block is the help as a 100-column terminal shows it (HELP_WIDTH).
from .conftest import HELP_WIDTH, error_lines, invoke

ROOT = Path(__file__).resolve().parents[1]


def test_short_and_long_help_are_the_same():
    long, short = invoke(["--help"]), invoke(["-h"])
    assert long.exit_code == short.exit_code == 0
    assert long.output == short.output
    assert "--max-memory SPEC" in long.output


def test_readme_usage_block_is_the_help():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- usage:.*?-->\n```\n(.*?)```", readme, re.S)
    assert block, "README.md lost its usage block"
    assert block.group(1) == invoke(["--help"]).output


def test_python_dash_m_works_like_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "flux_sharded", "-h"], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "COLUMNS": str(HELP_WIDTH)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: flux-sharded [OPTIONS]")


def tiny_args(checkpoint, out):
    return ["--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--steps", "1",
            "--height", "32", "--width", "32", "--out", str(out)]


def with_option(args, option, value):
    """Replace `option`'s value in args (or add it)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


ERROR_CASES = [
    # (option, value, message fragment)
    ("--max-memory", "cpu=16XB", "'XB' is an unknown unit"),
    ("--max-memory", "cpu=2GB,cpu=3GB", "'cpu' is given twice"),
    ("--max-memory", "cpu=2GB,,", "has an empty entry"),
    ("--max-memory", "cpu=0GB", "the size must be positive"),
    ("--max-memory", "cpu=99999999TB", "cpu=99999999TB is more than 1 PB"),
    ("--max-memory", "vram=2GB", "'vram' is an unknown device"),
    ("--max-memory", "0=16GB", "GPU 0 does not exist; this machine has no GPU"),
    ("--height", "50", "--height 50 is not a positive multiple of 16"),
    ("--width", "8", "--width 8 is not a positive multiple of 16"),
    ("--height", "0", "--height 0 is not a positive multiple of 16"),
    ("--steps", "0", "--steps 0: use 1 to 100000 steps"),
    # the ranges a saved run.json is checked against: a run that starts can always be resumed
    ("--steps", "100001", "--steps 100001: use 1 to 100000 steps"),
    ("--width", str(2**20 + 16), f"--width {2**20 + 16}: at most {2**20} pixels"),
    ("--batch-size", str(2**20 + 1), f"--batch-size {2**20 + 1}: at most {2**20}"),
    ("--guidance", "-1", "--guidance -1.0: give a finite guidance scale of 0 or more"),
    ("--guidance", "nan", "--guidance nan: give a finite guidance scale of 0 or more"),
    ("--guidance", "inf", "--guidance inf: give a finite guidance scale of 0 or more"),
    ("--max-sequence-length", "513", "--max-sequence-length 513: use 1 to 512"),
    ("--prompt", "   ", "an empty prompt cannot be generated"),
    ("--dtype", "int8", "'int8' is not one of 'bfloat16', 'float16', 'float32'"),
    ("--steps", "many", "'many' is not a valid integer"),
    ("--prompts-file", "/nonexistent/prompts.txt", "--prompts-file '/nonexistent/prompts.txt' does not exist"),
    ("--batch-size", "0", "--batch-size 0: give at least 1"),
    ("--num-images-per-prompt", "0", "--num-images-per-prompt 0: give at least 1"),
    ("--seed", str(2**64), f"--seed: image 0 would use seed {2**64}, outside"),
    ("--seed", str(-(2**63) - 1), "outside -9223372036854775808..18446744073709551615"),
    ("--max-memory", "cpu=2GB,disk=10GB", "--max-memory has a disk entry but no --offload-folder"),
]


@pytest.mark.parametrize("option, value, message", ERROR_CASES)
def test_user_mistakes_give_one_error_line_and_write_nothing(tiny_checkpoint, tmp_path, option, value, message,
                                                            monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "out"
    result = invoke(with_option(tiny_args(tiny_checkpoint, out), option, value))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert message in line
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert not out.exists()


def test_empty_prompts_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n\n")
    result = invoke(["--model", str(tiny_checkpoint), "--prompts-file", str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert "holds no prompt" in line
    assert not (tmp_path / "out").exists()


def test_missing_prompt(tiny_checkpoint, tmp_path):
    result = invoke(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "Error: no prompt given" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("{tmp}/nowhere", "folder '{tmp}/nowhere' does not exist"),
        ("{tmp}/empty", "is not a FLUX.1 diffusers checkpoint (missing scheduler, text_encoder, text_encoder_2"),
    ],
)
def test_bad_model_folders(tmp_path, model, message):
    (tmp_path / "empty").mkdir()
    model, message = model.format(tmp=tmp_path), message.format(tmp=tmp_path)
    result = invoke(["--model", model, "--prompt", "a dog", "--max-memory", "cpu=1GB", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_model_neither_local_nor_in_the_hub_cache(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_sharded", "--model", "no-such-user/no-such-model", "--prompt", "a dog",
         "--max-memory", "cpu=1GB", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert "'no-such-user/no-such-model' is not a local folder and the Hugging Face hub could not be reached" in line
    assert "hf download" not in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_flux_pipeline(tiny_checkpoint, tmp_path):
    import shutil

    other = tmp_path / "sd"
    shutil.copytree(tiny_checkpoint, other)
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    result = invoke(tiny_args(other, tmp_path / "out"))
    assert result.exit_code == 2
    assert "holds a StableDiffusionPipeline, not a FluxPipeline" in result.output


@pytest.mark.parametrize(
    "out, message",
    [
        ("{tmp}/a-file", "is a file, not a folder"),
        ("{tmp}/a-file/below", "cannot write in"),
        ("/proc/flux-sharded-out", "cannot write in '/proc/flux-sharded-out'"),
    ],
)
def test_unusable_out_folder(tiny_checkpoint, tmp_path, out, message):
    (tmp_path / "a-file").write_text("not a folder")
    out = out.format(tmp=tmp_path)
    result = invoke(tiny_args(tiny_checkpoint, out))
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert message.format(tmp=tmp_path) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--run-dir", "{tmp}/a-file", "--run-dir: '{tmp}/a-file' is a file, not a folder; give a folder (created if "
                                      "missing)"),
        ("--offload-folder", "{tmp}/a-file", "--offload-folder: '{tmp}/a-file' is a file, not a folder; give a folder"),
        ("--report", "{tmp}", "--report: '{tmp}' is a folder; give a file in it, e.g. {tmp}/report.json"),
    ],
)
def test_a_file_given_for_a_folder_or_a_folder_for_a_file_names_the_fix(tiny_checkpoint, tmp_path, option, value,
                                                                       message):
    (tmp_path / "a-file").write_text("not a folder")
    result = invoke([*tiny_args(tiny_checkpoint, tmp_path / "out"), option, value.format(tmp=tmp_path)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert line.startswith("Error: " + message.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_out_folder_probe_leaves_no_trace(tiny_checkpoint, tmp_path):
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.handoff import GenerationSettings
    from flux_sharded.runner import RunRequest, check_request

    out = tmp_path / "new" / "deeper"
    settings = GenerationSettings(str(tiny_checkpoint), ("a dog",), (0,), 1, 3.5, 32, 32, 512, "float32")
    paths = check_request(RunRequest(resolve_checkpoint(str(tiny_checkpoint)), settings, {"cpu": 10**9}, out))
    assert paths == [out / "0000-0-a-dog.png"]
    assert list(tmp_path.iterdir()) == []


def test_existing_image_is_never_overwritten(tiny_checkpoint, tmp_path):
    first = invoke(tiny_args(tiny_checkpoint, tmp_path))
    assert first.exit_code == 0, first.output
    (image,) = tmp_path.glob("*.png")
    before = image.read_bytes()
    second = invoke(tiny_args(tiny_checkpoint, tmp_path))
    assert second.exit_code == 2
    (run_dir,) = (tmp_path / ".flux-sharded").iterdir()
    assert f"Error: --out: the run in {run_dir} finished: its 1 image(s) exist, nothing is left to resume; " \
           "pass --overwrite to make them again" in second.output
    assert image.read_bytes() == before
    shutil.rmtree(run_dir)  # an image of no run of ours
    third = invoke(tiny_args(tiny_checkpoint, tmp_path))
    assert third.exit_code == 2
    assert f"Error: --out: {image} already exists" in third.output
    assert image.read_bytes() == before


def test_successful_run_prints_table_and_paths(tiny_checkpoint, tmp_path):
    result = invoke(tiny_args(tiny_checkpoint, tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table_start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    assert [line.split()[0] for line in lines[table_start + 1 : table_start + 4]] == ["encode", "denoise", "decode"]
    assert lines[-1] == f"wrote {tmp_path / '0000-0-a-dog.png'}"


def fake_hub_cache(hf_home: Path, repo_id: str, checkpoint: Path) -> None:
    """The Hugging Face cache layout, as `hf download` leaves it, holding `checkpoint`."""
    import shutil

    revision = "0" * 40
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_a_hub_id_runs_from_the_hugging_face_cache_offline(tiny_checkpoint, tmp_path):
    fake_hub_cache(tmp_path / "hf", "someone/tiny-flux", tiny_checkpoint)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    base = [sys.executable, "-m", "flux_sharded", "--model", "someone/tiny-flux", "--prompt", "a dog",
            "--max-memory", "cpu=1GB", "--height", "32", "--width", "32", "--steps", "1"]
    planned = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert planned.returncode == 0, planned.stderr
    assert "encode   cpu" in planned.stdout
    ran = subprocess.run([*base, "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "0000-0-a-dog.png").exists()


@pytest.mark.parametrize("args", [["--max-memory", "0=16"], ["--dtype", "float64"], ["--bogus"],
                                  ["--steps", "many"]])
def test_a_bad_option_value_is_one_line_without_click_usage(args):
    result = invoke(["--prompt", "a dog", *args])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("Error: "), result.output


def test_a_model_that_is_a_file_says_so(tmp_path):
    (tmp_path / "model").write_text("not a folder")
    result = invoke(["--prompt", "a dog", "--model", str(tmp_path / "model"), "--dry-run"])
    assert result.exit_code == 2
    assert f"--model: folder '{tmp_path / 'model'}' is a file, not a folder" in result.output
