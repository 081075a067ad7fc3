"""A component's block structure, as diffusers' block-level group offloading sees it: one home for
the planner (what streams, what it weighs) and for placement (what it hooks).

diffusers' `apply_group_offloading(offload_type="block_level", block_modules=...)` walks the
children of the module it is given: a `ModuleList`/`Sequential` child is a block list (each block
one group), a child named in `block_modules` is recursed into the same way, and every other child
joins one "unmatched" group with the parameters of the module itself, brought to the GPU whenever
that module runs. Here:

- a FLUX transformer holds its block lists itself: no containers, the embedders, modulations and
  the final norm and projection are its top-level modules;
- a text encoder holds them deeper (T5: `encoder.block`; Qwen3: `model.layers`; Mistral 3:
  `model.language_model.layers`; CLIP: `encoder.layers`), and FLUX.3's transformer some of them in
  a ModuleDict (`mode_blocks.image`): the modules on the way are *containers*, recursed into
  (`block_modules`, by their names), and each container's other children (embeddings, norms, rotary
  tables) are top-level modules too.

A container is a child that holds, outside any block list, a list of the model's no-split blocks
(`_no_split_modules`: T5Block, Qwen3DecoderLayer, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LISTS = (torch.nn.ModuleList, torch.nn.Sequential)


@dataclass(frozen=True)
class BlockStructure:
    lists: tuple[str, ...]  # dotted names of the block lists, in the model's order
    containers: tuple[str, ...]  # dotted names of the modules recursed into on the way to them
    top_level: tuple[str, ...]  # dotted names of every other child of the model or of a container
    # Whether the top-level modules stream with the blocks and group offloading may prefetch on a
    # side CUDA stream (`use_stream`): only when every top-level module (and weight) outside the
    # blocks is the model's own, as in a FLUX.1/FLUX.2 transformer, or FLUX.3's whose containers
    # (`mode_blocks`) hold block lists alone. Otherwise (a text encoder) the top-level modules stay on
    # the first GPU and blocks move without prefetching:
    # - a container's forward is not the only caller of its top-level modules (Mistral3Model calls
    #   `language_model.embed_tokens` itself), so the container's group (brought to the GPU when the
    #   container runs) may still be in RAM when they run;
    # - diffusers (0.42.1) gives the model and each such container its own lazy-prefetch hook, and
    #   the second registers the layer-tracking hook the first already set on the same blocks ("Hook
    #   with name ... already exists"); a text encoder runs once per batch of prompts, where
    #   prefetching saves little.
    streams: bool

    @property
    def block_modules(self) -> list[str] | None:
        """diffusers' `block_modules`: the containers' own names (it matches children by name)."""
        return [name.rpartition(".")[2] for name in self.containers] or None

    def blocks(self, model: torch.nn.Module) -> list[str]:
        """Every block's dotted name, in execution order."""
        return [f"{name}.{index}" for name in self.lists for index in range(len(model.get_submodule(name)))]

    def unit_of(self, name: str) -> str | None:
        """The block or top-level module that holds module `name` (itself included), or None for the
        model itself, a container or a block list."""
        for unit in self.top_level:
            if name == unit or name.startswith(unit + "."):
                return unit
        for block_list in self.lists:
            if name.startswith(block_list + "."):
                index = name[len(block_list) + 1:].split(".")[0]
                return f"{block_list}.{index}"
        return None


def block_structure(model: torch.nn.Module) -> BlockStructure:
    """The block lists, containers and top-level modules of `model` (see the module docstring).
    Raises ValueError where diffusers' name-based recursion would go astray: two containers, or a
    container and another child, that share a name."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists, containers, top_level = [], [], []

    def holds_blocks(module: torch.nn.Module) -> bool:
        for child in module.children():
            if isinstance(child, LISTS):
                if any(type(block).__name__ in no_split for block in child):
                    return True
            elif holds_blocks(child):
                return True
        return False

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, LISTS):
                lists.append(path)
            elif holds_blocks(child):
                containers.append(path)
                walk(path + ".", child)
            else:
                top_level.append(path)

    walk("", model)
    container_names = [name.rpartition(".")[2] for name in containers]
    others = {name.rpartition(".")[2] for name in (*lists, *top_level)}
    if len(set(container_names)) < len(container_names) or others & set(container_names):
        raise ValueError(f"{type(model).__name__}: containers {containers} share a name with another module; "
                         "diffusers' block_modules matches children by name")
    own = all("." not in name for name in top_level) and not any(
        True for name in containers for _ in (*model.get_submodule(name).parameters(recurse=False),
                                              *model.get_submodule(name).buffers(recurse=False)))
    return BlockStructure(tuple(lists), tuple(containers), tuple(top_level), streams=own)
