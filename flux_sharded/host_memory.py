"""Pinned host memory for streamed blocks, laid out so that the plan counts what PyTorch allocates.

Streaming a block to the GPU while another runs needs its weights in pinned (page-locked) RAM: a
copy from pageable memory is synchronous. diffusers' group offloading (use_stream=True) pins a copy
of every offloaded tensor, one allocation per tensor, and PyTorch's caching host allocator rounds
each allocation up to the next power of two (torch.cuda.host_memory_stats: "Block sizes are rounded
up to the next power of two before calling CUDA"). For FLUX.1-dev under `0=8GiB,cpu=32GB` that is
28.4 GB pinned for 18.4 GB of weights (1.55x), and during set-up the unpinned originals are still
resident next to the copies (about 47 GB).

Here the offloaded tensors are moved, before group offloading is applied, into a few large pinned
allocations (`host_layout`): chunks of one of CHUNK_SIZES, each a power of two, so the allocator's
rounding adds nothing, each cut to the power of two that holds its content. FLUX.1-dev under
`0=8GiB,cpu=32GB`: 17.72 GB pinned for 17.69 GB of streamed weights (benchmarks/RESULTS.md). Each tensor
becomes a view into its chunk; group offloading then finds every tensor pinned already and keeps it
as it is (`Tensor.pin_memory()` returns a pinned tensor itself), so there is one copy of each weight
in RAM, pinned, and its bytes are the layout's `allocated_bytes`. Each original is released as soon
as it is copied, so set-up holds at most the unpacked originals plus the chunks filled so far.

Memory (the plan's "cpu" line for a streamed component, plan.py): `allocated_bytes` of the layout
of its offloaded tensors, plus one chunk (`chunk_bytes`) while the chunks are being filled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# The sizes of one pinned allocation tried (host_layout keeps the one that allocates least): powers of
# two, so that the host allocator's rounding adds nothing. From 256 MiB (a few FLUX.1 blocks) to 4 GiB
# (six of FLUX.2-dev's 679 MB fused single-block projections); larger chunks would make the
# packing's transient (one chunk) a sizeable share of a 32 GB machine.
CHUNK_SIZES = tuple(2**power for power in range(28, 33))
# Each tensor starts on a multiple of this many bytes in its chunk: any dtype's alignment, and the
# granularity CUDA's copy engines read host memory in.
TENSOR_ALIGNMENT = 512


def next_power_of_two(size: int) -> int:
    """What PyTorch's caching host allocator reserves for a request of `size` bytes."""
    return 1 << max(size - 1, 0).bit_length()


def _aligned(size: int) -> int:
    return -(-size // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


@dataclass(frozen=True)
class HostLayout:
    """Where each tensor goes: `places[i]` = (chunk, byte offset) of the i-th tensor given to
    host_layout; `chunks` the bytes of each pinned allocation (each a power of two)."""

    chunks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]
    chunk_bytes: int = 0  # the chunk size it was packed with (CHUNK_SIZES): what packing holds on top, at most

    @property
    def allocated_bytes(self) -> int:
        """Host bytes the allocator holds for the layout: the chunks, which its rounding leaves as they are."""
        return sum(self.chunks)


def host_layout(sizes: Iterable[int]) -> HostLayout:
    """The layout of tensors of `sizes` bytes (in order) with the fewest allocated bytes among chunk
    sizes CHUNK_SIZES, the smaller chunk on a tie. The pinned bytes are held for the whole stage,
    the one chunk more only while packing, when the whole component read into RAM usually weighs
    more anyway; large fused tensors (FLUX.2's 679 MB single-block projection in bf16) leave less
    unused room in larger chunks (FLUX.2-dev under 0=24GB,1=24GB: 27.65 GB pinned in 256 MiB
    chunks, 25.77 GB in 4 GiB ones, for 25.19 GB of weights)."""
    sizes = list(sizes)
    layouts = [_layout(sizes, chunk_bytes) for chunk_bytes in CHUNK_SIZES]
    return min(layouts, key=lambda layout: layout.allocated_bytes)


def _layout(sizes: list[int], chunk_bytes: int) -> HostLayout:
    """Pack into chunks of `chunk_bytes`: first fit, largest first, each tensor aligned to
    TENSOR_ALIGNMENT; a tensor larger than a chunk gets a chunk of its own (its size rounded up to a
    power of two); each chunk is cut to the power of two that holds its content."""
    capacities: list[int] = []
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size = _aligned(sizes[index])
        chunk = next((c for c in range(len(capacities)) if used[c] + size <= capacities[c]), None)
        if chunk is None:
            capacities.append(max(chunk_bytes, next_power_of_two(size)))
            used.append(0)
            chunk = len(capacities) - 1
        places[index] = (chunk, used[chunk])
        used[chunk] += size
    chunks = tuple(next_power_of_two(content) if content else 0 for content in used)
    return HostLayout(chunks=chunks, places=tuple(places), chunk_bytes=chunk_bytes)


def per_tensor_pinned_bytes(sizes: Iterable[int]) -> int:
    """What pinning each tensor on its own takes (diffusers' group offloading with
    low_cpu_mem_usage=False): every size rounded up to a power of two. For comparison in benchmarks."""
    return sum(next_power_of_two(size) for size in sizes if size)


def offloaded_tensors(modules: Iterable[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of `modules`, each once (shared ones too), in module order."""
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def is_plain(tensor: torch.Tensor) -> bool:
    """A tensor whose storage is its own bytes; a tensor subclass (torchao's int8 weights) is not,
    and group offloading pins its inner tensors itself."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def layout_of(modules: Iterable[torch.nn.Module]) -> HostLayout:
    """The layout pack_into_host_memory gives these modules' plain tensors (works on the meta device)."""
    return host_layout(tensor_bytes(tensor) for tensor in offloaded_tensors(modules) if is_plain(tensor))


def pack_into_host_memory(modules: Iterable[torch.nn.Module], pin: bool) -> HostLayout:
    """Move the plain parameters and buffers of `modules` (on the CPU) into chunks laid out by
    host_layout, pinned when `pin` (a CUDA machine: torch cannot pin memory without one); each
    tensor's data becomes a view into its chunk, with the same dtype, shape and values. Returns
    the layout. A chunk is allocated when its first tensor is placed, and each original is
    released as soon as it is copied."""
    tensors = [tensor for tensor in offloaded_tensors(modules) if is_plain(tensor)]
    if any(tensor.device.type != "cpu" for tensor in tensors):
        raise ValueError("pack_into_host_memory takes modules whose tensors are on the CPU")
    layout = host_layout(tensor_bytes(tensor) for tensor in tensors)
    chunks: dict[int, torch.Tensor] = {}
    order = sorted(range(len(tensors)), key=lambda i: layout.places[i])  # fill the chunks one after another
    for index in order:
        tensor = tensors[index]
        chunk, offset = layout.places[index]
        if chunk not in chunks:
            chunks[chunk] = torch.empty(layout.chunks[chunk], dtype=torch.uint8, pin_memory=pin)
        size = tensor_bytes(tensor)
        view = chunks[chunk][offset : offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.data)
        tensor.data = view  # the original's storage is released here, unless something else holds it
    return layout
