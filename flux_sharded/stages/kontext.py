"""FLUX.1 Kontext's side of the stages (FluxKontextPipeline): FLUX.1's encode, decode and LoRAs
(stages/flux1.py), and its input image.

FluxKontextPipeline.__call__ resizes its one input image to the preferred resolution nearest its
aspect ratio (step 3, `_auto_resize`), encodes it with the VAE's mode (no generator) and packs it into
tokens that join the latents in every transformer pass. encode_image does step 3 and the VAE encode
(_encode_vae_image); denoise hands the encoded latents to __call__ as its image (a tensor of
latent_channels channels, which the pipeline takes as encoded), so packing, positions and noise are
the pipeline's own. __call__ also rescales --height/--width to an area of `max_area` pixels (1024^2
by default); denoise passes the run's own area, so that the image is the size asked for.
"""

from __future__ import annotations

import torch

from .flux1 import (  # noqa: F401 (the family protocol: FLUX.1's own)
    encode_batch,
    guidance_ignored,
    guidance_note,
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


SEEDED_ENCODE = False  # the VAE's mode, no generator


def input_sizes(settings, sizes: list[tuple[int, int]], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
    """(height, width) the VAE encodes the input image at (families.kontext_size)."""
    from ..families import kontext_size

    return tuple(kontext_size(size, vae_scale_factor) for size in sizes)


def encode_images(pipeline, images: list, settings, batch: range, mask=None) -> dict[str, torch.Tensor]:
    """{"input_latents": (len(batch), C, h/f, w/f)}: the one input image resized as __call__'s step 3
    resizes it and encoded as prepare_latents encodes it (the VAE's mode: the same for every image)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    (image,) = images
    processor, multiple = pipeline.image_processor, pipeline.vae_scale_factor * 2
    image_height, image_width = processor.get_default_height_width(image)
    aspect_ratio = image_width / image_height
    _, image_width, image_height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    image_width, image_height = image_width // multiple * multiple, image_height // multiple * multiple
    pixels = processor.preprocess(processor.resize(image, image_height, image_width), image_height, image_width)
    pixels = pixels.to(device=pipeline.vae.device, dtype=settings.torch_dtype)  # prepare_latents' cast
    latents = pipeline._encode_vae_image(image=pixels, generator=None)  # (1, C, h/f, w/f)
    return {"input_latents": latents.expand(len(batch), *latents.shape[1:]).contiguous()}


def image_pipeline(pipeline, settings):
    """`pipeline`, its latent channels set as a VAE would set them (it has none), so that __call__
    and prepare_latents take the encoded latents as they are."""
    pipeline.latent_channels = pipeline.transformer.config.in_channels // 4  # 2x2 packing
    return pipeline


def call_arguments(pipeline, inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    """The run's own area as max_area (so that __call__ keeps --height/--width), true_cfg_scale
    (--true-cfg), and the encoded input image of the rows of `batch`, if any."""
    image = {"image": inputs["input_latents"]} if inputs else {}
    return {"max_area": settings.height * settings.width, "true_cfg_scale": settings.true_cfg, **image}
