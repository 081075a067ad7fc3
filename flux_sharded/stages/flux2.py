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


def lora_state_dict(family, path) -> tuple[dict[str, torch.Tensor], None]:
    """(state dict with COMPONENT.-prefixed keys, None: no network alphas) of a LoRA file, converted
    from any format Flux2Pipeline and Flux2KleinPipeline read (kohya, ai-toolkit, LoKr, ...)."""
    import diffusers

    return getattr(diffusers, family.pipeline).lora_state_dict(str(path)), None


def load_lora(family, name: str, model, state_dict: dict, alphas: None, adapter_name: str) -> None:
    """Inject one LoRA's layers into the transformer (the only component FLUX.2's loader takes), as
    Flux2LoraLoaderMixin.load_lora_weights does (its default low_cpu_mem_usage with PEFT)."""
    import diffusers

    getattr(diffusers, family.pipeline).load_lora_into_transformer(state_dict, transformer=model,
                                                                   adapter_name=adapter_name, low_cpu_mem_usage=True)


# FLUX.2 takes no input image here yet (families.Family.max_images is 0: --image is refused before
# any stage); the family protocol's image members say so.

def input_sizes(settings, sizes: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return ()


def encode_images(pipeline, images: list, settings, batch: range) -> dict[str, torch.Tensor]:
    raise NotImplementedError("FLUX.2 input images are refused before any stage runs")


def image_pipeline(pipeline, settings):
    """The family's pipeline: a FLUX.2 run has no input image yet."""
    return pipeline


def image_arguments(inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    raise NotImplementedError("FLUX.2 input images are refused before any stage runs")
