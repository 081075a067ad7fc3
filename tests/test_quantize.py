"""--quantize: the staged image equals diffusers' one-piece pipeline quantized the same way, and the
planner counts the quantized bytes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.cli import main
from flux_sharded.components import empty_component, module_sizes
from flux_sharded.errors import PlanError
from flux_sharded.families import FLUX_1
from flux_sharded.plan import PlanInputs, plan_run
from flux_sharded.quantize import QuantizeError, format_quantize, parse_quantize
from flux_sharded.quantize_bytes import stored_bytes

from .conftest import assert_same_pixels, bnb_4bit_transformer_copy
from .devices import assert_close_to_the_cpu, logical_gpus
from .sealing import edit_sealed_json

pytest.importorskip("torchao", reason="int8 needs torchao: `make test` installs it (the test extra)")

GB = 10**9
GiB = 2**30
PROMPT, SEED, STEPS, SIZE, TOKENS = "a photo of a dog", 3, 2, 32, 64


@pytest.mark.parametrize("spec, expected", [
    ("none", {}),
    ("fp8", {"transformer": "fp8", "text_encoder_2": "fp8"}),
    ("INT8", {"transformer": "int8", "text_encoder_2": "int8"}),
    ("transformer=nf4,text_encoder_2=int8", {"transformer": "nf4", "text_encoder_2": "int8"}),
    ("vae=fp8, text_encoder=none", {"vae": "fp8"}),
])
def test_specs_parse(spec, expected):
    assert parse_quantize(spec, FLUX_1) == expected
    assert parse_quantize(format_quantize(expected)) == expected


@pytest.mark.parametrize("args, message", [
    (["--quantize", "fp4"], "--quantize: 'fp4' names an unknown method; use none, fp8, int8, nf4"),
    (["--quantize", "unet=fp8"], "--quantize: 'unet' is not a component of FLUX.1; use text_encoder, text_encoder_2"),
    (["--quantize", "transformer=fp8,transformer=int8"], "'transformer' is given twice"),
    (["--quantize", "transformer"], "names an unknown method"),
    (["--quantize", "transformer:fp8"], "names an unknown method"),
    (["--quantize", "vae=fp8,x"], "'x' is not COMPONENT=METHOD"),
    (["--quantize", "none,fp8"], "--quantize: 'none,fp8' lists methods without components; give one method for the "
                                 "large components, or COMPONENT=METHOD pairs"),
    (["--quantize", "fp8,text_encoder=int8"], "'fp8' is not COMPONENT=METHOD"),
])
def test_bad_specs_get_one_error_line(args, message):
    result = CliRunner().invoke(main, ["--dry-run", "--prompt", "a dog", "--max-memory", "0=24GB", *args])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert message in line and "Traceback" not in result.output


def test_nf4_is_refused_before_anything_loads_without_a_gpu(tiny_checkpoint, tmp_path):
    assert not torch.cuda.is_available()
    result = CliRunner().invoke(main, ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--quantize", "nf4",
                                       "--max-memory", "cpu=4GB", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Error: --quantize nf4 needs a CUDA GPU" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def one_piece_quantized(checkpoint: Path, method: str) -> np.ndarray:
    """diffusers' FluxPipeline with the transformer and T5 quantized through diffusers' and
    transformers' own interfaces: layerwise casting (fp8) or TorchAoConfig (int8)."""
    import diffusers
    import transformers
    from diffusers import FluxPipeline

    dtype = torch.float32
    if method == "fp8":
        from diffusers.hooks import apply_layerwise_casting
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        pipeline = FluxPipeline.from_pretrained(checkpoint, dtype=dtype)
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        apply_layerwise_casting(pipeline.text_encoder_2, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + ("wo",),
                                skip_modules_classes=(torch.nn.Embedding,))
    else:
        from torchao.quantization import Int8WeightOnlyConfig

        transformer = diffusers.FluxTransformer2DModel.from_pretrained(
            checkpoint, subfolder="transformer", dtype=dtype,
            quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
        text_encoder_2 = transformers.T5EncoderModel.from_pretrained(
            checkpoint, subfolder="text_encoder_2", dtype=dtype,
            quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
        pipeline = FluxPipeline.from_pretrained(checkpoint, transformer=transformer, text_encoder_2=text_encoder_2,
                                                dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, max_sequence_length=TOKENS,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


def staged(checkpoint: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(main, [
        "--model", str(checkpoint), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
        "--height", str(SIZE), "--width", str(SIZE), "--max-sequence-length", str(TOKENS), "--dtype", "float32",
        "--max-memory", "cpu=4GB", "--out", str(out), *extra,
    ])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.png")
    return path


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_staged_png_equals_the_quantized_one_piece_pipeline(tiny_checkpoint, tmp_path, method):
    path = staged(tiny_checkpoint, tmp_path / "q", "--quantize", method)
    expected = one_piece_quantized(tiny_checkpoint, method)
    assert_same_pixels(np.asarray(Image.open(path)), expected)
    assert Image.open(path).text["quantize"] == f"text_encoder_2={method},transformer={method}"
    # quantization changes these pixels: the comparison above is not the unquantized image's
    plain = np.asarray(Image.open(staged(tiny_checkpoint, tmp_path / "plain")))
    assert np.abs(plain.astype(int) - expected).max() > 0


def _t5_nf4(source: Path) -> "torch.nn.Module":
    """T5 in nf4 through transformers' own bitsandbytes loading, on the CPU (float32 compute)."""
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)
    return transformers.T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", quantization_config=config,
                                                       dtype=torch.float32, device_map="cpu")


def _one_piece(checkpoint: Path, **components) -> np.ndarray:
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32, **components)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, max_sequence_length=TOKENS,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


def test_nf4_t5_runs_on_the_cpu_and_equals_the_one_piece_pipeline(nf4_checkpoint, tmp_path):
    """bitsandbytes 0.50 quantizes and multiplies on the CPU, and transformers loads 4-bit there:
    only the transformer's nf4 needs a GPU (diffusers' loader)."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    path = staged(nf4_checkpoint, tmp_path / "q", "--quantize", "text_encoder_2=nf4")
    assert_same_pixels(np.asarray(Image.open(path)), _one_piece(nf4_checkpoint, text_encoder_2=_t5_nf4(nf4_checkpoint)))
    assert Image.open(path).text["quantize"] == "text_encoder_2=nf4"
    plain = np.asarray(Image.open(staged(nf4_checkpoint, tmp_path / "plain")))
    assert np.abs(plain.astype(int) - np.asarray(Image.open(path)).astype(int)).max() > 0


@pytest.fixture
def prequantized_t5_checkpoint(nf4_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint with T5 saved in bitsandbytes 4-bit by transformers (safetensors with the
    quantization state, config.json with its quantization_config), as diffusers/FLUX.1-dev-bnb-4bit
    stores its text_encoder_2."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    copy = tmp_path / "t5-bnb"
    shutil.copytree(nf4_checkpoint, copy, ignore=shutil.ignore_patterns("text_encoder_2"))
    _t5_nf4(nf4_checkpoint).save_pretrained(copy / "text_encoder_2")
    return copy


def test_a_prequantized_t5_loads_as_it_is_and_equals_the_one_piece_pipeline(prequantized_t5_checkpoint, tmp_path):
    checkpoint = prequantized_t5_checkpoint
    report = tmp_path / "report.json"
    path = staged(checkpoint, tmp_path / "pre", "--report", str(report))
    assert_same_pixels(np.asarray(Image.open(path)), _one_piece(checkpoint))  # diffusers loads it as it is, too
    assert Image.open(path).text["quantize"] == "none"  # nothing asked: the checkpoint's own 4-bit T5
    encode = next(stage for stage in json.loads(report.read_text())["stages"] if stage["name"] == "encode")
    planned_t5 = module_sizes(empty_component(checkpoint, "text_encoder_2", "nf4", torch.float32), torch.float32)[""]
    planned_clip = module_sizes(empty_component(checkpoint, "text_encoder"), torch.float32)[""]
    assert encode["weight_bytes"]["cpu"] == planned_t5 + planned_clip
    import transformers

    as_stored = transformers.T5EncoderModel.from_pretrained(checkpoint, subfolder="text_encoder_2", device_map="cpu")
    assert planned_t5 == stored_bytes(as_stored)
    refused = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=4GB",
                                        "--quantize", "text_encoder_2=int8", "--out", str(tmp_path / "again")])
    assert refused.exit_code == 2 and "is quantized already (nf4" in refused.output, refused.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_the_planner_counts_the_quantized_bytes_exactly(tiny_checkpoint, component, method, dtype):
    import diffusers
    import transformers

    from flux_sharded.quantize_load import from_pretrained

    model_class = diffusers.FluxTransformer2DModel if component == "transformer" else transformers.T5EncoderModel
    loaded = from_pretrained(model_class, tiny_checkpoint, component, method, dtype)
    planned = module_sizes(empty_component(tiny_checkpoint, component, method, dtype), dtype)[""]
    unquantized = module_sizes(empty_component(tiny_checkpoint, component), dtype)[""]
    assert stored_bytes(loaded) == planned < unquantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("component", ["text_encoder_2", "text_encoder"])
def test_the_planner_counts_nf4_text_encoders_as_transformers_stores_them(tiny_checkpoint, component, dtype):
    """bitsandbytes quantizes on the CPU too, so transformers' own 4-bit loading runs here: T5 keeps
    its `wo` unconverted (bitsandbytes' skip list, unlike torchao's), which the plan must count."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    import transformers

    model_class = getattr(transformers, "T5EncoderModel" if component == "text_encoder_2" else "CLIPTextModel")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=dtype)
    loaded = model_class.from_pretrained(tiny_checkpoint, subfolder=component, quantization_config=config,
                                         dtype=dtype, device_map="cpu")
    planned = module_sizes(empty_component(tiny_checkpoint, component, "nf4", dtype), dtype)[""]
    assert stored_bytes(loaded) == planned < module_sizes(empty_component(tiny_checkpoint, component), dtype)[""]
    if component == "text_encoder_2":
        assert type(loaded.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_klein", "tiny_dev"])
@pytest.mark.parametrize("skip_modules, double_quant", [
    (None, False),  # --quantize nf4's own layout
    (("proj_out", "ff"), True),  # a pre-quantized config's: its own skip list, 8-bit absmax
])
def test_the_planner_counts_an_nf4_transformer_as_bitsandbytes_stores_it(request, fixture, dtype, skip_modules,
                                                                         double_quant):
    """diffusers refuses to load bitsandbytes weights without a GPU, so this takes its two parts
    apart: diffusers' own quantizer picks the layers (preprocess_model, as from_pretrained calls it),
    and bitsandbytes quantizes each picked weight on the CPU (Params4bit, as diffusers' Linear4bit
    holds it: nf4, blocks of 64, double quantization as the config says)."""
    bnb = pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it")
    import diffusers
    from diffusers.quantizers import DiffusersAutoQuantizer

    from flux_sharded.families import family_of
    from flux_sharded.quantize_bytes import Nf4Layout, quantized_linears, quantized_meta

    checkpoint = request.getfixturevalue(fixture)
    transformer_class = getattr(diffusers, family_of(checkpoint).component("transformer").class_name)
    config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                          bnb_4bit_use_double_quant=double_quant,
                                          llm_int8_skip_modules=list(skip_modules) if skip_modules else None)
    picked = empty_component(checkpoint, "transformer")
    DiffusersAutoQuantizer.from_config(config).preprocess_model(picked, device_map=None, keep_in_fp32_modules=[])
    converted = {name for name, module in picked.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    planned_layers = {name for name, _ in quantized_linears(empty_component(checkpoint, "transformer"), "nf4",
                                                            skip_modules)}
    assert converted == planned_layers and converted
    if skip_modules:  # the skip list takes layers out: the comparison above is not the default's
        assert converted < {name for name, _ in quantized_linears(empty_component(checkpoint, "transformer"), "nf4")}

    model = transformer_class.from_pretrained(checkpoint, subfolder="transformer", dtype=dtype)
    for name in converted:
        linear = model.get_submodule(name)
        linear.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                          compress_statistics=double_quant).to("cpu")
        assert linear.weight.bnb_quantized
    layout = Nf4Layout(skip_modules, double_quant)
    planned = module_sizes(quantized_meta(empty_component(checkpoint, "transformer"), "nf4", dtype, layout), dtype)[""]
    assert stored_bytes(model) == planned


def inputs(method: str | None, model="FLUX.1-dev") -> PlanInputs:
    quantize = (("transformer", method), ("text_encoder_2", method)) if method else ()
    return PlanInputs(shipped_config_dir(model), torch.bfloat16, 1024, 1024, 512, vae_scale_factor=8,
                      quantize=quantize)


def test_flux1_dev_int8_plans_on_two_8gb_gpus_with_no_offload():
    plan = plan_run(inputs("int8"), {0: 8 * GB, 1: 8 * GB})
    assert all(set(stage.planned_bytes) <= {0, 1} for stage in plan.stages)
    transformer = plan.stage("denoise").component("transformer")
    assert abs(sum(transformer.weight_bytes.values()) - 11.92 * GB) < 0.01 * GB


def test_flux1_dev_nf4_plans_on_one_8gb_gpu():
    plan = plan_run(inputs("nf4"), {0: 8 * GB})
    assert all(set(stage.planned_bytes) == {0} for stage in plan.stages)


def test_flux1_dev_fp8_plans_on_two_cards_sold_as_8gb_with_no_offload():
    """A card sold as "8 GB" holds 8 GiB; fp8's 15.15 GB transformer fits two of those, not two 8.00 GB budgets."""
    plan = plan_run(inputs("fp8"), {0: 8 * GiB, 1: 8 * GiB})
    assert all(set(stage.planned_bytes) <= {0, 1} for stage in plan.stages)
    assert all(stage.planned_bytes[device] <= 8 * GiB for stage in plan.stages for device in stage.planned_bytes)
    refused = CliRunner().invoke(main, ["--dry-run", "--model", "black-forest-labs/FLUX.1-dev", "--prompt", "a dog",
                                        "--quantize", "fp8", "--max-memory", "0=8GB,1=8GB"])
    assert refused.exit_code == 2, refused.output
    assert "Ways out: --max-memory 0=8GiB,1=8GiB if that is your card" in refused.output


def test_flux1_dev_fp8_keeps_the_modulation_layers_in_bf16():
    """diffusers skips "norm" for FLUX's transformer (its AdaLN modulation linears, 6.4 GB in bf16), so
    fp8 stores 15.15 GB, not half of 23.8 GB; T5 keeps `wo` (its float32 module, 2.0 GB in bf16) and its
    token embedding (0.26 GB) in bf16: 5.90 GB."""
    plan = plan_run(inputs("fp8"), {0: 24 * GB, 1: 24 * GB})
    transformer = plan.stage("denoise").component("transformer")
    assert abs(sum(transformer.weight_bytes.values()) - 15.15 * GB) < 0.01 * GB
    t5 = plan.stage("encode").component("text_encoder_2")
    assert abs(sum(t5.weight_bytes.values()) - 5.90 * GB) < 0.01 * GB


def test_a_refusal_says_when_a_quantization_would_fit_without_offload():
    with pytest.raises(PlanError, match=r"or --quantize int8 would fit without offload"):
        plan_run(inputs(None), {0: 8 * GB, 1: 8 * GB})


def test_a_cpu_only_refusal_says_when_a_quantization_would_fit_the_budget():
    """No GPU budgeted: fp8 and int8 run on the CPU too (an nf4 transformer does not), and fp8 keeps
    FLUX.1-dev's transformer at 15.15 GB, which 16 GB of RAM holds."""
    with pytest.raises(PlanError, match=r"or --quantize fp8 would fit this budget$"):
        plan_run(inputs(None), {"cpu": 16 * GB})
    assert all(stage.fits for stage in plan_run(inputs("fp8"), {"cpu": 16 * GB}).stages)  # the suggestion holds
    with pytest.raises(PlanError) as refused:  # 8 GB holds no quantization of it
        plan_run(inputs(None), {"cpu": 8 * GB})
    assert "--quantize" not in str(refused.value)


@pytest.fixture
def prequantized_checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint with its transformer config saying it is stored in bitsandbytes 4-bit (the
    diffusers/FLUX.1-dev-bnb-4bit layout): only the config matters to what is tested here."""
    return bnb_4bit_transformer_copy(tiny_checkpoint, tmp_path / "bnb")


def test_quantize_on_a_prequantized_component_is_refused(prequantized_checkpoint):
    result = CliRunner().invoke(main, ["--dry-run", "--model", str(prequantized_checkpoint), "--prompt", "a dog",
                                       "--max-memory", "cpu=4GB", "--quantize", "transformer=fp8"])
    assert result.exit_code == 2, result.output
    assert "Error: --quantize: transformer in" in result.output and "is quantized already (nf4" in result.output


def test_a_prequantized_component_is_planned_with_its_quantized_bytes(prequantized_checkpoint, tmp_path):
    report = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["--dry-run", "--model", str(prequantized_checkpoint), "--prompt", "a dog",
                                       "--height", "32", "--width", "32", "--max-memory", "0=4GB",
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    denoise = next(stage for stage in json.loads(report.read_text())["stages"] if stage["name"] == "denoise")
    nf4 = module_sizes(empty_component(prequantized_checkpoint, "transformer", "nf4", torch.bfloat16),
                       torch.bfloat16)[""]
    assert denoise["weight_bytes"]["0"] == nf4  # on a GPU: bitsandbytes' 4-bit transformer runs nowhere else
    # and a run refuses it on this machine, which has no CUDA for bitsandbytes' 4-bit kernels
    run = CliRunner().invoke(main, ["--model", str(prequantized_checkpoint), "--prompt", "a dog", "--max-memory",
                                    "cpu=4GB", "--out", str(tmp_path / "out")])
    assert run.exit_code == 2 and "needs a CUDA GPU" in run.output, run.output


def test_a_resume_cannot_change_the_quantization(tiny_checkpoint, tmp_path):
    staged(tiny_checkpoint, tmp_path / "q", "--quantize", "int8")
    (run_dir,) = (tmp_path / "q" / ".flux-sharded").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["settings"]["quantize"] == \
        "text_encoder_2=int8,transformer=int8"
    result = CliRunner().invoke(main, ["--resume", str(run_dir), "--quantize", "fp8"])
    assert result.exit_code == 2, result.output
    assert ("--quantize text_encoder_2=fp8,transformer=fp8 conflicts with the saved run's "
            "text_encoder_2=int8,transformer=int8") in result.output


def test_a_bad_quantize_in_run_json_is_refused_on_resume(tiny_checkpoint, tmp_path):
    staged(tiny_checkpoint, tmp_path / "q", "--quantize", "int8")
    (run_dir,) = (tmp_path / "q" / ".flux-sharded").iterdir()
    # sealed again: one edited by hand is refused by its seal first (tests/test_faults.py)
    edit_sealed_json(run_dir / "run.json", lambda saved: saved["settings"].update(quantize="transformer=fp4"))
    result = CliRunner().invoke(main, ["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "'settings.quantize' is not a quantization spec" in result.output


def test_quantize_error_is_a_settings_error():
    with pytest.raises(QuantizeError):
        parse_quantize("transformer=int4")


@pytest.mark.devices
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_blocks_stream_like_the_others_and_change_no_latent(tiny_checkpoint, method):
    """A quantized transformer whose plan keeps its first block on "GPU 0" and streams the rest
    (group offloading moves torchao tensors and float8 weights alike): on this GPU-less machine
    GPU 0 is a logical device (the devices tier), and the latents equal the quantized run all on the CPU."""
    import dataclasses

    from flux_sharded import plan as plan_module
    from flux_sharded import runner
    from flux_sharded.checkpoint import resolve_checkpoint
    from flux_sharded.handoff import GenerationSettings, Handoff
    from flux_sharded.stages import denoise, encode

    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    settings = GenerationSettings(str(tiny_checkpoint), (PROMPT,), (SEED,), STEPS, 3.5, SIZE, SIZE, TOKENS, "float32",
                                  quantize=f"transformer={method}")
    request = runner.RunRequest(checkpoint, settings, {"cpu": 4 * GB}, Path("unused"))
    on_cpu = plan_run(runner.plan_inputs(request), {"cpu": 4 * GB})
    assert on_cpu.stage("denoise").component("transformer").quantization == method
    encoded = encode.run(encode.load(checkpoint, on_cpu.stage("encode"), torch.float32), Handoff(settings))
    expected = denoise.run(denoise.load(checkpoint, on_cpu.stage("denoise"), torch.float32), encoded).latents

    components = plan_module._Components(runner.plan_inputs(request))
    device_map = {"time_text_embed": 0, "context_embedder": 0, "x_embedder": 0, "transformer_blocks.0": 0,
                  "transformer_blocks.1": "cpu", "single_transformer_blocks": "cpu", "norm_out": "cpu",
                  "proj_out": "cpu"}
    transformer_plan = plan_module._placed(components, "transformer", "denoise", device_map, [0], streamed=True)
    assert transformer_plan.streamed and transformer_plan.quantization == method
    stage_plan = dataclasses.replace(on_cpu.stage("denoise"), components=(transformer_plan,))
    assert_close_to_the_cpu(streamed_latents(checkpoint, stage_plan, encoded, "transformer_blocks.1"), expected)


def streamed_latents(checkpoint, stage_plan, encoded, streamed_block: str) -> torch.Tensor:
    """denoise's latents with the transformer placed by `stage_plan` on logical GPUs (the devices
    tier), after checking that `streamed_block` carries diffusers' group-offloading hook."""
    from flux_sharded.stages import denoise

    with logical_gpus():
        pipeline = denoise.load(checkpoint, stage_plan, torch.float32)
        block = pipeline.transformer.get_submodule(streamed_block)
        assert block._diffusers_hook.get_hook("group_offloading") is not None
        return denoise.run(pipeline, encoded).latents


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_prequantized_component_saved_for_another_dtype_is_refused_before_anything_runs(
        prequantized_t5_checkpoint, tmp_path, dry_run):
    """transformers keeps a pre-quantized bitsandbytes T5 in the dtype it was saved for (float32
    here): under --dtype bfloat16 its embeddings would reach denoise in float32 and fail there, and
    again on every resume."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(prequantized_t5_checkpoint), "--prompt", "a dog", "--height",
                                       "32", "--width", "32", "--max-memory", "cpu=4GB", "--out", str(out), *dry_run])
    assert result.exit_code == 2, result.output
    assert (f"Error: --dtype bfloat16: text_encoder_2 in {prequantized_t5_checkpoint} is pre-quantized to compute in "
            "float32") in result.output and "run with --dtype float32" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_torchao_checkpoint_is_recognised_and_refused_where_diffusers_cannot_load_it(tiny_checkpoint, tmp_path):
    """A transformer saved by diffusers with torchao's int8 (TorchAoConfig, safetensors): its files
    pass the checks as torchao's layout (its config says torchao and its metadata lists torchao's
    tensors); a plan that puts part of it on the CPU is refused before anything is written, since
    diffusers' torchao quantizer refuses "cpu" in a pre-quantized model's device map (it failed
    inside denoise, after run.json)."""
    import diffusers
    from torchao.quantization import Int8WeightOnlyConfig

    from flux_sharded.checkpoint import check_weight_files, read_checkpoint

    checkpoint = tmp_path / "int8"
    shutil.copytree(tiny_checkpoint, checkpoint)
    shutil.rmtree(checkpoint / "transformer")
    diffusers.FluxTransformer2DModel.from_pretrained(
        tiny_checkpoint, subfolder="transformer", torch_dtype=torch.bfloat16,
        quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(checkpoint / "transformer")
    check_weight_files(read_checkpoint(str(checkpoint), checkpoint))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--model", str(checkpoint), "--prompt", "a dog", "--height", "32", "--width",
                                       "32", "--steps", "1", "--max-memory", "cpu=2GB", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error: ")] == [
        "Error: --max-memory: the checkpoint stores transformer quantized by torchao, which loads only onto GPUs "
        "(diffusers refuses cpu in the device map of a pre-quantized torchao model), but the plan puts part of it on "
        "cpu: give the GPUs room for all of it, or use the unquantized checkpoint with --quantize transformer=int8"]
    assert not out.exists()
