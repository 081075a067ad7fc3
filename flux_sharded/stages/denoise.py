"""Denoise: text embeddings -> packed latents.

Loads: the transformer alone, with the plan's device map (diffusers' "auto" strategy computed in
plan.py: whole blocks spread over the GPUs, the rest offloaded to the CPU or disk if budgeted),
and the scheduler. Runs FluxPipeline's own denoising loop (with
no text encoders and no VAE) so that the numbers are exactly the one-piece pipeline's.
Reads from the handoff: prompt_embeds, pooled_prompt_embeds, settings (seeds, steps, guidance,
size). Writes: latents. Memory: the transformer's weights (FLUX.1 in bf16: 23.8 GB) plus the
activations of one forward pass over (H/16)*(W/16) image tokens and 512 text tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ..budget import device_key
from ..handoff import Handoff
from ..quantize import load_quantized
from .offload import apply_streamed_offload, cuda_device

NAME = "denoise"
COMPONENTS = ("transformer", "scheduler")


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None,
         gpu_device: Callable[[int], torch.device] = cuda_device) -> FluxPipeline:
    """The transformer with the plan's device map: blocks on "cpu" streamed to the GPU by diffusers'
    group offloading when the plan says `streamed` (offload.py), else accelerate's device-map hooks
    (also for blocks on "disk"). gpu_device: see offload.apply_streamed_offload."""
    plan = stage_plan.component("transformer")
    if plan.quantization:
        transformer = load_quantized(FluxTransformer2DModel, checkpoint.path, "transformer", plan, dtype, gpu_device)
        if plan.streamed:
            transformer.streamed_device_map = dict(plan.device_map)
        return _pipeline(checkpoint, transformer)
    transformer = FluxTransformer2DModel.from_pretrained(
        checkpoint.path,
        subfolder="transformer",
        device_map={"": "cpu"} if plan.streamed else dict(plan.device_map),
        offload_folder=offload_folder,
        dtype=dtype,
        use_safetensors=True,
    )
    if plan.streamed:
        apply_streamed_offload(transformer, dict(plan.device_map), gpu_device)
        transformer.streamed_device_map = dict(plan.device_map)
    return _pipeline(checkpoint, transformer)


def _pipeline(checkpoint, transformer) -> FluxPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint.path, subfolder="scheduler")
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    # Without a VAE, FluxPipeline assumes a scale factor of 8; take the checkpoint's own.
    pipeline.vae_scale_factor = checkpoint.vae_scale_factor
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipeline: FluxPipeline, handoff: Handoff, on_image_done=None, on_step=None, finished_batches=None,
        on_batch_done=None) -> Handoff:
    """Denoise batch_size images per pass, each with its own CPU generator seeded with its seed,
    as FluxPipeline does for a list of generators.

    finished_batches: {batch number: latents (len(batch), tokens, channels)} denoised earlier (a
    resumed run), taken as they are; on_batch_done(number, latents) is called as each batch
    finishes, so that the runner can keep it; on_step(step, steps) after each denoising step."""
    settings = handoff.settings
    finished_batches = finished_batches or {}
    latents = []

    def step_done(pipe, step, timestep, callback_kwargs):
        on_step(step + 1, settings.steps)
        return {}

    with torch.inference_mode():
        for number, batch in enumerate(settings.batches()):
            if number in finished_batches:
                latents.append(finished_batches[number])
            else:
                # One batch's rows on the GPU at a time: the rest of the run's wait in RAM.
                rows = handoff.select(list(batch)).to(pipeline._execution_device)
                result = pipeline(
                    prompt_embeds=rows.prompt_embeds,
                    pooled_prompt_embeds=rows.pooled_prompt_embeds,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    height=settings.height,
                    width=settings.width,
                    max_sequence_length=settings.max_sequence_length,
                    generator=[torch.Generator("cpu").manual_seed(settings.seeds[p]) for p in batch],
                    output_type="latent",
                    callback_on_step_end=step_done if on_step else None,
                )
                latents.append(result.images.to("cpu"))
                if on_batch_done:
                    on_batch_done(number, latents[-1])
            if on_image_done:
                on_image_done(len(batch))
    return dataclasses.replace(handoff, latents=torch.cat(latents),
                               finished_stages=handoff.finished_stages + (NAME,))


def device_map(pipeline: FluxPipeline) -> dict[str, dict[str, str]]:
    placed = getattr(pipeline.transformer, "hf_device_map", None) or {"": pipeline.transformer.device}
    streamed = getattr(pipeline.transformer, "streamed_device_map", None)
    if streamed is not None:  # group offloading: the planned map, as placed by apply_streamed_offload
        placed = streamed
    return {"transformer": {module: device_key(device) for module, device in placed.items()}}

