"""The checkpoint builder: presets that load, and the real shapes (built here on meta only)."""

from __future__ import annotations

from pathlib import Path

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


# Parameter counts (tied weights once) from ../shared/flux-configs/README.md, measured there on meta.
@pytest.mark.parametrize("preset, transformer, text_encoder", [("klein-4b", 3_875_544_576, 4_022_468_096),
                                                                ("klein-9b", 9_078_581_248, 8_190_735_360)])
def test_real_klein_shapes_have_the_counted_parameters(monkeypatch, tmp_path, preset, transformer, text_encoder):
    built = {}
    monkeypatch.setattr(tiny, "_save", lambda pipeline, out: built.update(pipeline.components, pipeline=pipeline))
    tiny.build_tiny_checkpoint(tmp_path / preset, preset=preset, device="meta", dtype="bfloat16")
    count = lambda name: sum(p.numel() for p in built[name].parameters())  # noqa: E731 (tied: once)
    assert (count("transformer"), count("text_encoder"), count("vae")) == (transformer, text_encoder, 84_046_115)
    assert type(built["pipeline"]).__name__ == "Flux2KleinPipeline" and built["pipeline"].config.is_distilled
    assert all(next(built[name].parameters()).dtype == torch.bfloat16 for name in ("transformer", "text_encoder", "vae"))
    assert torch.get_default_dtype() == torch.float32  # restored


def test_a_real_klein_shape_shrunk_saves_what_flux_sharded_loads_and_runs(tmp_path):
    """gpu_klein.sh builds FLUX.2-klein-4B's real shape on a GPU (16 GB); the same code, on a copy of
    its configs cut down in width and depth, writes a checkpoint with those very configs that runs."""
    import json
    import shutil

    from click.testing import CliRunner
    from transformers import AutoConfig

    from flux_sharded.checkpoint import shipped_config_dir
    from flux_sharded.cli import main

    configs = tmp_path / "configs"
    shutil.copytree(shipped_config_dir("FLUX.2-klein-4B"), configs)
    smaller = {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, num_hidden_layers=28, vocab_size=4096, bos_token_id=1,
                             eos_token_id=2),  # klein's encode reads layer 27
        "transformer": dict(attention_head_dim=16, axes_dims_rope=[4, 4, 4, 4], num_attention_heads=2, num_layers=1,
                            num_single_layers=1, joint_attention_dim=3 * 32, timestep_guidance_channels=32),
        "vae": dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=4),
    }
    for component, changes in smaller.items():
        path = configs / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    checkpoint = tiny.build_real_shape(tmp_path / "klein", configs, seed=0, device="cpu", dtype="float32")
    def read(folder: Path, component: str) -> dict:  # as the library reads it (transformers 5 moves rope_theta)
        if component == "text_encoder":
            return AutoConfig.from_pretrained(folder / component).to_dict()
        return json.loads((folder / component / "config.json").read_text())

    for component in smaller:
        wanted, saved = read(configs, component), read(checkpoint, component)
        differs = {key for key, value in wanted.items()
                   if not key.startswith("_") and key not in ("dtype", "transformers_version") and saved.get(key) != value}
        assert not differs, (component, {key: (wanted[key], saved.get(key)) for key in differs})
    result = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=2GB",
                                       "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


# Parameter counts (tied weights once) from ../shared/flux-configs/README.md's FLUX.3 table.
@pytest.mark.parametrize("preset, transformer, flow_map", [("flux3-klein", 5_548_681_984, True),
                                                            ("flux3-klein-base", 5_538_458_368, False)])
def test_real_flux3_shapes_have_the_counted_parameters(monkeypatch, tmp_path, preset, transformer, flow_map):
    built = {}
    monkeypatch.setattr(tiny, "_save", lambda folder, out: built.update(folder.components))
    tiny.build_tiny_checkpoint(tmp_path / preset, preset=preset, device="meta", dtype="bfloat16")
    count = lambda name: sum(p.numel() for p in built[name].parameters())  # noqa: E731 (tied: once)
    assert (count("transformer"), count("text_encoder"), count("vae")) == (transformer, 4_437_815_808, 84_046_115)
    assert built["transformer"].config.flow_map is flow_map
    assert all(next(built[name].parameters()).dtype == torch.bfloat16 for name in ("transformer", "text_encoder", "vae"))
    assert tiny.real_shape_bytes(preset, "bfloat16") > 2 * (transformer + 4_437_815_808)
    assert torch.get_default_dtype() == torch.float32  # restored


def test_a_real_flux3_shape_shrunk_saves_what_flux_sharded_loads_and_runs(tmp_path):
    """The GPU scripts build FLUX.3 klein's real shape (20 GB); the same code, on a copy of its configs
    cut down in width and depth (the encode still stacks layer 32), writes a checkpoint with those
    very configs that runs."""
    import json
    import shutil

    from click.testing import CliRunner

    from flux_sharded.checkpoint import shipped_config_dir
    from flux_sharded.cli import main

    configs = tmp_path / "configs"
    shutil.copytree(shipped_config_dir("FLUX.3-klein"), configs)
    path = configs / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    config["text_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=16, num_hidden_layers=33, vocab_size=4096,
                                 rope_parameters={**config["text_config"]["rope_parameters"], "mrope_section": [4, 2, 2]})
    config["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                   deepstack_visual_indexes=[0])
    path.write_text(json.dumps(config))
    path = configs / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **dict(
        attention_head_dim=16, axes_dims_rope=[4, 4, 4, 4], num_attention_heads=2, num_layers=1, num_single_layers=1,
        joint_attention_dim=8 * 32, timestep_channels=32)}))
    path = configs / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **dict(block_out_channels=[8, 8, 8, 8],
                                                                         norm_num_groups=4)}))
    checkpoint = tiny.build_real_shape(tmp_path / "flux3", configs, seed=0, device="cpu", dtype="float32")
    saved = json.loads((checkpoint / "transformer" / "config.json").read_text())
    assert (saved["num_layers"], saved["joint_attention_dim"], saved["flow_map"]) == (1, 256, True)
    assert resolve_checkpoint(str(checkpoint)).family.name == "FLUX.3-klein"
    result = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=2GB",
                                       "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


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


@pytest.mark.parametrize("build", [
    # Tokenizers included: a build that trained them differently gave other pixels for the same command.
    pytest.param(lambda out: tiny.build_tiny_checkpoint(out, seed=3), id="FLUX.1"),
    # The byte-level BPE is learnt here too, and the random batch-norm statistics are seeded.
    pytest.param(lambda out: tiny.build_tiny_flux2_checkpoint(out, "FLUX.2-klein", seed=3), id="FLUX.2-klein"),
    # written folder by folder (not by a pipeline's save_pretrained), the processor's configs included
    pytest.param(lambda out: tiny.build_tiny_flux3_checkpoint(out, "FLUX.3-klein-base", seed=3), id="FLUX.3-klein"),
])
def test_the_same_seed_builds_byte_identical_files(tmp_path, build):
    first, second = build(tmp_path / "first"), build(tmp_path / "second")
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


@pytest.mark.parametrize("args, message", [
    (["--vae-scale-factor", "3"], "Error: --vae-scale-factor: 3 is not a power of two; use 1, 2, 4, 8 or 16"),
    (["--vae-scale-factor", "0"], "Error: --vae-scale-factor: 0 is not a power of two"),
    (["--preset", "klein-4b", "--device", "meta"], "Error: --device: 'meta' cannot hold weights that are saved"),
    (["--preset", "klein-4b", "--device", "gpu"], "Error: --device: 'gpu' is not a device; use cpu or cuda"),
    (["--preset", "tiny", "--device", "meta"], "Error: --device meta: only the real shapes"),
    (["--preset", "klein-4b", "--family", "FLUX.2-dev"],
     "Error: --preset klein-4b builds FLUX.2-klein-4B's real shape, a FLUX.2-klein checkpoint, not FLUX.2-dev"),
    (["--preset", "flux-dev", "--family", "FLUX.2-klein"], "a FLUX.1 checkpoint, not FLUX.2-klein"),
])
def test_the_builder_refuses_options_it_cannot_build_with_one_line(tmp_path, capsys, args, message):
    """These raised a traceback (meta: after building, while saving) or built something else silently."""
    assert tiny.main([str(tmp_path / "new"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU builds there")
def test_a_real_shape_on_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert tiny.main([str(tmp_path / "new"), "--preset", "klein-4b", "--device", "cuda", "--dtype", "bfloat16"]) == 2
    assert "Error: --device cuda: this machine's torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_real_shape_larger_than_the_free_ram_is_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    """klein-4B in float32 is 31.9 GB: on a smaller machine the build allocated until the OOM killer came."""
    import types

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=16 * 10**9))
    assert tiny.main([str(tmp_path / "new"), "--preset", "klein-4b"]) == 2
    assert ("Error: --preset klein-4b holds 31.9 GB of weights in float32, and cpu has 16.0 GB available; "
            "build it on a GPU machine (--device cuda --dtype bfloat16)") in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # the counted parameters (above) at 2 bytes each, plus a few small buffers (rotary frequencies, ...)
    parameters = 3_875_544_576 + 4_022_468_096 + 84_046_115
    assert 0 <= tiny.real_shape_bytes("klein-4b", "bfloat16") - 2 * parameters < 10**6


def test_the_builder_says_which_preset_it_built_and_refuses_a_vae_factor_for_the_upsampler(tmp_path, capsys):
    """Found by the fresh-clone tester: --preset small said "tiny", and the upsampler, which has no
    VAE, took --vae-scale-factor without a word."""
    assert tiny.main([str(tmp_path / "fill"), "--family", "FLUX.1-Fill", "--preset", "small"]) == 0
    assert f"small FLUX.1-Fill checkpoint written to {tmp_path / 'fill'}" in capsys.readouterr().out
    assert resolve_checkpoint(str(tmp_path / "fill")).family.name == "FLUX.1-Fill"
    assert tiny.main([str(tmp_path / "up"), "--family", "FLUX.3-upsampler", "--vae-scale-factor", "4"]) == 2
    assert capsys.readouterr().err == ("Error: --vae-scale-factor: FLUX.3-upsampler builds a prompt upsampler, which "
                                       "has no VAE; drop it\n")
    assert not (tmp_path / "up").exists()
