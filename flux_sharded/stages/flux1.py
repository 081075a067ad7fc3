"""FLUX.1's side of the stages (FluxPipeline): what encode keeps, what decode feeds the VAE.

encode_prompt gives the T5 embeddings, CLIP's pooled embedding and the text positions (zeros);
denoise passes the first two to FluxPipeline.__call__ (which recomputes the positions); decode
unpacks the 2x2-packed latents and undoes the VAE's scaling and shift, as FluxPipeline.__call__'s
tail does before vae.decode.
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
    """({name: (len(prompts), ...) rows, one per prompt}, {name: tensor shared by every image})."""
    prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, num_images_per_prompt=1, max_sequence_length=settings.max_sequence_length,
    )
    rows = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
    if settings.true_cfg > 1:  # __call__'s do_true_cfg: the negative prompt encoded as the prompt is
        rows["negative_prompt_embeds"], rows["negative_pooled_prompt_embeds"], _ = pipeline.encode_prompt(
            prompt=[settings.negative_prompt] * len(prompts), prompt_2=None, num_images_per_prompt=1,
            max_sequence_length=settings.max_sequence_length)
    return rows, {"text_ids": text_ids}


def vae_latents(pipeline, vae, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents (B, (H/2f)*(W/2f), 4*C) -> what vae.decode takes, (B, C, H/f, W/f)."""
    latents = pipeline._unpack_latents(packed, height, width, pipeline.vae_scale_factor)
    return (latents / vae.config.scaling_factor) + vae.config.shift_factor


def guidance_ignored(checkpoint) -> str | None:
    """Why --guidance cannot change the pixels of this checkpoint, or None when it does: FLUX.1-dev
    embeds the guidance scale; FLUX.1-schnell has no guidance embedding."""
    if checkpoint.transformer_config.get("guidance_embeds", True) is False:
        return "the transformer has no guidance embedding"
    return None


def guidance_note(checkpoint, guidance: float) -> str | None:
    """The note for a --guidance the checkpoint ignores, or None."""
    if guidance_ignored(checkpoint) is None:
        return None
    return (f"note: {checkpoint.model}'s transformer has no guidance embedding (guidance_embeds false, as "
            f"FLUX.1-schnell): --guidance {guidance:g} has no effect")


def lora_state_dict(family, path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with COMPONENT.-prefixed keys, {"network_alphas": ..., "metadata": ...}) of a LoRA
    file, converted from any format FluxPipeline reads (kohya, XLabs, ai-toolkit, ...), as its
    load_lora_weights reads it: the alphas and the adapter metadata (a saved LoraConfig) it hands its
    loaders."""
    import diffusers

    state_dict, alphas, metadata = getattr(diffusers, family.pipeline).lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True)
    return state_dict, {"network_alphas": alphas, "metadata": metadata}


def load_lora(family, name: str, model, state_dict: dict, options: dict, adapter_name: str) -> None:
    """Inject one LoRA's layers into component `name` (the transformer, or CLIP), as
    FluxPipeline.load_lora_weights does (its default low_cpu_mem_usage with PEFT, tests pin it);
    `options`: lora_state_dict's."""
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline)
    if name == "transformer":
        pipeline_class.load_lora_into_transformer(state_dict, transformer=model, adapter_name=adapter_name,
                                                  low_cpu_mem_usage=True, **options)
    else:
        pipeline_class.load_lora_into_text_encoder(state_dict, text_encoder=model, prefix=name,
                                                   adapter_name=adapter_name, low_cpu_mem_usage=True, **options)


# ---------------------------------------------------------------- image-to-image (FluxImg2ImgPipeline)
# FluxImg2ImgPipeline.prepare_latents encodes the image with the VAE, *sampling* its latent
# distribution with each image's generator (_encode_vae_image), and then draws the noise from the
# same generators. encode_image therefore does the first half with the pipeline's own preprocessing
# and _encode_vae_image and keeps, besides the latents, each generator's state after it; denoise
# hands the latents to __call__ as its image (a tensor of latent_channels channels, which the
# pipeline takes as encoded) with generators set to those states, so the pipeline's own timesteps,
# strength and noise follow exactly as in one call (tests/test_images.py compares the PNGs).

SEEDED_ENCODE = True  # _encode_vae_image samples with the batch's first generator


def input_sizes(settings, sizes: list[tuple[int, int]], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
    """(height, width) the VAE encodes each input image at: FluxImg2ImgPipeline resizes it to the run's
    size; FluxInpaintPipeline also encodes the masked image, at the same size (one after the other)."""
    return tuple((settings.height, settings.width) for _ in range(len(sizes) + bool(settings.mask)))


def encode_images(pipeline, images: list, settings, batch: range, mask=None) -> dict[str, torch.Tensor]:
    """{"input_latents": (len(batch), C, H/f, W/f), "input_generator_states": (len(batch), state
    bytes) uint8}: the one input image resized to the run's size by the pipeline's image processor and
    encoded as FluxImg2ImgPipeline.prepare_latents (and FluxInpaintPipeline's, the same) encodes it
    for this batch; with a `mask`, also "input_mask" and "input_masked_latents", (len(batch), tokens,
    4C) each: FluxInpaintPipeline.prepare_mask_latents' packed mask and masked image."""
    (image,) = images
    pixels = pipeline.image_processor.preprocess(image, height=settings.height, width=settings.width)
    pixels = pixels.to(dtype=torch.float32)  # __call__'s
    # prepare_latents casts to the prompt embeddings' dtype (the run's) on the execution device
    device_pixels = pixels.to(device=pipeline.vae.device, dtype=settings.torch_dtype)
    generators = [torch.Generator("cpu").manual_seed(settings.seeds[position]) for position in batch]
    latents = pipeline._encode_vae_image(image=device_pixels, generator=generators)  # (1, C, H/f, W/f)
    encoded = {"input_latents": latents.expand(len(batch), *latents.shape[1:]).contiguous(),
               "input_generator_states": torch.stack([generator.get_state() for generator in generators])}
    if mask is not None:
        encoded.update(_inpaint_mask(pipeline, pixels, mask, settings, batch, generators))
    return encoded


def _inpaint_mask(pipeline, pixels: torch.Tensor, mask, settings, batch: range,
                  generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
    """FluxInpaintPipeline.__call__'s mask steps for the input image's `pixels` (1, 3, H, W) float32:
    its mask processor (grey, resized, binary), the masked image, and prepare_mask_latents (the VAE
    encodes the masked image there). The pipeline samples that encoding with the batch's first
    generator after the noise; its loop reads only the mask (the masked image's latents serve a
    transformer of more input channels), so it samples here with copies of the generators, leaving
    the kept states (the noise's) as the image's encode left them."""
    import diffusers

    inpaint = diffusers.FluxInpaintPipeline(**pipeline.components)  # its processors, made for this VAE
    condition = inpaint.mask_processor.preprocess(mask, height=settings.height, width=settings.width)
    masked = pixels * (condition < 0.5)
    copies = generator_copies(generators)
    packed_mask, masked_latents = inpaint.prepare_mask_latents(
        condition, masked, len(batch), pipeline.latent_channels, 1, settings.height, settings.width,
        settings.torch_dtype, pipeline.vae.device, copies)
    return {"input_mask": packed_mask, "input_masked_latents": masked_latents}


def generator_copies(generators: list[torch.Generator]) -> list[torch.Generator]:
    """CPU generators at the states of `generators`, to draw from without moving them."""
    copies = []
    for generator in generators:
        copies.append(torch.Generator("cpu"))
        copies[-1].set_state(generator.get_state())
    return copies


def restored_generators(states: torch.Tensor) -> list[torch.Generator]:
    """CPU generators at the kept states (encode_images' "input_generator_states" rows, uint8)."""
    generators = []
    for state in states:
        generator = torch.Generator("cpu")
        generator.set_state(state.to("cpu").clone())  # a tensor of its own: set_state reads a row's storage from its start
        generators.append(generator)
    return generators


def image_pipeline(pipeline, settings):
    """FluxImg2ImgPipeline (FluxInpaintPipeline with a --mask) sharing `pipeline`'s transformer and
    scheduler when the run has an input image; its latent channels and image processor set as a VAE
    would set them (it has none), so that it takes the encoded latents as they are."""
    if not settings.images:
        return pipeline
    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    # Built from the same components, not by from_pipe, which casts them all to one dtype (float32 by default).
    pipeline_class = diffusers.FluxInpaintPipeline if settings.mask else diffusers.FluxImg2ImgPipeline
    image_pipeline = pipeline_class(**pipeline.components)
    image_pipeline.set_progress_bar_config(disable=True)
    image_pipeline.vae_scale_factor = pipeline.vae_scale_factor
    image_pipeline.latent_channels = pipeline.transformer.config.in_channels // 4  # 2x2 packing
    image_pipeline.image_processor = VaeImageProcessor(vae_scale_factor=2 * pipeline.vae_scale_factor,
                                                       vae_latent_channels=image_pipeline.latent_channels)
    return image_pipeline


def call_arguments(pipeline, inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    """FluxImg2ImgPipeline.__call__'s image, strength and generators for the encoded rows of `batch`
    (nothing for a run without an input image), and true_cfg_scale (--true-cfg). With a --mask,
    FluxInpaintPipeline's: its prepare_mask_latents gives the kept mask and masked image, and the
    mask_image it is handed is a blank one of the run's size (what __call__'s preprocessing reads)."""
    guidance = {"true_cfg_scale": settings.true_cfg}
    if not inputs:
        return guidance
    generators = restored_generators(inputs["input_generator_states"])
    arguments = {"image": inputs["input_latents"], "strength": settings.strength, "generator": generators, **guidance}
    if settings.mask:
        from PIL import Image

        kept = inputs["input_mask"], inputs["input_masked_latents"]
        pipeline.prepare_mask_latents = lambda *args, **kwargs: kept
        # masked_image_latents given: __call__ then masks no image of its own (it holds latents, not pixels)
        arguments.update(mask_image=Image.new("L", (settings.width, settings.height)), masked_image_latents=kept[1])
    return arguments
