"""FLUX.1's side of the stages (FluxPipeline): what encode keeps, what decode feeds the VAE.

encode_prompt gives the T5 embeddings, CLIP's pooled embedding and the text positions (zeros);
denoise passes the first two to FluxPipeline.__call__ (which recomputes the positions); decode
unpacks the 2x2-packed latents and undoes the VAE's scaling and shift, as FluxPipeline.__call__'s
tail does before vae.decode.
"""

from __future__ import annotations

import torch


def encode_batch(pipeline, prompts: list[str], settings) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: (len(prompts), ...) rows, one per prompt}, {name: tensor shared by every image})."""
    prompt_embeds, pooled_prompt_embeds, text_ids = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, num_images_per_prompt=1, max_sequence_length=settings.max_sequence_length,
    )
    return ({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds},
            {"text_ids": text_ids})


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


def lora_state_dict(family, path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict with COMPONENT.-prefixed keys, network alphas) of a LoRA file, converted from any
    format FluxPipeline reads (kohya, XLabs, ai-toolkit, ...), as its load_lora_weights reads it."""
    import diffusers

    return getattr(diffusers, family.pipeline).lora_state_dict(str(path), return_alphas=True)


def load_lora(family, name: str, model, state_dict: dict, alphas: dict | None, adapter_name: str) -> None:
    """Inject one LoRA's layers into component `name` (the transformer, or CLIP), as
    FluxPipeline.load_lora_weights does (its default low_cpu_mem_usage with PEFT, tests pin it)."""
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline)
    if name == "transformer":
        pipeline_class.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=model,
                                                  adapter_name=adapter_name, low_cpu_mem_usage=True)
    else:
        pipeline_class.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=model, prefix=name,
                                                   adapter_name=adapter_name, low_cpu_mem_usage=True)
