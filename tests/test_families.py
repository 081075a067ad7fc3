"""Model families (families.py): selected by model_index.json, FLUX.2 planned from its shipped configs.

The published sizes come from the shipped configs' README (/work/shared/flux-configs, copied to
flux_sharded/configs); the encoder cut is checked against the full model on random weights, and
the FLUX.2 activation estimates against memory.TensorBytesTracker on scaled-down random modules.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from flux_sharded import plan as plan_module
from flux_sharded.activations import (decoder_text_encoder_activation_bytes, flux2_transformer_activation_bytes,
                                      flux3_transformer_activation_bytes)
from flux_sharded.checkpoint import SHIPPED_CONFIGS, resolve_checkpoint, shipped_config_dir
from flux_sharded.components import empty_component, encode_only
from flux_sharded.families import FAMILIES, FLUX_1, encode_layers, encode_out_layers, family_of
from flux_sharded.memory import TensorBytesTracker
from flux_sharded.plan import PlanInputs, plan_run

from .conftest import error_lines, invoke

GB = 10**9
FLUX_2 = {"FLUX.2-dev": "Flux2Pipeline", "FLUX.2-klein-4B": "Flux2KleinPipeline", "FLUX.2-klein-9B": "Flux2KleinPipeline"}
FLUX_3 = {"FLUX.3-klein": "Flux3DistilledModularPipeline", "FLUX.3-klein-base": "Flux3ModularPipeline"}


# ---------------------------------------------------------------- the registry


def test_flux1_stages_and_classes_come_from_the_family():
    assert FLUX_1.stage_components() == {"upsample": (), "encode": ("text_encoder", "text_encoder_2"),
                                         "encode_image": ("vae",), "denoise": ("transformer",), "decode": ("vae",)}
    index = json.loads((shipped_config_dir("FLUX.1-dev") / "model_index.json").read_text())
    for component in FLUX_1.components:
        assert index[component.name] == [component.library, component.class_name]


@pytest.mark.parametrize("folder", ["FLUX.1-dev", "FLUX.1-schnell", "FLUX.1-Kontext-dev", *FLUX_2, *FLUX_3])
def test_each_shipped_checkpoint_selects_its_family_and_names_its_classes(folder):
    index = json.loads((shipped_config_dir(folder) / "model_index.json").read_text())
    family = family_of(shipped_config_dir(folder))
    assert family.pipeline == index["_class_name"]
    models = {key for key, value in index.items() if isinstance(value, list)} - {"scheduler", "tokenizer", "tokenizer_2"}
    assert models == set(family.names)
    for component in family.components:
        assert index[component.name] == [component.library, component.class_name]


@pytest.mark.parametrize("folder", list(FLUX_2))
def test_flux2_hub_ids_resolve_offline_to_the_shipped_configs(folder):
    checkpoint = resolve_checkpoint(f"black-forest-labs/{folder}", need_weights=False)
    assert SHIPPED_CONFIGS[f"black-forest-labs/{folder}"] == folder
    assert checkpoint.path == shipped_config_dir(folder)
    assert checkpoint.family.pipeline == FLUX_2[folder]
    assert (checkpoint.vae_scale_factor, checkpoint.default_size) == (8, 1024)


@pytest.mark.parametrize("typed, meant", [("black-forest-labs/FLUX.2-klein-4b", "black-forest-labs/FLUX.2-klein-4B"),
                                          ("FLUX.2-dve", "black-forest-labs/FLUX.2-dev")])
def test_a_misspelt_flux2_hub_id_names_the_near_match(tmp_path, monkeypatch, typed, meant):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def hub_answers(*args, **kwargs):  # the network boundary: no hub here
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_answers)
    result = invoke(["--model", typed, "--prompt", "a dog", "--max-memory", "0=12GB", "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert f"did you mean {meant}?" in line


@pytest.mark.parametrize("class_name", ['"StableDiffusionPipeline"', '"FluxControlPipeline"', "null"])
def test_an_unsupported_pipeline_is_refused_naming_the_supported_ones(tiny_checkpoint, tmp_path, class_name):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    (other / "model_index.json").write_text(f'{{"_class_name": {class_name}}}')
    result = invoke(["--model", str(other), "--prompt", "a dog", "--max-memory", "cpu=2GB", "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert f"holds a {json.loads(class_name)}, not a" in line
    for family in FAMILIES.values():
        assert f"{family.pipeline} ({family.name})" in line
    assert "Traceback" not in result.output


def test_a_flux2_config_whose_widths_disagree_is_refused(tmp_path):
    folder = tmp_path / "klein"
    shutil.copytree(shipped_config_dir("FLUX.2-klein-4B"), folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["joint_attention_dim"] = 4096
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    result = invoke(["--model", str(folder), "--prompt", "a dog", "--max-memory", "0=12GB", "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "text_encoder/config.json field 'hidden_size' is 2560, but the transformer's joint_attention_dim 4096" in line


# ---------------------------------------------------------------- the text encoders, as the encode uses them


def test_the_encode_layers_are_the_installed_pipelines():
    import inspect

    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    for pipeline, helper in ((Flux2Pipeline, "_get_mistral_3_small_prompt_embeds"),
                             (Flux2KleinPipeline, "_get_qwen3_prompt_embeds")):
        used = inspect.signature(getattr(pipeline, helper)).parameters["hidden_states_layers"].default
        assert encode_out_layers(pipeline.__name__) == tuple(used)
    assert (encode_layers("Flux2Pipeline"), encode_layers("Flux2KleinPipeline")) == (30, 27)


def _tiny_qwen3(layers: int, width: int = 32, heads: int = 4):
    import transformers

    config = transformers.Qwen3Config(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                                      num_key_value_heads=heads // 2, head_dim=width // heads, num_hidden_layers=layers,
                                      vocab_size=300, max_position_embeddings=1024, tie_word_embeddings=False)
    return transformers.Qwen3ForCausalLM(config)


def _tiny_mistral3(layers: int, width: int = 32, heads: int = 4):
    import transformers

    config = transformers.Mistral3Config(
        text_config=transformers.MistralConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
                                               num_key_value_heads=heads // 2, head_dim=width // heads,
                                               num_hidden_layers=layers, vocab_size=300, max_position_embeddings=1024),
        vision_config=transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, head_dim=8, image_size=28, patch_size=14),
        tie_word_embeddings=False,
    )
    return transformers.Mistral3ForConditionalGeneration(config)


@pytest.mark.parametrize("pipeline, build", [("Flux2KleinPipeline", _tiny_qwen3), ("Flux2Pipeline", _tiny_mistral3)])
def test_the_cut_encoder_gives_the_full_models_hidden_states(pipeline, build):
    torch.manual_seed(0)
    full = build(encode_layers(pipeline) + 3).eval()
    cut = build(encode_layers(pipeline) + 3).eval()
    cut.load_state_dict(full.state_dict())
    cut = encode_only(cut, encode_layers(pipeline))
    input_ids = torch.randint(0, 300, (2, 24))
    attention_mask = torch.ones(2, 24, dtype=torch.long)
    attention_mask[1, 10:] = 0  # padded, as the pipelines pad to max_sequence_length
    with torch.inference_mode():
        expected = full(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        actual = cut(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    for layer in encode_out_layers(pipeline):
        assert torch.equal(actual.hidden_states[layer], expected.hidden_states[layer]), f"hidden_states[{layer}]"
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in full.parameters())
    names = [name for name, _ in cut.named_parameters()]
    assert not any("lm_head" in name or "vision_tower" in name or "multi_modal_projector" in name for name in names)
    assert not any(re.search(rf"layers\.{encode_layers(pipeline)}\.", name) for name in names)


# ---------------------------------------------------------------- planned bytes against the published sizes

# bf16 bytes of what each stage loads, from the shipped configs' README (published numbers; the
# text encoders as the encode uses them: embeddings and the decoder layers up to the last one read).
PUBLISHED = {
    ("FLUX.2-dev", "text_encoder"): 34.69 * GB,
    ("FLUX.2-dev", "transformer"): 64.45 * GB,
    ("FLUX.2-dev", "vae"): 0.168 * GB,
    ("FLUX.2-klein-4B", "text_encoder"): 6.23 * GB,
    ("FLUX.2-klein-4B", "transformer"): 7.75 * GB,
    ("FLUX.2-klein-4B", "vae"): 0.168 * GB,
    ("FLUX.2-klein-9B", "text_encoder"): 11.66 * GB,
    ("FLUX.2-klein-9B", "transformer"): 18.16 * GB,
    ("FLUX.2-klein-9B", "vae"): 0.168 * GB,
}
# FLUX.2-dev in bf16 streams what two 24 GB cards miss, and reads its 64.45 GB transformer into RAM
# once before the resident blocks move to the cards (plan._streamed_host_bytes): RAM above 64.45 GB.
BUDGETS = {"FLUX.2-dev": "0=24GB,1=24GB,cpu=72GB", "FLUX.2-klein-9B": "0=16GB,1=16GB", "FLUX.2-klein-4B": "0=12GB"}


def _inputs(folder: str) -> PlanInputs:
    return PlanInputs(shipped_config_dir(folder), torch.bfloat16, 1024, 1024, 512, vae_scale_factor=8)


def _budget(spec: str):
    from flux_sharded.budget import parse_budget

    return parse_budget(spec, gpu_count=None)


@pytest.mark.parametrize("folder", list(FLUX_2))
def test_planned_weight_bytes_are_within_2_percent_of_the_published_sizes(folder):
    plan = plan_run(_inputs(folder), _budget(BUDGETS[folder]))
    for stage in plan.stages:
        for component in stage.components:
            planned = sum(component.weight_bytes.values())
            published = PUBLISHED[(folder, component.name)]
            assert abs(planned - published) <= 0.02 * published, f"{component.name}: {planned} vs {published}"


def test_flux2_dev_text_encoder_fits_no_gpu_so_it_is_split_by_whole_decoder_layers():
    plan = plan_run(_inputs("FLUX.2-dev"), _budget(BUDGETS["FLUX.2-dev"]))
    encoder = plan.stage("encode").component("text_encoder")
    assert set(encoder.weight_bytes) == {0, 1}  # 34.7 GB: on both 24 GB GPUs, nothing offloaded
    for module in encoder.device_map:  # whole decoder layers, never a part of one
        assert not re.search(r"layers\.\d+\.", module), module
    placed_layers = [module for module in encoder.device_map if re.fullmatch(r"model\.language_model\.layers\.\d+", module)]
    assert len(placed_layers) == 30
    cut = ("lm_head", "model.vision_tower", "model.multi_modal_projector", "model.language_model.norm")
    assert not set(cut) & set(encoder.device_map)
    assert plan.stage("encode").fits and plan.stage("denoise").fits


@pytest.mark.parametrize("folder", list(FLUX_2))
def test_flux2_dry_runs_fit_the_budgets_of_the_issue(folder):
    result = invoke(["--model", f"black-forest-labs/{folder}", "--prompt", "a dog", "--max-memory", BUDGETS[folder],
                     "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not error_lines(result.output)
    assert re.search(r"^encode\s+0\s", result.output, re.M) and re.search(r"^decode\s+0\s", result.output, re.M)


@pytest.mark.parametrize("folder, budget", [("FLUX.2-klein-4B", "0=6GB"), ("FLUX.2-dev", "0=24GB,1=24GB")])
def test_flux2_dry_runs_that_do_not_fit_are_refused(folder, budget):
    result = invoke(["--model", f"black-forest-labs/{folder}", "--prompt", "a dog", "--max-memory", budget, "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "does not fit" in line and "Ways out: --max-memory" in line


def test_flux2_dev_dry_run_takes_the_familys_steps_unless_given():
    def per_step_and_image(args):
        result = invoke(["--model", "black-forest-labs/FLUX.2-dev", "--prompt", "a dog", "--max-memory",
                         BUDGETS["FLUX.2-dev"], "--dry-run", *args])
        assert result.exit_code == 0, result.output
        step, image = re.search(r"([\d.]+) GB host-to-GPU per denoising step, ([\d.]+) GB per image", result.output).groups()
        return float(image) / float(step)

    assert per_step_and_image([]) == pytest.approx(50, rel=1e-3)
    assert per_step_and_image(["--steps", "28"]) == pytest.approx(28, rel=1e-3)


@pytest.mark.parametrize("model, quantize, budget", [
    # fp8 and int8 halve FLUX.2-dev: both stages on two 24 GB cards, nothing offloaded (bf16 needs RAM)
    ("FLUX.2-dev", "fp8", "0=24GB,1=24GB"),
    ("FLUX.2-dev", "int8", "0=24GB,1=24GB"),
    ("FLUX.2-dev", "nf4", "0=16GB,1=16GB"),
    ("FLUX.2-klein-9B", "fp8", "0=12GB"),
    ("FLUX.2-klein-9B", "nf4", "0=12GB"),
    ("FLUX.2-klein-4B", "nf4", "0=8GB"),
])
def test_flux2_quantized_dry_runs_fit_gpus_alone(model, quantize, budget):
    result = invoke(["--model", f"black-forest-labs/{model}", "--prompt", "a dog", "--dry-run", "--quantize", quantize,
                     "--max-memory", budget])
    assert result.exit_code == 0, result.output
    plan = plan_run(dataclasses.replace(_inputs(model), quantize=(("text_encoder", quantize), ("transformer", quantize))),
                    _budget(budget))
    assert all(set(stage.planned_bytes) <= {0, 1} for stage in plan.stages)


def test_flux2_dev_in_bf16_on_two_24gb_cards_is_told_that_fp8_would_fit():
    result = invoke(["--model", "black-forest-labs/FLUX.2-dev", "--prompt", "a dog", "--dry-run", "--max-memory",
                     "0=24GB,1=24GB"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert "--quantize fp8 would fit without offload" in line


def test_flux2_dev_nf4_transformer_is_not_offloaded_so_one_16gb_card_refuses_it():
    """bitsandbytes' 4-bit layers run on a GPU only: 18.1 GB of nf4 transformer fits no 16 GB card,
    RAM or not, while fp8 streams its blocks from RAM."""
    refused = invoke(["--model", "black-forest-labs/FLUX.2-dev", "--prompt", "a dog", "--dry-run", "--quantize", "nf4",
                      "--max-memory", "0=16GB,cpu=64GB"])
    assert refused.exit_code == 2, refused.output
    (line,) = error_lines(refused.output)
    assert "denoise (transformer: 18.13 GB of weights" in line
    streamed = invoke(["--model", "black-forest-labs/FLUX.2-dev", "--prompt", "a dog", "--dry-run", "--quantize", "fp8",
                       "--max-memory", "0=16GB,cpu=64GB"])
    assert streamed.exit_code == 0 and "host-to-GPU per denoising step" in streamed.output, streamed.output


# ---------------------------------------------------------------- activation estimates against measurement

# As tests/test_activations.py: an estimate may exceed the measured peak by the margin and slack, never fall below.
MOST_OVER = 1.6


@pytest.mark.parametrize(
    "heads, head_dim, dtype, image_side, text_tokens, references",
    [(4, 32, torch.float32, 16, 128, 0), (8, 32, torch.bfloat16, 32, 256, 0), (4, 64, torch.bfloat16, 24, 64, 0),
     # reference images' tokens, concatenated to the latents as Flux2Pipeline's loop does (one and three)
     (4, 32, torch.float32, 16, 128, 1), (8, 32, torch.bfloat16, 16, 128, 3)],
)
def test_flux2_transformer_estimate_bounds_the_measured_peak(heads, head_dim, dtype, image_side, text_tokens,
                                                            references):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    config = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=head_dim,
                  num_attention_heads=heads, joint_attention_dim=96, timestep_guidance_channels=32, mlp_ratio=3.0,
                  axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=False)
    model = Flux2Transformer2DModel(**config).to(dtype).eval()
    # the image and each reference image_side x image_side tokens, at times 0, 10, 20, ... as the pipeline sets them
    latents = torch.randn(1, (1 + references) * image_side * image_side, 16, dtype=dtype)
    embeds = torch.randn(1, text_tokens, 96, dtype=dtype)
    timestep = torch.tensor([0.5], dtype=dtype)
    image_ids = torch.cat([torch.cartesian_prod(torch.tensor([10 * time]), torch.arange(image_side),
                                                torch.arange(image_side), torch.arange(1))
                           for time in range(1 + references)])[None]
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))[None]
    with torch.inference_mode(), TensorBytesTracker([latents, embeds, timestep, image_ids, text_ids]) as tracker:
        model(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep, img_ids=image_ids,
              txt_ids=text_ids)
    # Pixels whose packed latents are image_side x image_side tokens (VAE factor 8, 2x2 packing).
    planned = flux2_transformer_activation_bytes(model.config, image_side * 16, image_side * 16, 8, text_tokens,
                                                 torch.finfo(dtype).bits // 8, references * image_side * image_side)
    assert 1.0 <= planned / tracker.peak_bytes <= MOST_OVER, f"planned {planned} vs measured {tracker.peak_bytes}"


# Widths where the MLP phase outweighs the attention scores (heads x S x S), as in the real encoders
# (Mistral Small 3 and Qwen3 at 512 tokens): the CPU's flash attention never holds the scores, so
# that upper-bound term cannot be measured here.
@pytest.mark.parametrize(
    "pipeline, build, width, heads, dtype, tokens",
    [("Flux2KleinPipeline", _tiny_qwen3, 64, 2, torch.float32, 128),
     ("Flux2KleinPipeline", _tiny_qwen3, 256, 4, torch.bfloat16, 256),
     ("Flux2Pipeline", _tiny_mistral3, 128, 2, torch.bfloat16, 128)],
)
def test_text_encoder_estimate_bounds_the_measured_peak(pipeline, build, width, heads, dtype, tokens):
    torch.manual_seed(0)
    layers = encode_layers(pipeline)
    model = encode_only(build(layers + 2, width, heads), layers).to(dtype).eval()
    input_ids = torch.randint(0, 300, (1, tokens))
    attention_mask = torch.ones(1, tokens, dtype=torch.long)
    attention_mask[:, tokens // 3:] = 0
    with torch.inference_mode(), TensorBytesTracker([input_ids, attention_mask]) as tracker:
        model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    text_config = getattr(model.config, "text_config", None) or model.config
    planned = decoder_text_encoder_activation_bytes(text_config.to_dict(), tokens, torch.finfo(dtype).bits // 8, layers)
    assert 1.0 <= planned / tracker.peak_bytes <= MOST_OVER, f"planned {planned} vs measured {tracker.peak_bytes}"


def test_the_meta_text_encoder_is_cut_as_the_encode_uses_it():
    model = empty_component(shipped_config_dir("FLUX.2-klein-9B"), "text_encoder")
    assert len(model.get_decoder().layers) == 27
    assert isinstance(model.lm_head, torch.nn.Identity)


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS.values()))
def test_each_family_lists_the_folders_of_its_pipeline(name):
    """The registry's folders (models, tokenizers, scheduler) are the published model_index.json's parts."""
    folder = shipped_config_dir(name)
    index = json.loads((folder / "model_index.json").read_text())
    parts = sorted(key for key, value in index.items() if isinstance(value, list) and value[0] is not None)
    assert family_of(folder).folders == tuple(parts)


# ---------------------------------------------------------------- FLUX.3 klein (its runs: tests/test_flux3.py)

# configs/README.md: parameters x 2 bytes (bf16); the text encoder as the encode cuts it (3.62 B).
FLUX_3_PUBLISHED = {"transformer": {"FLUX.3-klein": 11_097_363_968, "FLUX.3-klein-base": 11_076_916_736},
                    "text_encoder": 7_240_000_000, "vae": 168_092_230}
FLUX_3_HUB = {"FLUX.3-klein": "black-forest-labs/flux-3-image-klein",
              "FLUX.3-klein-base": "black-forest-labs/flux-3-image-klein-base"}


@pytest.mark.parametrize("folder", list(FLUX_3))
@pytest.mark.parametrize("budget", ["0=12GiB,cpu=32GB", "0=8GiB,cpu=32GB"])
def test_flux3_hub_ids_plan_offline_within_2_percent_of_the_published_sizes(folder, budget):
    checkpoint = resolve_checkpoint(FLUX_3_HUB[folder], need_weights=False)
    assert checkpoint.path == shipped_config_dir(folder) and checkpoint.family.pipeline == FLUX_3[folder]
    inputs = PlanInputs(checkpoint.path, torch.bfloat16, 1024, 1024, checkpoint.family.max_sequence_length,
                        vae_scale_factor=checkpoint.vae_scale_factor)
    plan = plan_run(inputs, _budget(budget))  # fits, or PlanError
    for stage in plan.stages:
        for component in stage.components:
            planned = sum(size for device, size in component.weight_bytes.items())
            published = FLUX_3_PUBLISHED[component.name]
            published = published[folder] if isinstance(published, dict) else published
            assert abs(planned - published) <= 0.02 * published, f"{component.name}: {planned} vs {published}"
    transformer = plan.stage("denoise").component("transformer")
    assert transformer.streamed == budget.startswith("0=8GiB")  # 11.1 GB: on a 12 GiB card whole, on 8 GiB streamed
    assert bool(transformer.pinned_bytes) == transformer.streamed  # its blocks are prefetched (blocks.py)


@pytest.mark.parametrize("folder", list(FLUX_3))
def test_flux3_plans_a_reference_images_tokens_in_every_transformer_pass(folder):
    """A 1024x1024 reference, kept whole (its canvas: the vae_encoder block's processor), adds its
    4,096 tokens to the denoise estimate (flux3_transformer_activation_bytes' reference_tokens), and
    the plan gains encode_image; both hub ids still plan on 0=12GiB,cpu=32GB."""
    from flux_sharded.stages import flux3

    checkpoint = resolve_checkpoint(FLUX_3_HUB[folder], need_weights=False)
    sizes = flux3.input_sizes(None, [(1024, 1024)], checkpoint.vae_scale_factor)
    assert sizes == ((1024, 1024),) and checkpoint.vae_scale_factor == 8
    inputs = PlanInputs(checkpoint.path, torch.bfloat16, 1024, 1024, 640, vae_scale_factor=8, input_sizes=sizes)
    config = dict(checkpoint.transformer_config)
    assert checkpoint.family.component("transformer").activation("denoise", config, inputs) == (
        flux3_transformer_activation_bytes(config, 1024, 1024, 8, 640, 2, reference_tokens=4096))
    plan = plan_run(inputs, _budget("0=12GiB,cpu=32GB"))
    assert [stage.name for stage in plan.stages] == ["encode", "encode_image", "denoise", "decode"]


def test_flux3_dry_runs_name_the_familys_defaults():
    for folder, defaults in [("FLUX.3-klein", "16 steps, guidance 0, 640 prompt tokens"),
                             ("FLUX.3-klein-base", "50 steps, guidance 3.5, 640 prompt tokens")]:
        dry = invoke(["--model", FLUX_3_HUB[folder], "--prompt", "a dog", "--max-memory", "0=12GiB,cpu=32GB",
                      "--dry-run"])
        assert dry.exit_code == 0 and defaults in dry.output, dry.output


def test_flux3_encode_reads_the_installed_blocks_layers_and_the_meta_encoder_is_cut_to_them():
    assert encode_out_layers("Flux3ModularPipeline") == (4, 8, 12, 16, 20, 24, 28, 32)
    assert encode_layers("Flux3DistilledModularPipeline") == 32
    model = empty_component(shipped_config_dir("FLUX.3-klein"), "text_encoder")
    assert len(model.get_decoder().layers) == 32
    assert isinstance(model.model.visual, torch.nn.Identity) and isinstance(model.lm_head, torch.nn.Identity)


@pytest.mark.parametrize(
    "heads, head_dim, dtype, image_side, text_tokens, reference_side",
    [(4, 32, torch.float32, 16, 128, 0), (8, 32, torch.bfloat16, 32, 240, 0), (4, 64, torch.bfloat16, 24, 80, 0),
     (4, 32, torch.float32, 16, 160, 16)],
)
def test_flux3_transformer_estimate_bounds_the_measured_peak(heads, head_dim, dtype, image_side, text_tokens,
                                                             reference_side):
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(0)
    model = Flux3Transformer2DModel(
        in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=96, timestep_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4).to(dtype).eval()
    for name, module in model.named_modules():  # as from_pretrained(dtype=...) keeps them: the q/k RMS norms
        if set(name.split(".")) & set(model._keep_in_fp32_modules):
            module.float()
    latents = torch.randn(1, image_side * image_side, 16, dtype=dtype)
    embeds = torch.randn(1, text_tokens, 96, dtype=dtype)
    timestep = torch.tensor([0.5], dtype=dtype)
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(image_side), torch.arange(image_side),
                                     torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
    inputs, references = [latents, embeds, timestep, image_ids, text_ids], {}
    if reference_side:
        references = dict(
            image_cond_hidden_states=torch.randn(1, reference_side * reference_side, 16, dtype=dtype),
            image_cond_ids=torch.cartesian_prod(torch.arange(1, 2), torch.arange(reference_side),
                                                torch.arange(reference_side), torch.arange(1)))
        inputs += list(references.values())
    with torch.inference_mode(), TensorBytesTracker(inputs) as tracker:
        model(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep, img_ids=image_ids,
              txt_ids=text_ids, **references)
    planned = flux3_transformer_activation_bytes(model.config, image_side * 16, image_side * 16, 8, text_tokens,
                                                 torch.finfo(dtype).bits // 8, reference_side * reference_side)
    assert 1.0 <= planned / tracker.peak_bytes <= MOST_OVER, f"planned {planned} vs measured {tracker.peak_bytes}"


def test_a_flux3_text_encoder_too_shallow_for_the_stacked_layers_is_refused(tmp_path):
    folder = tmp_path / "klein"
    shutil.copytree(shipped_config_dir("FLUX.3-klein"), folder)
    config_file = folder / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["num_hidden_layers"] = 30
    config_file.write_text(json.dumps(config))
    result = invoke(["--model", str(folder), "--prompt", "a dog", "--max-memory", "0=12GiB,cpu=32GB", "--dry-run"])
    assert result.exit_code == 2 and error_lines(result.output) == [
        f"Error: --model: '{folder}': text_encoder/config.json field 'text_config.num_hidden_layers' is 30, but "
        "Flux3DistilledModularPipeline reads the hidden states of layer 32; the checkpoint is damaged or not "
        "FLUX.3-klein: fetch that file again or give another --model"]
