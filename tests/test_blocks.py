"""blocks.py: each component's block lists, containers and top-level modules as diffusers' block-level
group offloading walks them (on meta models from the shipped configs), and whether they prefetch."""

from __future__ import annotations

import pytest
import torch

from flux_sharded.blocks import block_structure
from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.components import empty_component


@pytest.mark.parametrize("folder, name, lists, containers, streams", [
    ("FLUX.1-dev", "transformer", ("transformer_blocks", "single_transformer_blocks"), (), True),
    ("FLUX.1-dev", "text_encoder_2", ("encoder.block",), ("encoder",), False),
    ("FLUX.1-dev", "text_encoder", ("encoder.layers",), ("encoder",), True),  # CLIP: the encoder holds the list alone
    ("FLUX.2-klein-4B", "text_encoder", ("model.layers",), ("model",), False),
    ("FLUX.2-dev", "text_encoder", ("model.language_model.layers",), ("model", "model.language_model"), False),
    ("FLUX.3-klein", "transformer", ("mode_blocks.image", "mode_blocks.image_cond", "txt_mode_blocks",
                                     "single_transformer_blocks"), ("mode_blocks",), True),  # the model's order
])
def test_each_components_structure_is_what_group_offloading_walks(folder, name, lists, containers, streams):
    model = empty_component(shipped_config_dir(folder), name)
    structure = block_structure(model)
    assert (structure.lists, structure.containers, structure.streams) == (lists, containers, streams)
    assert structure.block_modules == ([path.rpartition(".")[2] for path in containers] or None)
    for path in structure.top_level:  # every other module is a top-level one, none inside a block
        assert not any(path.startswith(block_list + ".") for block_list in lists)
        assert structure.unit_of(path) == path and structure.unit_of(path + ".weight") == path
    first = structure.blocks(model)[0]
    assert structure.unit_of(first + ".attn") == first == f"{lists[0]}.0"
    covered = {structure.unit_of(module) for module, _ in model.named_modules()} - {None}
    assert covered == {*structure.top_level, *structure.blocks(model)}


def test_a_container_sharing_a_name_with_another_module_is_refused():
    """diffusers' block_modules matches children by name at every level it recurses into."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])
            self.model = torch.nn.Linear(2, 2)  # named like the container above it

    class Model(torch.nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.model = Inner()

    with pytest.raises(ValueError, match="share a name"):
        block_structure(Model())
