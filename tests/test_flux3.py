"""FLUX.3 klein (diffusers' modular pipelines): the tiny checkpoints, the processor stand-in, and staged\nruns equal to the one-piece auto blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from flux_sharded import tiny
from flux_sharded.checkpoint import TextProcessor, pipeline_tokenizer, resolve_checkpoint
from flux_sharded.families import encode_layers
from flux_sharded.stages import flux3
from flux_sharded.tiny import build_tiny_lora

from .conftest import (assert_same_pixels, error_lines, invoke, modular_images, modular_pipeline, modular_pixels,
                       one_piece_pixels)

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


# ---------------------------------------------------------------- staged runs equal the one-piece blocks

SHORT = "a dog"
# over 80 tokens once templated: a window of 160, where SHORT's is 80 (asserted below)
LONG = ("a small red house on a green hill under a blue sky with white clouds and a yellow sun, a river runs past "
        "the house and a dog sits by the door while birds fly over the trees and the mountains behind them are "
        "covered in snow, in the style of an old painting with warm light")
SIZE = ["--height", "32", "--width", "32", "--steps", "2", "--dtype", "float32", "--max-memory", "cpu=4GB"]


def _images(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("*.png"))]


def test_the_base_model_guided_with_two_prompts_of_different_windows_equals_the_one_piece_blocks(tiny_flux3_base,
                                                                                                  tmp_path):
    """Flux3ModularPipeline with a ClassifierFreeGuidance of 4: two images of each of two prompts whose
    windows differ (80 and 160 tokens), batched two at a time, equal the one-piece auto blocks' images
    of each prompt with num_images_per_prompt 2 and the same seeds; the handoff keeps both prompts'
    embeddings and the negative ones, padded to --max-sequence-length, with their windows."""
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3_base), *SIZE, "--guidance", "4", "--seed", "5", "--prompt", SHORT,
                     "--prompt", LONG, "--num-images-per-prompt", "2", "--batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.glob(".flux-sharded/run-*")
    encoded = load_file(run_dir / "encode.safetensors")
    assert encoded["prompt_tokens"].tolist() == [80, 80, 160, 160]
    assert encoded["negative_prompt_tokens"].tolist() == [80] * 4
    assert encoded["prompt_embeds"].shape == encoded["negative_prompt_embeds"].shape == (4, 640, 8 * 16)
    expected = [*modular_pixels(tiny_flux3_base, "Flux3ModularPipeline", SHORT, [5, 6], 2, 32, 32, guidance=4.0),
                *modular_pixels(tiny_flux3_base, "Flux3ModularPipeline", LONG, [7, 8], 2, 32, 32, guidance=4.0)]
    for image, reference in zip(_images(out), expected, strict=True):
        assert_same_pixels(image, reference)


def test_two_processes_under_torchrun_equal_the_one_piece_blocks(tiny_flux3_base, tmp_path):
    """FLUX.3 under torchrun: three prompts of two windows (80, 160, 80 tokens) shared by two
    processes, contiguous and in order (2 + 1 images), each process encoding only its share's
    prompts; every image equals the one-piece guided blocks' with its seed (the index over the run)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{SHORT}\n{LONG}\na cat\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flux_sharded",
         "--model", str(tiny_flux3_base), *SIZE, "--guidance", "4", "--seed", "5", "--prompts-file", str(prompts),
         "--out", str(out), "--report", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(stage["process"], stage["name"], stage["images"]) for stage in report["stages"]] == [
        (0, "encode", 2), (0, "denoise", 2), (0, "decode", 2), (1, "encode", 1), (1, "denoise", 1), (1, "decode", 1)]
    expected = [modular_pixels(tiny_flux3_base, "Flux3ModularPipeline", prompt, [seed], 2, 32, 32, guidance=4.0)[0]
                for prompt, seed in ((SHORT, 5), (LONG, 6), ("a cat", 7))]
    for image, reference in zip(_images(out), expected, strict=True):
        assert_same_pixels(image, reference)


def test_the_distilled_model_resumed_after_an_interrupted_denoise_equals_the_one_piece_blocks(tiny_flux3, tmp_path,
                                                                                              monkeypatch):
    """Flux3DistilledModularPipeline, one image per batch: a run interrupted after its first batch keeps
    that batch's latents; --resume reads the encode's padded embeddings and windows back from the run
    folder, denoises the second prompt (the longer window) and decodes: both images equal the
    one-piece auto blocks'."""
    out = tmp_path / "out"
    real, calls = flux3.denoise_batch, []

    def stopped_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(flux3, "denoise_batch", stopped_after_one)
    first = invoke(["--model", str(tiny_flux3), *SIZE, "--seed", "3", "--prompt", SHORT, "--prompt", LONG,
                    "--out", str(out)])
    assert first.exit_code == 130, first.output
    (run_dir,) = out.glob(".flux-sharded/run-*")
    assert (run_dir / "denoise-batch-from-image-0.safetensors").exists() and not list(out.glob("*.png"))
    monkeypatch.setattr(flux3, "denoise_batch", real)
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "denoise: 1 of 2 image(s) finished earlier" in resumed.output
    expected = [*modular_pixels(tiny_flux3, "Flux3DistilledModularPipeline", SHORT, [3], 2, 32, 32),
                *modular_pixels(tiny_flux3, "Flux3DistilledModularPipeline", LONG, [4], 2, 32, 32)]
    for image, reference in zip(_images(out), expected, strict=True):
        assert_same_pixels(image, reference)


def test_a_guidance_scale_for_the_step_distilled_model_is_refused_in_one_line(tiny_flux3, tmp_path):
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--guidance", "4", "--prompt", SHORT,
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and error_lines(result.output) == [
        "Error: --guidance 4: FLUX.3-klein (Flux3DistilledModularPipeline) is step-distilled and takes no guidance "
        "scale; leave out --guidance"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0, 1.0 + 1e-12, 1.5, 3.5])
def test_the_base_model_guides_with_a_second_pass_exactly_where_diffusers_guider_does(guidance):
    """FLUX.3 base's families.Family.guides is ClassifierFreeGuidance's own rule (any scale but 1),
    not klein's (above 1): encode keeps negative embeddings exactly when the guider asks for them."""
    from diffusers.guiders import ClassifierFreeGuidance

    from flux_sharded.families import FLUX_3_KLEIN_BASE

    assert FLUX_3_KLEIN_BASE.guides(guidance) == (ClassifierFreeGuidance(guidance_scale=guidance).num_conditions > 1)


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_staged_flux3_equals_the_quantized_one_piece_blocks(tiny_flux3, tmp_path, method):
    """--quantize fp8 / int8 (the transformer and the cut text encoder) equals the one-piece auto
    blocks with the same components quantized the same way (layerwise casting; TorchAoConfig at
    load), which is not the unquantized image."""
    import diffusers
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--seed", "2", "--prompt", SHORT, "--quantize", method,
                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    (image,) = _images(out)
    pipeline = modular_pipeline(tiny_flux3, "Flux3DistilledModularPipeline")
    (plain,) = modular_images(pipeline, SHORT, [2], 2, 32, 32)
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        pipeline.update_components(
            transformer=diffusers.Flux3Transformer2DModel.from_pretrained(
                tiny_flux3, subfolder="transformer", dtype=torch.float32,
                quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig())),
            text_encoder=transformers.Qwen3VLForConditionalGeneration.from_pretrained(
                tiny_flux3, subfolder="text_encoder", dtype=torch.float32,
                quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig())))
    else:
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        # the parts the staged encode cuts (components.encode_only) stay as they are: the tied lm_head
        # is the token embedding, and the vision tower never runs
        apply_layerwise_casting(pipeline.text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + ("^lm_head$", "visual"),
                                skip_modules_classes=(torch.nn.Embedding,))
    (expected,) = modular_images(pipeline, SHORT, [2], 2, 32, 32)
    assert_same_pixels(image, expected)
    assert np.abs(plain.astype(int) - expected).max() > 0


@pytest.mark.parametrize("alpha", [None, 12.0])
def test_a_lora_on_flux3_equals_the_one_piece_blocks_with_it(tiny_flux3, tmp_path, alpha):
    """--lora FILE:0.7 (diffusers' format, every per-mode and single block's attention and MLP)
    equals the one-piece auto blocks with the same LoRA loaded through the pipeline's
    Flux3LoraLoaderMixin (load_lora_weights, set_adapters with 0.7), and changes the pixels; also
    with a lora_alpha (12, rank 4) in the file's adapter metadata, which the loader scales by."""
    lora = build_tiny_lora(tiny_flux3, tmp_path / "style.safetensors", seed=12, alpha=alpha)
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--seed", "4", "--prompt", SHORT, "--lora", f"{lora}:0.7",
                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    (image,) = _images(out)
    (expected,) = modular_pixels(tiny_flux3, "Flux3DistilledModularPipeline", SHORT, [4], 2, 32, 32,
                                 loras=((lora, 0.7),))
    assert_same_pixels(image, expected)
    (plain,) = modular_pixels(tiny_flux3, "Flux3DistilledModularPipeline", SHORT, [4], 2, 32, 32)
    assert np.abs(image.astype(int) - plain).max() > 5


def test_an_nf4_text_encoder_runs_cut_on_the_cpu_and_equals_the_one_piece_blocks(nf4_flux3, tmp_path):
    """--quantize text_encoder=nf4: bitsandbytes 0.50 quantizes and multiplies on the CPU; the encode
    loads Qwen3-VL cut to the layers it stacks, in 4-bit, and equals the one-piece auto blocks with the
    whole encoder loaded in 4-bit by transformers (BitsAndBytesConfig), which differ from the
    unquantized blocks' image (so the quantization was applied on both sides)."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    out = tmp_path / "out"
    result = invoke(["--model", str(nf4_flux3), *SIZE, "--seed", "2", "--prompt", SHORT, "--quantize",
                     "text_encoder=nf4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.png")
    assert Image.open(path).text["quantize"] == "text_encoder=nf4"
    pipeline = modular_pipeline(nf4_flux3, "Flux3DistilledModularPipeline")
    (plain,) = modular_images(pipeline, SHORT, [2], 2, 32, 32)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)
    pipeline.update_components(text_encoder=transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        nf4_flux3, subfolder="text_encoder", quantization_config=config, dtype=torch.float32, device_map="cpu"))
    (expected,) = modular_images(pipeline, SHORT, [2], 2, 32, 32)
    assert_same_pixels(np.asarray(Image.open(path)), expected)
    assert np.abs(plain.astype(int) - expected).max() > 0


def test_a_prompt_over_max_sequence_length_is_cut_as_the_blocks_cut_it_and_noted_once(tiny_flux3, tmp_path):
    """LONG is 142 tokens once templated; with --max-sequence-length 100 the text_encoder block cuts it
    to a window of 100 (not a multiple of 80) without a word: the staged image equals the one-piece
    blocks' with max_sequence_length 100, not their uncut one, and the run says so in one note."""
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--seed", "6", "--prompt", LONG, "--max-sequence-length",
                     "100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run_dir,) = out.glob(".flux-sharded/run-*")
    assert load_file(run_dir / "encode.safetensors")["prompt_tokens"].tolist() == [100]
    notes = [line for line in result.output.splitlines() if "longer than a text encoder reads" in line]
    assert notes == ["note: a prompt is longer than a text encoder reads (--max-sequence-length is 100; "
                     "--max-sequence-length up to 8192 reads more of its 142 tokens); the text after that, starting "
                     "'overed in snow, in the style of an old painting with warm li...', does not shape the image "
                     "(said once per run)"]  # the tiny tokenizer cuts inside 'covered'
    (image,) = _images(out)
    pipeline = modular_pipeline(tiny_flux3, "Flux3DistilledModularPipeline")
    (expected,) = modular_images(pipeline, LONG, [6], 2, 32, 32, max_sequence_length=100)
    assert_same_pixels(image, expected)
    (uncut,) = modular_images(pipeline, LONG, [6], 2, 32, 32)
    assert np.abs(image.astype(int) - uncut).max() > 0


def test_max_sequence_length_over_flux3s_limit_is_refused_in_one_line(tiny_flux3, tmp_path):
    """The limit is the installed text_encoder block's own max_sequence_length default (8192)."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from flux_sharded.families import FLUX_3_KLEIN

    limit = next(param.default for param in Flux3TextEncoderStep().inputs if param.name == "max_sequence_length")
    assert FLUX_3_KLEIN.text_token_limit == limit == 8192
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--prompt", SHORT, "--max-sequence-length", "8193",
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and error_lines(result.output) == [
        "Error: --max-sequence-length 8193: use 1 to 8192 tokens"]
    assert not (tmp_path / "out").exists()


def test_a_prompt_over_flux3s_limit_is_refused_in_one_line_before_any_weight_is_read(tiny_flux3, tmp_path):
    """A prompt of more templated tokens than the text_encoder block ever reads (8192) would be cut
    without a word whatever --max-sequence-length says: refused, naming the image and the count,
    before run.json (nothing in --out); one at the limit's edge runs (the 142-token LONG above)."""
    words = "dog " * 8200  # over 8192 tokens with the tiny tokenizer too (one or more per word)
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3), *SIZE, "--prompt", SHORT, "--prompt", words, "--max-sequence-length",
                     "8192", "--out", str(out)])
    (line,) = error_lines(result.output)
    assert result.exit_code == 2, result.output
    tokens = len(flux3._templated_tokens(pipeline_tokenizer(str(tiny_flux3), tiny_flux3, "tokenizer"), words))
    assert tokens > 8192
    assert line == (f"Error: the prompt of image 1 ('{words[:40]}...') is {tokens} tokens once FLUX.3-klein's chat "
                    "template is applied; its text encoder reads at most 8192 (the rest would be cut without a "
                    "word): shorten the prompt")
    assert not list(out.rglob("run.json")) and not list(out.rglob("*.png"))


@pytest.mark.parametrize("sizes, encoded", [([(40, 56)], [(64, 64)]), ([(40, 56), (72, 40)], [(48, 32), (32, 64)])])
def test_reference_images_equal_the_one_piece_blocks_with_them(tiny_flux3, tmp_path, monkeypatch, sizes, encoded):
    """--image (repeatable) is encoded by the vae_encoder block in encode_image and denoised by the
    image_conditioned branch: equal to the one-piece auto blocks called with the same images, and not
    their image without. One reference is kept whole on its canvas (sides rounded up to 16, at least
    64: 40x56 -> 64x64); several are each cropped to the 16-pixel grid; the plan's sizes
    (input_sizes, whose tokens it counts) are the encoded ones. The run stops in denoise and resumes
    from the kept encoded references (their shapes checked against families' on the resume)."""
    paths = []
    for index, size in enumerate(sizes):
        paths.append(tmp_path / f"ref-{index}.png")
        pixels = np.random.default_rng(index).integers(0, 255, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(paths[-1])
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(flux3, "denoise_batch", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("stop")))
        failed = invoke(["--model", str(tiny_flux3), *SIZE, "--seed", "8", "--prompt", SHORT,
                         *[arg for path in paths for arg in ("--image", str(path))], "--out", str(out)])
    assert failed.exit_code == 1, failed.output
    (run_dir,) = out.glob(".flux-sharded/run-*")
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    kept = load_file(run_dir / "encode_image.safetensors")
    assert [tuple(kept[f"input_latents_{index}"].shape) for index in range(len(sizes))] == [
        (1, 16, height // 16, width // 16) for height, width in encoded]
    assert flux3.input_sizes(None, sizes, 8) == tuple(encoded)
    (image,) = _images(out)
    pipeline = modular_pipeline(tiny_flux3, "Flux3DistilledModularPipeline")
    (expected,) = modular_images(pipeline, SHORT, [8], 2, 32, 32,
                                 image=[Image.open(path).convert("RGB") for path in paths])
    assert_same_pixels(image, expected)
    (plain,) = modular_images(pipeline, SHORT, [8], 2, 32, 32)
    assert np.abs(image.astype(int) - plain).max() > 0


def test_the_guided_base_model_with_a_reference_equals_the_one_piece_blocks(tiny_flux3_base, tmp_path):
    """Flux3ModularPipeline's image_conditioned branch guided (ClassifierFreeGuidance of 4, the empty
    negative prompt) with one reference equals the one-piece auto blocks with the same image."""
    path = tmp_path / "ref.png"
    pixels = np.random.default_rng(5).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((64, 48), Image.BILINEAR).save(path)
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_flux3_base), *SIZE, "--guidance", "4", "--seed", "9", "--prompt", SHORT,
                     "--image", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (image,) = _images(out)
    pipeline = modular_pipeline(tiny_flux3_base, "Flux3ModularPipeline", guidance=4.0)
    (expected,) = modular_images(pipeline, SHORT, [9], 2, 32, 32, image=Image.open(path).convert("RGB"))
    assert_same_pixels(image, expected)


@pytest.mark.parametrize("removed, message", [
    ("tokenizer.json", "tokenizer lacks vocab.json and merges.txt or tokenizer.json; the checkpoint is incomplete: "
                       "fetch its tokenizer folder again"),
    ("chat_template.jinja", "tokenizer has no chat template (chat_template.jinja), which Flux3DistilledModularPipeline "
                            "applies to every prompt; the checkpoint is incomplete: fetch its tokenizer folder again"),
])
def test_a_flux3_processor_folder_missing_a_file_is_refused_in_one_line(tiny_flux3, tmp_path, removed, message):
    """(A text encoder too shallow for the stacked layers: tests/test_families.py.)"""
    import shutil

    folder = tmp_path / "flux3"
    shutil.copytree(tiny_flux3, folder)
    (folder / "tokenizer" / removed).unlink()
    result = invoke(["--model", str(folder), *SIZE, "--prompt", SHORT, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and error_lines(result.output) == [f"Error: --model: '{folder}': {message}"]
    assert not (tmp_path / "out").exists()
