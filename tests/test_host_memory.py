"""Pinned host memory for streamed blocks (host_memory.py): the layout's bytes are what the host
allocator holds, packing keeps every value, and the plan counts the layout of the real model."""

from __future__ import annotations

import pytest
import torch

from flux_sharded import host_memory
from flux_sharded.components import empty_component
from flux_sharded.host_memory import (CHUNK_SIZES, TENSOR_ALIGNMENT, host_layout, layout_of,
                                      next_power_of_two, pack_into_host_memory, per_tensor_pinned_bytes)

MiB = 2**20


@pytest.mark.parametrize("size, rounded", [(0, 1), (1, 1), (3, 4), (4, 4), (5, 8), (2**28 + 1, 2**29)])
def test_the_allocators_rounding(size, rounded):
    assert next_power_of_two(size) == rounded


def test_a_layout_packs_largest_first_into_power_of_two_chunks():
    """In chunks of 256 MiB: 300 MiB gets a chunk of its own (512 MiB), which the two 100 MiB tensors
    and the 1 KiB one fill further; 60 MiB opens a second chunk, cut to 64 MiB. Chunks of 1 GiB
    would hold it all in one, cut to 1 GiB: more. Every allocation is a power of two (the
    allocator's rounding adds nothing)."""
    sizes = [60 * MiB, 300 * MiB, 100 * MiB, 1024, 100 * MiB]
    layout = host_layout(sizes)
    assert layout.chunk_bytes == 256 * MiB
    assert layout.chunks == (512 * MiB, 64 * MiB)
    assert layout.places == ((1, 0), (0, 0), (0, 300 * MiB), (0, 500 * MiB), (0, 400 * MiB))
    assert layout.allocated_bytes == 576 * MiB
    assert per_tensor_pinned_bytes(sizes) == (64 + 512 + 128 + 128) * MiB + 1024  # diffusers' own pinning
    assert all(chunk == next_power_of_two(chunk) for chunk in layout.chunks)


def test_tensors_start_aligned_and_never_overlap():
    sizes = [TENSOR_ALIGNMENT + 1, 7, 3 * TENSOR_ALIGNMENT, 1, CHUNK_SIZES[0] // 3]
    layout = host_layout(sizes)
    spans = sorted((chunk, offset, offset + size) for (chunk, offset), size in zip(layout.places, sizes))
    for (chunk, start, end), (next_chunk, next_start, _) in zip(spans, spans[1:]):
        assert start % TENSOR_ALIGNMENT == 0
        assert chunk != next_chunk or end <= next_start
    assert all(end <= layout.chunks[chunk] for chunk, _, end in spans)


def test_packing_keeps_every_value_and_holds_exactly_the_layouts_bytes(tiny_checkpoint):
    """The real tiny transformer, packed as a streamed stage packs it (unpinned: this machine has no
    CUDA): the same tensors, each a view into one of the layout's chunks, which are all there is;
    and the layout is the one the plan computes on the meta device."""
    import diffusers

    model = diffusers.FluxTransformer2DModel.from_pretrained(tiny_checkpoint, subfolder="transformer")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layout = pack_into_host_memory([model], pin=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in host_memory.offloaded_tensors([model])}
    assert sorted(storages.values()) == sorted(layout.chunks)
    assert layout == layout_of([empty_component(tiny_checkpoint, "transformer")])


def test_packing_refuses_tensors_off_the_cpu():
    with pytest.raises(ValueError, match="on the CPU"):
        pack_into_host_memory([torch.nn.Linear(2, 2, device="meta")], pin=False)


@pytest.mark.parametrize("folder, quantize, spec", [
    ("FLUX.1-dev", (), "0=8GiB,cpu=32GB"),
    ("FLUX.2-dev", (("transformer", "fp8"), ("text_encoder", "fp8")), "0=16GiB,cpu=64GB"),
    ("FLUX.2-dev", (), "0=24GB,1=24GB,cpu=72GB"),
])
def test_the_plan_pins_the_streamed_blocks_of_the_real_shapes_within_3_percent(folder, quantize, spec):
    """The streamed transformer's "cpu" line is the layout of its offloaded tensors (what packing
    allocates), within 3% of their bytes, where pinning each tensor on its own (diffusers' group
    offloading by itself) would take a third more or worse; the set-up on top is the whole
    component read into RAM less what stays pinned, or one chunk."""
    from flux_sharded.budget import parse_budget
    from flux_sharded.checkpoint import shipped_config_dir
    from flux_sharded.plan import PlanInputs, _Components, plan_run

    inputs = PlanInputs(shipped_config_dir(folder), torch.bfloat16, 1024, 1024, 512, vae_scale_factor=8,
                        quantize=quantize)
    transformer = plan_run(inputs, parse_budget(spec, gpu_count=None)).stage("denoise").component("transformer")
    components = _Components(inputs)
    sizes, model = components.sizes("transformer"), components.model("transformer")
    streamed = [module for module, device in transformer.device_map.items() if device == "cpu"]
    tensors = {id(tensor): sizes[f"{module}.{name}"] for module in streamed
               for name, tensor in [*model.get_submodule(module).named_parameters(),
                                    *model.get_submodule(module).named_buffers()]}
    assert sum(tensors.values()) == transformer.offload_bytes
    layout = host_layout(tensors.values())
    assert transformer.weight_bytes["cpu"] == transformer.pinned_bytes == layout.allocated_bytes
    assert transformer.offload_bytes < transformer.pinned_bytes < 1.03 * transformer.offload_bytes
    assert per_tensor_pinned_bytes(tensors.values()) > 1.3 * transformer.offload_bytes
    assert transformer.activation_bytes["cpu"] == max(layout.chunk_bytes, sizes[""] - transformer.pinned_bytes)


def test_an_nf4_load_is_planned_with_its_largest_unpacked_weight_on_the_gpu():
    """bitsandbytes packs each weight on the GPU it loads onto, so the largest converted layer's
    unpacked weight (FLUX.1-dev's double-block AdaLN linear, 3072 x 18432 in bf16: 113 MB) is there
    for a moment besides the weights; the plan gives each GPU the more of that and the activations."""
    from flux_sharded.checkpoint import shipped_config_dir
    from flux_sharded.plan import PlanInputs, _Components, plan_run

    def inputs(method):
        return PlanInputs(shipped_config_dir("FLUX.1-dev"), torch.bfloat16, 64, 64, 8, vae_scale_factor=8,
                          quantize=(("transformer", method),) if method else ())

    components = _Components(inputs("nf4"))
    assert components.load_transient("transformer") == 3072 * 18432 * 2
    assert _Components(inputs("fp8")).load_transient("transformer") == 0 == _Components(inputs(None)).load_transient(
        "transformer")
    transformer = plan_run(inputs("nf4"), {0: 30 * 10**9}).stage("denoise").component("transformer")
    assert components.activation_bytes("transformer", "denoise") < 3072 * 18432 * 2  # 64x64 pixels: a small forward pass
    assert transformer.activation_bytes == {0: 3072 * 18432 * 2}
