"""Decode: packed latents -> images.

Loads: the VAE alone, on the single device the plan chose (the one with the largest budget).
Reads from the handoff: latents and settings (size). Returns PIL images in prompt order. The
unpacking, un-scaling/shifting and post-processing are FluxPipeline's own. Memory: the VAE's
weights (168 MB in bf16 for FLUX.1) plus decoder activations, which grow with H*W and dominate.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.image_processor import VaeImageProcessor

from ..budget import device_key
from ..handoff import Handoff
from ..quantize import load_quantized

NAME = "decode"
COMPONENTS = ("vae",)


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None) -> AutoencoderKL:
    """The VAE on the plan's device; tiled decoding (diffusers' `enable_tiling`) when the plan says
    so. The plan's decode batch size rides along as `vae.decode_batch_size` (images per decode)."""
    plan = stage_plan.component("vae")
    if plan.quantization:
        vae = load_quantized(AutoencoderKL, checkpoint.path, "vae", plan, dtype)
    else:
        vae = AutoencoderKL.from_pretrained(
            checkpoint.path, subfolder="vae", device_map=dict(plan.device_map), dtype=dtype, use_safetensors=True,
        )
    if plan.tiled:
        vae.enable_tiling()
    vae.decode_batch_size = plan.batch_size
    return vae


# Set in the `info` of an image whose decoded values held NaN or infinity (a float16 overflow in
# the VAE): NaN becomes black and infinity saturates, so the runner names the image.
NON_FINITE = "flux_sharded_non_finite"


def run(vae: AutoencoderKL, handoff: Handoff, on_image_done=None, on_step=None) -> list:
    """PIL images in the handoff's order, decoded batch_size at a time; see NON_FINITE."""
    settings = handoff.settings
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    images = []
    with torch.inference_mode():
        # The run's batches, each cut into the plan's decode batches (one image at a time when a
        # whole batch's activations do not fit).
        step = min(getattr(vae, "decode_batch_size", settings.batch_size) or settings.batch_size, settings.batch_size)
        for batch in (part for whole in settings.batches() for part in (
                range(start, min(start + step, whole.stop)) for start in range(whole.start, whole.stop, step))):
            latents = FluxPipeline._unpack_latents(  # one batch on the VAE's device at a time
                handoff.latents[batch.start : batch.stop].to(vae.device), settings.height, settings.width,
                vae_scale_factor,
            )
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            decoded = vae.decode(latents, return_dict=False)[0]
            finite = torch.isfinite(decoded).flatten(1).all(1).tolist()
            with np.errstate(invalid="ignore"):  # NaN pixels become 0; the runner names those images
                batch_images = image_processor.postprocess(decoded, output_type="pil")
            for image, is_finite in zip(batch_images, finite, strict=True):
                if not is_finite:
                    image.info[NON_FINITE] = True
            images.extend(batch_images)
            if on_image_done:
                on_image_done(len(batch))
    return images


def device_map(vae: AutoencoderKL) -> dict[str, dict[str, str]]:
    return {"vae": {"": device_key(vae.device)}}
