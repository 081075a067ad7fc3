"""The handoff: moves between devices, and survives a round trip through safetensors + JSON."""

from __future__ import annotations

import json

import torch

from flux_sharded.handoff import GenerationSettings, Handoff

SETTINGS = GenerationSettings("some/model", ("a dog", "a cat"), (4, 5), 28, 3.5, 1024, 768, 512, "bfloat16")


def test_round_trip_keeps_every_tensor_and_setting(tmp_path):
    torch.manual_seed(0)
    handoff = Handoff(
        SETTINGS,
        prompt_embeds=torch.randn(2, 512, 8, dtype=torch.bfloat16),
        pooled_prompt_embeds=torch.randn(2, 4, dtype=torch.bfloat16),
        text_ids=torch.zeros(512, 3, dtype=torch.bfloat16),
        finished_stages=("encode",),
    )
    handoff.save(tmp_path / "encode", weights="0123456789abcdef")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encode.json", "encode.safetensors"]
    loaded = Handoff.load(tmp_path / "encode")
    assert loaded.settings == SETTINGS
    assert loaded.finished_stages == ("encode",)
    assert loaded.latents is None
    for name, tensor in handoff.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor) and loaded.tensors()[name].dtype == tensor.dtype
    assert json.loads((tmp_path / "encode.json").read_text())["settings"]["prompts"] == ["a dog", "a cat"]


def test_to_moves_tensors_and_keeps_settings():
    handoff = Handoff(SETTINGS, latents=torch.ones(2, 3, 4))
    moved = handoff.to("meta")
    assert moved.latents.device.type == "meta" and handoff.latents.device.type == "cpu"
    assert moved.settings is SETTINGS
    assert handoff.nbytes() == 2 * 3 * 4 * 4


def test_a_handoff_holds_whatever_tensors_its_family_declares(tmp_path):
    """Not a fixed list of names: a tensor a new family would declare (reference image latents, say)
    is selected per image, moved and saved like the others; a shared one stays whole."""
    handoff = Handoff(SETTINGS, shared=("positions",), reference_latents=torch.arange(6.0).reshape(2, 3),
                      positions=torch.zeros(5, 3))
    picked = handoff.select([1])
    assert torch.equal(picked.reference_latents, torch.tensor([[3.0, 4.0, 5.0]]))
    assert picked.positions.shape == (5, 3) and picked.embeddings().keys() == {"reference_latents"}
    handoff.save(tmp_path / "encode", weights="0123456789abcdef")
    loaded = Handoff.load(tmp_path / "encode", shared=("positions",))
    assert sorted(loaded.tensors()) == ["positions", "reference_latents"] and loaded.latents is None
