"""FLUX.2's side of the stages (Flux2Pipeline for dev, Flux2KleinPipeline for klein).

encode_prompt stacks the hidden states of a few decoder layers of the text encoder (Mistral Small 3
or Qwen3) into the prompt embeddings; the text positions it also returns are recomputed from the
embeddings by __call__, so the handoff keeps only the embeddings. klein without step distillation
(`is_distilled` false in model_index.json) guides with a second transformer pass on the empty
prompt when the guidance scale is above 1: encode then also keeps those negative embeddings.
FLUX.2-dev embeds the guidance scale instead. There is no pooled embedding.

decode does what Flux2Pipeline.__call__'s tail does before vae.decode: place the packed tokens by
their latent positions, undo the VAE's batch-norm (its running mean and variance, and the config's
batch_norm_eps), and undo the 2x2 patches.
"""

from __future__ import annotations

import torch

from .pipelines import (  # noqa: F401 (the family protocol: the one-piece pipelines')
    check_prompt_lengths,
    denoise_batch,
    denoise_pipeline,
    encode_pipeline,
    vae_pipeline,
)


def encode_batch(pipeline, prompts: list[str], settings) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: (len(prompts), ...) rows, one per prompt}, {}): the prompt embeddings and, when the
    pipeline guides with a second pass, the empty prompt's, one row per prompt as __call__ makes them."""
    prompt_embeds, _ = pipeline.encode_prompt(
        prompt=prompts, num_images_per_prompt=1, max_sequence_length=settings.max_sequence_length,
    )
    rows = {"prompt_embeds": prompt_embeds}
    if getattr(pipeline.config, "is_distilled", True) is False and settings.guidance > 1:
        rows["negative_prompt_embeds"], _ = pipeline.encode_prompt(
            prompt=[""] * len(prompts), num_images_per_prompt=1, max_sequence_length=settings.max_sequence_length,
        )
    return rows, {}


def vae_latents(pipeline, vae, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents (B, (H/2f)*(W/2f), 4*C) -> what vae.decode takes, (B, C, H/f, W/f), by
    the pipeline's own helpers and Flux2Pipeline.__call__'s un-normalisation."""
    factor = pipeline.vae_scale_factor
    rows, columns = height // (2 * factor), width // (2 * factor)
    # The positions prepare_latents gives the packed tokens (only the shape is read).
    latent_ids = pipeline._prepare_latent_ids(torch.empty(packed.shape[0], packed.shape[2], rows, columns,
                                                          device="meta")).to(packed.device)
    latents = pipeline._unpack_latents_with_ids(packed, latent_ids)  # (B, 4*C, H/2f, W/2f)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                           latents.dtype)
    return pipeline._unpatchify_latents(latents * std + mean)


def guidance_ignored(checkpoint) -> str | None:
    """Why --guidance cannot change the pixels of this checkpoint, or None when it does: FLUX.2-dev
    embeds the guidance scale; klein guides (above 1) only when not step-distilled."""
    if checkpoint.family.second_pass:  # klein
        return "the checkpoint is step-distilled: model_index.json 'is_distilled'" if checkpoint.is_distilled else None
    if checkpoint.transformer_config.get("guidance_embeds", True) is False:
        return "the transformer has no guidance embedding"
    return None


def guidance_note(checkpoint, guidance: float) -> str | None:
    """The note for a --guidance the checkpoint ignores, or None."""
    reason = guidance_ignored(checkpoint)
    return f"note: {checkpoint.model}: {reason}, so --guidance {guidance:g} has no effect" if reason else None


def lora_state_dict(family, path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with COMPONENT.-prefixed keys, {"metadata": ...}: no network alphas) of a LoRA file,
    converted from any format the family's pipeline reads: Flux2Pipeline's and Flux2KleinPipeline's
    (kohya, ai-toolkit, LoKr, ...), FLUX.3's modular pipelines' Flux3LoraLoaderMixin (BFL's
    diffusion_model. keys); with the adapter metadata (a saved LoraConfig) load_lora_weights hands on."""
    import diffusers

    state_dict, metadata = getattr(diffusers, family.pipeline).lora_state_dict(str(path), return_lora_metadata=True)
    return state_dict, {"metadata": metadata}


def load_lora(family, name: str, model, state_dict: dict, options: dict, adapter_name: str) -> None:
    """Inject one LoRA's layers into the transformer (the only component FLUX.2's and FLUX.3's loaders
    take), as Flux2LoraLoaderMixin.load_lora_weights and Flux3LoraLoaderMixin's do (their default
    low_cpu_mem_usage with PEFT); `options`: lora_state_dict's."""
    import diffusers

    getattr(diffusers, family.pipeline).load_lora_into_transformer(state_dict, transformer=model,
                                                                   adapter_name=adapter_name, low_cpu_mem_usage=True,
                                                                   **options)


# ---------------------------------------------------------------- reference images (image=[...])
# Flux2Pipeline / Flux2KleinPipeline.__call__ shrink each reference to at most 1024^2 pixels, crop it
# to multiples of 2 x the VAE's factor (its step 4) and encode them all with prepare_image_latents
# (the VAE's mode, no generator) into one run of packed tokens with their positions. encode_image
# does step 4 and prepare_image_latents with the VAE; denoise calls __call__ with images of the same
# sizes whose encoding is replaced by the kept tokens (the pipeline reads of its VAE only the dtype
# it passes on, and the device: _EncodedReferencesVae), so the loop, noise and positions are the
# pipeline's own (tests/test_images.py compares the PNGs).

SEEDED_ENCODE = False  # the VAE's mode (argmax), no generator: references and klein's inpainted image alike


def input_sizes(settings, sizes: list[tuple[int, int]], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
    """(height, width) the VAE encodes each reference of (width, height) `sizes` at (families.reference_size)."""
    from ..families import reference_size

    return tuple(reference_size(size, vae_scale_factor) for size in sizes)


def _condition_images(pipeline, images: list) -> list[torch.Tensor]:
    """Each reference as Flux2Pipeline.__call__'s step 4 makes it: checked, shrunk to 1024^2 pixels
    when larger, cropped to multiples of 2 x the VAE's factor, preprocessed to (1, 3, h, w)."""
    from ..families import REFERENCE_MAX_AREA

    processor, conditions = pipeline.image_processor, []
    for image in images:
        processor.check_image_input(image)
        width, height = image.size
        if width * height > REFERENCE_MAX_AREA:
            image = processor._resize_to_target_area(image, REFERENCE_MAX_AREA)
            width, height = image.size
        multiple = pipeline.vae_scale_factor * 2
        width, height = (width // multiple) * multiple, (height // multiple) * multiple
        conditions.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
    return conditions


def encode_images(pipeline, images: list, settings, batch: range, mask=None) -> dict[str, torch.Tensor]:
    """{"input_latents": (len(batch), reference tokens, in_channels), "input_latent_ids":
    (len(batch), reference tokens, 4) int64}: every reference encoded as __call__ encodes them; with a
    `mask`, klein's inpainting (_inpaint_inputs)."""
    if mask is not None:
        return _inpaint_inputs(pipeline, images, settings, batch, mask)
    latents, ids = pipeline.prepare_image_latents(images=_condition_images(pipeline, images), batch_size=len(batch),
                                                  generator=None, device=pipeline.vae.device, dtype=pipeline.vae.dtype)
    return {"input_latents": latents, "input_latent_ids": ids}


# ---------------------------------------------------------------- klein inpainting (Flux2KleinInpaintPipeline)
# Flux2KleinInpaintPipeline.__call__ paints at its input image's size (shrunk to 1024^2 pixels when
# larger, cut to multiples of 2 x the VAE's factor: its step 2), encodes it with the VAE's mode
# (prepare_latents' _encode_vae_image: patchified and normalised by the VAE's batch-norm statistics),
# takes those latents also as its first reference, and blends the kept image back outside the mask
# each step (prepare_mask_latents: the mask at the packed size, bilinear). encode_image does step 2,
# the encode and the mask; denoise hands __call__ the latents as its image (a tensor of 4 x
# latent_channels channels, which it takes as encoded and normalises with _InpaintVae's identity
# statistics) and the kept mask through prepare_mask_latents; noise and references are the pipeline's.

def _inpaint_inputs(pipeline, images: list, settings, batch: range, mask) -> dict[str, torch.Tensor]:
    """{"input_latents": (len(batch), 4C, H/2f, W/2f), "input_mask": (len(batch), tokens, 1)}: the
    input image and the mask as Flux2KleinInpaintPipeline.__call__ prepares them (its steps 2 and 6,
    without padding_mask_crop); the run's size is the image's (runner.check_mask_settings). With a
    second image, its image_reference, also "input_reference_latents" (len(batch), 4C, h/2f, w/2f), as
    its step 2.2 prepares it and prepare_image_latents encodes it."""
    import diffusers

    from ..families import reference_size

    inpaint = diffusers.Flux2KleinInpaintPipeline(**pipeline.components)  # its processors, made for this VAE
    image, *references = images
    height, width = reference_size(image.size, pipeline.vae_scale_factor)  # step 2's size
    pixels = inpaint.image_processor.preprocess(_capped(inpaint, image), height, width, crops_coords=None,
                                                resize_mode="default")
    encoded = {"input_latents": _encode(inpaint, pixels, settings, batch)}
    condition = inpaint.mask_processor.preprocess(mask, height=height, width=width, resize_mode="default",
                                                  crops_coords=None)
    encoded["input_mask"] = inpaint.prepare_mask_latents(condition, len(batch), 1, height, width,
                                                         settings.torch_dtype, pipeline.vae.device)
    for reference in references:  # step 2.2, then prepare_image_latents' encode
        height, width = reference_size(reference.size, pipeline.vae_scale_factor)
        pixels = inpaint.image_processor.preprocess(_capped(inpaint, reference), height, width, resize_mode="crop")
        encoded["input_reference_latents"] = _encode(inpaint, pixels, settings, batch)
    return encoded


def _capped(inpaint, image):
    """`image` shrunk to REFERENCE_MAX_AREA pixels when larger, as __call__'s steps 2 and 2.2 shrink it."""
    from ..families import REFERENCE_MAX_AREA

    width, height = image.size
    if width * height <= REFERENCE_MAX_AREA:
        return image
    scale = (REFERENCE_MAX_AREA / (width * height)) ** 0.5
    return inpaint.image_processor.resize(image, int(height * scale), int(width * scale))


def _encode(inpaint, pixels: torch.Tensor, settings, batch: range) -> torch.Tensor:
    """(len(batch), 4C, h/2f, w/2f): `pixels` cast as prepare_latents casts them and encoded with the
    VAE's mode, patchified and normalised (_encode_vae_image), one row per image."""
    pixels = pixels.to(device=inpaint.vae.device, dtype=settings.torch_dtype)
    latents = inpaint._encode_vae_image(image=pixels, generator=None)
    return latents.expand(len(batch), *latents.shape[1:]).contiguous()


class _EncodedReferencesVae(torch.nn.Module):
    """What Flux2Pipeline.__call__ reads of its VAE when the references come encoded: the dtype it
    hands prepare_image_latents (replaced by call_arguments) and the device DiffusionPipeline.device
    takes from its first model. Holds no weights."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.dtype, self.device = dtype, device


class _InpaintVae(_EncodedReferencesVae):
    """_EncodedReferencesVae with the batch-norm statistics Flux2KleinInpaintPipeline.prepare_latents
    normalises an encoded image by: the identity (mean 0, variance 1, eps 0: (x - 0) / sqrt(1 + 0) is x
    exactly), since encode_image kept the latents normalised by the VAE's own (_encode_vae_image)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, channels: int):
        super().__init__(dtype, device)
        self.bn = torch.nn.Module()
        self.bn.running_mean, self.bn.running_var = torch.zeros(channels), torch.ones(channels)
        self.config = type("Config", (), {"batch_norm_eps": 0.0})()


def image_pipeline(pipeline, settings):
    """`pipeline` itself; for a run with references, given _EncodedReferencesVae in place of its VAE;
    with a --mask, Flux2KleinInpaintPipeline sharing its transformer and scheduler, given _InpaintVae,
    its VAE factor and latent channels set as a VAE would set them."""
    if not settings.images:
        return pipeline
    device = pipeline._execution_device  # the transformer's, found before the stand-in comes first
    if not settings.mask:
        pipeline.vae = _EncodedReferencesVae(settings.torch_dtype, device)
        return pipeline
    import diffusers

    inpaint = diffusers.Flux2KleinInpaintPipeline(**pipeline.components, is_distilled=pipeline.config.is_distilled)
    inpaint.set_progress_bar_config(disable=True)
    channels = pipeline.transformer.config.in_channels  # 4 x the VAE's latent channels (2x2 patches)
    inpaint.vae = _InpaintVae(settings.torch_dtype, device, channels)
    inpaint.vae_scale_factor, inpaint.latent_channels = pipeline.vae_scale_factor, channels // 4
    return inpaint


def call_arguments(pipeline, inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    """__call__'s image=[...] for the encoded rows of `batch`: blank images of the references' sizes
    (what step 4 reads of them), their encoding replaced by the kept tokens and positions; nothing for a
    run without references. With a --mask, Flux2KleinInpaintPipeline's image (the kept latents),
    strength, and a blank mask_image of the run's size, prepare_mask_latents giving the kept mask."""
    if not inputs:
        return {}
    if settings.mask:
        from PIL import Image

        kept = inputs["input_mask"]
        pipeline.prepare_mask_latents = lambda *args, **kwargs: kept
        reference = {"image_reference": inputs["input_reference_latents"]} if len(settings.images) > 1 else {}
        return {"image": inputs["input_latents"], "strength": settings.strength,
                "mask_image": Image.new("L", (settings.width, settings.height)), **reference}
    from PIL import Image

    from ..families import reference_size
    from ..input_images import parse_saved

    latents, ids = inputs["input_latents"], inputs["input_latent_ids"]

    def prepare_image_latents(images, batch_size, generator, device, dtype):
        return latents.to(device), ids.to(device)

    pipeline.prepare_image_latents = prepare_image_latents
    sizes = [reference_size(parse_saved(text)[1], pipeline.vae_scale_factor) for text in settings.images]
    return {"image": [Image.new("RGB", (width, height)) for height, width in sizes]}
