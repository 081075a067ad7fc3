"""Upsample: each prompt -> FLUX.3's prompt upsampler's rewriting of it, before encode (--upsample-prompt).

Loads: the prompt upsampler alone (families.Family.upsampler: a Qwen3.5 model in a folder of its own,
not the checkpoint's), placed as the plan says (plan.plan_upsample: as a text encoder is), and its
processor (checkpoint.upsampler_processor), in the auto blocks' own prompt_upsampler block made a
pipeline (stages/flux3.py). Runs that block once per distinct prompt of the share: one greedy generation
of at most --upsample-max-tokens tokens. Reads from the handoff: settings.prompts. Writes: `upsampled`,
each image's rewritten prompt, which encode encodes instead, and keeps the handoff in the run folder, so
that a resume does not load the upsampler again. Memory: its weights (the published one, a Qwen3.5-9B:
18.8 GB in bf16) plus one generation's cache and prefill (activations.upsampler_generation_bytes).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..budget import device_key
from ..checkpoint import upsampler_processor
from ..handoff import Handoff
from ..placement import check_placement
from ..progress import quiet_logger
from . import flux3
from .interface import Share, Work

NAME = "upsample"


def todo(handoff: Handoff, share: Share) -> Work:
    """The share's images: each distinct prompt among them is rewritten once."""
    return Work(Handoff(settings=share.settings))


def finish(output: Handoff, share: Share) -> Handoff:
    """Kept in the run folder: a resume from here needs the upsampler no more."""
    share.save_handoff(output, NAME)
    return output


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None):
    """The prompt_upsampler block's pipeline with the upsampler placed as the plan says."""
    import transformers

    (plan,) = stage_plan.components
    component = checkpoint.family.upsampler
    with quiet_logger("transformers.modeling_utils"):
        model = getattr(transformers, component.class_name).from_pretrained(
            plan.folder, device_map=plan.device_map, dtype=dtype, use_safetensors=True)
    check_placement(model, dict(plan.device_map), streamed=False)
    return flux3.upsample_pipeline(checkpoint, model.eval(), upsampler_processor(plan.folder))


def run(pipeline, handoff: Handoff, on_image_done=None, on_step=None) -> Handoff:
    """Each distinct prompt rewritten once (first-seen order); a text per image. on_step(token,
    --upsample-max-tokens) after each forward pass of the upsampler (each writes one token: the
    prompt's prefill the first; generation may stop sooner, at its end-of-turn token), so that a
    long generation shows its progress and stops at a Ctrl-C between two tokens."""
    settings = handoff.settings
    images_of = Counter(settings.prompts)
    written = {}
    tokens = 0

    def token_done(module, args, output) -> None:
        nonlocal tokens
        tokens += 1
        if on_step:
            on_step(tokens, settings.upsample_max_tokens)

    # a forward hook of the upsampler itself: the block's generate() takes no callback
    hook = pipeline.prompt_upsampler.register_forward_hook(token_done)
    try:
        with torch.inference_mode():
            for prompt in images_of:
                tokens = 0
                written[prompt] = flux3.upsample(pipeline, prompt, settings)
                if on_image_done:
                    on_image_done(images_of[prompt])
    finally:
        hook.remove()  # the upsampler may be kept between calls (the Python API)
    return dataclasses.replace(handoff, upsampled=tuple(written[prompt] for prompt in settings.prompts),
                               finished_stages=handoff.finished_stages + (NAME,))


def device_map(pipeline) -> dict[str, dict[str, str]]:
    model = pipeline.prompt_upsampler
    split = getattr(model, "hf_device_map", None)  # split GPU + CPU by the plan
    return {"prompt_upsampler": {module: device_key(device) for module, device in split.items()}
            if split and len(split) > 1 else {"": device_key(model.device)}}
