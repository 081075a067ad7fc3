"""Settings that decide the pixels are fixed for a run: a resume under another budget decodes as the run did."""

from __future__ import annotations

import json

from .conftest import error_line, invoke

# 256x256 is larger than the tiny VAE's 32-pixel tile, so tiling changes its pixels; under cpu=10MB every
# stage fits but decode only tiled (--max-sequence-length 16 keeps encode small).
ARGS = ["--steps", "1", "--height", "256", "--width", "256", "--max-sequence-length", "16", "--dtype", "float32",
        "--prompt", "a dog"]


def _stopped_before_decode(checkpoint, out):
    result = invoke(["--model", str(checkpoint), *ARGS, "--max-memory", "cpu=2GB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (image,) = out.glob("*.png")
    image.unlink()  # as if stopped after denoise: denoise.safetensors holds the latents
    return next((out / ".flux-sharded").iterdir()), image


def test_a_resume_whose_budget_would_tile_the_decode_is_refused(tiny_checkpoint, tmp_path):
    run_dir, image = _stopped_before_decode(tiny_checkpoint, tmp_path / "out")
    assert json.loads((run_dir / "run.json").read_text())["decode_tiled"] is False
    result = invoke(["--resume", str(run_dir), "--max-memory", "cpu=10MB"])
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        "Error: --resume: under --max-memory cpu=10.00 MB decode would use tiled VAE decoding, but the run planned "
        "untiled decoding under its --max-memory cpu=2.00 GB, and the two give different pixels; resume under a "
        "budget that keeps the run's decoding (leave --max-memory out to use the run's own), or start a new run")
    assert not image.exists()


def test_a_resume_under_another_budget_that_keeps_the_decode_goes_on(tiny_checkpoint, tmp_path):
    run_dir, image = _stopped_before_decode(tiny_checkpoint, tmp_path / "out")
    result = invoke(["--resume", str(run_dir), "--max-memory", "cpu=1GB"])
    assert result.exit_code == 0, result.output
    assert image.exists()
