"""One small card plus RAM: plans for every card size, streamed offload, tiled decode, batch activations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flux_sharded import plan as plan_module
from flux_sharded import runner
from flux_sharded.checkpoint import resolve_checkpoint, shipped_config_dir
from flux_sharded.cli import main
from flux_sharded.handoff import GenerationSettings, Handoff
from flux_sharded.host_memory import CHUNK_SIZES
from flux_sharded.plan import PlanInputs, check_free_cpu_memory, plan_run
from flux_sharded.placement import offloaded_blocks, placement
from flux_sharded.stages import decode, denoise, encode

from .conftest import assert_same_pixels
from .devices import assert_close_to_the_cpu, logical_gpus

GB = 10**9


def inputs(model: str, size: int = 1024, batch_size: int = 1, images: int | None = None) -> PlanInputs:
    return PlanInputs(shipped_config_dir(model), torch.bfloat16, size, size, 512, vae_scale_factor=8,
                      batch_size=batch_size, images=images, distinct_prompts=1)


def assert_within_budget(plan, budget) -> None:
    for stage in plan.stages:
        for device, planned in stage.planned_bytes.items():
            assert planned <= budget[device], f"{stage.name} plans {planned} on {device}, budget {budget[device]}"


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
@pytest.mark.parametrize("gpu_gb", [4, 6, 8, 10, 12, 16, 24])
def test_one_small_gpu_plus_ram_plans_within_every_budget(model, gpu_gb):
    budget = {0: gpu_gb * GB, "cpu": 64 * GB}
    plan = plan_run(inputs(model), budget)
    assert_within_budget(plan, budget)
    transformer = plan.stage("denoise").component("transformer")
    # Some of the 23.8 GB transformer stays on the card; the rest streams from RAM, and the GPU keeps
    # room for two of its largest blocks (about 0.68 GB each) while they run, never for a whole list.
    assert transformer.weight_bytes[0] > 0
    # RAM holds the streamed blocks pinned, as PyTorch allocates them (host_memory.py: a little more)
    assert transformer.streamed and transformer.weight_bytes["cpu"] == transformer.pinned_bytes
    assert transformer.offload_bytes < transformer.pinned_bytes < 1.03 * transformer.offload_bytes + CHUNK_SIZES[0]
    components = plan_module._Components(inputs(model))
    sizes = components.sizes("transformer")
    streamed_blocks = [sizes[m] for m, device in transformer.device_map.items() if device == "cpu" and "blocks." in m]
    assert max(streamed_blocks) <= components.largest_block("transformer") < GB
    reserve = 2 * max(streamed_blocks) + components.top_level_bytes("transformer")
    assert transformer.activation_bytes[0] == components.activation_bytes("transformer", "denoise") + reserve


def test_the_largest_block_is_one_transformer_block_not_a_merged_list():
    components = plan_module._Components(inputs("FLUX.1-dev"))
    sizes = components.sizes("transformer")
    largest = components.largest_block("transformer")
    assert largest == max(sizes[f"transformer_blocks.{i}"] for i in range(19))
    assert largest < sizes["single_transformer_blocks"] / 10  # 0.68 GB against the list's 10.8 GB


def test_the_12gb_card_of_the_issue_plans_on_the_command_line():
    result = CliRunner().invoke(main, ["--dry-run", "--prompt", "a dog", "--max-memory", "0=12GB,cpu=32GB"])
    assert result.exit_code == 0, result.output
    assert "denoise: offloaded weights streamed ahead of use (diffusers group offloading)" in result.output
    assert "per denoising step" in result.output and "at 25 GB/s (PCIe 4.0 x16)" in result.output


@pytest.mark.parametrize("budget", [{0: 100 * 10**6, "cpu": 64 * GB}, {0: 0, "cpu": 64 * GB}])
def test_a_gpu_too_small_for_anything_is_left_out_with_a_note(budget):
    plan = plan_run(inputs("FLUX.1-dev"), budget)
    assert_within_budget(plan, budget)
    assert plan.stage("denoise").planned_bytes.keys() == {"cpu"}
    assert plan.stage("encode").component("text_encoder_2").device_map == {"": "cpu"}  # T5 whole on the CPU
    assert any(note.startswith("note: denoise leaves GPU 0 out") for note in plan.notes), plan.notes


def test_text_encoders_that_fit_no_gpu_never_crash_the_planner():
    """diffusers' private `_assign_components_to_devices` lost text_encoder_2 here (KeyError)."""
    budget = {0: 300 * 10**6, 1: 300 * 10**6, "cpu": 64 * GB}
    plan = plan_run(inputs("FLUX.1-dev"), budget)
    assert_within_budget(plan, budget)
    assert {component.name for component in plan.stage("encode").components} == {"text_encoder", "text_encoder_2"}


def test_flux1_dev_at_4096_fits_two_24gb_gpus_with_tiled_decode_and_no_cpu():
    budget = {0: 24 * GB, 1: 24 * GB}
    plan = plan_run(inputs("FLUX.1-dev", size=4096), budget)
    assert_within_budget(plan, budget)
    vae = plan.stage("decode").component("vae")
    assert vae.tiled and vae.device_map == {"": 0}
    untiled = plan_module._Components(inputs("FLUX.1-dev", size=4096)).activation_bytes("vae", "decode", 1, tiled=False)
    assert untiled > 24 * GB > vae.activation_bytes[0]


def test_decode_runs_one_image_at_a_time_when_a_batch_does_not_fit():
    components = plan_module._Components(inputs("FLUX.1-dev", batch_size=8, images=8))
    one = components.sizes("vae")[""] + components.activation_bytes("vae", "decode", 1)
    stage = plan_module.plan_decode(components, {0: 3 * one})
    vae = stage.component("vae")
    assert (vae.batch_size, vae.tiled, vae.device_map) == (1, False, {"": 0}) and stage.fits
    assert plan_module.plan_decode(components, {0: 9 * one}).component("vae").batch_size == 8


def test_activations_count_the_images_a_batch_really_holds():
    """--batch-size 16 with one prompt and one image plans one image's activations."""
    budget = {0: 24 * GB, 1: 24 * GB}
    single = plan_run(inputs("FLUX.1-dev"), budget)
    batched = plan_run(inputs("FLUX.1-dev", batch_size=16, images=1), budget)
    for stage in ("encode", "denoise", "decode"):
        assert batched.stage(stage).planned_bytes == single.stage(stage).planned_bytes
    two = plan_run(inputs("FLUX.1-dev", batch_size=16, images=2), {0: 40 * GB, 1: 40 * GB})
    one = plan_run(inputs("FLUX.1-dev"), {0: 40 * GB, 1: 40 * GB})
    assert two.stage("denoise").activation_bytes[0] == 2 * one.stage("denoise").activation_bytes[0]


def test_the_dry_run_report_states_the_offload_cost(tmp_path):
    report = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["--dry-run", "--prompt", "a dog", "--max-memory", "0=8GB,cpu=64GB",
                                       "--steps", "4", "--report", str(report)])
    assert result.exit_code == 0, result.output
    stages = {stage["name"]: stage for stage in json.loads(report.read_text())["stages"]}
    per_step = stages["denoise"]["offload_bytes_per_step"]
    assert stages["denoise"]["weight_bytes"]["cpu"] == stages["denoise"]["pinned_bytes"] > per_step > 0
    assert stages["denoise"]["offload_bytes_per_image"] == 4 * per_step
    assert "of RAM pinned for the streamed blocks (planned as allocated)" in result.output
    assert stages["denoise"]["offload"] == "streamed"
    assert stages["decode"]["offload_bytes_per_step"] == 0 and stages["decode"]["offload"] == "none"


def test_the_free_ram_check_counts_every_local_process():
    plan = plan_run(inputs("FLUX.1-dev"), {0: 8 * GB, "cpu": 64 * GB})
    most = max(stage.planned_bytes.get("cpu", 0) for stage in plan.stages)
    assert check_free_cpu_memory(plan, most + GB) == []
    (note,) = check_free_cpu_memory(plan, most + GB, local_processes=2)
    assert "in each of this machine's 2 processes" in note


def test_the_default_budget_splits_the_ram_between_local_processes(monkeypatch):
    from flux_sharded.budget import default_budget

    one, two = default_budget(1)["cpu"], default_budget(2)["cpu"]
    assert abs(two - one / 2) < one * 0.05  # the free RAM moves a little between the two reads


# --- the streamed path and tiled decode, run on the tiny checkpoint on the CPU ---------------


def tiny_settings(checkpoint: Path, size: int = 32) -> GenerationSettings:
    return GenerationSettings(str(checkpoint), ("a photo of a dog",), (5,), 2, 3.5, size, size, 64, "float32")


@pytest.mark.devices
def test_streamed_offload_hooks_sit_on_exactly_the_planned_blocks_and_change_no_latent(tiny_checkpoint):
    """The plan streams the tiny transformer's blocks but its first one, which stays on "GPU 0" (the
    tiny model is smaller than two blocks in flight plus one resident, so the device map is written
    here; the planner's budgets are tested on the real configs above). GPU 0 is a logical device
    (the devices tier; no side stream there), so the same group-offloading hooks run, and the
    latents equal the plain in-memory run."""
    from diffusers.hooks import HookRegistry

    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    settings = tiny_settings(tiny_checkpoint)
    request = runner.RunRequest(checkpoint, settings, {"cpu": 4 * GB}, Path("unused"))
    components = plan_module._Components(runner.plan_inputs(request))
    device_map = {"time_text_embed": 0, "context_embedder": 0, "x_embedder": 0, "transformer_blocks.0": 0,
                  "transformer_blocks.1": "cpu", "single_transformer_blocks": "cpu", "norm_out": "cpu",
                  "proj_out": "cpu"}
    transformer_plan = plan_module._placed(components, "transformer", "denoise", device_map, [0], streamed=True)
    stage_plan = plan_module.StagePlan("denoise", (transformer_plan,), {0: 10**9, "cpu": 10**9})
    assert transformer_plan.streamed
    sizes = components.sizes("transformer")
    assert transformer_plan.weight_bytes[0] == sizes["transformer_blocks.0"]  # the embedders stream too
    assert transformer_plan.offload_bytes == sizes[""] - sizes["transformer_blocks.0"]

    encoded = encode.run(encode.load(checkpoint, plan_run(runner.plan_inputs(request), {"cpu": 4 * GB})
                                     .stage("encode"), torch.float32), Handoff(settings))
    plain_plan = plan_run(runner.plan_inputs(request), {"cpu": 4 * GB}).stage("denoise")
    expected = denoise.run(denoise.load(checkpoint, plain_plan, torch.float32), encoded).latents

    with logical_gpus():
        pipeline = denoise.load(checkpoint, stage_plan, torch.float32)
        model = pipeline.transformer
        streamed = set(offloaded_blocks(model, transformer_plan.device_map))
        assert streamed, "the plan should offload some blocks"
        for name in ("transformer_blocks", "single_transformer_blocks"):
            for index, block in enumerate(getattr(model, name)):
                registry = getattr(block, "_diffusers_hook", None)
                hooked = registry is not None and registry.get_hook("group_offloading") is not None
                planned_cpu = placement(f"{name}.{index}", transformer_plan.device_map) == "cpu"
                assert hooked == planned_cpu == (f"{name}.{index}" in streamed), f"{name}.{index}"
        # the top-level modules form diffusers' own group on the model itself
        assert HookRegistry.check_if_exists_or_initialize(model).get_hook("group_offloading") is not None
        assert denoise.device_map(pipeline)["transformer"] == {k: str(v) for k, v in transformer_plan.device_map.items()}

        latents = denoise.run(pipeline, encoded).latents
    assert_close_to_the_cpu(latents, expected)


def one_piece_tiled_pixels(checkpoint: Path, prompt: str, seed: int, steps: int, size: int,
                           tiled: bool = True) -> np.ndarray:
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    if tiled:
        pipeline.vae.enable_tiling()
    pipeline.set_progress_bar_config(disable=True)
    return np.asarray(pipeline(prompt, height=size, width=size, num_inference_steps=steps, max_sequence_length=64,
                               generator=torch.Generator("cpu").manual_seed(seed)).images[0])


def test_tiled_decode_equals_diffusers_tiled_pipeline(tiny_checkpoint, tmp_path):
    """The tiny VAE tiles 32-pixel squares; at 96x96 a budget that holds every other stage and the
    tiled decode, but not the whole image's decode, makes the plan choose tiling."""
    size, seed, prompt = 96, 4, "a photo of a dog"
    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    settings = tiny_settings(tiny_checkpoint, size)
    request = runner.RunRequest(checkpoint, settings, {"cpu": 4 * GB}, Path("unused"))
    components = plan_module._Components(runner.plan_inputs(request))
    vae = components.sizes("vae")[""]
    tiled, whole = (vae + components.activation_bytes("vae", "decode", 1, tiled=flag) for flag in (True, False))
    others = max(stage.planned_bytes["cpu"] for stage in plan_run(runner.plan_inputs(request), {"cpu": 4 * GB}).stages
                 if stage.name != "decode")
    budget_bytes = max(tiled, others)
    assert budget_bytes < whole, (tiled, whole, others)

    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "--model", str(tiny_checkpoint), "--prompt", prompt, "--seed", str(seed), "--steps", "2",
        "--height", str(size), "--width", str(size), "--dtype", "float32", "--max-memory", f"cpu={budget_bytes}B",
        "--max-sequence-length", "64",
        "--out", str(out), "--report", str(tmp_path / "report.json"),
    ])
    assert result.exit_code == 0, result.output
    decode_report = next(s for s in json.loads((tmp_path / "report.json").read_text())["stages"]
                         if s["name"] == "decode")
    assert decode_report["tiled"]
    (path,) = out.glob("*.png")
    expected = one_piece_tiled_pixels(tiny_checkpoint, prompt, seed, 2, size)
    assert_same_pixels(np.asarray(Image.open(path)), expected)
    untiled = one_piece_tiled_pixels(tiny_checkpoint, prompt, seed, 2, size, tiled=False)
    assert np.abs(untiled.astype(int) - expected).max() > 0, "tiling must change these pixels for the test to count"


def test_a_decode_planned_one_image_at_a_time_equals_each_image_decoded_alone(tiny_checkpoint):
    """A plan whose decode holds one image's activations decodes a batch through diffusers'
    vae.enable_slicing(); its images are exactly those of each image decoded alone (what decode did
    by hand before: a batch of one image per vae.decode)."""
    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    settings = dataclasses.replace(tiny_settings(tiny_checkpoint), prompts=("a dog", "a cat"), seeds=(1, 2),
                                   batch_size=2)
    request = runner.RunRequest(checkpoint, settings, {"cpu": 4 * GB}, Path("unused"))
    whole = plan_run(runner.plan_inputs(request), {"cpu": 4 * GB}).stage("decode")
    assert whole.component("vae").batch_size == 2
    one_at_a_time = dataclasses.replace(whole, components=(dataclasses.replace(whole.component("vae"), batch_size=1),))
    tokens = (32 // 16) ** 2
    latents = torch.randn(2, tokens, checkpoint.transformer_config["in_channels"],
                          generator=torch.Generator("cpu").manual_seed(0))
    handoff = Handoff(settings, latents=latents)

    pipeline = decode.load(checkpoint, one_at_a_time, torch.float32)
    assert pipeline.vae.use_slicing
    sliced = decode.run(pipeline, handoff).images
    alone = [decode.run(decode.load(checkpoint, whole, torch.float32), handoff.select([row])).images[0]
             for row in range(2)]
    for image, expected in zip(sliced, alone, strict=True):
        assert_same_pixels(np.asarray(image), np.asarray(expected))
