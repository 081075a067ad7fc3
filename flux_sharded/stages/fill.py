"""FLUX.1 Fill's side of the stages (FluxFillPipeline, e.g. black-forest-labs/FLUX.1-Fill-dev):
FLUX.1's encode, decode and LoRA loading, with its own input images.

FLUX.1 Fill's transformer takes, beside the packed latents (4C channels), the packed masked image
(4C) and the packed mask (4 f^2: each latent pixel's f x f mask pixels), concatenated at every step:
its in_channels is 384 for out_channels 64 (families.packed_latent_channels). FluxFillPipeline.__call__
draws from the batch's first generator three times, in this order: the VAE's sample of the image
(prepare_latents' _encode_vae_image), each image's noise (prepare_latents), the VAE's sample of the
masked image (prepare_mask_latents). encode_image does the first and the third with the pipeline's
own code, drawing the noise on copies of the generators in between exactly as prepare_latents draws
it (randn_tensor, the run's dtype), and keeps each generator's state after the first; denoise hands
__call__ the image latents (a tensor of latent_channels channels, which it takes as encoded) with
generators set to those states, so that its noise is the one call's, and the kept mask and masked
image in place of prepare_mask_latents' (tests/test_images.py compares the PNGs).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..families import packed_latent_channels
from .flux1 import generator_copies, restored_generators
from .flux1 import (  # noqa: F401 (the family protocol: FLUX.1's own)
    encode_batch,
    guidance_ignored,
    guidance_note,
    input_sizes,
    load_lora,
    lora_state_dict,
    vae_latents,
)
from .pipelines import (  # noqa: F401 (the family protocol: the one-piece pipelines')
    check_prompt_lengths,
    denoise_batch,
    denoise_pipeline,
    encode_pipeline,
    vae_pipeline,
)

SEEDED_ENCODE = True  # the image and the masked image are sampled with the batch's first generator


def encode_images(pipeline, images: list, settings, batch: range, mask=None) -> dict[str, torch.Tensor]:
    """{"input_latents": (len(batch), C, H/f, W/f), "input_generator_states": (len(batch), state
    bytes) uint8, "input_mask": (len(batch), tokens, 4 f^2), "input_masked_latents": (len(batch),
    tokens, 4C)}: the one input image and its `mask` (PIL) as FluxFillPipeline.__call__ prepares them
    for this batch at the run's size (its image and mask processors, prepare_latents' encode,
    prepare_mask_latents)."""
    from diffusers.utils.torch_utils import randn_tensor

    (image,) = images
    device, dtype = pipeline.vae.device, settings.torch_dtype
    pixels = pipeline.image_processor.preprocess(image, height=settings.height, width=settings.width)
    pixels = pixels.to(dtype=torch.float32)  # __call__'s init_image
    generators = [torch.Generator("cpu").manual_seed(settings.seeds[position]) for position in batch]
    latents = pipeline._encode_vae_image(image=pixels.to(device=device, dtype=dtype), generator=generators)
    states = torch.stack([generator.get_state() for generator in generators])
    drawn = generator_copies(generators)  # prepare_latents' noise, drawn as it draws it, to reach the masked image's draw
    factor = pipeline.vae_scale_factor
    shape = (len(batch), latents.shape[1], 2 * (settings.height // (2 * factor)), 2 * (settings.width // (2 * factor)))
    randn_tensor(shape, generator=drawn, device=device, dtype=dtype)
    condition = pipeline.mask_processor.preprocess(mask, height=settings.height, width=settings.width)
    masked = (pixels * (1 - condition)).to(device=device, dtype=dtype)
    packed_mask, masked_latents = pipeline.prepare_mask_latents(
        condition, masked, len(batch), latents.shape[1], 1, settings.height, settings.width, dtype, device, drawn)
    return {"input_latents": latents.expand(len(batch), *latents.shape[1:]).contiguous(),
            "input_generator_states": states, "input_mask": packed_mask, "input_masked_latents": masked_latents}


def image_pipeline(pipeline, settings):
    """A FluxFillPipeline sharing `pipeline`'s transformer and scheduler, its latent channels and image
    and mask processors set as a VAE would set them, so that it takes the encoded latents, and a
    latent-shaped mask, as they are; in place of the VAE it does not hold, the one thing __call__ reads
    of it before the loop: config.latent_channels."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    # Built from the same components, not by from_pipe, which casts them all to one dtype (float32 by default).
    fill = diffusers.FluxFillPipeline(**pipeline.components)
    fill.set_progress_bar_config(disable=True)
    fill.vae_scale_factor = pipeline.vae_scale_factor
    fill.latent_channels = packed_latent_channels(pipeline.transformer.config) // 4  # 2x2 packing
    fill.vae = SimpleNamespace(config=SimpleNamespace(latent_channels=fill.latent_channels))
    fill.image_processor = VaeImageProcessor(vae_scale_factor=2 * fill.vae_scale_factor,
                                             vae_latent_channels=fill.latent_channels)
    fill.mask_processor = VaeImageProcessor(vae_scale_factor=2 * fill.vae_scale_factor,
                                            vae_latent_channels=fill.latent_channels, do_normalize=False,
                                            do_binarize=True, do_convert_grayscale=True)
    return fill


def call_arguments(pipeline, inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    """FluxFillPipeline.__call__'s image (the encoded latents), strength and generators (at their
    states after the image's encode) for the encoded rows of `batch`; prepare_mask_latents answers with
    the kept mask and masked image, and the mask_image __call__ multiplies its image by is a zero
    tensor of the latents' shape (taken as it is by the mask processor): __call__ refuses a
    masked_image_latents beside an image."""
    generators = restored_generators(inputs["input_generator_states"])
    kept = inputs["input_mask"], inputs["input_masked_latents"]
    pipeline.prepare_mask_latents = lambda *args, **kwargs: kept
    latents = inputs["input_latents"]
    return {"image": latents, "mask_image": torch.zeros_like(latents[:1]), "strength": settings.strength,
            "generator": generators}
