"""The checkpoint builder: presets that load, and the real shapes (built here on meta only)."""

from __future__ import annotations

import pytest
import torch

from flux_sharded import tiny
from flux_sharded.checkpoint import resolve_checkpoint


@pytest.mark.parametrize("preset, published_billions", [("flux-dev", 11.90), ("flux-schnell", 11.89)])
def test_real_shapes_have_the_published_parameter_counts(monkeypatch, tmp_path, preset, published_billions):
    built = {}
    monkeypatch.setattr(tiny, "_save", lambda pipeline, out: built.update(pipeline.components))
    tiny.build_tiny_checkpoint(tmp_path / preset, preset=preset, device="meta", dtype="bfloat16")
    count = lambda name: sum(p.numel() for p in built[name].parameters()) / 1e9  # noqa: E731
    assert abs(count("transformer") - published_billions) < 0.01
    assert abs(count("text_encoder_2") - 4.76) < 0.01
    assert all(next(built[name].parameters()).dtype == torch.bfloat16
               for name in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    assert torch.get_default_dtype() == torch.float32  # restored


def test_tiny_checkpoint_reads_back_as_flux(tiny_checkpoint, tiny_checkpoint_f2):
    assert resolve_checkpoint(str(tiny_checkpoint)).vae_scale_factor == 8
    assert resolve_checkpoint(str(tiny_checkpoint_f2)).size_multiple == 4


def test_the_builder_refuses_a_folder_it_did_not_build(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    assert tiny.main([str(folder)]) == 2
    assert f"Error: {folder} is not empty and is not a checkpoint this builder made" in capsys.readouterr().err
    assert [path.name for path in folder.iterdir()] == ["thesis.txt"]


def test_the_builder_may_replace_its_own_build(tiny_checkpoint, tmp_path):
    assert (tiny_checkpoint / tiny.MARKER).is_file()
    tiny.check_replaceable(tiny_checkpoint)  # raises NotOurFolder otherwise
    tiny.check_replaceable(tmp_path / "new")


def test_the_same_seed_builds_byte_identical_files(tmp_path):
    """Tokenizers included: a build that trained them differently gave other pixels for the same command."""
    first = tiny.build_tiny_checkpoint(tmp_path / "first", seed=3)
    second = tiny.build_tiny_checkpoint(tmp_path / "second", seed=3)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert any(path.parts[0] == "tokenizer" for path in files)
    different = [str(path) for path in files if (first / path).read_bytes() != (second / path).read_bytes()]
    assert different == []


def test_the_same_seed_builds_byte_identical_flux2_files(tmp_path):
    """The byte-level BPE is learnt here too, and the random batch-norm statistics are seeded."""
    first = tiny.build_tiny_flux2_checkpoint(tmp_path / "first", "FLUX.2-klein", seed=3)
    second = tiny.build_tiny_flux2_checkpoint(tmp_path / "second", "FLUX.2-klein", seed=3)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file())
    assert any(path.parts[0] == "tokenizer" for path in files)
    different = [str(path) for path in files if (first / path).read_bytes() != (second / path).read_bytes()]
    assert different == []


def test_a_tiny_klein_reads_back_as_klein_with_its_chat_template(tiny_klein):
    from transformers import AutoTokenizer

    checkpoint = resolve_checkpoint(str(tiny_klein))
    assert (checkpoint.family.name, checkpoint.is_distilled, checkpoint.vae_scale_factor) == ("FLUX.2-klein", True, 8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_klein / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # the chat markup is one token each, as in Qwen3's vocabulary
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[0] == "<|im_start|>"


@pytest.mark.parametrize("args", [["--preset", "small"], ["--dtype", "bfloat16"]])
def test_the_builder_refuses_flux2_options_it_does_not_build(tmp_path, capsys, args):
    assert tiny.main([str(tmp_path / "new"), "--family", "FLUX.2-klein", *args]) == 2
    assert "Error: --family FLUX.2-klein builds the tiny preset in float32 on the cpu only" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
