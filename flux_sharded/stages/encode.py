"""Encode: prompts -> text embeddings.

Loads: the CLIP-L and T5-XXL text encoders, each whole on the device the plan gave it (diffusers'
"balanced" pipeline strategy, computed in plan.py), then FluxPipeline.from_pretrained with those
two and no transformer or VAE, which adds both tokenizers and the scheduler config.
Reads from the handoff: settings.prompts. Writes: prompt_embeds (T5), pooled_prompt_embeds (CLIP
pooled), text_ids. Memory: the encoders' weights (FLUX.1 in bf16: T5 9.52 GB, CLIP 246 MB) plus
activations of a 512-token T5 forward pass, small next to the weights.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from diffusers import FluxPipeline

from ..families import FLUX_1
from ..budget import device_key
from ..handoff import Handoff
from ..quantize import load_quantized

NAME = "encode"
COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None) -> FluxPipeline:
    encoders = {
        name: load_quantized(_model_class(name), checkpoint.path, name, stage_plan.component(name), dtype)
        if stage_plan.component(name).quantization else _model_class(name).from_pretrained(
            checkpoint.path, subfolder=name, device_map=stage_plan.component(name).device_map, dtype=dtype,
            use_safetensors=True,
        )
        for name in ("text_encoder", "text_encoder_2")
    }
    return FluxPipeline.from_pretrained(checkpoint.path, transformer=None, vae=None, dtype=dtype, **encoders)


def _model_class(name: str):
    import transformers

    return getattr(transformers, FLUX_1.component(name).class_name)


def run(pipeline: FluxPipeline, handoff: Handoff, on_image_done=None, on_step=None) -> Handoff:
    """Encode each distinct prompt once, batch_size prompts per forward pass; rows per image."""
    settings = handoff.settings
    images_of = Counter(settings.prompts)
    distinct = list(images_of)  # first-seen order
    embeds, pooled, text_ids = {}, {}, None
    with torch.inference_mode():
        for start in range(0, len(distinct), settings.batch_size):
            batch = distinct[start : start + settings.batch_size]
            batch_embeds, batch_pooled, text_ids = pipeline.encode_prompt(
                prompt=batch,
                prompt_2=None,
                num_images_per_prompt=1,
                max_sequence_length=settings.max_sequence_length,
            )
            for row, prompt in enumerate(batch):
                embeds[prompt], pooled[prompt] = batch_embeds[row].to("cpu"), batch_pooled[row].to("cpu")
            if on_image_done:
                on_image_done(sum(images_of[prompt] for prompt in batch))
    return dataclasses.replace(
        handoff,
        prompt_embeds=torch.stack([embeds[prompt] for prompt in settings.prompts]),
        pooled_prompt_embeds=torch.stack([pooled[prompt] for prompt in settings.prompts]),
        text_ids=text_ids.to("cpu"),
        finished_stages=handoff.finished_stages + (NAME,),
    )


def device_map(pipeline: FluxPipeline) -> dict[str, dict[str, str]]:
    placed = {}
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipeline, name)
        split = getattr(model, "hf_device_map", None)  # an encoder split GPU + CPU by the plan
        placed[name] = ({module: device_key(device) for module, device in split.items()} if split and len(split) > 1
                        else {"": device_key(model.device)})
    return placed

