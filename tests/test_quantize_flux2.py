"""--quantize for FLUX.2 (klein: Qwen3, dev: Mistral3): the staged image equals the one-piece
Flux2KleinPipeline / Flux2Pipeline with the same components quantized through diffusers' and
transformers' own interfaces, the planner counts the quantized (and pre-quantized) bytes exactly,
and the spec is read in the family's component names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flux_sharded.cli import main
from flux_sharded.components import empty_component, module_sizes
from flux_sharded.families import FLUX_1, FLUX_2_DEV, FLUX_2_KLEIN, family_of
from flux_sharded.quantize import QuantizeError, parse_quantize
from flux_sharded.quantize_bytes import quantized_meta, stored_bytes
from flux_sharded.quantize_load import from_pretrained
from flux_sharded.stages.encode import _model_class

from .conftest import assert_same_pixels, bnb_4bit_transformer_copy
from .devices import assert_close_to_the_cpu
from .test_quantize import PROMPT, SEED, SIZE, STEPS, TOKENS, streamed_latents

pytest.importorskip("torchao", reason="int8 needs torchao: `make test` installs it (the test extra)")

GUIDANCE = 4.0  # Flux2Pipeline's default; a step-distilled klein ignores it


def staged(checkpoint: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(main, [
        "--model", str(checkpoint), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
        "--height", str(SIZE), "--width", str(SIZE), "--max-sequence-length", str(TOKENS), "--dtype", "float32",
        "--guidance", str(GUIDANCE), "--max-memory", "cpu=4GB", "--out", str(out), *extra,
    ])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.png")
    return path


def _text_encoder_class(checkpoint: Path):
    import transformers

    return getattr(transformers, family_of(checkpoint).component("text_encoder").class_name)


def _nf4_text_encoder(checkpoint: Path, model_class=None, **layout):
    """The text encoder in nf4 through transformers' own bitsandbytes loading, on the CPU (float32
    compute); layout: more BitsAndBytesConfig fields (bnb_4bit_use_double_quant, llm_int8_skip_modules)."""
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32, **layout)
    return (model_class or _text_encoder_class(checkpoint)).from_pretrained(
        checkpoint, subfolder="text_encoder", quantization_config=config, dtype=torch.float32, device_map="cpu")


def one_piece(checkpoint: Path, method: str | None = None, **components) -> np.ndarray:
    """The checkpoint's FLUX.2 pipeline, whole, with its transformer and its full (uncut) text
    encoder quantized by `method`: layerwise casting (fp8) or TorchAoConfig (int8) at load."""
    import diffusers
    import transformers

    dtype = torch.float32
    pipeline_class = getattr(diffusers, family_of(checkpoint).pipeline)
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        components["transformer"] = diffusers.Flux2Transformer2DModel.from_pretrained(
            checkpoint, subfolder="transformer", dtype=dtype,
            quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
        components["text_encoder"] = _text_encoder_class(checkpoint).from_pretrained(
            checkpoint, subfolder="text_encoder", dtype=dtype,
            quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    pipeline = pipeline_class.from_pretrained(checkpoint, dtype=dtype, **components)
    if method == "fp8":
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        # The full encoder's parts the staged encode cuts (components.encode_only) stay in float32
        # here: the tied lm_head is klein's token embedding, and the pipeline takes the encoder's
        # dtype from its first parameter, Mistral3's vision tower's.
        apply_layerwise_casting(pipeline.text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN
                                + ("^lm_head$", "vision_tower", "multi_modal_projector"),
                                skip_modules_classes=(torch.nn.Embedding,))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, max_sequence_length=TOKENS,
                     guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


_unquantized: dict[Path, np.ndarray] = {}


def assert_quantized_pixels(path: Path, expected: np.ndarray, checkpoint: Path) -> None:
    """The staged PNG is the quantized one-piece image, which is not the unquantized one (so the
    quantization was applied, not skipped on both sides)."""
    assert_same_pixels(np.asarray(Image.open(path)), expected)
    if checkpoint not in _unquantized:
        _unquantized[checkpoint] = one_piece(checkpoint)
    assert np.abs(_unquantized[checkpoint].astype(int) - expected).max() > 0


@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev"])
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_staged_flux2_png_equals_the_quantized_one_piece_pipeline(request, tmp_path, fixture, method):
    checkpoint = request.getfixturevalue(fixture)
    path = staged(checkpoint, tmp_path / "q", "--quantize", method)
    assert Image.open(path).text["quantize"] == f"text_encoder={method},transformer={method}"
    assert_quantized_pixels(path, one_piece(checkpoint, method), checkpoint)


@pytest.mark.parametrize("fixture", ["nf4_klein", "nf4_dev"])
def test_an_nf4_flux2_text_encoder_runs_cut_on_the_cpu_and_equals_the_one_piece_pipeline(request, tmp_path, fixture):
    """bitsandbytes 0.50 quantizes and multiplies on the CPU; transformers loads Qwen3 and Mistral3
    in 4-bit there, cut to the layers the encode reads as well as whole."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    checkpoint = request.getfixturevalue(fixture)
    path = staged(checkpoint, tmp_path / "q", "--quantize", "text_encoder=nf4")
    assert Image.open(path).text["quantize"] == "text_encoder=nf4"
    assert_quantized_pixels(path, one_piece(checkpoint, text_encoder=_nf4_text_encoder(checkpoint)), checkpoint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fp8", "int8", "nf4"])
@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev", "tiny_flux3"])
def test_the_planner_counts_a_quantized_cut_text_encoder_exactly(request, fixture, method, dtype):
    """The encode loads the cut encoder (stages/encode.py), quantized as it loads; its stored bytes
    (rotary inverse frequencies kept in float32 included) are the plan's."""
    if method == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it")
    checkpoint = request.getfixturevalue(fixture)
    loaded = from_pretrained(_model_class(family_of(checkpoint), "text_encoder"), checkpoint, "text_encoder", method,
                             dtype, device_map={"": "cpu"} if method == "nf4" else None)
    planned = module_sizes(empty_component(checkpoint, "text_encoder", method, dtype), dtype)[""]
    unquantized = module_sizes(empty_component(checkpoint, "text_encoder"), dtype)[""]
    assert stored_bytes(loaded) == planned < unquantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev", "tiny_flux3"])
def test_the_planner_counts_an_unquantized_cut_text_encoder_exactly(request, fixture, dtype):
    checkpoint = request.getfixturevalue(fixture)
    loaded = _model_class(family_of(checkpoint), "text_encoder").from_pretrained(
        checkpoint, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
    assert stored_bytes(loaded) == module_sizes(empty_component(checkpoint, "text_encoder"), dtype)[""]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev", "tiny_flux3"])
def test_the_planner_counts_a_quantized_flux2_transformer_exactly(request, fixture, method, dtype):
    import diffusers

    checkpoint = request.getfixturevalue(fixture)
    model_class = getattr(diffusers, family_of(checkpoint).component("transformer").class_name)
    loaded = from_pretrained(model_class, checkpoint, "transformer", method, dtype)
    planned = module_sizes(empty_component(checkpoint, "transformer", method, dtype), dtype)[""]
    assert stored_bytes(loaded) == planned < module_sizes(empty_component(checkpoint, "transformer"), dtype)[""]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev", "tiny_flux3"])
def test_the_planner_counts_an_unquantized_transformer_exactly(request, fixture, dtype):
    """FLUX.3's transformer keeps norm_q and norm_k in float32 at any dtype (diffusers'
    _keep_in_fp32_modules, unlike transformers' float16-only rule): the plan counts them so."""
    import diffusers

    checkpoint = request.getfixturevalue(fixture)
    model_class = getattr(diffusers, family_of(checkpoint).component("transformer").class_name)
    loaded = model_class.from_pretrained(checkpoint, subfolder="transformer", dtype=dtype)
    assert stored_bytes(loaded) == module_sizes(empty_component(checkpoint, "transformer"), dtype)[""]


@pytest.mark.parametrize("fixture", ["tiny_klein", "tiny_dev", "tiny_flux3"])
def test_an_nf4_flux2_transformer_is_refused_before_anything_loads_without_a_gpu(request, tmp_path, fixture):
    assert not torch.cuda.is_available()
    checkpoint = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--quantize", "nf4",
                                       "--max-memory", "cpu=4GB", "--out", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "--quantize nf4 needs a CUDA GPU for the transformer" in line
    assert "(nf4 for the text encoders alone runs on the CPU)" in line
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize("family, spec, expected", [
    (FLUX_1, "fp8", {"transformer": "fp8", "text_encoder_2": "fp8"}),
    (FLUX_2_KLEIN, "fp8", {"transformer": "fp8", "text_encoder": "fp8"}),
    (FLUX_2_DEV, "NF4", {"transformer": "nf4", "text_encoder": "nf4"}),
    (FLUX_2_DEV, "transformer=int8,text_encoder=nf4,vae=fp8", {"transformer": "int8", "text_encoder": "nf4",
                                                               "vae": "fp8"}),
])
def test_a_bare_method_quantizes_the_familys_large_components(family, spec, expected):
    assert parse_quantize(spec, family) == expected


def test_a_saved_spec_must_name_its_components():
    """run.json and the handoff keep the spec as format_quantize writes it; a bare method there has
    no family to take its components from."""
    with pytest.raises(QuantizeError, match="'fp8' names no component"):
        parse_quantize("fp8")


@pytest.mark.parametrize("model, args, message", [
    ("black-forest-labs/FLUX.2-klein-4B", ["--quantize", "text_encoder_2=fp8"],
     "Error: --quantize: 'text_encoder_2' is not a component of FLUX.2-klein; use text_encoder, transformer, vae "
     "(e.g. --quantize fp8, or --quantize transformer=nf4,text_encoder=int8)"),
    ("black-forest-labs/FLUX.2-dev", ["--quantize", "fp4"],
     "Error: --quantize: 'fp4' names an unknown method; use none, fp8, int8, nf4 (e.g. --quantize fp8, or "
     "--quantize transformer=nf4,text_encoder=int8)"),
    ("black-forest-labs/FLUX.2-dev", ["--quantize", "text_encoder=int8,text_encoder=fp8"],
     "Error: --quantize: 'text_encoder' is given twice"),
    ("black-forest-labs/FLUX.1-dev", ["--quantize", "text_encoder_3=fp8"],
     "Error: --quantize: 'text_encoder_3' is not a component of FLUX.1; use text_encoder, text_encoder_2, "
     "transformer, vae"),
])
def test_flux2_bad_specs_get_one_error_line(tmp_path, model, args, message):
    result = CliRunner().invoke(main, ["--dry-run", "--model", model, "--prompt", "a dog", "--max-memory", "0=24GB",
                                       "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith(message) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _prequantized_klein(klein, folder: Path, **layout) -> Path:
    """The tiny klein with its (whole) Qwen3 saved in bitsandbytes 4-bit by transformers on the CPU,
    as diffusers/FLUX.2-dev-bnb-4bit stores its text encoder (config.json with a quantization_config)."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    shutil.copytree(klein, folder, ignore=shutil.ignore_patterns("text_encoder"))
    _nf4_text_encoder(klein, **layout).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture
def prequantized_klein(tiny_klein, tmp_path) -> Path:
    return _prequantized_klein(tiny_klein, tmp_path / "klein-bnb")


@pytest.mark.parametrize("layout", [
    {},
    # a saved layout that changes the bytes: 8-bit absmax with float32 second-level statistics, and
    # a skip list that replaces transformers' default one (the MLP output layers stay in float32 too)
    {"bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["lm_head", "down_proj"]},
])
def test_a_prequantized_flux2_text_encoder_loads_as_it_is_and_equals_the_one_piece_pipeline(nf4_klein, tmp_path,
                                                                                            layout):
    checkpoint = _prequantized_klein(nf4_klein, tmp_path / "klein-bnb", **layout)
    report = tmp_path / "report.json"
    path = staged(checkpoint, tmp_path / "pre", "--report", str(report))
    assert Image.open(path).text["quantize"] == "none"  # nothing asked: the checkpoint's own 4-bit Qwen3
    assert_same_pixels(np.asarray(Image.open(path)), one_piece(checkpoint))  # diffusers loads it as it is, too
    # planned as stored: the cut encoder's 4-bit bytes, counted on meta and read back from the loaded model
    encode = next(stage for stage in json.loads(report.read_text())["stages"] if stage["name"] == "encode")
    planned = module_sizes(empty_component(checkpoint, "text_encoder", "nf4", torch.float32), torch.float32)[""]
    assert encode["weight_bytes"]["cpu"] == planned
    as_stored = _model_class(FLUX_2_KLEIN, "text_encoder").from_pretrained(checkpoint, subfolder="text_encoder",
                                                                            device_map="cpu")
    assert planned == stored_bytes(as_stored)
    assert planned < module_sizes(empty_component(checkpoint, "text_encoder"), torch.float32)[""]
    # the saved layout is what the plan counted, not --quantize nf4's own
    ours = module_sizes(quantized_meta(empty_component(checkpoint, "text_encoder"), "nf4", torch.float32),
                        torch.float32)[""]
    assert (planned == ours) == (not layout)


@pytest.mark.parametrize("args, message", [
    (["--quantize", "text_encoder=int8"], "Error: --quantize: text_encoder in {} is quantized already (nf4"),
    (["--quantize", "fp8"], "Error: --quantize: text_encoder in {} is quantized already (nf4"),
    (["--dtype", "bfloat16"], "Error: --dtype bfloat16: text_encoder in {} is pre-quantized to compute in float32"),
])
def test_a_prequantized_flux2_text_encoder_refuses_what_would_change_it(prequantized_klein, tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(prequantized_klein), "--prompt", "a dog", "--dtype", "float32",
                                       "--max-memory", "cpu=4GB", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert line.startswith(message.format(prequantized_klein)) and "Traceback" not in result.output
    assert not out.exists()


@pytest.fixture
def prequantized_dev_transformer(tiny_dev, tmp_path) -> Path:
    """The tiny dev with its transformer config saying it is stored in bitsandbytes 4-bit, as
    diffusers/FLUX.2-dev-bnb-4bit's does: diffusers loads such weights only onto a GPU, so only the
    config matters to what the CPU can test (the plan and the refusal)."""
    return bnb_4bit_transformer_copy(tiny_dev, tmp_path / "dev-bnb")


def test_a_prequantized_flux2_transformer_is_planned_as_stored_on_a_gpu_and_refused_without_one(
        prequantized_dev_transformer, tmp_path):
    checkpoint = prequantized_dev_transformer
    report = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["--dry-run", "--model", str(checkpoint), "--prompt", "a dog", "--height", "32",
                                       "--width", "32", "--max-memory", "0=4GB", "--report", str(report)])
    assert result.exit_code == 0, result.output
    denoise = next(stage for stage in json.loads(report.read_text())["stages"] if stage["name"] == "denoise")
    nf4 = module_sizes(empty_component(checkpoint, "transformer", "nf4", torch.bfloat16), torch.bfloat16)[""]
    assert denoise["weight_bytes"] == {"0": nf4}
    quantize = CliRunner().invoke(main, ["--dry-run", "--model", str(checkpoint), "--prompt", "a dog",
                                         "--max-memory", "0=4GB", "--quantize", "fp8"])
    assert quantize.exit_code == 2 and "Error: --quantize: transformer in" in quantize.output, quantize.output
    run = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=4GB",
                                    "--out", str(tmp_path / "out")])
    assert run.exit_code == 2 and "--quantize nf4 needs a CUDA GPU for the transformer" in run.output, run.output
    assert not (tmp_path / "out").exists()


@pytest.mark.devices
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_flux2_blocks_stream_like_the_others_and_change_no_latent(tiny_klein, method):
    """As tests/test_quantize.py's FLUX.1 test: a quantized klein transformer whose plan keeps its
    first modules on "GPU 0" and streams the single-stream blocks (what FLUX.2-dev fp8 on one 16 GB
    card plans); GPU 0 is a logical device (the devices tier), and the latents equal the all-CPU run's."""
    import dataclasses

    from flux_sharded import plan as plan_module
    from flux_sharded import runner
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.handoff import GenerationSettings, Handoff
    from flux_sharded.plan import plan_run
    from flux_sharded.stages import denoise, encode

    checkpoint = resolve_checkpoint(str(tiny_klein))
    settings = GenerationSettings(str(tiny_klein), (PROMPT,), (SEED,), STEPS, GUIDANCE, SIZE, SIZE, TOKENS, "float32",
                                  quantize=f"transformer={method}")
    request = runner.RunRequest(checkpoint, settings, {"cpu": 4 * 10**9}, Path("unused"))
    on_cpu = plan_run(runner.plan_inputs(request), {"cpu": 4 * 10**9})
    encoded = encode.run(encode.load(checkpoint, on_cpu.stage("encode"), torch.float32), Handoff(settings))
    expected = denoise.run(denoise.load(checkpoint, on_cpu.stage("denoise"), torch.float32), encoded).latents

    components = plan_module._Components(runner.plan_inputs(request))
    on_gpu = ("pos_embed", "time_guidance_embed", "double_stream_modulation_img", "double_stream_modulation_txt",
              "single_stream_modulation", "x_embedder", "context_embedder", "transformer_blocks")
    device_map = {**dict.fromkeys(on_gpu, 0), "single_transformer_blocks": "cpu", "norm_out": "cpu", "proj_out": "cpu"}
    transformer_plan = plan_module._placed(components, "transformer", "denoise", device_map, [0], streamed=True)
    assert transformer_plan.streamed and transformer_plan.quantization == method
    stage_plan = dataclasses.replace(on_cpu.stage("denoise"), components=(transformer_plan,))
    assert_close_to_the_cpu(streamed_latents(checkpoint, stage_plan, encoded, "single_transformer_blocks.0"), expected)
