"""FLUX.3's prompt upsampler (--upsample-prompt): its own stage before encode, equal to the one-piece auto
blocks with their prompt_upsampler block, planned like a text encoder, resumed without it, refused in one
line where it cannot run."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from flux_sharded.activations import upsampler_generation_bytes
from flux_sharded.memory import TensorBytesTracker
from flux_sharded.settings import UPSAMPLE_MAX_TOKENS

from .conftest import assert_same_pixels, error_lines, invoke, modular_pipeline

SIZE = ["--height", "32", "--width", "32", "--steps", "2", "--dtype", "float32", "--max-memory", "cpu=4GB"]
TOKENS = 12  # --upsample-max-tokens: a few tokens of a random model are text enough


def _images(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("*.png"))]


def _one_piece(checkpoint, pipeline_name: str, upsampler, prompt: str, seeds: list[int], guidance: float = 3.5):
    """The auto blocks with their prompt_upsampler block: (images, the prompt the block wrote)."""
    pipeline = modular_pipeline(checkpoint, pipeline_name, guidance=guidance, upsampler=upsampler)
    out = pipeline(prompt=prompt, height=32, width=32, num_inference_steps=2, max_new_tokens=TOKENS,
                   num_images_per_prompt=len(seeds),
                   generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds], output=["images", "prompt"])
    return [np.asarray(image) for image in out["images"]], out["prompt"]


def test_the_builder_writes_an_upsampler_that_transformers_and_the_checks_read(tmp_path, capsys):
    """`python -m flux_sharded.tiny DIR --family FLUX.3-upsampler`: a Qwen3.5 with Qwen3.5's layer
    pattern, its tokenizer and chat template at the folder's root, as --upsample-prompt reads one."""
    from flux_sharded import tiny
    from flux_sharded.checkpoint import check_upsampler
    from flux_sharded.families import FLUX_3_KLEIN

    assert tiny.main([str(tmp_path / "up"), "--family", "FLUX.3-upsampler"]) == 0
    assert "tiny FLUX.3-upsampler prompt upsampler written" in capsys.readouterr().out
    check_upsampler("up", tmp_path / "up", FLUX_3_KLEIN, need_weights=True)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "up")
    assert config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]


def test_the_default_max_tokens_is_the_upsampler_blocks_own():
    from diffusers.modular_pipelines.flux3.prompt_upsampler import MAX_NEW_TOKENS

    assert UPSAMPLE_MAX_TOKENS == MAX_NEW_TOKENS


@pytest.mark.parametrize("family, pipeline_name, guidance", [
    ("distilled", "Flux3DistilledModularPipeline", []), ("base", "Flux3ModularPipeline", ["--guidance", "4"])])
def test_the_upsampled_run_equals_the_one_piece_blocks_with_their_upsampler(tiny_flux3, tiny_flux3_base,
                                                                          tiny_upsampler, tmp_path, family,
                                                                          pipeline_name, guidance):
    """The staged run (upsample, encode, denoise, decode) gives the one-piece auto blocks' images, with
    their prompt_upsampler block and the same upsampler, and records the prompt that block wrote beside
    the prompt as typed: in run.json, each PNG and the report; the encode encoded the rewritten prompt
    (its image differs from the run without the upsampler)."""
    checkpoint = tiny_flux3 if family == "distilled" else tiny_flux3_base
    out, plain = tmp_path / "out", tmp_path / "plain"
    common = ["--model", str(checkpoint), *SIZE, *guidance, "--seed", "5", "--prompt", "a dog",
              "--num-images-per-prompt", "2", "--batch-size", "2"]  # one batch, as the one-piece call
    result = invoke([*common, "--upsample-prompt", str(tiny_upsampler), "--upsample-max-tokens", str(TOKENS),
                     "--out", str(out), "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    images, written = _one_piece(checkpoint, pipeline_name, tiny_upsampler, "a dog", [5, 6],
                                 guidance=4.0 if guidance else 3.5)
    assert written.strip() and written != "a dog"
    for image, reference in zip(_images(out), images, strict=True):
        assert_same_pixels(image, reference)
    (run_dir,) = out.glob(".flux-sharded/run-*")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["settings"]["prompts"] == ["a dog", "a dog"] and run["upsampled_prompts"] == [written, written]
    assert run["settings"]["upsample_prompt"] == str(tiny_upsampler)
    for path in sorted(out.glob("*.png")):
        text = Image.open(path).text
        assert text["prompt"] == "a dog" and text["upsampled_prompt"] == written
    report = json.loads((tmp_path / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["upsample", "encode", "denoise", "decode"]
    assert report["upsampled_prompts"] == [written, written]
    assert invoke([*common, "--out", str(plain)]).exit_code == 0
    assert not np.array_equal(_images(plain)[0], _images(out)[0])


def test_a_resume_after_the_upsample_stage_does_not_load_the_upsampler_again(tiny_flux3, tiny_upsampler, tmp_path,
                                                                             monkeypatch, loads):
    """A run stopped in encode keeps the rewritten prompts in the run folder (upsample's handoff); its
    resume says upsample finished earlier, reads no Qwen3.5 weights (the loads counted where
    transformers reads them), runs encode, denoise and decode only, and gives the one-piece blocks' image."""
    out = tmp_path / "out"
    run_dir = _stopped_in("encode_batch", tiny_flux3, tiny_upsampler, out, monkeypatch)
    assert [name for name, _, _ in loads].count("Qwen3_5ForConditionalGeneration") == 1
    saved = json.loads((run_dir / "upsample.json").read_text())
    assert saved["finished_stages"] == ["upsample"] and len(saved["upsampled"]) == 1
    before = len(loads)
    resumed = invoke(["--resume", str(run_dir), "--report", str(tmp_path / "report.json")])
    assert resumed.exit_code == 0, resumed.output
    assert "upsample: finished earlier" in resumed.output
    read = [name for name, _, _ in loads[before:]]
    assert "Qwen3_5ForConditionalGeneration" not in read and "Qwen3VLForConditionalGenerationEncodeOnly" in read
    report = json.loads((tmp_path / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "denoise", "decode"]
    images, written = _one_piece(tiny_flux3, "Flux3DistilledModularPipeline", tiny_upsampler, "a dog", [3])
    assert report["upsampled_prompts"] == saved["upsampled"] == [written]
    assert_same_pixels(_images(out)[0], images[0])


def _stopped_in(function: str, checkpoint, upsampler, out, monkeypatch):
    """The run folder of an upsampled run of "a dog" (seed 3) stopped by Ctrl-C in stages/flux3.py's
    `function` (exit 130); the function is restored for the resume."""
    from flux_sharded.stages import flux3

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(flux3, function, stopped)
        first = invoke(["--model", str(checkpoint), *SIZE, "--seed", "3", "--prompt", "a dog", "--upsample-prompt",
                        str(upsampler), "--upsample-max-tokens", str(TOKENS), "--out", str(out)])
    assert first.exit_code == 130, first.output
    (run_dir,) = out.glob(".flux-sharded/run-*")
    return run_dir


def test_a_resume_after_the_encode_stage_of_an_upsampled_run_continues_it(tiny_flux3, tiny_upsampler, tmp_path,
                                                                           monkeypatch):
    """A run stopped in denoise keeps encode's handoff, which follows upsample's (its finished_stages
    upsample then encode, as the resume checks them): the resume runs denoise and decode only, records
    the rewritten prompt and gives the one-piece blocks' image. Encode's handoff once forgot upsample's
    stage, and every such resume was refused."""
    out = tmp_path / "out"
    run_dir = _stopped_in("denoise_batch", tiny_flux3, tiny_upsampler, out, monkeypatch)
    assert json.loads((run_dir / "encode.json").read_text())["finished_stages"] == ["upsample", "encode"]
    resumed = invoke(["--resume", str(run_dir), "--report", str(tmp_path / "report.json")])
    assert resumed.exit_code == 0, resumed.output
    assert "encode: finished earlier" in resumed.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["denoise", "decode"]
    images, written = _one_piece(tiny_flux3, "Flux3DistilledModularPipeline", tiny_upsampler, "a dog", [3])
    assert report["upsampled_prompts"] == [written]
    assert_same_pixels(_images(out)[0], images[0])


# ---------------------------------------------------------------- the plan


def _parameters(folder) -> int:
    """The upsampler's parameters as its weights file holds them (no tied tensors: tie_word_embeddings false)."""
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(folder / "model.safetensors").values())


def test_the_dry_run_plans_the_upsample_stage_from_the_upsamplers_config(tiny_flux3, tiny_upsampler, tmp_path):
    """--dry-run shows the upsample stage before encode; its planned weights are the tiny upsampler's
    parameters in float32 (within 2%), and its activations those of one generation
    (activations.upsampler_generation_bytes) for --upsample-max-tokens, whatever the batch size (the
    block takes one prompt per call); nothing is written but the report."""
    report_path = tmp_path / "plan.json"
    result = invoke(["--dry-run", "--model", str(tiny_flux3), *SIZE, "--prompt", "a dog", "--upsample-prompt",
                     str(tiny_upsampler), "--upsample-max-tokens", "100", "--out", str(tmp_path / "out"),
                     "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "upsample" in result.output.split("encode")[0]  # the table's first stage
    report = json.loads(report_path.read_text())
    stage = report["stages"][0]
    assert [each["name"] for each in report["stages"]] == ["upsample", "encode", "denoise", "decode"]
    assert list(stage["device_map"]) == ["prompt_upsampler"]
    weights = stage["weight_bytes"]["cpu"]
    assert abs(weights / (4 * _parameters(tiny_upsampler)) - 1) < 0.02
    assert stage["planned_bytes"]["cpu"] > weights
    assert not (tmp_path / "out").exists()
    # one request per call: a batch of two prompts (of as many bytes) plans the same generation
    batched = invoke(["--dry-run", "--model", str(tiny_flux3), *SIZE, "--prompt", "a dog", "--prompt", "a cat",
                      "--batch-size", "2", "--upsample-prompt", str(tiny_upsampler), "--upsample-max-tokens", "100",
                      "--report", str(tmp_path / "batched.json")])
    assert batched.exit_code == 0, batched.output
    assert json.loads((tmp_path / "batched.json").read_text())["stages"][0]["planned_bytes"] == stage["planned_bytes"]


def test_the_published_upsampler_plans_offline_at_its_published_size(tmp_path):
    """black-forest-labs/flux-3-image-klein-pup plans offline from the shipped config (transformers'
    Qwen3.5-9B defaults, configs/README.md): 18.8 GB of bf16 weights (within 2%), split over a 12 GiB
    card and the CPU, whole on a 24 GiB one; each generated token is a forward pass of the offloaded part."""
    small = invoke(["--dry-run", "--model", "black-forest-labs/flux-3-image-klein", "--prompt", "a dog",
                    "--upsample-prompt", "black-forest-labs/flux-3-image-klein-pup", "--max-memory", "0=12GiB,cpu=32GB",
                    "--report", str(tmp_path / "small.json")])
    assert small.exit_code == 0, small.output
    stage = json.loads((tmp_path / "small.json").read_text())["stages"][0]
    assert stage["name"] == "upsample" and set(stage["weight_bytes"]) == {"0", "cpu"}
    assert abs(sum(stage["weight_bytes"].values()) / 18.8e9 - 1) < 0.02
    assert stage["offload_bytes_per_image"] == stage["offload_bytes_per_step"] * UPSAMPLE_MAX_TOKENS
    large = invoke(["--dry-run", "--model", "black-forest-labs/flux-3-image-klein", "--prompt", "a dog",
                    "--upsample-prompt", "black-forest-labs/flux-3-image-klein-pup", "--max-memory", "0=24GiB,cpu=32GB",
                    "--report", str(tmp_path / "large.json")])
    assert large.exit_code == 0, large.output
    assert list(json.loads((tmp_path / "large.json").read_text())["stages"][0]["weight_bytes"]) == ["0"]


@pytest.mark.parametrize("width, prompt, new, dtype", [(64, 256, 16, torch.float32), (128, 512, 32, torch.bfloat16),
                                                       (64, 64, 64, torch.float32)])
def test_the_generation_estimate_covers_a_measured_greedy_generation(width, prompt, new, dtype):
    """upsampler_generation_bytes against the tensors a random small Qwen3.5 (three linear-attention
    layers and one full-attention layer, as Qwen3.5 alternates them) holds while generate() writes
    `new` tokens greedily after `prompt` tokens: at least what was measured, at most 1.6 times it."""
    torch.manual_seed(0)
    config = transformers.Qwen3_5Config(
        text_config=dict(vocab_size=500, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                         linear_key_head_dim=width // 4, linear_value_head_dim=width // 4, linear_num_key_heads=2,
                         linear_num_value_heads=4, max_position_embeddings=4096, eos_token_id=499,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25,
                                          "mrope_section": [1, 1, 0], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=width, intermediate_size=2 * width, num_heads=2, patch_size=4,
                           out_hidden_size=width, num_position_embeddings=16))
    model = transformers.Qwen3_5ForConditionalGeneration(config).eval().to(dtype)
    ids = torch.randint(0, 498, (1, prompt))
    with torch.inference_mode(), TensorBytesTracker([*model.parameters(), *model.buffers(), ids]) as tracker:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    planned = upsampler_generation_bytes(config.text_config.to_dict(), prompt, new, torch.finfo(dtype).bits // 8)
    assert 1.0 <= planned / tracker.peak_bytes <= 1.6, f"planned {planned} vs measured {tracker.peak_bytes}"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("case, message", [
    ("flux1", "--upsample-prompt: FLUX.1 (FluxPipeline) has no prompt upsampler"),
    ("flux2", "--upsample-prompt: FLUX.2-klein (Flux2KleinPipeline) has no prompt upsampler"),
    ("missing", "does not exist; give the prompt upsampler's folder or hub id"),
    ("empty", "--upsample-prompt: empty; give the prompt upsampler's folder or hub id"),  # an unset shell variable
    ("checkpoint", "has no config.json, so it is not a prompt upsampler"),
    ("text_encoder", "config.json describes a qwen3_vl, not a Qwen3_5ForConditionalGeneration"),
    ("no weights", "has no weights (*.safetensors)"),
    ("no tokenizer", "has no tokenizer"),
    # damaged files: once found only in the upsample stage, after run.json, with exit code 1
    ("truncated weights", "model.safetensors is truncated or corrupt"),
    ("damaged tokenizer", "its tokenizer cannot be loaded"),
    ("image", "--upsample-prompt with --image"),
    ("tokens", "--upsample-max-tokens 0: use 1 to 32768 tokens"),
    ("tokens alone", "--upsample-max-tokens 5 has no effect without --upsample-prompt"),
])
def test_an_upsampler_that_cannot_run_is_refused_in_one_line_before_anything_is_written(
        tiny_checkpoint, tiny_klein, tiny_flux3, tiny_upsampler, tmp_path, case, message):
    import shutil

    model, upsampler, extra = tiny_flux3, str(tiny_upsampler), []
    if case == "flux1":
        model = tiny_checkpoint
    elif case == "flux2":
        model = tiny_klein
    elif case == "missing":
        upsampler = str(tmp_path / "nowhere")
    elif case == "empty":
        upsampler = ""
    elif case == "checkpoint":
        upsampler = str(tiny_flux3)
    elif case == "text_encoder":
        upsampler = str(tiny_flux3 / "text_encoder")
    elif case in ("no weights", "no tokenizer"):
        upsampler = str(shutil.copytree(tiny_upsampler, tmp_path / "copy"))
        (tmp_path / "copy" / ("model.safetensors" if case == "no weights" else "tokenizer.json")).unlink()
    elif case in ("truncated weights", "damaged tokenizer"):
        upsampler = str(shutil.copytree(tiny_upsampler, tmp_path / "copy"))
        damaged = tmp_path / "copy" / ("model.safetensors" if case == "truncated weights" else "tokenizer.json")
        damaged.write_bytes(damaged.read_bytes()[:100])
    elif case == "image":
        Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
        extra = ["--image", str(tmp_path / "in.png")]
    elif case == "tokens":
        extra = ["--upsample-max-tokens", "0"]
    out = tmp_path / "out"
    arguments = ["--model", str(model), *SIZE, "--prompt", "a dog", *extra, "--out", str(out)]
    if case == "tokens alone":
        arguments += ["--upsample-max-tokens", "5"]
    else:
        arguments += ["--upsample-prompt", upsampler]
    result = invoke(arguments)
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert message in line and "Traceback" not in result.output
    assert not out.exists()


def test_the_python_api_upsamples_and_keeps_the_upsampler_between_calls(tiny_flux3, tiny_upsampler, loads):
    """Model.generate takes upsample_prompt and upsample_max_tokens as the command line takes its options:
    the image's metadata holds the prompt as typed and as rewritten, which the one-piece blocks wrote;
    the progress callback hears each token written; a second call with the same upsampler reads no
    Qwen3.5 weights (the stage kept in RAM)."""
    import flux_sharded

    with flux_sharded.open_model(str(tiny_flux3), max_memory="cpu=4GB", dtype="float32") as model:
        arguments = dict(seed=3, steps=2, height=32, width=32, upsample_prompt=str(tiny_upsampler),
                         upsample_max_tokens=TOKENS)
        events = []
        first = model.generate("a dog", progress=events.append, **arguments)
        assert [name for name, _, _ in loads].count("Qwen3_5ForConditionalGeneration") == 1
        second = model.generate("a dog", **arguments)
    assert [name for name, _, _ in loads].count("Qwen3_5ForConditionalGeneration") == 1
    assert second.report.stages[0].name == "upsample" and second.report.stages[0].weights_kept
    # a step per token written: the prefill's, then one per generated token, up to upsample_max_tokens
    steps = [event.step for event in events if event.stage == "upsample" and event.step is not None]
    assert steps == list(range(1, len(steps) + 1)) and 1 < len(steps) <= TOKENS
    assert {event.steps for event in events if event.stage == "upsample" and event.step} == {TOKENS}
    images, written = _one_piece(tiny_flux3, "Flux3DistilledModularPipeline", tiny_upsampler, "a dog", [3])
    for generation in (first, second):
        assert generation.metadata[0]["prompt"] == "a dog" and generation.metadata[0]["upsampled_prompt"] == written
        assert generation.report.upsampled_prompts == [written]
        assert_same_pixels(np.asarray(generation.images[0]), images[0])


def test_the_upsamplers_weights_are_recorded_and_a_changed_upsampler_is_refused_before_it_runs(
        tiny_flux3, tiny_upsampler, tmp_path, monkeypatch):
    """run.json records the upsampler's files (checkpoint.upsampler_fingerprint) and each PNG their
    digest; a run stopped in its upsample stage is not resumed with other upsampler files (one
    Error line), and is with the files it began with."""
    import shutil

    from flux_sharded.checkpoint import fingerprint_digest, upsampler_fingerprint
    from flux_sharded.stages import flux3

    upsampler = shutil.copytree(tiny_upsampler, tmp_path / "upsampler")
    out = tmp_path / "out"
    real = flux3.upsample

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flux3, "upsample", stopped)
    first = invoke(["--model", str(tiny_flux3), *SIZE, "--prompt", "a dog", "--upsample-prompt", str(upsampler),
                    "--upsample-max-tokens", str(TOKENS), "--out", str(out)])
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(flux3, "upsample", real)
    (run_dir,) = out.glob(".flux-sharded/run-*")
    recorded = json.loads((run_dir / "run.json").read_text())["upsampler_weights"]
    assert recorded == upsampler_fingerprint(upsampler, "prompt_upsampler")
    config = (upsampler / "generation_config.json").read_text()
    (upsampler / "generation_config.json").write_text(config.replace("{", '{\n  "temperature": 0.5,', 1))
    refused = invoke(["--resume", str(run_dir)])
    assert refused.exit_code == 2, refused.output
    (line,) = error_lines(refused.output)
    assert "the files of the prompt upsampler" in line and "differ from those the run" in line
    (upsampler / "generation_config.json").write_text(config)
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    (image,) = out.glob("*.png")
    assert Image.open(image).text["upsampler_weights"] == fingerprint_digest(recorded)


def test_two_processes_under_torchrun_each_upsample_their_share(tiny_flux3, tiny_upsampler, tmp_path):
    """Under torchrun each process rewrites its own share's prompts (2 + 1 images) in its own upsample
    stage; run.json and the report list every image's rewritten prompt in order, each the one-piece
    blocks' with their upsampler, and every image equals theirs."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    prompts = ["a dog", "a red car", "a cat"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flux_sharded",
         "--model", str(tiny_flux3), *SIZE, "--seed", "5", "--prompts-file", str(tmp_path / "prompts.txt"),
         "--upsample-prompt", str(tiny_upsampler), "--upsample-max-tokens", str(TOKENS), "--out", str(out),
         "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(stage["process"], stage["name"], stage["images"]) for stage in report["stages"]][::4] == [
        (0, "upsample", 2), (1, "upsample", 1)]
    expected = [_one_piece(tiny_flux3, "Flux3DistilledModularPipeline", tiny_upsampler, prompt, [seed])
                for prompt, seed in zip(prompts, (5, 6, 7))]
    written = [text for _, text in expected]
    (run_dir,) = out.glob(".flux-sharded/run-*")
    assert report["upsampled_prompts"] == written == json.loads((run_dir / "run.json").read_text())["upsampled_prompts"]
    for image, (images, _) in zip(_images(out), expected, strict=True):
        assert_same_pixels(image, images[0])


def test_an_upsampled_run_reads_the_whole_caption_by_default(tiny_flux3, tiny_upsampler, tmp_path):
    """diffusers' blocks read up to 8192 tokens; FLUX.3's own default window (640) would cut most
    captions: with the upsampler and no --max-sequence-length, the window holds --upsample-max-tokens
    and one window of chat markup, in whole windows of the family's pad multiple (the installed
    encode block's); given, it is kept."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from flux_sharded.api import Model
    from flux_sharded.families import FLUX_3_KLEIN
    from flux_sharded.prompts import PromptLine

    pad = inspect.signature(Flux3TextEncoderStep.__init__).parameters["pad_multiple"].default
    assert FLUX_3_KLEIN.text_window == pad == 80
    model = Model(str(tiny_flux3), max_memory="cpu=2GB")

    def window(**settings) -> int:
        return model.request([PromptLine("a dog")], 0, 1, tmp_path, **settings).settings.max_sequence_length

    assert window() == 640
    assert window(upsample_prompt=str(tiny_upsampler)) == 3680  # 3584 + 80, in windows of 80
    assert window(upsample_prompt=str(tiny_upsampler), upsample_max_tokens=100) == 240
    assert window(upsample_prompt=str(tiny_upsampler), upsample_max_tokens=9000) == 8192
    assert window(upsample_prompt=str(tiny_upsampler), max_sequence_length=400) == 400
