"""The planner: byte-exact placements on small modules, and the real FLUX.1 configs on meta."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from flux_sharded import families
from flux_sharded import plan as plan_module
from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.components import empty_component, module_sizes
from flux_sharded.errors import PlanError
from flux_sharded.plan import PlanInputs, auto_device_map, check_free_cpu_memory, check_free_gpu_memory, plan_run

GB = 10**9


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)  # 2 x (64 + 8) x 4 bytes = 576 bytes


class Toy(nn.Module):
    """embed 128 bytes, four 576-byte blocks, head 64 bytes: 2496 bytes in float32."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8, bias=False)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 2, bias=False)


def test_toy_sizes_are_what_the_cases_below_assume():
    sizes = module_sizes(Toy(), torch.float32)
    assert (sizes[""], sizes["embed"], sizes["blocks.0"], sizes["head"]) == (2496, 128, 576, 64)
    assert module_sizes(Toy(), torch.bfloat16)[""] == 1248


@pytest.mark.parametrize(
    "budget, expected",
    [
        # everything fits one device: one entry for the whole model
        ({0: 10_000}, {"": 0}),
        ({"cpu": 3_000}, {"": "cpu"}),
        # two GPUs: balanced, then accelerate keeps room for the largest block on each GPU for
        # offloaded layers, so what misses goes to disk even though it is not budgeted
        ({0: 1_500, 1: 1_500}, {"embed": 0, "blocks.0": 0, "blocks.1": 1, "blocks.2": 1, "blocks.3": "disk", "head": "disk"}),
        # balanced share: 2496 / 2 + 1.25 x 576 = 1968 bytes for GPU 0; a third block would leave
        # less than one block (576) of room there, so it goes to GPU 1
        ({0: 2_000, 1: 2_000}, {"embed": 0, "blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "blocks.3": 1, "head": 1}),
        # with RAM budgeted, the rest is offloaded to the CPU
        ({0: 800, 1: 800, "cpu": 10_000},
         {"embed": 0, "blocks.0": 1, "blocks.1": "cpu", "blocks.2": "cpu", "blocks.3": "cpu", "head": "cpu"}),
        # disk is used after the CPU; "disk" is also accepted (diffusers' own recipe fails on it)
        ({0: 700, "cpu": 1_000, "disk": 5_000}, {"embed": "cpu", "blocks": "disk", "head": "disk"}),
    ],
)
def test_byte_exact_device_maps_on_a_small_module(budget, expected):
    device_map = auto_device_map(Toy(), budget, torch.float32)
    assert dict(device_map) == expected
    for module in device_map:  # a block is never split
        assert module.count(".") <= 1


def inputs(name: str, dtype=torch.bfloat16, size=1024, sequence=512) -> PlanInputs:
    return PlanInputs(shipped_config_dir(name), dtype, size, size, sequence, vae_scale_factor=8)


@pytest.mark.parametrize(
    "component, published",
    [("transformer", 23.8 * GB), ("text_encoder_2", 9.52 * GB), ("text_encoder", 246 * 10**6), ("vae", 168 * 10**6)],
)
@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_weight_bytes_match_the_published_bf16_sizes(model, component, published):
    size = module_sizes(empty_component(shipped_config_dir(model), component), torch.bfloat16)[""]
    assert abs(size - published) / published < 0.02, f"{component}: {size} vs {published}"


def test_t5_shared_embedding_is_counted_once():
    t5 = empty_component(shipped_config_dir("FLUX.1-dev"), "text_encoder_2")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    embedding = 32128 * 4096 * 2
    unique = sum(p.numel() for p in t5.parameters()) * 2  # parameters() yields a shared tensor once
    assert module_sizes(t5, torch.bfloat16)[""] == unique
    assert unique + embedding != module_sizes(t5, torch.bfloat16)[""]


def test_float16_keeps_t5_feed_forward_output_in_float32():
    t5 = empty_component(shipped_config_dir("FLUX.1-dev"), "text_encoder_2")
    wo = 24 * 10240 * 4096  # 24 blocks' DenseReluDense.wo
    assert module_sizes(t5, torch.float16)[""] - module_sizes(t5, torch.bfloat16)[""] == wo * 2


def check_within_budget(plan, budget):
    for stage in plan.stages:
        for device, planned in stage.planned_bytes.items():
            assert device in budget, f"{stage.name} uses {device}, which is not budgeted"
            assert planned <= budget[device], f"{stage.name} on {device}: {planned} > {budget[device]}"
            if device != "disk":
                assert stage.weight_bytes.get(device, 0) + stage.activation_bytes.get(device, 0) == planned


def transformer_blocks_whole(plan):
    for module in plan.stage("denoise").component("transformer").device_map:
        parts = module.split(".")
        assert module == "" or len(parts) == 1 or (len(parts) == 2 and parts[1].isdigit()), module


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_two_16gb_gpus_share_the_transformer(model):
    budget = {0: 16 * GB, 1: 16 * GB}
    plan = plan_run(inputs(model), budget)
    check_within_budget(plan, budget)
    transformer_blocks_whole(plan)
    denoise = plan.stage("denoise")
    assert set(denoise.weight_bytes) == {0, 1}
    assert sum(denoise.weight_bytes.values()) == module_sizes(
        empty_component(shipped_config_dir(model), "transformer"), torch.bfloat16)[""]
    assert denoise.activation_bytes[0] > 100 * 10**6  # a 1024x1024 forward pass is not free
    encode = plan.stage("encode")
    assert {c.name: c.device_map for c in encode.components} == {"text_encoder": {"": 1}, "text_encoder_2": {"": 0}}


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_two_24gb_gpus(model):
    budget = {0: 24 * GB, 1: 24 * GB}
    plan = plan_run(inputs(model), budget)
    check_within_budget(plan, budget)
    transformer_blocks_whole(plan)


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_one_40gb_gpu_holds_everything_whole(model):
    budget = {0: 40 * GB}
    plan = plan_run(inputs(model), budget)
    check_within_budget(plan, budget)
    for stage in plan.stages:
        assert set(stage.planned_bytes) == {0}
        for component in stage.components:
            assert dict(component.device_map) == {"": 0}


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_two_8gb_gpus_are_refused_with_ways_out(model):
    with pytest.raises(PlanError) as refused:
        plan_run(inputs(model), {0: 8 * GB, 1: 8 * GB})
    message = str(refused.value)
    assert "encode (text_encoder, text_encoder_2: 9.77 GB of weights" in message
    assert re.search(r"denoise \(transformer: 23\.[78]\d GB of weights", message), message
    assert "finds no room on 0, 1" in message
    assert "Ways out: --max-memory 0=" in message and "cpu=" in message
    # the suggested budget is the smallest that fits, to the suggestion step
    suggested = float(message.split("--max-memory 0=")[1].split("GB")[0]) * GB
    plan_run(inputs(model), {0: int(suggested), 1: int(suggested)})
    with pytest.raises(PlanError):
        plan_run(inputs(model), {0: int(suggested - 0.1 * GB), 1: int(suggested - 0.1 * GB)})
    assert refused.value.stages and not all(stage.fits for stage in refused.value.stages)


@pytest.mark.parametrize("model", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_two_8gb_gpus_with_ram_offload_the_rest(model):
    budget = {0: 8 * GB, 1: 8 * GB, "cpu": 64 * GB}
    plan = plan_run(inputs(model), budget)
    check_within_budget(plan, budget)
    transformer_blocks_whole(plan)
    denoise = plan.stage("denoise")
    assert denoise.weight_bytes["cpu"] > 5 * GB and denoise.weight_bytes[0] > 4 * GB and denoise.weight_bytes[1] > 4 * GB
    # offloaded blocks run on a GPU: what the CPU holds beyond the pinned blocks is the loading's
    # set-up (the whole transformer is read into RAM before its resident blocks move)
    transformer = denoise.component("transformer")
    whole = transformer.weight_bytes[0] + transformer.weight_bytes[1] + transformer.offload_bytes
    assert denoise.activation_bytes["cpu"] == whole - transformer.pinned_bytes
    assert denoise.component("transformer").streamed  # the "cpu" blocks stream through group offloading
    # T5 (9.5 GB) fits neither GPU whole: split block-wise, no T5 block split, none on the CPU's side
    # of a GPU that has room.
    t5 = plan.stage("encode").component("text_encoder_2").device_map
    assert {0, 1} <= set(t5.values())
    assert all(not module.startswith("encoder.block.") or module.count(".") == 2 for module in t5)


def test_refusal_suggests_bfloat16_for_float32():
    with pytest.raises(PlanError, match=r"--dtype bfloat16 \(half the bytes\)"):
        plan_run(inputs("FLUX.1-dev", dtype=torch.float32), {0: 24 * GB})


def test_larger_images_need_more_activation_room():
    small = plan_run(inputs("FLUX.1-dev", size=512), {0: 40 * GB})
    large = plan_run(inputs("FLUX.1-dev", size=1536), {0: 40 * GB})
    for stage in ("denoise", "decode"):
        assert large.stage(stage).activation_bytes[0] > 2 * small.stage(stage).activation_bytes[0]
    assert large.stage("encode").activation_bytes == small.stage("encode").activation_bytes


def test_cpu_only_budget_plans_everything_on_the_cpu():
    plan = plan_run(inputs("FLUX.1-schnell", sequence=256), {"cpu": 64 * GB})
    for stage in plan.stages:
        assert set(stage.planned_bytes) == {"cpu"}


def test_the_plan_is_checked_against_each_gpus_free_memory():
    """0=16GB,1=16GB plans at most 12.24 GB (denoise) on GPU 0 and 12.75 GB on GPU 1."""
    plan = plan_run(inputs("FLUX.1-dev"), {0: 16 * GB, 1: 16 * GB})
    most = {index: max(stage.planned_bytes.get(index, 0) for stage in plan.stages) for index in (0, 1)}
    assert check_free_gpu_memory(plan, {0: 16 * GB, 1: 16 * GB}) == []

    # GPU 1 has the plan's bytes free, but not 1 GiB more: a note, naming the stage and a safe budget.
    (note,) = check_free_gpu_memory(plan, {0: 16 * GB, 1: most[1] + 2**29})
    assert note.startswith("note: denoise plans 12.75 GB on GPU 1, which has 13.29 GB free")
    assert "budget 1=12.2GB or less" in note

    # Another process holds part of GPU 0: refused before anything loads, with the budget that would do.
    with pytest.raises(PlanError) as refused:
        check_free_gpu_memory(plan, {0: most[0] - 1, 1: 16 * GB})
    message = str(refused.value)
    assert message.startswith("GPU 0 has 12.24 GB free now, but denoise plans 12.24 GB there under --max-memory "
                              "0=16.00 GB")
    assert "lower the budget to 0=11.1GB (its free memory less 1 GiB)" in message


def test_a_suggestion_keeps_the_users_other_entries_exactly():
    with pytest.raises(PlanError) as refused:
        plan_run(inputs("FLUX.1-dev"), {0: 8 * GB, 1: 8 * GB, "cpu": 2**31})
    assert re.search(r"Ways out: --max-memory 0=\d+\.\dGB,1=\d+\.\dGB,cpu=2GiB;", str(refused.value)), str(refused.value)


def test_the_free_memory_check_covers_only_the_stages_that_will_run():
    """A resumed run whose encode and denoise are done needs room for decode only."""
    plan = plan_run(inputs("FLUX.1-dev"), {0: 16 * GB, 1: 16 * GB})
    free = {0: 4 * GB, 1: 16 * GB}
    with pytest.raises(PlanError, match="^GPU 0 has 4.00 GB free now, but denoise plans"):
        check_free_gpu_memory(plan, free)
    assert check_free_gpu_memory(plan, free, ["decode"]) == []  # 2.02 GB, with 1 GiB to spare


def test_a_plan_above_the_available_ram_gets_a_note():
    plan = plan_run(inputs("FLUX.1-dev"), {0: 8 * GB, 1: 8 * GB, "cpu": 64 * GB})
    most = max(stage.planned_bytes.get("cpu", 0) for stage in plan.stages)
    assert check_free_cpu_memory(plan, most) == []
    (note,) = check_free_cpu_memory(plan, 4 * GB)
    assert note.startswith("note: denoise plans ") and "in RAM, but 4.00 GB is available now" in note
    assert "budget cpu=4.0GB or less" in note
    assert check_free_cpu_memory(plan, 4 * GB, ["decode"]) == []  # decode is all on a GPU


def test_a_component_serving_two_stages_is_planned_in_each_with_that_stages_estimate():
    """A VAE that encodes reference images before denoise and decodes after it (families.Component
    with two passes) is placed by both stages, each time with the activation estimate of its own pass."""
    encoding = 123 * 10**6  # an encode pass's estimate, far from the decode pass's
    vae = families.FLUX_1.component("vae")
    twice = dataclasses.replace(vae, passes={"encode": lambda config, geometry, tiled: encoding, **vae.passes})
    components = plan_module._Components(inputs("FLUX.1-dev"))
    components.family = dataclasses.replace(
        families.FLUX_1, components=tuple(twice if c.name == "vae" else c for c in families.FLUX_1.components))
    stages = {stage.name: stage for stage in plan_module._plan_all(components, {0: 40 * GB, "cpu": 64 * GB})}

    assert [c.name for c in stages["encode"].components] == ["text_encoder", "text_encoder_2", "vae"]
    encoded, decoded = stages["encode"].component("vae"), stages["decode"].component("vae")
    assert encoded.activation_bytes == {0: encoding}  # one image's encode pass
    assert decoded.activation_bytes == {0: components.activation_bytes("vae", "decode")} != {0: encoding}
    assert encoded.weight_bytes == decoded.weight_bytes == {0: components.sizes("vae")[""]}


@pytest.mark.parametrize("model, encoder, budget", [
    ("FLUX.2-dev", "text_encoder", {0: 16 * 2**30, "cpu": 64 * GB}),  # Mistral Small 3 in fp8: 18 GB
    ("FLUX.1-dev", "text_encoder_2", {0: 3 * 2**30, "cpu": 32 * GB}),  # T5-XXL in fp8: 5.9 GB
])
def test_a_quantized_text_encoder_that_misses_the_gpu_streams_its_blocks_there(model, encoder, budget):
    """Issue 18: a quantized (fp8) text encoder too large for the GPU ran whole on the CPU. Now its
    first blocks fill the GPU, the rest stream from RAM (group offloading; placement.py), its
    embeddings and norms stay on the GPU, and nothing is pinned (no side stream: blocks.py)."""
    quantize = (("transformer", "fp8"), (encoder, "fp8"))
    inputs_ = PlanInputs(shipped_config_dir(model), torch.bfloat16, 1024, 1024, 512, vae_scale_factor=8,
                         quantize=quantize)
    plan = plan_run(inputs_, budget)  # fits, or PlanError
    planned = plan.stage("encode").component(encoder)
    assert planned.streamed and planned.quantization == "fp8" and planned.pinned_bytes == 0
    assert set(planned.device_map.values()) == {0, "cpu"}
    blocks = {module for module in planned.device_map if ".layers." in module or ".block." in module}
    assert {planned.device_map[module] for module in blocks} == {0, "cpu"}
    assert all(device == 0 for module, device in planned.device_map.items() if module not in blocks)
    assert planned.weight_bytes["cpu"] == sum(size for module, size in plan_module._Components(inputs_).sizes(
        encoder).items() if planned.device_map.get(module) == "cpu")


def test_a_text_encoder_left_on_the_cpu_while_gpus_are_budgeted_is_explained():
    stages = plan_module._plan_all(plan_module._Components(inputs("FLUX.1-dev")), {0: 8 * 2**30})
    (note,) = [note for note in stages[0].notes if "text_encoder_2" in note]
    assert note == ("note: encode runs text_encoder_2 (9.52 GB) whole on the CPU, the slowest place: the blocks "
                    "that miss the GPUs stream from RAM, and no cpu budget is given; add one")
