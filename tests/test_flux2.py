"""FLUX.2 on the staged runner: the central invariant on tiny klein and dev checkpoints, the cut
text encoder's embeddings, the handoff's shapes, resume, a tokenizer that cannot load."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image

from flux_sharded import runner
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.cli import main
from flux_sharded.families import encode_layers
from flux_sharded.handoff import GenerationSettings, Handoff
from flux_sharded.plan import plan_run
from flux_sharded.stages import decode, encode
from flux_sharded.checkpoint import expected_tensors

from .conftest import assert_same_pixels, error_lines, one_piece_pixels
from .sealing import edit_sealed_json, write_sealed_tensors

# Short prompts fit 64 tokens; a shorter max_sequence_length keeps the 29-layer encode cheap.
TOKENS = 64
BUDGET = {"cpu": 4 * 10**9}


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize(
    "fixture, size, guidance",
    [
        # step-distilled: no --guidance given; the pipeline ignores its default 4.0 (is_distilled)
        ("tiny_klein", 64, None),
        # not distilled, guidance 3: a second pass on the empty prompt's embeddings
        ("tiny_klein_base", 24, 3.0),
    ],
)
def test_staged_klein_png_equals_one_piece_pipeline(request, tmp_path, fixture, size, guidance):
    _assert_staged_equals_one_piece(request.getfixturevalue(fixture), tmp_path, seed=7, size=size, guidance=guidance)


def _assert_staged_equals_one_piece(checkpoint: Path, tmp_path: Path, seed: int, size: int,
                                    guidance: float | None) -> Path:
    """The staged PNG (2 steps, float32) against the one-piece pipeline's pixels; the PNG's path.
    guidance None: the family's default, which is 4 for Flux2Pipeline and ignored by a distilled klein."""
    prompt, steps = "a photo of a dog", 2
    report_path = tmp_path / "report.json"
    run_cli([
        "--model", str(checkpoint), "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
        "--height", str(size), "--width", str(size), "--dtype", "float32", "--max-memory", "cpu=4GB",
        "--max-sequence-length", str(TOKENS), "--out", str(tmp_path / "out"), "--report", str(report_path),
        *(["--guidance", str(guidance)] if guidance is not None else []),
    ])
    (image_path,) = json.loads(report_path.read_text())["images"]
    staged = np.asarray(Image.open(image_path))
    expected = one_piece_pixels(checkpoint, prompt, seed, steps, size, size, guidance=guidance or 4.0,
                                max_sequence_length=TOKENS)
    assert_same_pixels(staged, expected)
    assert staged.std() > 10  # a blank or saturated image would make the comparison meaningless
    return Path(image_path)
    assert Image.open(image_path).text["guidance"] == (
        str(guidance) if guidance else "none (the checkpoint is step-distilled: model_index.json 'is_distilled')")


def test_guidance_changes_a_klein_that_is_not_distilled(tiny_klein_base, tmp_path):
    """The control of the test above: the second pass is really taken (else guidance would not matter)."""
    images = []
    for guidance in ("1.0", "3.0"):
        out = tmp_path / guidance
        run_cli(["--model", str(tiny_klein_base), "--prompt", "a dog", "--steps", "1", "--height", "16", "--width",
                 "16", "--dtype", "float32", "--max-memory", "cpu=4GB", "--max-sequence-length", str(TOKENS),
                 "--guidance", guidance, "--out", str(out)])
        images.append(np.asarray(Image.open(next(out.glob("*.png")))))
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0


def _encode_plan(checkpoint: Path, settings: GenerationSettings):
    request = runner.RunRequest(resolve_checkpoint(str(checkpoint)), settings, BUDGET, Path("unused"))
    return request.checkpoint, plan_run(runner.plan_inputs(request), BUDGET).stage("encode")


def test_the_encode_loads_only_the_layers_it_reads_and_gives_the_full_pipelines_embeddings(tiny_klein):
    from diffusers import Flux2KleinPipeline

    prompts = ("a photo of a dog", "watercolor portrait of a cat")
    settings = GenerationSettings(str(tiny_klein), prompts, (0, 1), 2, 1.0, 32, 32, TOKENS, "float32", batch_size=2)
    checkpoint, stage_plan = _encode_plan(tiny_klein, settings)
    pipeline = encode.load(checkpoint, stage_plan, torch.float32)
    cut = pipeline.text_encoder
    full = Flux2KleinPipeline.from_pretrained(tiny_klein, dtype=torch.float32)
    # The checkpoint has layers past the last one read, so that there is something to leave out.
    assert len(full.text_encoder.model.layers) > encode_layers("Flux2KleinPipeline") == len(cut.model.layers)
    assert isinstance(cut.lm_head, torch.nn.Identity) and isinstance(cut.model.norm, torch.nn.Identity)
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.text_encoder.parameters())

    handoff = encode.run(pipeline, Handoff(settings=settings))
    expected, _ = full.encode_prompt(prompt=list(prompts), max_sequence_length=TOKENS)
    assert torch.equal(handoff.prompt_embeds, expected)
    assert handoff.tensors().keys() == {"prompt_embeds"}  # no pooled embedding, no text positions


@pytest.mark.parametrize("fixture, guidance, names", [
    ("tiny_klein", 5.0, {"prompt_embeds"}),  # distilled: guidance ignored, no second pass
    ("tiny_klein_base", 1.0, {"prompt_embeds"}),  # guidance 1: no second pass
    ("tiny_klein_base", 2.0, {"prompt_embeds", "negative_prompt_embeds"}),
])
def test_the_handoff_holds_what_the_familys_pipeline_takes(request, fixture, guidance, names):
    checkpoint = resolve_checkpoint(str(request.getfixturevalue(fixture)))
    settings = GenerationSettings(str(checkpoint.path), ("a", "b", "c"), (0, 1, 2), 2, guidance, 32, 64, TOKENS,
                                  "float32")
    width = checkpoint.transformer_config["joint_attention_dim"]
    assert expected_tensors("encode", settings, checkpoint) == {name: (3, TOKENS, width) for name in names}
    latents = expected_tensors("denoise", settings, checkpoint)["latents"]
    factor = checkpoint.vae_scale_factor
    assert latents == (3, (32 // (2 * factor)) * (64 // (2 * factor)), checkpoint.transformer_config["in_channels"])


def test_a_klein_run_stopped_before_decode_resumes_to_the_same_image(tiny_klein, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--model", str(tiny_klein), "--prompt", "a red car", "--prompt", "a dog", "--seed", "3", "--steps", "2",
            "--height", "32", "--width", "32", "--dtype", "float32", "--max-memory", "cpu=4GB",
            "--max-sequence-length", str(TOKENS), "--out", str(out)]

    def out_of_memory(*args, **kwargs):
        raise MemoryError("can't allocate memory")

    with monkeypatch.context() as patch:
        patch.setattr(decode, "run", out_of_memory)
        failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 3, failed.output
    assert not list(out.glob("*.png"))
    (run_dir,) = (out / ".flux-sharded").iterdir()
    resumed = CliRunner().invoke(main, ["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "denoise: finished earlier" in resumed.output
    for index, prompt in enumerate(("a red car", "a dog")):
        (path,) = out.glob(f"{index:04d}-*.png")
        expected = one_piece_pixels(tiny_klein, prompt, 3 + index, 2, 32, 32, max_sequence_length=TOKENS)
        assert_same_pixels(np.asarray(Image.open(path)), expected)
        assert Image.open(path).text["prompt"] == prompt


def _finished_klein_run_without_its_image(checkpoint: Path, out: Path) -> Path:
    """A one-image klein run into `out`, its PNG deleted so that a --resume has work left; its run folder."""
    run_cli(["--model", str(checkpoint), "--prompt", "a dog", "--steps", "1", "--height", "16", "--width", "16",
             "--dtype", "float32", "--max-memory", "cpu=4GB", "--max-sequence-length", str(TOKENS), "--out", str(out)])
    (image,) = out.glob("*.png")
    image.unlink()
    (run_dir,) = (out / ".flux-sharded").iterdir()
    return run_dir


@pytest.mark.parametrize("change, message", [
    (lambda t: {**t, "prompt_embeds": t["prompt_embeds"][..., :-1].contiguous()}, "prompt_embeds has shape"),
    (lambda t: {**t, "pooled_prompt_embeds": torch.zeros(1, 4)}, "holds unexpected pooled_prompt_embeds"),
])
def test_a_damaged_klein_handoff_is_refused_on_resume(tiny_klein, tmp_path, change, message):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    run_dir = _finished_klein_run_without_its_image(tiny_klein, out)
    saved = run_dir / "denoise.safetensors"
    write_sealed_tensors(saved, change(load_file(saved)))  # as the tool's writer would: the check is the shape
    result = CliRunner().invoke(main, ["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert f"--resume: {saved}" in line and message in line
    assert not list(out.glob("*.png"))


def test_staged_flux2_dev_png_equals_one_piece_pipeline(tiny_dev, tmp_path):
    """FLUX.2-dev's defaults (guidance 4, embedded in the transformer) as Flux2Pipeline's: no --guidance given."""
    image_path = _assert_staged_equals_one_piece(tiny_dev, tmp_path, seed=5, size=32, guidance=None)
    assert Image.open(image_path).text["guidance"] == "4.0"


def test_the_dev_encode_leaves_out_the_vision_tower_and_gives_the_full_pipelines_embeddings(tiny_dev):
    from diffusers import Flux2Pipeline

    prompts = ("a photo of a dog",)
    settings = GenerationSettings(str(tiny_dev), prompts, (0,), 2, 4.0, 32, 32, TOKENS, "float32")
    checkpoint, stage_plan = _encode_plan(tiny_dev, settings)
    cut = encode.load(checkpoint, stage_plan, torch.float32)
    full = Flux2Pipeline.from_pretrained(tiny_dev, dtype=torch.float32)
    model = cut.text_encoder.model
    assert len(model.language_model.layers) == encode_layers("Flux2Pipeline")
    assert len(full.text_encoder.model.language_model.layers) > encode_layers("Flux2Pipeline")
    for part in (model.vision_tower, model.multi_modal_projector, model.language_model.norm, cut.text_encoder.lm_head):
        assert isinstance(part, torch.nn.Identity)
    handoff = encode.run(cut, Handoff(settings=settings))
    expected, _ = full.encode_prompt(prompt=list(prompts), max_sequence_length=TOKENS)
    assert torch.equal(handoff.prompt_embeds, expected)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="PixtralProcessor loads here")
def test_a_processor_tokenizer_that_cannot_load_here_is_replaced_by_its_tokenizer(tiny_dev, tmp_path):
    """FLUX.2-dev's published tokenizer folder is a PixtralProcessor, whose image processor needs
    torchvision (not installed): the encode takes the tokenizer inside it alone, and the image is
    the one the same checkpoint gives with a plain tokenizer in model_index.json."""
    import shutil

    folder = tmp_path / "dev"
    shutil.copytree(tiny_dev, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ImportError):  # what the one-piece Flux2Pipeline.from_pretrained meets here
        transformers.PixtralProcessor.from_pretrained(folder / "tokenizer")
    common = ["--prompt", "a dog", "--steps", "1", "--height", "16", "--width", "16", "--dtype", "float32",
              "--max-memory", "cpu=4GB", "--max-sequence-length", str(TOKENS)]
    for model, out in ((folder, tmp_path / "processor"), (tiny_dev, tmp_path / "tokenizer")):
        result = CliRunner().invoke(main, ["--model", str(model), *common, "--out", str(out)])
        assert result.exit_code == 0, result.output
    (processor_image,), (tokenizer_image,) = (list(out.glob("*.png")) for out in (tmp_path / "processor",
                                                                                   tmp_path / "tokenizer"))
    assert_same_pixels(np.asarray(Image.open(processor_image)), np.asarray(Image.open(tokenizer_image)))


def test_two_klein_processes_equal_one_process(tiny_klein, tmp_path):
    """FLUX.2 carries over to several processes: each share's images equal the one-process run's."""

    common = ["--model", str(tiny_klein), "--steps", "1", "--height", "16", "--width", "16", "--dtype", "float32",
              "--max-memory", "cpu=4GB", "--max-sequence-length", str(TOKENS), "--seed", "4"]
    prompts = [arg for prompt in ("a red car", "a dog", "a red car") for arg in ("--prompt", prompt)]
    run_cli([*common, *prompts, "--out", str(tmp_path / "one"), "--report", str(tmp_path / "one.json")])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flux_sharded",
         *common, *prompts, "--out", str(tmp_path / "two"), "--report", str(tmp_path / "two.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = (json.loads((tmp_path / f"{name}.json").read_text())["images"] for name in ("one", "two"))
    assert [Path(path).name for path in two] == [Path(path).name for path in one] and len(one) == 3
    for path_two, path_one in zip(two, one):
        assert_same_pixels(np.asarray(Image.open(path_two)), np.asarray(Image.open(path_one)))


def test_a_klein_without_its_chat_template_is_refused_before_run_json(tiny_klein, tmp_path):
    """Flux2KleinPipeline applies the tokenizer's chat template to every prompt: without one, encode
    failed after run.json was written."""
    import shutil

    copy = tmp_path / "klein"
    shutil.copytree(tiny_klein, copy)
    (copy / "tokenizer" / "chat_template.jinja").unlink()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(copy), "--prompt", "a dog", "--steps", "1", "--height", "16",
                                       "--width", "16", "--dtype", "float32", "--max-memory", "cpu=4GB", "--out",
                                       str(out)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert line == (f"Error: --model: '{copy}': tokenizer has no chat template (chat_template.jinja), which "
                    "Flux2KleinPipeline applies to every prompt; the checkpoint is incomplete: fetch its tokenizer "
                    "folder again")
    assert not list(out.rglob("run.json"))


def test_a_run_json_edited_to_quantize_a_component_klein_lacks_is_refused_on_resume(tiny_klein, tmp_path):
    """--quantize checks its components against the family on the command line; an edited run.json
    (FLUX.1's T5 named for a klein) must not get around it."""
    out = tmp_path / "out"
    run_dir = _finished_klein_run_without_its_image(tiny_klein, out)
    for handoff in [*run_dir.glob("encode*"), *run_dir.glob("denoise*")]:  # so that every stage would run again
        handoff.unlink()
    # sealed again: one edited by hand is refused by its seal first (tests/test_faults.py)
    edit_sealed_json(run_dir / "run.json", lambda saved: saved["settings"].update(quantize="text_encoder_2=int8"))
    result = CliRunner().invoke(main, ["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "quantize text_encoder_2=int8: FLUX.2-klein has no text_encoder_2" in line and "run.json" in line
    assert not list(out.glob("*.png"))
