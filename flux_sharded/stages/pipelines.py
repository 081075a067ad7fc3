"""The one-piece diffusers pipelines' side of the stages (FluxPipeline, FluxKontextPipeline,
Flux2Pipeline, Flux2KleinPipeline; flux1.py, kontext.py and flux2.py take it as theirs): the family's
pipeline class built around one stage's loaded models, and one denoise batch through its __call__.

Each stage's pipeline holds that stage's models and nothing else: from_pretrained with the other
models given as None, which adds the tokenizers and the scheduler config; the VAE's is built
directly (from_pretrained would also load the tokenizers and scheduler, unused there). denoise calls
the whole __call__ and takes the packed latents after its last step (_Denoised), so that the loop,
noise and positions are the pipeline's own; what follows in __call__ (unpacking, un-normalising) is
decode's.
"""

from __future__ import annotations

import inspect
import json

import torch

from ..checkpoint import pipeline_tokenizer


def encode_pipeline(checkpoint, encoders: dict, dtype: torch.dtype):
    """The family's pipeline holding the text encoders `encoders` (loaded, placed), its tokenizers
    (checkpoint.pipeline_tokenizer's stand-in where a processor cannot be built here) and scheduler config."""
    import diffusers

    family = checkpoint.family
    others = {name: None for name in family.names if name not in encoders}
    tokenizers = {folder: tokenizer for folder in family.tokenizers
                  if (tokenizer := pipeline_tokenizer(checkpoint.model, checkpoint.path, folder)) is not None}
    # Set after loading: from_pretrained checks a passed part against model_index.json's class.
    pipeline = getattr(diffusers, family.pipeline).from_pretrained(
        checkpoint.path, dtype=dtype, **others, **encoders, **dict.fromkeys(tokenizers))
    for folder, tokenizer in tokenizers.items():
        setattr(pipeline, folder, tokenizer)
    return pipeline


def check_prompt_lengths(checkpoint, prompts) -> None:
    """Nothing: a one-piece pipeline cuts a prompt longer than it reads itself, and warns (FluxPipeline
    of T5's 512 tokens), which the run passes on as a note (progress.TRUNCATION_LOGGERS)."""


def denoise_pipeline(checkpoint, transformer):
    """The family's pipeline with this transformer, its scheduler and config (klein's is_distilled), no other model."""
    import diffusers

    family = checkpoint.family
    others = {name: None for name in (*family.names, *_tokenizers(checkpoint)) if name != "transformer"}
    pipeline = getattr(diffusers, family.pipeline).from_pretrained(checkpoint.path, transformer=transformer, **others)
    # Without a VAE, the pipelines assume a scale factor of 8; take the checkpoint's own.
    pipeline.vae_scale_factor = checkpoint.vae_scale_factor
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _tokenizers(checkpoint) -> list[str]:
    """The pipeline's parts in model_index.json that are not models of the family (tokenizers, the scheduler)."""
    index = json.loads((checkpoint.path / "model_index.json").read_text(encoding="utf-8"))
    return [name for name, value in index.items() if isinstance(value, list) and name != "scheduler"
            and name not in checkpoint.family.names]


def vae_pipeline(checkpoint, vae, images: bool):
    """The family's pipeline (`images`: the one that takes its input images, families.Family.image_pipeline)
    holding only `vae`."""
    import diffusers

    family = checkpoint.family
    pipeline_class = getattr(diffusers, family.image_pipeline if images else family.pipeline)
    parts = {name: None for name in inspect.signature(pipeline_class.__init__).parameters if name in family.folders}
    return pipeline_class(**{**parts, "vae": vae})


class _Denoised(Exception):
    """Raised by the step callback after the last step, with the packed latents: what follows in
    __call__ (unpacking; for klein, un-normalising with the VAE's statistics) is decode's work."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("denoised")
        self.latents = latents


def denoise_batch(caller, rows, settings, arguments: dict, on_step=None) -> torch.Tensor:
    """One batch through `caller`'s __call__ (the family's pipeline, or its image pipeline): `rows`
    (the batch's handoff on the execution device) gives the embeddings, `arguments` the generators and
    what the family adds (code.call_arguments). Returns the packed latents (len(rows), tokens,
    channels) after the last step; on_step(step, steps) after each step."""

    def step_done(pipe, step, timestep, callback_kwargs):
        if on_step:
            on_step(step + 1, pipe.num_timesteps)  # image-to-image runs fewer than --steps (--strength)
        if step + 1 == pipe.num_timesteps:
            raise _Denoised(callback_kwargs["latents"])  # (B, tokens, 4*latent_channels), packed
        return {}

    try:
        caller(
            **rows.embeddings(),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            height=settings.height,
            width=settings.width,
            max_sequence_length=settings.max_sequence_length,
            output_type="latent",
            callback_on_step_end=step_done,
            **arguments,
        )
    except _Denoised as denoised:
        return denoised.latents
    raise RuntimeError(f"{type(caller).__name__} returned before its last step")
