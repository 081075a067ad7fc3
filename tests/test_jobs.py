"""A prompts file whose JSON lines give their own "image", "mask" and "negative_prompt" (jobs.py):
one run per set of inputs, each image equal to the one-piece pipeline's for its own inputs and
seed, each set of inputs encoded once; the same command continues an interrupted job; a bad line
is one Error line naming the file and line, with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_sharded.stages import STAGES

from .conftest import assert_same_pixels, error_line, invoke
from .test_images import mask, photo, tiny_kontext  # noqa: F401 (a fixture)

SEED, STRENGTH, TRUE_CFG = 5, 0.6, 4.0
LINES = [
    {"prompt": "a photo of a dog", "image": "a.png"},
    {"prompt": "a red car", "image": "a.png", "seed": 11},
    {"prompt": "a cat", "image": "inputs/b.png", "mask": "inputs/m.png"},
    {"prompt": "a tree", "negative_prompt": "blurry"},
]
# Each image's name: its index over the whole file, its seed (--seed + index, or its line's own)
NAMES = ["0000-5-a-photo-of-a-dog.png", "0001-11-a-red-car.png", "0002-7-a-cat.png", "0003-8-a-tree.png"]


def job_folder(tmp_path: Path, lines=LINES) -> Path:
    """The prompts file and its inputs, in a folder of their own (relative paths are the file's)."""
    folder = tmp_path / "job"
    (folder / "inputs").mkdir(parents=True)
    photo(folder / "a.png")
    photo(folder / "inputs" / "b.png", seed=2)
    mask(folder / "inputs" / "m.png")
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def job_args(checkpoint: Path, folder: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(checkpoint), "--prompts-file", str(folder / "jobs.jsonl"), "--steps", "2", "--seed",
            str(SEED), "--height", "32", "--width", "32", "--strength", str(STRENGTH), "--true-cfg", str(TRUE_CFG),
            "--dtype", "float32", "--max-memory", "cpu=4GB", "--out", str(out), *extra]


def one_piece(checkpoint: Path, folder: Path) -> dict[str, np.ndarray]:
    """Each line's image from diffusers' own pipeline for its inputs, whole, on the CPU."""
    import diffusers
    from diffusers.utils import load_image

    common = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 3.5, "true_cfg_scale": TRUE_CFG}

    def call(name: str, prompt: str, seed: int, **arguments) -> np.ndarray:
        pipeline = getattr(diffusers, name).from_pretrained(checkpoint, dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)
        return np.asarray(pipeline(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **common,
                                   **arguments).images[0])

    image, other, painted = (load_image(str(folder / name)) for name in ("a.png", "inputs/b.png", "inputs/m.png"))
    return {
        NAMES[0]: call("FluxImg2ImgPipeline", "a photo of a dog", 5, image=image, strength=STRENGTH, negative_prompt=""),
        NAMES[1]: call("FluxImg2ImgPipeline", "a red car", 11, image=image, strength=STRENGTH, negative_prompt=""),
        NAMES[2]: call("FluxInpaintPipeline", "a cat", 7, image=other, mask_image=painted, strength=STRENGTH,
                       negative_prompt=""),
        NAMES[3]: call("FluxPipeline", "a tree", 8, negative_prompt="blurry"),
    }


def runs_of(output: str) -> list[str]:
    """The output of each run, from its "run k of n: ..." line to the next one."""
    return re.split(r"^(?=run \d+ of \d+: )", output, flags=re.MULTILINE)[1:]


def table_rows(run_output: str, stage: str) -> int:
    return sum(1 for line in run_output.splitlines() if line.split()[:1] == [stage])


def test_each_set_of_inputs_is_one_run_and_every_png_equals_the_one_piece_pipelines(tiny_checkpoint, tmp_path):
    folder, out = job_folder(tmp_path), tmp_path / "out"
    result = invoke(job_args(tiny_checkpoint, folder, out))
    assert result.exit_code == 0, result.output
    runs = runs_of(result.output)
    assert [run.splitlines()[0] for run in runs] == [
        "run 1 of 3: lines 1-2, image a.png",
        "run 2 of 3: line 3, image b.png, mask m.png",
        "run 3 of 3: line 4, no image, negative prompt 'blurry'",
    ]
    # the two lines of one image: encode_image ran once for both (one row of the run's table)
    assert [table_rows(run, "encode_image") for run in runs] == [1, 1, 0]
    assert [table_rows(run, "denoise") for run in runs] == [1, 1, 1]
    assert sorted(path.name for path in out.glob("*.png")) == NAMES
    expected = one_piece(tiny_checkpoint, folder)
    for name in NAMES:
        assert_same_pixels(np.asarray(Image.open(out / name)), expected[name])
    # each run is a run of its own: its folder, run.json and PNG text fields name its inputs
    texts = {name: Image.open(out / name).text for name in NAMES}
    assert texts[NAMES[0]]["image"] == texts[NAMES[1]]["image"] != texts[NAMES[2]]["image"]
    assert "mask" in texts[NAMES[2]] and "image" not in texts[NAMES[3]]
    assert texts[NAMES[3]]["negative_prompt"] == "blurry" and "strength" not in texts[NAMES[3]]
    runs_json = sorted((out / ".flux-sharded").glob("run-*/run.json"))
    settings = sorted((json.loads(path.read_text())["settings"] for path in runs_json), key=lambda s: s["prompts"])
    assert [each["prompts"] for each in settings] == [["a cat"], ["a photo of a dog", "a red car"], ["a tree"]]
    assert [each["indices"] for each in settings] == [[2], [], [3]]  # the first lines' run: named as alone
    assert settings[0]["images"][0].startswith(str(folder / "inputs" / "b.png"))


def test_an_interrupted_job_continues_with_the_same_command_and_the_same_pixels(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    folder = job_folder(tmp_path)
    reference = tmp_path / "reference"
    assert invoke(job_args(tiny_checkpoint, folder, reference)).exit_code == 0
    out = tmp_path / "out"
    args = job_args(tiny_checkpoint, folder, out)
    denoise = next(stage for stage in STAGES if stage.NAME == "denoise")
    real = denoise.run
    calls = []

    def interrupted_in_the_second_run(*arguments, **keywords):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*arguments, **keywords)

    with monkeypatch.context() as patch:
        patch.setattr(denoise, "run", interrupted_in_the_second_run)
        stopped = invoke(args)
    assert stopped.exit_code == 130, stopped.output
    command = stopped.output.split("Continue with: ")[1].strip()
    assert command.startswith("cd ") and command.endswith(" ".join(args[-2:]))
    assert sorted(path.name for path in out.glob("*.png")) == NAMES[:2]  # the first run finished
    loads = []
    for each in STAGES:
        monkeypatch.setattr(each, "load", lambda *a, _real=each.load, _name=each.NAME, **k: loads.append(_name)
                            or _real(*a, **k))
    again = invoke(args)  # the same command
    assert again.exit_code == 0, again.output
    runs = runs_of(again.output)
    assert f"nothing to do: every image of the run in" in runs[0] and "wrote" not in runs[0]
    assert [table_rows(run, "encode_image") for run in runs] == [0, 0, 0]  # run 2 encoded its image before
    assert "wrote" in runs[1] and "wrote" in runs[2]
    # run 2 loads what it has left (its encodes are in its folder); run 3 only its encode: denoise and decode
    # stayed loaded from run 2 (one runner.KeptStages for the job, plan.kept_between_calls)
    assert loads == ["denoise", "decode", "encode"]
    assert sorted(path.name for path in out.glob("*.png")) == NAMES
    for name in NAMES:
        assert_same_pixels(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name)))
    finished = invoke(args)  # a finished job: nothing runs, nothing is written
    assert finished.exit_code == 0 and "wrote" not in finished.output
    assert finished.output.count("nothing to do: every image of the run in") == 3


@pytest.mark.parametrize("line, extra, message", [
    ({"prompt": "a dog", "image": "gone.png"}, [],
     "{file}, line 2: \"image\" '{folder}/gone.png': no such file; check the path"),
    ({"prompt": "a dog", "mask": "inputs/m.png"}, [],
     "{file}, line 2: --mask needs the image it paints into: give --image PATH, or leave out --mask"),
    ({"prompt": "a dog", "image": 3}, [], "{file}, line 2: \"image\" must be a path or a list of paths, not 3"),
    ({"prompt": "a dog", "image": ["a.png", "inputs/b.png"]}, [],
     "{file}, line 2: --image given 2 times: FluxImg2ImgPipeline takes at most 1 input image(s)"),
    ({"prompt": "a dog", "mask": ["inputs/m.png"], "image": "a.png"}, [],
     "{file}, line 2: \"mask\" must be the path of a mask image, not [\"inputs/m.png\"]"),
    ({"prompt": "a dog", "negative_prompt": "blurry"}, ["--true-cfg", "1"],
     "{file}, line 2: --negative-prompt has no effect without true classifier-free guidance"),
    ({"prompt": "a dog", "image": "a.png", "size": 3}, [], "{file}, line 2: unknown key(s) size; use \"prompt\", "
     "\"seed\", \"image\", \"mask\" and \"negative_prompt\""),
    ({"prompt": "a dog", "image": "inputs/b.png"}, ["--run-dir", "{folder}/run"],
     "--run-dir: the prompts file's lines make 2 runs"),
])
def test_a_bad_line_is_one_error_line_naming_it_and_nothing_is_written(tiny_checkpoint, tmp_path, line, extra,
                                                                       message):
    folder = job_folder(tmp_path, [LINES[0], line])
    out, file = tmp_path / "out", f"--prompts-file '{folder / 'jobs.jsonl'}'"
    result = invoke(job_args(tiny_checkpoint, folder, out, *(part.format(folder=folder) for part in extra)))
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith("Error: " + message.format(file=file, folder=folder)), error_line(result)
    assert not out.exists() and not (folder / "run").exists()


def test_a_mask_on_a_family_without_inpainting_names_the_line(tiny_kontext, tmp_path):
    folder = job_folder(tmp_path, [{"prompt": "a dog", "image": "a.png", "mask": "inputs/m.png"}])
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_kontext), "--prompts-file", str(folder / "jobs.jsonl"), "--max-memory",
                     "cpu=2GB", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(f"Error: --prompts-file '{folder / 'jobs.jsonl'}', line 1: --mask: "
                                         "FLUX.1-Kontext (FluxKontextPipeline) does no inpainting here")
    assert not out.exists()


def test_a_dry_run_shows_each_runs_plan_and_writes_nothing(tiny_checkpoint, tmp_path):
    folder, out = job_folder(tmp_path), tmp_path / "out"
    result = invoke(job_args(tiny_checkpoint, folder, out, "--dry-run"))
    assert result.exit_code == 0, result.output
    runs = runs_of(result.output)
    assert len(runs) == 3 and all(run.count("plan for 32x32, 2 steps") == 1 for run in runs)
    assert [table_rows(run, "encode_image") for run in runs] == [1, 1, 0]
    assert not out.exists()


def test_several_processes_are_refused_in_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    folder, out = job_folder(tmp_path), tmp_path / "out"
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    result = invoke(job_args(tiny_checkpoint, folder, out))
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(f"Error: --prompts-file '{folder / 'jobs.jsonl'}': lines that give their "
                                         "own \"image\", \"mask\" or \"negative_prompt\" run in one process")
    assert not out.exists()


def test_resume_with_such_a_prompts_file_says_how_to_continue(tiny_checkpoint, tmp_path):
    folder, out = job_folder(tmp_path, LINES[:1]), tmp_path / "out"
    assert invoke(job_args(tiny_checkpoint, folder, out)).exit_code == 0
    (run_dir,) = (out / ".flux-sharded").glob("run-*")
    result = invoke(["--resume", str(run_dir), "--prompts-file", str(folder / "jobs.jsonl")])
    assert result.exit_code == 2, result.output
    assert "run the same command again, without --resume, to continue them all" in error_line(result)
