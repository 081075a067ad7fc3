"""Streamed offload: the blocks a plan put on "cpu" are copied to the GPU ahead of use.

accelerate's device-map hooks (AlignDevicesHook with offload) copy each offloaded block to the GPU
synchronously inside its forward, so the GPU waits for every copy (users report minutes per image,
diffusers #9195). diffusers' group offloading (`diffusers.hooks.apply_group_offloading`, block
level, `use_stream=True`) keeps the offloaded blocks in pinned RAM and, while block i runs, copies
block i+1 on a side CUDA stream, so the copy overlaps the compute. We use it, not an offloader of
our own.

diffusers refuses to apply group offloading to a module that carries accelerate's device-map
hooks, and block-level group offloading offloads *every* block of each ModuleList. We want the
plan's resident blocks to stay on their GPUs, so:

1. the component is loaded whole on the CPU (no accelerate hooks);
2. each resident block moves to its GPU; a block on a GPU other than the one that runs the
   offloaded blocks gets an accelerate `AlignDevicesHook` (no offload) that moves its inputs there;
3. while group offloading is applied, each block list holds only its offloaded blocks, so diffusers
   groups exactly those (one block per group) plus, as it always does, the top-level modules
   (embedders, final norm: a few hundred MB for FLUX.1, brought to the GPU for each forward);
4. the full lists are put back. At the first forward, diffusers records the order in which the
   offloaded blocks run and from then on prefetches each one during the previous one.

Memory (the plan's `STREAMED_BLOCKS_IN_FLIGHT`): two blocks and the top-level modules on the GPU
that runs offloaded blocks; the offloaded weights once, pinned, in RAM. tests/test_offload.py pins
that the hooks sit on exactly the planned blocks.
"""

from __future__ import annotations

from typing import Callable

import torch

Device = int | str


def cuda_device(index: int) -> torch.device:
    return torch.device("cuda", index)


def placement(name: str, device_map: dict[str, Device]) -> Device:
    """The device of module `name` under a device map whose entries may be any of its ancestors."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(f"{name} has no entry in the device map")


def block_lists(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's top-level block lists: what diffusers' block-level group offloading groups."""
    return {name: child for name, child in model.named_children()
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))}


def offloaded_blocks(model: torch.nn.Module, device_map: dict[str, Device]) -> list[str]:
    """Names of the blocks the device map puts on "cpu", in execution order."""
    return [f"{name}.{index}" for name, blocks in block_lists(model).items() for index in range(len(blocks))
            if placement(f"{name}.{index}", device_map) == "cpu"]


def place(model: torch.nn.Module, device_map: dict[str, Device],
          gpu_device: Callable[[int], torch.device] = cuda_device) -> None:
    """Place a component loaded whole on the CPU (a quantized one, say) as its plan's device map says:
    whole on one device, blocks over GPUs, or blocks over GPUs with the rest streamed from RAM."""
    devices = set(device_map.values())
    if "disk" in devices:
        raise ValueError("a component loaded on the CPU is never placed on disk")
    if device_map.keys() == {""}:
        device = device_map[""]
        if device != "cpu":
            model.to(gpu_device(device))
        return
    if "cpu" in devices:
        apply_streamed_offload(model, device_map, gpu_device)
        return
    # Blocks over several GPUs, nothing offloaded: the top-level modules go with the first GPU.
    onload = _place_resident_blocks(model, device_map, gpu_device)
    lists = block_lists(model)
    for name, child in model.named_children():
        if name not in lists:
            child.to(onload)


def _place_resident_blocks(model: torch.nn.Module, device_map: dict[str, Device],
                           gpu_device: Callable[[int], torch.device]) -> torch.device:
    """Move each block the map puts on a GPU there; a block on a GPU other than the first (which runs
    the top-level modules and any offloaded block) gets an accelerate AlignDevicesHook (no offload)
    that moves its inputs to it. Returns the first GPU."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    gpus = [device for device in device_map.values() if device != "cpu"]
    onload = gpu_device(gpus[0])
    for name, blocks in block_lists(model).items():
        for index, block in enumerate(blocks):
            device = placement(f"{name}.{index}", device_map)
            if device == "cpu":
                continue
            block.to(gpu_device(device))
            if gpu_device(device) != onload:
                add_hook_to_module(block, AlignDevicesHook(execution_device=gpu_device(device), io_same_device=False))
    return onload


def apply_streamed_offload(model: torch.nn.Module, device_map: dict[str, Device],
                           gpu_device: Callable[[int], torch.device] = cuda_device) -> torch.device:
    """Place `model` (loaded whole on the CPU) as `device_map` says, streaming its "cpu" blocks.

    device_map: module name -> GPU index or "cpu" (the plan's map; no "disk"). The offloaded blocks
    run on the first GPU of the map, which is returned. gpu_device turns a GPU index into a device
    (tests map every index to the CPU to run the same hooks without a GPU; a CPU has no side
    stream, so there the copies are not overlapped). Raises ValueError for a map with "disk".
    """
    from diffusers.hooks import apply_group_offloading

    if "disk" in device_map.values():
        raise ValueError("streamed offload keeps offloaded blocks in RAM; a map with disk entries uses accelerate's hooks")
    if all(device == "cpu" for device in device_map.values()):
        raise ValueError("streamed offload needs a GPU in the device map to run the offloaded blocks on")
    lists = block_lists(model)
    offloaded = set(offloaded_blocks(model, device_map))
    # 1) and 2): resident blocks to their GPUs.
    onload = _place_resident_blocks(model, device_map, gpu_device)
    # 3) The lists hold only their offloaded blocks while diffusers builds its groups.
    for name, blocks in lists.items():
        kept = [block for index, block in enumerate(blocks) if f"{name}.{index}" in offloaded]
        model._modules[name] = (torch.nn.Sequential(*kept) if isinstance(blocks, torch.nn.Sequential)
                                else torch.nn.ModuleList(kept))
    try:
        apply_group_offloading(
            model,
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,  # what use_stream requires; also the least GPU memory
            use_stream=onload.type == "cuda",
        )
    finally:
        # 4) The full lists back: the resident blocks run where they are, without hooks.
        for name, blocks in lists.items():
            model._modules[name] = blocks
    return onload
