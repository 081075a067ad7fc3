"""FLUX.3 klein (diffusers' modular pipelines): the tiny checkpoints, and the processor stand-in."""

from __future__ import annotations

import json

import pytest
import transformers

from flux_sharded import tiny
from flux_sharded.checkpoint import TextProcessor, pipeline_tokenizer, resolve_checkpoint
from flux_sharded.families import encode_layers

from .conftest import one_piece_pixels

FAMILIES = {"FLUX.3-klein": "Flux3DistilledModularPipeline", "FLUX.3-klein-base": "Flux3ModularPipeline"}


@pytest.fixture(scope="module")
def checkpoints(tiny_flux3, tiny_flux3_base):
    return {"FLUX.3-klein": tiny_flux3, "FLUX.3-klein-base": tiny_flux3_base}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_tiny_flux3_reads_back_as_its_family_and_the_one_piece_blocks_run_on_it(checkpoints, name):
    """The builder writes what the modular pipeline loads offline (init_pipeline + load_components):
    the family from model_index.json, flow_map only on the distilled transformer, a text encoder
    deeper than the encode's deepest stacked layer, and an image from the auto blocks."""
    folder = checkpoints[name]
    checkpoint = resolve_checkpoint(str(folder))
    assert checkpoint.family.name == name and checkpoint.family.pipeline == FAMILIES[name]
    assert checkpoint.transformer_config["flow_map"] is (name == "FLUX.3-klein")
    text = json.loads((folder / "text_encoder" / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] > encode_layers(FAMILIES[name])
    pixels = one_piece_pixels(folder, "a red car", seed=3, steps=2, height=32, width=48, guidance=4.0)
    assert pixels.shape == (32, 48, 3) and pixels.std() > 0


def test_the_builder_command_line_builds_flux3(tmp_path, capsys):
    assert tiny.main([str(tmp_path / "k"), "--family", "FLUX.3-klein-base"]) == 0
    assert "tiny FLUX.3-klein-base checkpoint written" in capsys.readouterr().out
    assert resolve_checkpoint(str(tmp_path / "k")).family.pipeline == "Flux3ModularPipeline"


@pytest.mark.parametrize("prompt", ["a photo of a dog", "", "  two\nlines  ", "x " * 300])
def test_the_processor_stand_in_renders_and_tokenizes_as_the_qwen3vl_processor(tiny_flux3, prompt):
    """Qwen3VLProcessor cannot be built without torchvision here; the encode gets a TextProcessor:
    the tokenizer inside the folder and the processor's chat template. What FLUX.3's encode calls on
    it (encoders.py: apply_chat_template with tokenize=False, and .tokenizer) gives what the
    processor's own apply_chat_template (ProcessorMixin's, run on an instance holding the same
    tokenizer and template) and tokenizer give."""
    with pytest.raises((ImportError, AttributeError)):  # what the one-piece load_components meets here
        transformers.Qwen3VLProcessor.from_pretrained(tiny_flux3 / "tokenizer")
    stand_in = pipeline_tokenizer(str(tiny_flux3), tiny_flux3, "tokenizer")
    assert isinstance(stand_in, TextProcessor)
    processor = object.__new__(transformers.Qwen3VLProcessor)  # its rendering alone, no image processor
    processor.tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_flux3 / "tokenizer")
    processor.chat_template = transformers.ProcessorMixin.get_processor_dict(
        str(tiny_flux3 / "tokenizer"))[0]["chat_template"]
    messages = [{"role": "user", "content": prompt}]
    text = stand_in.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt in text
    assert stand_in.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
