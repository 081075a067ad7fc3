"""The VAE as encode_image and decode load it: whole on the plan's one device, in a pipeline of the
family's that holds nothing else."""

from __future__ import annotations

import torch

from ..placement import check_placement
from ..quantize_load import load_quantized
from .code import family_code


def vae_pipeline(checkpoint, stage_plan, dtype: torch.dtype, images: bool):
    """The family's pipeline holding only the checkpoint's VAE (code.vae_pipeline; `images`: the one
    that takes its input images), on the plan's device;
    tiled (diffusers' `enable_tiling`, which covers encode and decode) when the plan says so, and
    one image at a time (diffusers' `enable_slicing`) when the plan's batch is one image."""
    import diffusers

    plan = stage_plan.component("vae")
    vae_class = getattr(diffusers, checkpoint.family.component("vae").class_name)
    if plan.quantization:
        vae = load_quantized(vae_class, checkpoint.path, "vae", plan, dtype)
    else:
        vae = vae_class.from_pretrained(
            checkpoint.path, subfolder="vae", device_map=dict(plan.device_map), dtype=dtype, use_safetensors=True,
        )
        check_placement(vae, dict(plan.device_map), streamed=False)
    if plan.tiled:
        vae.enable_tiling()
    if plan.batch_size == 1:  # a whole batch's activations do not fit (or the batch is one image)
        vae.enable_slicing()
    return family_code(checkpoint.family).vae_pipeline(checkpoint, vae, images)
