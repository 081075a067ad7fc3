"""The central invariant: the staged runner's PNG equals diffusers' one-piece FluxPipeline image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flux_sharded.cli import main

from .conftest import SIZE, STEPS, assert_same_pixels, one_piece_pixels


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("fixture, size", [("tiny_checkpoint", SIZE), ("tiny_checkpoint_f2", 24)])
def test_staged_png_equals_one_piece_pipeline(request, tmp_path, fixture, size):
    checkpoint = request.getfixturevalue(fixture)
    prompt, seed = "a photo of a dog", 7
    report_path = tmp_path / "report.json"
    run_cli([
        "--model", str(checkpoint), "--prompt", prompt, "--seed", str(seed), "--steps", str(STEPS),
        "--height", str(size), "--width", str(size), "--dtype", "float32", "--max-memory", "cpu=4GB",
        "--out", str(tmp_path / "out"), "--report", str(report_path),
    ])
    report = json.loads(report_path.read_text())
    (image_path,) = report["images"]
    staged = np.asarray(Image.open(image_path))
    assert_same_pixels(staged, one_piece_pixels(checkpoint, prompt, seed, STEPS, size, size))
    # a blank or saturated image would make the comparison meaningless
    assert staged.std() > 10


def test_each_image_of_a_multi_prompt_run_equals_its_single_run(tiny_checkpoint, tmp_path):
    prompts = ["a red car under the sky", "watercolor portrait of a cat"]
    result = run_cli([
        "--model", str(tiny_checkpoint), "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "3",
        "--steps", "2", "--height", "32", "--width", "48", "--dtype", "float32", "--max-memory", "cpu=4GB",
        "--out", str(tmp_path), "--report", str(tmp_path / "report.json"),
    ])
    images = json.loads((tmp_path / "report.json").read_text())["images"]
    assert len(images) == 2, result.output
    for index, (prompt, path) in enumerate(zip(prompts, images)):
        expected = one_piece_pixels(tiny_checkpoint, prompt, 3 + index, 2, 32, 48)
        assert_same_pixels(np.asarray(Image.open(path)), expected)


def test_bfloat16_run_matches_one_piece_in_bfloat16(tiny_checkpoint, tmp_path):
    import torch

    run_cli([
        "--model", str(tiny_checkpoint), "--prompt", "a dog", "--seed", "1", "--steps", "2",
        "--height", "32", "--width", "32", "--max-memory", "cpu=4GB", "--out", str(tmp_path),
    ])
    (path,) = tmp_path.glob("*.png")
    expected = one_piece_pixels(tiny_checkpoint, "a dog", 1, 2, 32, 32, dtype=torch.bfloat16)
    assert_same_pixels(np.asarray(Image.open(path)), expected)
