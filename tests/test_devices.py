"""The `devices` tier: each GPU of a plan is a distinct (logical) device, so a tensor that crosses
devices without a hook fails on this CPU-only machine, while every value is the CPU's, so the PNGs
still equal the one-piece pipeline's.

How (tests/devices.py): a torch function mode keeps beside every real CPU tensor the device it would
be on; `.to(cuda:i)` marks a copy `cuda:i`, `tensor.device` answers the mark, and a call mixing two
marks (two GPUs, or a GPU and un-hooked CPU weights) raises DeviceMismatch, as CUDA would. The
placement code runs as on GPUs (accelerate's dispatch and hooks, diffusers' group offloading with
streams off, from_pretrained with a device map): nothing in flux_sharded knows about the tier.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import flux_sharded
from flux_sharded import api, memory
from flux_sharded import plan as plan_module
from flux_sharded import runner
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.errors import PlacementError
from flux_sharded.handoff import GenerationSettings, Handoff
from flux_sharded.blocks import block_structure
from flux_sharded.placement import check_placement, place, placement
from flux_sharded.plan import plan_run
from flux_sharded.stages import decode, denoise, encode

from .conftest import assert_same_pixels, one_piece_pixels
from .devices import DeviceMismatch, assert_close_to_the_cpu, logical_gpus
from .test_quantize import PROMPT, SEED, SIZE, STEPS, TOKENS, one_piece_quantized

pytestmark = pytest.mark.devices

GB = 10**9
CPU_BUDGET = {"cpu": 4 * GB}


def settings_for(checkpoint: Path, method: str) -> GenerationSettings:
    """test_quantize's image (so that its one-piece references apply), quantized as `method` says."""
    quantize = "none" if method == "none" else f"text_encoder_2={method},transformer={method}"
    return GenerationSettings(str(checkpoint), (PROMPT,), (SEED,), STEPS, 3.5, SIZE, SIZE, TOKENS, "float32",
                              quantize=quantize)


def expected_pixels(checkpoint: Path, method: str) -> np.ndarray:
    """The one-piece pipeline's image, quantized the same way."""
    if method == "none":
        return one_piece_pixels(checkpoint, PROMPT, SEED, STEPS, SIZE, SIZE, max_sequence_length=TOKENS)
    return one_piece_quantized(checkpoint, method)


def staged_pixels(checkpoint: Path, settings: GenerationSettings, stages: dict) -> np.ndarray:
    """encode -> denoise -> decode, each loaded by its stage plan (`stages`: name -> StagePlan) on
    distinct logical GPUs, and the image."""
    resolved = resolve_checkpoint(str(checkpoint))
    with logical_gpus():
        encoded = encode.run(encode.load(resolved, stages["encode"], torch.float32), Handoff(settings))
        denoised = denoise.run(denoise.load(resolved, stages["denoise"], torch.float32), encoded)
        decoded = decode.run(decode.load(resolved, stages["decode"], torch.float32), denoised)
    return np.asarray(decoded.images[0])


def plans(checkpoint: Path, settings: GenerationSettings, budget: dict) -> dict:
    request = runner.RunRequest(resolve_checkpoint(str(checkpoint)), settings, budget, Path("unused"))
    return {stage.name: stage for stage in plan_run(runner.plan_inputs(request), budget).stages}


def components(checkpoint: Path, settings: GenerationSettings):
    request = runner.RunRequest(resolve_checkpoint(str(checkpoint)), settings, CPU_BUDGET, Path("unused"))
    return plan_module._Components(runner.plan_inputs(request))


def test_a_tensor_crossing_logical_gpus_without_a_hook_fails_and_accelerates_hook_computes_the_cpu_values():
    torch.manual_seed(0)
    layer, inputs = torch.nn.Linear(4, 4), torch.randn(2, 4)
    expected = layer(inputs)
    with logical_gpus():
        on_gpu_1, on_gpu_0 = copy.deepcopy(layer).to("cuda:1"), inputs.to(0)
        assert on_gpu_1.weight.device == torch.device("cuda", 1) and on_gpu_0.device == torch.device("cuda", 0)
        assert torch.arange(2, device=on_gpu_0.device).device == torch.device("cuda", 0)
        with pytest.raises(DeviceMismatch, match="cuda:0 and cuda:1"):
            on_gpu_1(on_gpu_0)
        with pytest.raises(DeviceMismatch, match="cpu and cuda:0"):
            layer(on_gpu_0)  # weights never moved: the CPU's
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(on_gpu_1, AlignDevicesHook(execution_device=1, io_same_device=True))
        output = on_gpu_1(on_gpu_0)
        assert output.device == torch.device("cuda", 0)  # back where its input was
        assert (output * torch.tensor(2.0)).device == torch.device("cuda", 0)  # a 0-dim CPU scalar mixes, as on a GPU
    assert torch.equal(output, expected)


@pytest.mark.parametrize("method, gpu_bytes", [("none", 600_000), ("fp8", 400_000), ("int8", 400_000)])
def test_a_transformer_split_over_two_gpus_runs_where_its_plan_put_each_module(tiny_checkpoint, method, gpu_bytes):
    """Issue 18 item 1: the plan puts blocks on both GPUs and norm_out/proj_out on GPU 1; a quantized
    transformer (loaded on the CPU, then placed) used to have every top-level module on GPU 0 and
    crashed at norm_out with GPU 1's hidden states. Placed by accelerate's dispatch now, as planned."""
    settings = settings_for(tiny_checkpoint, method)
    stages = plans(tiny_checkpoint, settings, {0: gpu_bytes, 1: gpu_bytes, **CPU_BUDGET})
    transformer = stages["denoise"].component("transformer")
    assert transformer.quantization == (None if method == "none" else method) and not transformer.streamed
    assert transformer.device_map["norm_out"] == transformer.device_map["proj_out"] == 1
    assert transformer.device_map["x_embedder"] == 0
    assert_same_pixels(staged_pixels(tiny_checkpoint, settings, stages), expected_pixels(tiny_checkpoint, method))


# Resident blocks on GPUs 0 and 1 with "cpu" blocks streamed, in both orders: streamed blocks last
# (which worked only because group offloading's hook brings the hidden states back to GPU 0), and a
# last block on GPU 1 after streamed ones (item 2: norm_out on GPU 0 got GPU 1's hidden states).
ORDERS = {
    "gpus-then-streamed": {"transformer_blocks.0": 0, "transformer_blocks.1": 1, "single_transformer_blocks": "cpu"},
    "streamed-then-gpu-1": {"transformer_blocks.0": "cpu", "transformer_blocks.1": 0,
                            "single_transformer_blocks.0": "cpu", "single_transformer_blocks.1": 1},
}
TOP_LEVEL = {"pos_embed": 0, "time_text_embed": 0, "context_embedder": 0, "x_embedder": 0, "norm_out": 0,
             "proj_out": 0}


@pytest.mark.parametrize("method", ["none", "fp8"])
@pytest.mark.parametrize("order", ORDERS)
def test_streamed_blocks_and_resident_blocks_on_two_gpus_run_in_any_order(tiny_checkpoint, order, method):
    """The tiny model is smaller than blocks in flight, so the map is written here and given to the
    planner's own _placed (which streams the top-level modules with the "cpu" blocks)."""
    settings = settings_for(tiny_checkpoint, method)
    stages = plans(tiny_checkpoint, settings, CPU_BUDGET)
    planned = plan_module._placed(components(tiny_checkpoint, settings), "transformer", "denoise",
                                  {**TOP_LEVEL, **ORDERS[order]}, [0, 1], streamed=True)
    assert planned.streamed and planned.device_map["norm_out"] == "cpu"
    stages["denoise"] = dataclasses.replace(stages["denoise"], components=(planned,))
    assert_same_pixels(staged_pixels(tiny_checkpoint, settings, stages), expected_pixels(tiny_checkpoint, method))


def test_streamed_placement_hooks_exactly_the_planned_blocks(tiny_checkpoint):
    """Each "cpu" block carries diffusers' group-offloading hook alone; each resident block keeps its
    weights on its GPU with one accelerate hook; the report's map is the plan's."""
    settings = settings_for(tiny_checkpoint, "none")
    planned = plan_module._placed(components(tiny_checkpoint, settings), "transformer", "denoise",
                                  {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1], streamed=True)
    stage_plan = dataclasses.replace(plans(tiny_checkpoint, settings, CPU_BUDGET)["denoise"], components=(planned,))
    with logical_gpus():
        pipeline = denoise.load(resolve_checkpoint(str(tiny_checkpoint)), stage_plan, torch.float32)
        model = pipeline.transformer
        for name in block_structure(model).blocks(model):
            block = model.get_submodule(name)
            device = placement(name, planned.device_map)
            streamed = block._diffusers_hook.get_hook("group_offloading") is not None \
                if hasattr(block, "_diffusers_hook") else False
            assert streamed == (device == "cpu"), name
            assert hasattr(block, "_hf_hook") == (device != "cpu"), name
            expected = torch.device("cpu") if device == "cpu" else torch.device("cuda", device)
            assert {p.device for p in block.parameters()} == {expected}, name
    assert denoise.device_map(pipeline)["transformer"] == {key: str(value) for key, value in planned.device_map.items()}


def test_the_streamed_tensors_are_packed_into_exactly_the_host_memory_the_plan_counted(tiny_checkpoint):
    """After placement, the tensors of the modules the plan streams live in chunks whose bytes are
    the plan's pinned bytes, its "cpu" weights (host_memory.py; unpinned here: torch pins only with
    CUDA). Checked before the first forward: without a CUDA stream, group offloading moves a block
    back to the CPU as a new tensor, where on a GPU it puts back the pinned one it kept."""
    settings = settings_for(tiny_checkpoint, "none")
    planned = plan_module._placed(components(tiny_checkpoint, settings), "transformer", "denoise",
                                  {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1], streamed=True)
    stage_plan = dataclasses.replace(plans(tiny_checkpoint, settings, CPU_BUDGET)["denoise"], components=(planned,))
    with logical_gpus():
        model = denoise.load(resolve_checkpoint(str(tiny_checkpoint)), stage_plan, torch.float32).transformer
        streamed = [model.get_submodule(name) for name, device in planned.device_map.items() if device == "cpu"]
        storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                    for module in streamed for tensor in [*module.parameters(), *module.buffers()]}
    assert planned.pinned_bytes == planned.weight_bytes["cpu"] == sum(storages.values()) > planned.offload_bytes


@pytest.mark.parametrize("fixture, encoder, room", [("tiny_checkpoint", "text_encoder_2", (45_000, 35_000)),
                                                     ("tiny_klein", "text_encoder", (80_000, 60_000))])
def test_a_text_encoder_split_over_two_gpus_and_the_cpu_equals_the_one_piece_pipeline(request, fixture, encoder, room):
    """T5 (FLUX.1) or Qwen3 (klein) split by the planner over GPU 0, GPU 1 and the CPU (accelerate's
    offload hooks, set by transformers' from_pretrained with the map), the rest of the run on the CPU.
    `room`: bytes on each GPU beyond the encoder's activations, chosen to give that three-way split.
    Qwen3's rotary buffer, planned on the CPU, sits on GPU 0 with accelerate's offload hooks."""
    checkpoint = request.getfixturevalue(fixture)
    settings = settings_for(checkpoint, "none")
    parts = components(checkpoint, settings)
    activation = parts.activation_bytes(encoder, "encode")
    split = plan_module._split(parts, encoder, "encode",
                               {0: activation + room[0], 1: activation + room[1], **CPU_BUDGET}, streamed=False)
    assert set(split.device_map.values()) == {0, 1, "cpu"}, split.device_map
    stages = plans(checkpoint, settings, CPU_BUDGET)
    stages["encode"] = dataclasses.replace(stages["encode"], components=tuple(
        split if part.name == encoder else part for part in stages["encode"].components))
    assert_same_pixels(staged_pixels(checkpoint, settings, stages), expected_pixels(checkpoint, "none"))


def test_a_module_moved_off_its_planned_gpu_is_a_placement_error(tiny_checkpoint):
    """check_placement compares the model with the map after placement; a difference is a bug error."""
    settings = settings_for(tiny_checkpoint, "fp8")
    stage_plan = plans(tiny_checkpoint, settings, {0: 400_000, 1: 400_000, **CPU_BUDGET})["denoise"]
    transformer_plan = stage_plan.component("transformer")
    with logical_gpus():
        pipeline = denoise.load(resolve_checkpoint(str(tiny_checkpoint)), stage_plan, torch.float32)
        model = pipeline.transformer
        check_placement(model, transformer_plan.device_map, streamed=False)
        model.norm_out._hf_hook.execution_device = torch.device("cuda", 0)
        with pytest.raises(PlacementError, match=r"norm_out has no hook moving its inputs to 1"):
            check_placement(model, transformer_plan.device_map, streamed=False)
        model.proj_out.to("cuda:0")
        with pytest.raises(PlacementError, match=r"proj_out holds weights on \['0'\], planned on 1"):
            check_placement(model, transformer_plan.device_map, streamed=False)


def _transformer_with_adapter(checkpoint: Path):
    """The tiny transformer with a LoRA adapter on its attention projections, initialised to change
    the outputs (peft's init_lora_weights=False), added through diffusers' own add_adapter."""
    import diffusers
    from peft import LoraConfig

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer", dtype=torch.float32)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    return model


def _inputs(model) -> dict:
    config = model.config
    generator = torch.Generator("cpu").manual_seed(1)
    tokens, text = 16, 8
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def test_adapters_loaded_before_a_streamed_placement_keep_the_resident_blocks_resident(tiny_checkpoint):
    """Item 9's contract: adapters are loaded before placement. The placed model passes the check
    (resident blocks resident with one accelerate hook, streamed blocks with one group hook) and
    its output, adapter included, equals the model's on the CPU."""
    model = _transformer_with_adapter(tiny_checkpoint)
    with torch.inference_mode():
        expected = model(**_inputs(model))[0]
        model.disable_adapters()
        without_adapter = model(**_inputs(model))[0]
        model.enable_adapters()
    device_map = plan_module._placed(components(tiny_checkpoint, settings_for(tiny_checkpoint, "none")),
                                     "transformer", "denoise", {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1],
                                     streamed=True).device_map
    with logical_gpus(), torch.inference_mode():
        place(model, device_map, streamed=True)
        inputs = {name: value.to(0) if isinstance(value, torch.Tensor) else value
                  for name, value in _inputs(model).items()}
        output = model(**inputs)[0]
        assert output.device == torch.device("cuda", 0)
    assert_close_to_the_cpu(output, expected)
    assert (without_adapter - expected).abs().max() > 1e-2



def test_adapters_changed_after_a_streamed_placement_undo_it_and_the_check_says_so(tiny_checkpoint):
    """Why the contract: diffusers re-applies group offloading over the full block lists when an
    adapter is deleted, loaded or unloaded (_maybe_remove_and_reapply_group_offloading, a private
    helper this pins), which streams the resident blocks too; check_placement catches it."""
    model = _transformer_with_adapter(tiny_checkpoint)
    device_map = plan_module._placed(components(tiny_checkpoint, settings_for(tiny_checkpoint, "none")),
                                     "transformer", "denoise", {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1],
                                     streamed=True).device_map
    with logical_gpus():
        place(model, device_map, streamed=True)
        model.delete_adapters("default")
        resident = model.transformer_blocks[1]
        assert resident._diffusers_hook.get_hook("group_offloading") is not None and hasattr(resident, "_hf_hook")
        with pytest.raises(PlacementError, match=r"transformer_blocks\.1 is planned resident on 0 but streamed"):
            check_placement(model, device_map, streamed=True)


def test_flush_touches_only_the_budgeted_gpus(monkeypatch):
    """Item 5: on a machine with four GPUs and a budget of GPUs 0 and 2, flush empties the caches
    and resets the peaks of those two and enters no device (each entered device opens a CUDA
    context: 0.3-0.5 GB on a card the budget never named). CUDA's runtime is the boundary faked here:
    every call that names or enters a device is recorded."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "device", lambda index: touched.append(("enter", index)) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: touched.append(("enter", index)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: touched.append(("empty cache", None)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index=None: touched.append(("reset", index)))
    # item 4: the pinned host memory a streamed stage held is given back too
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: touched.append(("empty host cache", None)))
    memory.flush([0, 2])
    assert sorted(touched, key=str) == [("empty cache", None), ("empty host cache", None), ("reset", 0), ("reset", 2)]


@pytest.mark.parametrize("fixture, encoder, method", [("tiny_checkpoint", "text_encoder_2", "fp8"),
                                                      ("tiny_checkpoint", "text_encoder_2", "int8"),
                                                      ("tiny_klein", "text_encoder", "int8"),
                                                      ("tiny_dev", "text_encoder", "fp8")])
def test_a_quantized_text_encoder_split_over_a_gpu_and_ram_streams_its_nested_blocks(request, fixture, encoder, method):
    """Issue 18 item 10: a quantized (fp8, int8) text encoder that fits no GPU whole ran whole on the
    CPU. Now its blocks fill the GPU's room and the rest stream from RAM by diffusers' group
    offloading, recursing into the containers that hold the block list (T5's encoder.block, Qwen3's
    model.layers, Mistral 3's model.language_model.layers: blocks.py). Its embeddings equal the
    all-CPU encode's, and each block sits where the plan put it."""
    checkpoint = request.getfixturevalue(fixture)
    settings = dataclasses.replace(settings_for(checkpoint, "none"), quantize=f"{encoder}={method}")
    parts = components(checkpoint, settings)
    # The tiny encoders are smaller than the blocks in flight, so the map is written here (the first
    # half of the blocks on GPU 0) and given to the planner's own _placed; plan_encode's choice is
    # test_plan's (real configs on meta).
    blocks = block_structure(parts.model(encoder)).blocks(parts.model(encoder))
    device_map = {"": "cpu", **{name: 0 for name in blocks[: len(blocks) // 2]}}
    split = plan_module._placed(parts, encoder, "encode", device_map, [0], streamed=True)
    assert split.streamed and split.quantization == method and set(split.device_map.values()) == {0, "cpu"}
    stages = plans(checkpoint, settings, CPU_BUDGET)
    resolved = resolve_checkpoint(str(checkpoint))
    expected = encode.run(encode.load(resolved, stages["encode"], torch.float32), Handoff(settings))
    stage_plan = dataclasses.replace(stages["encode"], components=tuple(
        split if part.name == encoder else part for part in stages["encode"].components))
    with logical_gpus():
        pipeline = encode.load(resolved, stage_plan, torch.float32)
        model = getattr(pipeline, encoder)
        for name in block_structure(model).blocks(model):
            block = model.get_submodule(name)
            planned = placement(name, split.device_map)
            assert hasattr(block, "_diffusers_hook") == (planned == "cpu"), name
            assert {p.device for p in block.parameters()} == {torch.device("cpu") if planned == "cpu"
                                                              else torch.device("cuda", planned)}, name
        encoded = encode.run(pipeline, Handoff(settings))
    for name, tensor in expected.named.items():
        assert_close_to_the_cpu(encoded.named[name], tensor)


def _lora_settings(checkpoint: Path, lora: Path, quantize: str = "none") -> GenerationSettings:
    """test_lora's image with `lora` at scale 0.8, as the command line records it."""
    from flux_sharded.lora import resolve

    from . import test_lora

    return GenerationSettings(str(checkpoint), (test_lora.PROMPT,), (test_lora.SEED,), test_lora.STEPS, 3.5,
                              test_lora.SIZE, test_lora.SIZE, test_lora.TOKENS, "float32", quantize=quantize,
                              lora=(resolve(f"{lora}:0.8").saved_text,))


def _lora_expected(checkpoint: Path, lora: Path, method: str) -> np.ndarray:
    from . import test_lora

    if method == "none":
        return one_piece_pixels(checkpoint, test_lora.PROMPT, test_lora.SEED, test_lora.STEPS, test_lora.SIZE,
                                test_lora.SIZE, max_sequence_length=test_lora.TOKENS, loras=((lora, 0.8),))
    return test_lora._one_piece_quantized(checkpoint, method, lora, 0.8)


def test_clip_with_a_lora_split_over_a_gpu_and_ram_streams_its_blocks_with_their_adapters(tiny_checkpoint, tmp_path):
    """A text encoder with LoRAs that fits no GPU whole is split by streaming (plan._plan_encode):
    accelerate's offload hooks, which from_pretrained sets as it loads, leave no moment to put the
    adapters in first. Its embeddings equal the all-CPU encode's with the LoRA, and each block sits
    where the map put it. (The tiny CLIP's blocks are smaller than the blocks in flight, so the map
    is written here, as for the quantized encoders above.)"""
    from flux_sharded.tiny import build_tiny_lora

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "kohya.safetensors", seed=2, kind="kohya", text_encoder=True)
    settings = _lora_settings(tiny_checkpoint, lora)
    stages = plans(tiny_checkpoint, settings, CPU_BUDGET)
    parts = components(tiny_checkpoint, settings)
    clip = stages["encode"].component("text_encoder")
    assert clip.adapters
    blocks = block_structure(parts.model("text_encoder")).blocks(parts.model("text_encoder"))
    split = dataclasses.replace(
        plan_module._placed(parts, "text_encoder", "encode", {"": "cpu", **{name: 0 for name in blocks[:1]}}, [0],
                            streamed=True), adapters=clip.adapters)
    resolved = resolve_checkpoint(str(tiny_checkpoint))
    expected = encode.run(encode.load(resolved, stages["encode"], torch.float32), Handoff(settings))
    stage_plan = dataclasses.replace(stages["encode"], components=tuple(
        split if part.name == "text_encoder" else part for part in stages["encode"].components))
    with logical_gpus():
        pipeline = encode.load(resolved, stage_plan, torch.float32)
        model = pipeline.text_encoder
        assert any("lora_A" in name for name, _ in model.named_parameters())  # the adapters went in
        assert {p.device for p in model.get_submodule(blocks[0]).parameters()} == {torch.device("cuda", 0)}
        assert hasattr(model.get_submodule(blocks[1]), "_diffusers_hook")  # streamed from RAM
        encoded = encode.run(pipeline, Handoff(settings))
    for name, tensor in expected.named.items():
        assert_close_to_the_cpu(encoded.named[name], tensor)


def test_an_encoder_with_loras_is_never_planned_under_accelerates_offload_hooks(tiny_checkpoint, tmp_path):
    """A budget that split CLIP with its LoRA under accelerate's hooks, which was refused: its
    blocks would stream now, which takes more GPU room than is left here, so CLIP runs on the
    CPU with its LoRA and the run is planned, not refused."""
    from flux_sharded.tiny import build_tiny_lora

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "kohya.safetensors", seed=2, kind="kohya", text_encoder=True)
    budget = {0: 700_000, "cpu": 2 * GB}
    settings = _lora_settings(tiny_checkpoint, lora)
    request = runner.RunRequest(resolve_checkpoint(str(tiny_checkpoint)), settings, budget, Path("unused"))
    plan = plan_run(runner.plan_inputs(request), budget)
    runner.check_adapters_placed(plan, request)  # not refused
    clip = plan.stage("encode").component("text_encoder")
    assert clip.device_map == {"": "cpu"} and clip.adapters
    assert any("streaming its blocks" in note for note in plan.stage("encode").notes)


@pytest.mark.parametrize("method", ["none", "int8"])
def test_a_transformer_with_a_lora_split_over_two_gpus_equals_the_one_piece_pipeline(tiny_checkpoint, tmp_path,
                                                                                     method):
    """The LoRA goes into the transformer on the CPU; accelerate's dispatch then puts each block, its
    adapters with it, on the GPU the plan chose (the plan counts them there)."""
    from flux_sharded.tiny import build_tiny_lora

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1, text_encoder=True)
    settings = _lora_settings(tiny_checkpoint, lora, "none" if method == "none" else f"transformer={method}")
    stages = plans(tiny_checkpoint, settings, {0: 800_000, 1: 800_000, **CPU_BUDGET})
    transformer = stages["denoise"].component("transformer")
    assert transformer.adapters and transformer.adapter_bytes > 0
    assert set(transformer.device_map.values()) == {0, 1}
    assert stages["encode"].component("text_encoder").adapters  # CLIP's LoRA, in encode
    assert_same_pixels(staged_pixels(tiny_checkpoint, settings, stages), _lora_expected(tiny_checkpoint, lora, method))


@pytest.mark.parametrize("method", ["none", "fp8"])
def test_a_transformer_with_a_lora_and_streamed_blocks_equals_the_one_piece_pipeline(tiny_checkpoint, tmp_path,
                                                                                     method):
    """Adapters loaded before group offloading is applied: the streamed blocks carry theirs from RAM,
    the resident blocks stay resident (placement.check_placement), the pixels are the one-piece's."""
    from flux_sharded.tiny import build_tiny_lora

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1)
    settings = _lora_settings(tiny_checkpoint, lora, "none" if method == "none" else f"transformer={method}")
    stages = plans(tiny_checkpoint, settings, CPU_BUDGET)
    adapters = stages["denoise"].component("transformer").adapters
    planned = plan_module._placed(components(tiny_checkpoint, settings), "transformer", "denoise",
                                  {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1], streamed=True)
    stages["denoise"] = dataclasses.replace(stages["denoise"], components=(dataclasses.replace(planned,
                                                                                              adapters=adapters),))
    assert planned.streamed and adapters
    assert_same_pixels(staged_pixels(tiny_checkpoint, settings, stages), _lora_expected(tiny_checkpoint, lora, method))


@pytest.mark.parametrize("budget, denoise_devices, offload", [
    ("0=800KB,1=800KB,cpu=2GB", {"0", "1"}, "none"),  # the transformer split over both GPUs
    ("0=600KB,cpu=2GB", {"cpu"}, "streamed"),  # its blocks streamed to GPU 0 from pinned RAM
], ids=["split", "streamed"])
def test_a_models_stages_on_gpus_go_back_to_ram_between_calls_and_are_placed_again(tiny_checkpoint, loads,
                                                                                  monkeypatch, budget,
                                                                                  denoise_devices, offload):
    """Issue 24: api.Model keeps a stage placed on GPUs (encoders and VAE on a GPU, the transformer
    split over two or streamed) in RAM between calls, with no GPU weight left, and the next call
    places it again by the same map without reading a weight: the pixels of a run on the CPU.
    CUDA's runtime is faked at its boundary only: the GPU count and the memory statistics the
    report reads."""
    monkeypatch.setattr(api, "gpu_count", lambda: 2)
    for name in ("synchronize", "reset_peak_memory_stats", "reset_peak_host_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda index=None: 0)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: {})
    settings = {"steps": 2, "height": 32, "width": 32, "max_sequence_length": 64}
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as on_cpu:
        expected = np.asarray(on_cpu.generate("a dog", seed=3, **settings).images[0])
    loads.clear()
    with logical_gpus(), flux_sharded.open_model(str(tiny_checkpoint), max_memory=budget, dtype="float32") as model:
        plan = model.plan(**settings)
        assert [stage.kept_bytes for stage in plan.stages] == [sum(stage.weight_bytes.values())
                                                               for stage in plan.stages]
        assert set(plan.stages[1].weight_bytes) == denoise_devices and plan.stages[1].offload == offload
        assert all(set(stage.weight_bytes) - {"cpu"} for stage in (plan.stages[0], plan.stages[2]))  # on a GPU
        first = model.generate("a dog", seed=3, **settings)
        read = len(loads)
        for _, loaded in model.kept._loaded.values():  # between calls: every weight in RAM
            for part in ("text_encoder", "text_encoder_2", "transformer", "vae"):
                component = getattr(loaded, part, None)
                if component is not None:
                    assert {tensor.device.type for tensor in component.state_dict().values()} == {"cpu"}, part
        second = model.generate("a dog", seed=3, **settings)
        assert len(loads) == read == 4  # nothing read again
    assert [stage.weights_kept for stage in second.report.stages] == [True, True, True]
    for generation in (first, second):  # placed as planned both times
        assert set(generation.report.stages[1].device_map["transformer"].values()) == denoise_devices
        assert_same_pixels(np.asarray(generation.images[0]), expected)


def test_a_streamed_placement_goes_to_ram_and_back_keeping_group_offloading(tiny_checkpoint):
    """placement.to_host and place_again on a streamed map with a resident block on GPU 1: the
    resident block's weights go to RAM and come back under the same hooks, the streamed blocks
    keep group offloading's, and the output is the CPU's."""
    from flux_sharded.placement import place_again, to_host

    model = _transformer_with_adapter(tiny_checkpoint)
    expected = model(**_inputs(model))[0]
    device_map = plan_module._placed(components(tiny_checkpoint, settings_for(tiny_checkpoint, "none")),
                                     "transformer", "denoise", {**TOP_LEVEL, **ORDERS["streamed-then-gpu-1"]}, [0, 1],
                                     streamed=True).device_map
    with logical_gpus(), torch.inference_mode():
        place(model, device_map, streamed=True)
        resident = model.single_transformer_blocks[1]
        to_host(model, streamed=True)
        assert {parameter.device for parameter in model.parameters()} == {torch.device("cpu")}
        assert hasattr(resident, "_hf_hook") and model.transformer_blocks[0]._diffusers_hook is not None
        place_again(model, device_map, streamed=True)
        assert {parameter.device for parameter in resident.parameters()} == {torch.device("cuda", 1)}
        inputs = {name: value.to(0) if isinstance(value, torch.Tensor) else value
                  for name, value in _inputs(model).items()}
        output = model(**inputs)[0]
    assert_close_to_the_cpu(output, expected)
