"""--lora: the staged PNG equals diffusers' one-piece pipeline with the same LoRAs loaded the same
way (load_lora_weights, set_adapters), on every family; each LoRA is part of the run (run.json, the
run's hash, the PNGs, --report, --resume); every bad LoRA is one Error line before anything is written.

The LoRAs are built here, offline (flux_sharded.tiny.build_tiny_lora), with random non-zero up
weights, so that each changes the pixels (checked: else equality would prove nothing)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_sharded.families import FAMILIES
from flux_sharded.tiny import build_tiny_lora

from .conftest import assert_same_pixels, error_line, error_lines, invoke, one_piece_pixels

PROMPT, SEED, STEPS, SIZE, TOKENS = "a photo of a dog", 7, 2, 32, 64


def _run(checkpoint: Path, out: Path, *extra: str):
    return invoke(["--model", str(checkpoint), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
                   "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "--max-memory", "cpu=4GB",
                   "--max-sequence-length", str(TOKENS), "--out", str(out), "--report", str(out.parent / "report.json"),
                   *extra])


def _image(out: Path) -> Path:
    (path,) = out.glob("*.png")
    return path


def _reference(checkpoint: Path, loras=()) -> np.ndarray:
    guidance = FAMILIES[json.loads((checkpoint / "model_index.json").read_text())["_class_name"]].guidance
    return one_piece_pixels(checkpoint, PROMPT, SEED, STEPS, SIZE, SIZE, guidance=guidance,
                            max_sequence_length=TOKENS, loras=loras)


# (checkpoint fixture, [(LoRA format, seed, scale), ...]): one LoRA, and two with different scales
CASES = [
    ("tiny_checkpoint", [("diffusers", 1, 1.0)]),
    ("tiny_checkpoint", [("kohya", 2, 0.8), ("diffusers", 3, -0.5)]),
    # the other formats diffusers converts for FLUX.1: ComfyUI's (BFL names under diffusion_model., CLIP
    # under text_encoders.clip_l) and XLabs' (fused q, k, v)
    ("tiny_checkpoint", [("comfyui", 10, 0.9), ("xlabs", 11, 1.2)]),
    ("tiny_klein", [("diffusers", 4, 1.0)]),
    ("tiny_klein", [("diffusers", 5, 0.6), ("diffusers", 6, 1.3)]),
    ("tiny_dev", [("diffusers", 7, 1.0)]),
    ("tiny_dev", [("diffusers", 8, 0.6), ("diffusers", 9, 1.3)]),
]


@pytest.mark.parametrize("fixture, loras", CASES, ids=lambda case: case if isinstance(case, str) else
                         "+".join(f"{kind}:{scale:g}" for kind, _, scale in case))
def test_staged_png_with_loras_equals_one_piece_pipeline_with_them(request, tmp_path, fixture, loras):
    checkpoint = request.getfixturevalue(fixture)
    flux1 = fixture == "tiny_checkpoint"
    files = [(build_tiny_lora(checkpoint, tmp_path / f"lora-{index}.safetensors", seed=seed, kind=kind,
                              text_encoder=flux1), scale) for index, (kind, seed, scale) in enumerate(loras)]
    result = _run(checkpoint, tmp_path / "out", *[arg for path, scale in files for arg in ("--lora", f"{path}:{scale}")])
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(_image(tmp_path / "out")))
    assert_same_pixels(staged, _reference(checkpoint, files))
    assert staged.std() > 10
    # the LoRAs change the pixels: the equality above is not that of two runs without them
    assert np.abs(staged.astype(int) - _reference(checkpoint)).max() > 5


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_klein"])
def test_a_loras_alpha_in_its_adapter_metadata_scales_it_as_diffusers_does(request, tmp_path, fixture):
    """A diffusers-format LoRA whose file keeps its LoraConfig (lora_alpha 12 at rank 4, as diffusers'
    training scripts save it): load_lora_weights hands that metadata to the loaders, which scale by
    alpha / rank; the staged PNG equals the one-piece pipeline's with it (FLUX.3: tests/test_flux3.py),
    which is not the image of the same weights without it."""
    checkpoint = request.getfixturevalue(fixture)
    lora = build_tiny_lora(checkpoint, tmp_path / "alpha.safetensors", seed=13, alpha=12.0)
    result = _run(checkpoint, tmp_path / "out", "--lora", f"{lora}:0.9")
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(_image(tmp_path / "out")))
    assert_same_pixels(staged, _reference(checkpoint, [(lora, 0.9)]))
    plain = build_tiny_lora(checkpoint, tmp_path / "plain.safetensors", seed=13)  # the same weights, alpha = rank
    assert np.abs(staged.astype(int) - _reference(checkpoint, [(plain, 0.9)])).max() > 0


def test_a_kohya_loras_clip_weights_apply_in_encode(tiny_checkpoint, tmp_path):
    """FLUX.1 kohya LoRAs carry CLIP weights (lora_te1_...): the encode applies them, so CLIP's pooled
    embedding changes while T5's embeddings (no LoRA) stay as they were."""
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "kohya.safetensors", seed=2, kind="kohya", text_encoder=True)
    embeddings = {}
    for name, extra in (("plain", []), ("lora", ["--lora", str(lora)])):
        assert _run(tiny_checkpoint, tmp_path / name, *extra).exit_code == 0
        (encoded,) = (tmp_path / name / ".flux-sharded").glob("run-*/encode.safetensors")
        embeddings[name] = load_file(encoded)
    assert not torch.equal(embeddings["plain"]["pooled_prompt_embeds"], embeddings["lora"]["pooled_prompt_embeds"])
    assert torch.equal(embeddings["plain"]["prompt_embeds"], embeddings["lora"]["prompt_embeds"])


def test_each_lora_is_part_of_the_run(tiny_checkpoint, tmp_path):
    """Its source, SHA-256 and scale in run.json, the run folder's name, the PNG and --report; a
    run without LoRAs records none (old run folders keep their names)."""
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "style.safetensors", seed=1)
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()
    recorded = f"{lora.absolute()}:0.5 sha256:{digest}"
    folders = {}
    for name, extra in (("plain", []), ("half", ["--lora", f"{lora}:0.5"]), ("full", ["--lora", str(lora)])):
        assert _run(tiny_checkpoint, tmp_path / name, *extra).exit_code == 0
        (run_json,) = (tmp_path / name / ".flux-sharded").glob("run-*/run.json")
        folders[name] = run_json.parent.name
        settings = json.loads(run_json.read_text())["settings"]
        text = Image.open(_image(tmp_path / name)).text
        if name == "plain":
            assert "lora" not in settings and "lora" not in text
        if name == "half":
            assert settings["lora"] == [recorded]
            assert text["lora"] == recorded
            assert json.loads((tmp_path / "report.json").read_text())["loras"] == [
                {"source": str(lora.absolute()), "scale": 0.5, "sha256": digest}]
    assert len(set(folders.values())) == 3  # the LoRA and its scale decide the run's hash


def test_resume_refuses_a_lora_file_changed_since_the_run_began(tiny_checkpoint, tmp_path):
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "style.safetensors", seed=1)
    assert _run(tiny_checkpoint, tmp_path / "out", "--lora", str(lora)).exit_code == 0
    (run_dir,) = (tmp_path / "out" / ".flux-sharded").glob("run-*")
    repeated = invoke(["--resume", str(run_dir), "--lora", str(lora)])  # the run's own LoRA may be repeated
    assert repeated.exit_code == 0, repeated.output
    other = build_tiny_lora(tiny_checkpoint, tmp_path / "other.safetensors", seed=3)
    changed = invoke(["--resume", str(run_dir), "--lora", f"{other}:0.5"])
    assert changed.exit_code == 2
    assert error_line(changed).startswith(f"Error: --resume: --lora {other.absolute()}:0.5 sha256:")
    assert error_line(changed).endswith("; drop it to continue the run, or start a new run")
    build_tiny_lora(tiny_checkpoint, lora, seed=2)  # same name, other weights
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2
    line = error_line(result)
    assert f"the LoRA file {lora.absolute()} changed since the run in {run_dir} began" in line
    assert "restore that file, or start a new run" in line
    lora.unlink()  # it said "--lora: '...' is neither a file that exists nor a hub id", as if the user had typed it
    gone = invoke(["--resume", str(run_dir)])
    assert gone.exit_code == 2
    assert error_line(gone).startswith(
        f"Error: --resume: the LoRA file {lora.absolute()}, which the run in {run_dir} applies (run.json "
        "'settings.lora'), is gone; restore it (SHA-256 ")
    os.mkfifo(lora)  # named as --lora too
    piped = invoke(["--resume", str(run_dir)])
    assert piped.exit_code == 2
    assert error_line(piped).startswith(
        f"Error: --resume: the LoRA file {lora.absolute()}, which the run in {run_dir} applies (run.json "
        "'settings.lora'), is not a regular file now (a pipe, a device or a folder); restore it (SHA-256 ")


def test_a_lora_that_is_a_pipe_is_refused_without_reading_it(tiny_checkpoint, tmp_path):
    """Reading a FIFO waits for a writer forever; one named like a hub id was taken for one."""
    (tmp_path / "loras").mkdir()
    os.mkfifo(tmp_path / "loras" / "style")
    result = _run(tiny_checkpoint, tmp_path / "out", "--lora", str(tmp_path / "loras" / "style"))
    assert result.exit_code == 2
    assert error_line(result) == (f"Error: --lora: '{tmp_path / 'loras' / 'style'}' is not a regular file (a pipe, a "
                                  "device or a socket); give the LoRA's .safetensors file")


def _control_lora(checkpoint: Path, path: Path) -> Path:
    """A LoRA that widens x_embedder's input, as FLUX.1 Canny/Depth Control LoRAs do (diffusers would
    expand the transformer's layer)."""
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    diffusers.FluxPipeline.save_lora_weights(path.parent, weight_name=path.name, transformer_lora_layers={
        "x_embedder.lora_A.weight": torch.randn(4, 2 * config["in_channels"]),
        "x_embedder.lora_B.weight": torch.randn(inner, 4)})
    return path


def _bad_lora(kind: str, tmp_path: Path, flux1: Path, klein: Path) -> tuple[Path, Path]:
    """(checkpoint, LoRA source) of each kind of bad LoRA."""
    if kind == "text file":
        (tmp_path / "notes.safetensors").write_text("not a tensor file\n")
        return flux1, tmp_path / "notes.safetensors"
    if kind == "truncated":
        whole = build_tiny_lora(flux1, tmp_path / "whole.safetensors").read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
        return flux1, tmp_path / "cut.safetensors"
    if kind == "full checkpoint":
        return flux1, flux1 / "transformer" / "diffusion_pytorch_model.safetensors"
    if kind == "FLUX.1 LoRA on FLUX.2":
        return klein, build_tiny_lora(flux1, tmp_path / "flux1.safetensors")
    if kind == "FLUX.2 LoRA on FLUX.1":
        return flux1, build_tiny_lora(klein, tmp_path / "flux2.safetensors")
    if kind == "kohya FLUX.1 LoRA on FLUX.2":
        return klein, build_tiny_lora(flux1, tmp_path / "kohya.safetensors", kind="kohya", text_encoder=True)
    if kind == "control LoRA":
        return flux1, _control_lora(flux1, tmp_path / "canny.safetensors")
    if kind == "no tensors of the model's":
        save_file({"lora_unet_unknown_block.lora_down.weight": torch.ones(2, 2)}, tmp_path / "odd.safetensors")
        return flux1, tmp_path / "odd.safetensors"
    raise ValueError(kind)


BAD_LORAS = {  # kind -> what its Error line says
    "text file": "is not a whole safetensors file",
    "truncated": "is not a whole safetensors file",
    "full checkpoint": "holds no LoRA weights",
    "FLUX.1 LoRA on FLUX.2": "has no linear layer",
    "FLUX.2 LoRA on FLUX.1": "has no linear layer",
    "kohya FLUX.1 LoRA on FLUX.2": "has no linear layer",
    "control LoRA": "widens transformer layer 'x_embedder' from 16 to 32 input features",
    "no tensors of the model's": "diffusers cannot read it as a FLUX.1 LoRA",
}


@pytest.mark.parametrize("kind", BAD_LORAS)
def test_a_bad_lora_is_one_error_line_and_nothing_is_written(tiny_checkpoint, tiny_klein, tmp_path, kind):
    checkpoint, lora = _bad_lora(kind, tmp_path, tiny_checkpoint, tiny_klein)
    out = tmp_path / "out"
    result = _run(checkpoint, out, "--lora", str(lora))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith(f"Error: --lora '{lora}': ") and BAD_LORAS[kind] in line, line
    assert "give a" in line  # the fix
    assert not out.exists() and not (tmp_path / "report.json").exists()
    dry = _run(checkpoint, out, "--lora", str(lora), "--dry-run")  # refused as well, before any weight is read
    assert dry.exit_code == 2 and BAD_LORAS[kind] in error_line(dry)


@pytest.mark.parametrize("value, message", [
    ("style.safetensors:strong", "--lora 'style.safetensors:strong': the scale 'strong' is not a number"),
    ("style.safetensors:nan", "the scale nan is outside -100..100"),
    # ran to a black image whose note blamed the checkpoint's weights
    ("style.safetensors:1e30", "--lora 'style.safetensors:1e30': the scale 1e30 is outside -100..100 (a LoRA's usual "
                               "weights lie in 0..1.5; larger ones overflow to NaN, a black image); e.g. --lora "
                               "style.safetensors:0.8"),
    ("./missing.safetensors", "--lora: './missing.safetensors' is neither a file that exists nor a hub id"),
])
def test_a_bad_lora_value_is_one_error_line(tiny_checkpoint, tmp_path, value, message):
    result = _run(tiny_checkpoint, tmp_path / "out", "--lora", value)
    assert result.exit_code == 2
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def _hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache holding `files` of `repo_id` at one revision, as huggingface_hub lays it out."""
    commit = "0" * 40
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def _offline(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "flux_sharded", *args], capture_output=True, text=True, env=environment,
                          timeout=300)


def test_a_hub_lora_is_found_offline_in_the_cache_and_refused_when_not_there(tiny_checkpoint, tmp_path):
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1)
    _hub_cache(tmp_path / "hf", "someone/style", {"pytorch_lora_weights.safetensors": lora})
    _hub_cache(tmp_path / "hf", "someone/pack", {"a.safetensors": lora, "sub/b.safetensors": lora})
    common = ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--height", "32", "--width", "32",
              "--max-memory", "cpu=4GB", "--dry-run"]
    for source in ("someone/style:0.5", "someone/pack/sub/b.safetensors"):
        found = _offline([*common, "--lora", source], tmp_path / "hf")
        assert found.returncode == 0, found.stderr
    several = _offline([*common, "--lora", "someone/pack"], tmp_path / "hf")
    assert several.returncode == 2
    assert ("Error: --lora: the hub repository 'someone/pack' holds 2 .safetensors files (a.safetensors, "
            "sub/b.safetensors); name one: --lora someone/pack/FILE") in several.stderr
    missing = _offline([*common, "--lora", "someone/other"], tmp_path / "hf")
    assert missing.returncode == 2
    (line,) = [line for line in missing.stderr.splitlines() if line.startswith("Error: ")]
    assert line == ("Error: --lora: 'someone/other' is not a local file and HF_HUB_OFFLINE is set and it is not in the "
                    "Hugging Face cache; unset HF_HUB_OFFLINE to let flux-sharded fetch it, or give a local "
                    ".safetensors file")


def test_every_familys_lora_components_are_its_pipelines():
    """families.Component.lora says what the pipeline's LoRA loader takes (its _lora_loadable_modules;
    FLUX.3's modular pipelines: Flux3LoraLoaderMixin's)."""
    for family in FAMILIES.values():
        assert set(family.lora_components) == set(getattr(diffusers, family.pipeline)._lora_loadable_modules)


def _one_piece_quantized(checkpoint: Path, method: str, lora: Path, scale: float) -> np.ndarray:
    """diffusers' FluxPipeline with the LoRA and a quantized transformer, in the order
    quantize.LORA_MERGE gives: fp8 fused into the float32 weights (fuse_lora, unload_lora_weights),
    then cast by layerwise casting; int8 quantized at load (TorchAoConfig), the LoRA beside it."""
    dtype = torch.float32
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        transformer = diffusers.FluxTransformer2DModel.from_pretrained(
            checkpoint, subfolder="transformer", dtype=dtype,
            quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
        pipeline = diffusers.FluxPipeline.from_pretrained(checkpoint, transformer=transformer, dtype=dtype)
    else:
        pipeline = diffusers.FluxPipeline.from_pretrained(checkpoint, dtype=dtype)
    pipeline.load_lora_weights(str(lora), adapter_name="lora_0")
    pipeline.set_adapters(["lora_0"], [scale])
    if method == "fp8":
        pipeline.fuse_lora(components=["transformer"])
        pipeline.unload_lora_weights()
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
                     max_sequence_length=TOKENS, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_a_lora_on_a_quantized_transformer_equals_the_one_piece_pipeline_done_the_same_way(tiny_checkpoint, tmp_path,
                                                                                           method):
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1)
    out = tmp_path / method
    result = _run(tiny_checkpoint, out, "--quantize", f"transformer={method}", "--lora", f"{lora}:0.8")
    assert result.exit_code == 0, result.output
    staged = np.asarray(Image.open(_image(out)))
    assert_same_pixels(staged, _one_piece_quantized(tiny_checkpoint, method, lora, 0.8))
    plain = _run(tiny_checkpoint, tmp_path / "plain", "--quantize", f"transformer={method}")
    assert plain.exit_code == 0
    assert np.abs(staged.astype(int) - np.asarray(Image.open(_image(tmp_path / "plain")))).max() > 5


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "transformer=nf4", "--max-memory", "0=4GB,cpu=4GB"],
     "--lora with --quantize transformer=nf4: LoRAs go into a quantized transformer in fp8 or int8 only; use "
     "--quantize transformer=fp8 or int8, or drop --lora"),
    (["--quantize", "text_encoder=int8"],
     "--lora with --quantize text_encoder=int8: LoRAs go into a quantized transformer in fp8 or int8 only; leave "
     "text_encoder in --dtype, or drop --lora"),
])
def test_a_lora_on_a_component_it_cannot_go_into_is_refused_before_any_weight_is_read(tiny_checkpoint, tmp_path,
                                                                                      extra, message):
    """nf4 (bitsandbytes places as it loads; planned here for a GPU this machine lacks, so only the
    dry-run gets that far), a quantized CLIP: refused by the plan, the dry-run's too."""
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1, text_encoder=True)
    for dry in ([["--dry-run"]] if "transformer=nf4" in extra else [[], ["--dry-run"]]):
        result = _run(tiny_checkpoint, tmp_path / "out", "--lora", str(lora), *extra, *dry)
        assert result.exit_code == 2, result.output
        assert error_line(result) == f"Error: {message}"
        assert not (tmp_path / "out").exists()


def _dry_run_stages(checkpoint: Path, tmp_path: Path, *extra: str) -> dict:
    report = tmp_path / "plan.json"
    result = invoke(["--model", str(checkpoint), "--prompt", PROMPT, "--height", str(SIZE), "--width", str(SIZE),
                     "--max-memory", "cpu=4GB", "--dry-run", "--report", str(report), *extra])
    assert result.exit_code == 0, result.output
    return {stage["name"]: stage for stage in json.loads(report.read_text())["stages"]}


def _stored_adapter_bytes(checkpoint: Path, name: str, lora: Path, dtype: torch.dtype, method: str | None) -> int:
    """The bytes of the adapter tensors PEFT holds once stages/adapters.py loaded the LoRA into `name`."""
    from flux_sharded.families import family_of
    from flux_sharded.lora import Adapter
    from flux_sharded.quantize_load import from_pretrained
    from flux_sharded.stages.adapters import load_adapters

    family = family_of(checkpoint)
    library = __import__(family.component(name).library)
    model = from_pretrained(getattr(library, family.component(name).class_name), checkpoint, name, method, dtype)
    load_adapters(family, name, model, (Adapter("lora_0", lora, 1.0),))
    return sum(tensor.numel() * tensor.element_size() for key, tensor in model.named_parameters() if "lora_" in key)


@pytest.mark.parametrize("dtype, method", [("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_the_plan_counts_each_adapters_bytes_as_they_are_stored(tiny_checkpoint, tmp_path, dtype, method):
    """The dry-run counts the unfused adapters (lora_A, lora_B of every layer wrapped) in the weights of
    the device of their layer: exactly what PEFT stores, for CLIP in encode and the transformer in denoise."""
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1, text_encoder=True)
    quantize = ["--quantize", f"transformer={method}"] if method else []
    plain = _dry_run_stages(tiny_checkpoint, tmp_path, "--dtype", dtype, *quantize)
    planned = _dry_run_stages(tiny_checkpoint, tmp_path, "--dtype", dtype, *quantize, "--lora", str(lora))
    for stage, component in (("encode", "text_encoder"), ("denoise", "transformer")):
        stored = _stored_adapter_bytes(tiny_checkpoint, component, lora, getattr(torch, dtype),
                                       method if component == "transformer" else None)
        assert stored > 0
        assert planned[stage]["adapter_bytes"] == stored
        assert planned[stage]["weight_bytes"]["cpu"] - plain[stage]["weight_bytes"]["cpu"] == stored
    assert planned["decode"]["adapter_bytes"] == 0


def test_an_fp8_transformer_fuses_its_lora_and_plans_no_adapter_bytes(tiny_checkpoint, tmp_path):
    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1)
    plain = _dry_run_stages(tiny_checkpoint, tmp_path, "--quantize", "transformer=fp8")
    fused = _dry_run_stages(tiny_checkpoint, tmp_path, "--quantize", "transformer=fp8", "--lora", str(lora))
    assert fused["denoise"]["adapter_bytes"] == 0
    assert fused["denoise"]["weight_bytes"] == plain["denoise"]["weight_bytes"]


def test_the_plan_adds_the_adapters_activations(tiny_checkpoint, tmp_path):
    """Unfused adapters add their transient tensors (lora_A's output and two of the widest wrapped
    layer's output width, over the tokens the component sees) to each computing device's activations."""
    from flux_sharded.activations import ACTIVATION_MARGIN

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1, rank=4, text_encoder=True)
    plain = _dry_run_stages(tiny_checkpoint, tmp_path)
    planned = _dry_run_stages(tiny_checkpoint, tmp_path, "--lora", str(lora))
    config = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    widest = max(6 * config["num_attention_heads"] * config["attention_head_dim"], 4 * config["num_attention_heads"]
                 * config["attention_head_dim"])  # norm1.linear (6 x inner), ff.net.0.proj (4 x inner)
    tokens = (SIZE // 16) ** 2 + 512  # the dry-run's default max_sequence_length for FLUX.1
    expected = int((4 + 2 * widest) * tokens * 2 * ACTIVATION_MARGIN)  # bfloat16
    added = {stage: planned[stage]["planned_bytes"]["cpu"] - planned[stage]["weight_bytes"]["cpu"]
             - (plain[stage]["planned_bytes"]["cpu"] - plain[stage]["weight_bytes"]["cpu"])
             for stage in ("encode", "denoise")}
    assert abs(added["denoise"] - expected) <= 1
    assert added["encode"] == 0  # CLIP's, with its adapters, stays below T5's peak, which the stage plans


def test_a_lora_on_a_component_offloaded_by_accelerates_hooks_is_refused(tiny_checkpoint, tmp_path):
    """A map with "disk" (or "cpu" blocks under accelerate's hooks) is placed by from_pretrained as it
    loads, before any adapter could go in: such a plan is refused, naming the way out."""
    import dataclasses

    from flux_sharded import runner
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.errors import SettingsError
    from flux_sharded.handoff import GenerationSettings
    from flux_sharded.lora import resolve
    from flux_sharded.plan import plan_run

    lora = build_tiny_lora(tiny_checkpoint, tmp_path / "lora.safetensors", seed=1)
    settings = GenerationSettings(str(tiny_checkpoint), (PROMPT,), (SEED,), STEPS, 3.5, SIZE, SIZE, TOKENS, "float32",
                                  lora=(resolve(str(lora)).saved_text,))
    budget = {0: 10**9, "cpu": 10**9, "disk": 10**9}
    request = runner.RunRequest(resolve_checkpoint(str(tiny_checkpoint)), settings, budget, tmp_path)
    plan = plan_run(runner.plan_inputs(request), budget)
    runner.check_adapters_placed(plan, request)  # whole on GPU 0: placed after the LoRA went in
    denoise = plan.stage("denoise")
    on_disk = dataclasses.replace(denoise.component("transformer"), streamed=False, device_map={
        "transformer_blocks": 0, "single_transformer_blocks": "disk", "": 0})
    plan = dataclasses.replace(plan, stages=tuple(dataclasses.replace(stage, components=(on_disk,))
                                                  if stage.name == "denoise" else stage for stage in plan.stages))
    with pytest.raises(SettingsError, match=r"the plan offloads transformer through accelerate's hooks \(0, disk\), "
                                            r"where its LoRA layers could not be placed; give its GPUs room"):
        runner.check_adapters_placed(plan, request)


def test_a_kohya_lora_whose_clip_part_diffusers_cannot_convert_is_one_error_line(tiny_checkpoint, tmp_path):
    """Found by the fresh-clone tester: a kohya file training only CLIP's first q_proj made diffusers'
    converter raise ("Could not automatically infer state dict type"), a traceback and exit 1."""
    full = build_tiny_lora(tiny_checkpoint, tmp_path / "full.safetensors", seed=2, kind="kohya", text_encoder=True)
    weights = load_file(str(full))
    kept = {key: tensor for key, tensor in weights.items()
            if not key.startswith("lora_te1_") or "layers_0_self_attn_q_proj" in key}
    lora = tmp_path / "q-only.safetensors"
    save_file(kept, str(lora))
    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--lora", str(lora),
                     "--max-memory", "cpu=4GB", "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert line.startswith(f"Error: --lora '{lora}': diffusers cannot convert its text_encoder weights")
    assert "Traceback" not in result.output


def test_two_loras_print_no_library_warning(tiny_checkpoint, tmp_path):
    """peft warned "Already found a `peft_config` attribute" on the second adapter, on every run with
    two. Run as a process: pytest would capture the warning itself, away from the output checked."""
    loras = [build_tiny_lora(tiny_checkpoint, tmp_path / f"lora-{seed}.safetensors", seed=seed) for seed in (1, 2)]
    result = subprocess.run(
        [sys.executable, "-m", "flux_sharded", "--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory",
         "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "out"),
         "--lora", f"{loras[0]}:0.5", "--lora", str(loras[1])],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "warn" not in result.stderr.lower() and "peft" not in result.stderr, result.stderr
