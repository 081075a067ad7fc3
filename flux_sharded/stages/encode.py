"""Encode: prompts -> text embeddings.

Loads: the family's text encoders (FLUX.1: CLIP-L and T5-XXL; FLUX.2: Mistral Small 3 or Qwen3,
cut to the decoder layers the encode reads: components.encode_only), each with the device map the
plan gave it (diffusers' "balanced" pipeline strategy, computed in plan.py), then the family's
pipeline with those and no transformer or VAE, which adds the tokenizers and the scheduler config
(code.encode_pipeline). Runs the pipeline's own encode_prompt (FLUX.3: its text_encoder block).
Reads from the handoff: settings.prompts. Writes: the embeddings the family's pipeline takes
(stages/flux1.py, flux2.py), a row per image of the share (todo/finish: the share's encode runs on
whole groups of the run's distinct prompts, distributed.encode_positions). Memory: the encoders' weights (FLUX.1 in bf16: T5 9.52 GB, CLIP
246 MB; FLUX.2-dev: 30 of Mistral's 40 layers) plus the activations of one forward pass.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from ..budget import device_key
from ..components import encode_only
from ..families import encode_layers
from ..handoff import Handoff
from ..placement import check_placement, place
from ..progress import quiet_logger
from ..quantize_load import load_quantized
from .adapters import load_adapters
from .code import family_code, pipeline_family
from .interface import Share, Work

NAME = "encode"


def todo(handoff: Handoff, share: Share) -> Work:
    """The prompts this share's encode runs on (Share.encoded), not the share's images, with what the
    prompt upsampler wrote for them (upsample's handoff: the share's images). A prompt of encode's
    groups that no image of the share has was not rewritten here; its rows are dropped (finish), and
    FLUX.3, the one family with an upsampler, encodes one prompt per call, so it is encoded as typed."""
    # the stages finished before (upsample's), which a resume checks encode's handoff names
    if not handoff.upsampled:
        return Work(Handoff(settings=share.encoded, finished_stages=handoff.finished_stages))
    written = dict(zip(handoff.settings.prompts, handoff.upsampled))
    return Work(Handoff(settings=share.encoded, finished_stages=handoff.finished_stages,
                        upsampled=tuple(written.get(prompt, prompt) for prompt in share.encoded.prompts)))


def finish(output: Handoff, share: Share) -> Handoff:
    """A row per image of the share, from its prompt's row; kept in the run folder."""
    row_of = {prompt: row for row, prompt in enumerate(output.settings.prompts)}
    rows = [row_of[prompt] for prompt in share.settings.prompts]
    # every embedding the family's encode kept (handoff.select keeps the shared ones whole)
    handoff = dataclasses.replace(output.select(rows), settings=share.settings)
    share.save_handoff(handoff, NAME)
    return handoff


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None):
    """The family's pipeline (code.encode_pipeline) with its text encoders placed as the plan says."""
    family = checkpoint.family
    encoders = {}
    for name in family.stage_components()["encode"]:
        plan = stage_plan.component(name)
        model_class = _model_class(family, name)
        if plan.quantization:
            encoders[name] = load_quantized(model_class, checkpoint.path, name, plan, dtype)
            continue
        # transformers reports the weights of the cut layers as unexpected keys: they are meant to stay unread.
        # An encoder with LoRAs loads on the CPU, takes them, then is placed (stages/adapters.py).
        with quiet_logger("transformers.modeling_utils"):
            encoders[name] = model_class.from_pretrained(
                checkpoint.path, subfolder=name, device_map={"": "cpu"} if plan.adapters else plan.device_map,
                dtype=dtype, use_safetensors=True,
            )
        if plan.adapters:
            load_adapters(family, name, encoders[name], plan.adapters)
            place(encoders[name], dict(plan.device_map), streamed=plan.streamed)
        else:
            check_placement(encoders[name], dict(plan.device_map), streamed=False)
    return family_code(family).encode_pipeline(checkpoint, encoders, dtype)


def _model_class(family, name: str):
    """The component's transformers class; for a text encoder the family cuts (FLUX.2), a subclass
    that builds only what the encode reads (components.encode_only), so that from_pretrained reads
    no weight of the layers after the last one used, the final norm, the language-model head or
    the vision tower."""
    import transformers

    component = family.component(name)
    model_class = getattr(transformers, component.class_name)
    if not component.truncated:
        return model_class
    layers = encode_layers(family.pipeline)

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        encode_only(self, layers)

    # No weight ties: the tied lm_head is cut.
    return type(f"{component.class_name}EncodeOnly", (model_class,), {"__init__": __init__, "_tied_weights_keys": {}})


def run(pipeline, handoff: Handoff, on_image_done=None, on_step=None) -> Handoff:
    """Encode each distinct prompt once (as the upsampler rewrote it, where it ran), batch_size prompts
    per forward pass; rows per image."""
    settings = handoff.settings
    code = family_code(pipeline_family(pipeline))
    images_of = Counter(settings.prompts)
    distinct = list(images_of)  # first-seen order
    text_of = dict(zip(settings.prompts, handoff.prompt_texts()))  # the upsampler's rewriting, if any
    rows_of, shared = {}, {}
    with torch.inference_mode():
        for start in range(0, len(distinct), settings.batch_size):
            batch = distinct[start : start + settings.batch_size]
            rows, shared = code.encode_batch(pipeline, [text_of[prompt] for prompt in batch], settings)
            for row, prompt in enumerate(batch):
                rows_of[prompt] = {name: tensor[row].to("cpu") for name, tensor in rows.items()}
            if on_image_done:
                on_image_done(sum(images_of[prompt] for prompt in batch))
    names = rows_of[distinct[0]].keys()
    return dataclasses.replace(
        handoff,
        named={**{name: torch.stack([rows_of[prompt][name] for prompt in settings.prompts]) for name in names},
               **{name: tensor.to("cpu") for name, tensor in shared.items()}},
        shared=pipeline_family(pipeline).shared_tensors,
        finished_stages=handoff.finished_stages + (NAME,),
    )


def device_map(pipeline) -> dict[str, dict[str, str]]:
    placed = {}
    for name in pipeline_family(pipeline).stage_components()["encode"]:
        model = getattr(pipeline, name)
        split = getattr(model, "hf_device_map", None)  # an encoder split GPU + CPU by the plan
        placed[name] = ({module: device_key(device) for module, device in split.items()} if split and len(split) > 1
                        else {"": device_key(model.device)})
    return placed
