"""Input images in the plan: FLUX.2-dev with 0, 1 and 3 reference images of 1024x1024, FLUX.1 Kontext
with its input image and FLUX.1-dev image-to-image, planned from the shipped configs alone (no weights, no GPU), then the estimates of
the reference tokens' transformer activations and of the VAE encode against TensorBytesTracker on
small random models (the measured peaks on the CPU).

    python benchmarks/input_images.py

Per plan: the tokens the transformer sees (image + text + references), the transformer's activation
estimate for one forward pass, the planned bytes per device of encode_image and denoise, and what
streams host-to-GPU per denoising step. Prints Markdown tables, then one JSON line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from _env import environment
from diffusers import AutoencoderKL, Flux2Transformer2DModel

from flux_sharded.activations import (flux2_transformer_activation_bytes, image_tokens, transformer_activation_bytes,
                                     vae_encode_activation_bytes)
from flux_sharded.budget import parse_budget
from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.errors import PlanError
from flux_sharded.families import family_of
from flux_sharded.memory import TensorBytesTracker
from flux_sharded.plan import PlanInputs, plan_run

SIZE, TEXT_TOKENS = 1024, 512


@dataclass(frozen=True)
class Scenario:
    model: str
    references: int  # input images of SIZE x SIZE (FLUX.1: one, for image-to-image)
    budget: str
    quantize: str | None = None


SCENARIOS = tuple(Scenario("FLUX.2-dev", references, budget, quantize)
                  for quantize in (None, "fp8") for budget in ("0=24GiB,cpu=64GB", "0=24GiB,1=24GiB,cpu=64GB")
                  for references in (0, 1, 3)) + tuple(
    Scenario(model, inputs, budget) for model in ("FLUX.1-Kontext-dev", "FLUX.1-dev") for inputs in (0, 1)
    for budget in ("0=24GiB,cpu=64GB", "0=24GiB,1=24GiB,cpu=64GB"))


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f}"


def plan_row(scenario: Scenario) -> dict:
    root = shipped_config_dir(scenario.model)
    family = family_of(root)
    quantize = tuple((name, scenario.quantize) for name in family.large_components) if scenario.quantize else ()
    inputs = PlanInputs(root, torch.bfloat16, SIZE, SIZE, TEXT_TOKENS, vae_scale_factor=8, quantize=quantize,
                        input_sizes=((SIZE, SIZE),) * scenario.references)
    # FLUX.2's references and Kontext's input join the transformer's tokens; image-to-image's does not
    references = scenario.references if family.name.startswith(("FLUX.2", "FLUX.1-Kontext")) else 0
    tokens = image_tokens(SIZE, SIZE, 8) + TEXT_TOKENS + references * image_tokens(SIZE, SIZE, 8)
    row = {"model": scenario.model, "quantize": scenario.quantize or "none", "budget": scenario.budget,
           "inputs": scenario.references, "tokens": tokens}
    config = json.loads((root / "transformer" / "config.json").read_text())
    estimate = flux2_transformer_activation_bytes if family.name.startswith("FLUX.2") else transformer_activation_bytes
    row["transformer_activation_bytes"] = estimate(config, SIZE, SIZE, 8, TEXT_TOKENS, 2,
                                                   references * image_tokens(SIZE, SIZE, 8))
    try:
        plan, fits = plan_run(inputs, parse_budget(scenario.budget, gpu_count=None)), True
        stages = plan.stages
    except PlanError as error:
        stages, fits = error.stages, False
    row["fits"] = fits
    for stage in stages:
        row[stage.name] = {str(device): size for device, size in stage.planned_bytes.items()}
        if stage.name == "denoise":
            row["streamed_per_step"] = stage.offload_bytes_per_step
    return row


def measured_rows() -> list[dict]:
    """Estimate / TensorBytesTracker peak: Flux2Transformer2DModel with 0, 1 and 3 references' tokens,
    AutoencoderKL.encode (and its sample) at two sizes."""
    rows = []
    for heads, head_dim, dtype, side, text, references in [(4, 32, torch.float32, 16, 128, 0),
                                                           (4, 32, torch.float32, 16, 128, 1),
                                                           (8, 32, torch.bfloat16, 16, 128, 3)]:
        torch.manual_seed(0)
        model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=96,
                                        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(head_dim // 4,) * 4,
                                        guidance_embeds=False).to(dtype).eval()
        latents = torch.randn(1, (1 + references) * side * side, 16, dtype=dtype)
        embeds, timestep = torch.randn(1, text, 96, dtype=dtype), torch.tensor([0.5], dtype=dtype)
        ids = torch.cat([torch.cartesian_prod(torch.tensor([10 * time]), torch.arange(side), torch.arange(side),
                                              torch.arange(1)) for time in range(1 + references)])[None]
        text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))[None]
        with torch.inference_mode(), TensorBytesTracker([latents, embeds, timestep, ids, text_ids]) as tracker:
            model(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep, img_ids=ids, txt_ids=text_ids)
        planned = flux2_transformer_activation_bytes(model.config, side * 16, side * 16, 8, text,
                                                     torch.finfo(dtype).bits // 8, references * side * side)
        rows.append({"what": f"Flux2Transformer2DModel width {heads * head_dim}, {references} reference(s)",
                     "dtype": str(dtype).removeprefix("torch."), "tokens": latents.shape[1] + text,
                     "measured": tracker.peak_bytes, "planned": planned})
    for channels, height, width, dtype in [((32, 64), 128, 96, torch.float32),
                                           ((32, 64, 128, 128), 128, 128, torch.bfloat16)]:
        vae = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                            up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4,
                            norm_num_groups=min(32, channels[0])).to(dtype).eval()
        pixels = torch.randn(1, 3, height, width, dtype=dtype)
        with torch.no_grad(), TensorBytesTracker(existing=list(vae.parameters())) as tracker:
            vae.encode(pixels.clone()).latent_dist.sample(torch.Generator().manual_seed(0))
        planned = vae_encode_activation_bytes(dict(vae.config), height, width, torch.finfo(dtype).bits // 8)
        rows.append({"what": f"AutoencoderKL.encode C0={channels[0]} at {width}x{height}",
                     "dtype": str(dtype).removeprefix("torch."), "tokens": None, "measured": tracker.peak_bytes,
                     "planned": planned})
    return rows


def main() -> None:
    plans = [plan_row(scenario) for scenario in SCENARIOS]
    print("| model | --quantize | budget | inputs | transformer tokens | transformer activations GB | fits | "
          "encode_image GB | denoise GB per device | streamed per step GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in plans:
        encode_image = ", ".join(f"{device}: {_gb(size)}" for device, size in row.get("encode_image", {}).items())
        denoise = ", ".join(f"{device}: {_gb(size)}" for device, size in row["denoise"].items())
        activation = _gb(row["transformer_activation_bytes"]) if "transformer_activation_bytes" in row else "-"
        print(f"| {row['model']} | {row['quantize']} | {row['budget']} | {row['inputs']} | {row['tokens']} | "
              f"{activation} | {'yes' if row['fits'] else 'no'} | {encode_image or '-'} | {denoise} | "
              f"{_gb(row.get('streamed_per_step', 0))} |")
    measured = measured_rows()
    print("\n| estimate | dtype | tokens | measured bytes | planned bytes | planned / measured |")
    print("|---|---|---|---|---|---|")
    for row in measured:
        print(f"| {row['what']} | {row['dtype']} | {row['tokens'] or '-'} | {row['measured']} | {row['planned']} | "
              f"{row['planned'] / row['measured']:.2f} |")
    print(json.dumps({"environment": environment(), "plans": plans, "measured": measured}))


if __name__ == "__main__":
    main()
