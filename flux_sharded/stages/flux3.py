"""FLUX.3 klein's side of the stages: diffusers' modular pipelines (Flux3DistilledModularPipeline for
the step-distilled checkpoint, Flux3ModularPipeline for the base one), each stage running the
family's own auto blocks' sub-block (families.MODULAR_PIPELINES) made a pipeline of its own:

    encode   the `text_encoder` block: the chat template, the prompt right-padded to a multiple of
             80 tokens, the stacked hidden states (and, for a guided base run, the empty negative
             prompt's, which the one-piece pipeline encodes when its guider needs them)
    encode_image  the `vae_encoder` block (a run with reference images: --image)
    denoise  the `denoise` block's text-to-image branch, or its image_conditioned one for a run with
             references (noise, timesteps, positions, the loop; the base one with a
             ClassifierFreeGuidance of --guidance's scale), with a step of ours in its loop that
             reports progress
    decode   what the `decode` blocks do before vae.decode (unpack the tokens, undo the VAE's
             batch-norm and the 2x2 patches), then the generic decode

The encode takes one prompt per call and each prompt's window has its own length: the handoff keeps
every prompt's embeddings right-padded with zeros to --max-sequence-length (the most the window may
be) beside their window's length (`prompt_tokens`), and denoise hands the transformer each batch's
embeddings cut back to that length. A batch holds one prompt's images only
(families.Family.prompt_batches), as the one-piece pipeline's call with num_images_per_prompt does.
The packed latents denoise hands on are the loop's (B, tokens, channels), as the other families'.

A LoRA goes into the transformer as Flux3LoraLoaderMixin (both pipelines' loader) loads it, through
FLUX.2's loaders (stages/flux2.py), which call the family's pipeline class's own lora_state_dict
and load_lora_into_transformer.
"""

from __future__ import annotations

import logging

import torch

from ..checkpoint import pipeline_tokenizer
from ..errors import SettingsError
from ..families import FAMILIES, MODULAR_PIPELINES, flux3_reference_sizes
from ..progress import TRUNCATION_PREFIX, quiet_logger
from .flux2 import (  # noqa: F401 (the family protocol: FLUX.2's loaders read the pipeline's own mixin)
    load_lora,
    lora_state_dict,
)

LOGGER = logging.getLogger(__name__)  # a prompt cut to --max-sequence-length (progress.TRUNCATION_LOGGERS)
# diffusers warns that guiders are experimental each time one is made, and that a guider passed to
# update_components was not made from its spec: both about the guider flux-sharded makes, not the user.
GUIDER_LOGGERS = ("diffusers.guiders.guider_utils", "diffusers.modular_pipelines.modular_pipeline_utils")


def _sub_blocks(checkpoint):
    """A fresh instance of the family's auto blocks' sub-blocks (prompt_upsampler, text_encoder,
    vae_encoder, denoise, decode)."""
    import diffusers

    return getattr(diffusers.modular_pipelines, MODULAR_PIPELINES[checkpoint.family.pipeline])().sub_blocks


def _pipeline(checkpoint, blocks):
    """The family's modular pipeline class (what init_pipeline makes for the whole auto blocks)
    running `blocks`, its component specs read from the checkpoint's model_index.json, no model
    loaded yet; it runs `blocks` itself, not a copy."""
    import diffusers

    with quiet_logger(*GUIDER_LOGGERS):  # the base model's guider, made from its spec
        pipeline = getattr(diffusers, checkpoint.family.pipeline)(blocks=blocks,
                                                                  pretrained_model_name_or_path=str(checkpoint.path))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encode_pipeline(checkpoint, encoders: dict, dtype: torch.dtype):
    """The `text_encoder` block's pipeline with the loaded Qwen3-VL and the processor (or its
    stand-in where it cannot be built here, checkpoint.pipeline_tokenizer)."""
    pipeline = _pipeline(checkpoint, _sub_blocks(checkpoint)["text_encoder"])
    (folder,) = checkpoint.family.tokenizers
    tokenizer = pipeline_tokenizer(checkpoint.model, checkpoint.path, folder)
    if tokenizer is None:
        pipeline.load_components(names=[folder])
    else:
        encoders = {**encoders, folder: tokenizer}
    pipeline.update_components(**encoders)
    return pipeline


def encode_batch(pipeline, prompts: list[str], settings) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: (len(prompts), ...) rows}, {}): each prompt's embeddings (len(prompts),
    max_sequence_length, joint_attention_dim), zero-padded after its window, and the window's length
    `prompt_tokens` (len(prompts),); for a guided base run the empty negative prompt's too."""
    family = FAMILIES[type(pipeline).__name__]
    guided = family.second_pass and family.guides(settings.guidance)
    rows: dict[str, list[torch.Tensor]] = {}
    for prompt in prompts:  # one prompt per call (the block refuses a list)
        _warn_if_cut(pipeline, prompt, settings.max_sequence_length, family.text_token_limit)
        state = pipeline(prompt=prompt, max_sequence_length=settings.max_sequence_length,
                         **({"negative_prompt": ""} if guided else {}))
        for name in ("prompt_embeds", "negative_prompt_embeds") if guided else ("prompt_embeds",):
            embeds = state.get(name)  # (1, window, joint_attention_dim)
            padded = embeds.new_zeros(1, settings.max_sequence_length, embeds.shape[2])
            padded[:, : embeds.shape[1]] = embeds
            rows.setdefault(name, []).append(padded)
            rows.setdefault(_tokens(name), []).append(torch.tensor([embeds.shape[1]]))
    return {name: torch.cat(tensors) for name, tensors in rows.items()}, {}


def _warn_if_cut(pipeline, prompt: str, max_sequence_length: int, limit: int) -> None:
    """Warn, as FluxPipeline.encode_prompt warns of a cut prompt, where the text_encoder block will cut
    `prompt` beyond --max-sequence-length, which it truncates to without a word (a prompt beyond the
    family's `limit` was refused before the run: check_prompt_lengths)."""
    tokens = _templated_tokens(pipeline.tokenizer, prompt)
    if len(tokens) > max_sequence_length:
        removed = pipeline.tokenizer.tokenizer.decode(tokens[max_sequence_length:], skip_special_tokens=True)
        more = (f"; --max-sequence-length up to {limit} reads more of its {len(tokens)}"
                if max_sequence_length < limit else f", FLUX.3's most, of its {len(tokens)}")
        LOGGER.warning(f"{TRUNCATION_PREFIX}--max-sequence-length is {max_sequence_length}{more} tokens: {removed}")


def _templated_tokens(processor, prompt: str) -> list[int]:
    """`prompt`'s token ids once templated, as Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds counts
    them: the processor's chat template (one user turn, add_generation_prompt) and its tokenizer."""
    text = processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return processor.tokenizer(text)["input_ids"]


def check_prompt_lengths(checkpoint, prompts) -> None:
    """Raises SettingsError for the first of `prompts` (one per image) longer once templated than the
    most FLUX.3's text_encoder block reads (families.Family.text_token_limit: its max_sequence_length
    is at most 8192): the block would cut it without a word. Loads the checkpoint's processor (or
    its stand-in, checkpoint.pipeline_tokenizer) only."""
    import transformers

    (folder,) = checkpoint.family.tokenizers
    processor = (pipeline_tokenizer(checkpoint.model, checkpoint.path, folder)
                 or transformers.AutoProcessor.from_pretrained(checkpoint.path / folder))
    limit, seen = checkpoint.family.text_token_limit, set()
    for position, prompt in enumerate(prompts):
        if prompt in seen:
            continue
        seen.add(prompt)
        tokens = len(_templated_tokens(processor, prompt))
        if tokens > limit:
            shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise SettingsError(
                f"the prompt of image {position} ('{shown}') is {tokens} tokens once {checkpoint.family.name}'s chat "
                f"template is applied; its text encoder reads at most {limit} (the rest would be cut without a "
                "word): shorten the prompt")


def _tokens(name: str) -> str:
    """The handoff tensor that holds the window length of the embeddings `name`."""
    return name.replace("_embeds", "_tokens")


def denoise_pipeline(checkpoint, transformer):
    """The `denoise` block's text-to-image branch as a pipeline with the loaded transformer and the
    checkpoint's scheduler, and a _progress_block step at the end of its loop; told the VAE's scale
    factor (it holds no VAE, and would assume 8). Its `image_conditioned`: the branch that takes
    reference images, made the same way with the same transformer (image_pipeline)."""
    pipeline = _denoise_branch(checkpoint, transformer, "text2image")
    pipeline.image_conditioned = _denoise_branch(checkpoint, transformer, "image_conditioned")
    return pipeline


def _denoise_branch(checkpoint, transformer, branch: str):
    """The `denoise` block's sub-block `branch` as a pipeline (denoise_pipeline)."""
    blocks = _sub_blocks(checkpoint)["denoise"].sub_blocks[branch]
    loop = blocks.sub_blocks["denoise"].sub_blocks
    progress = _progress_block()
    loop.insert("progress", progress, len(loop))
    pipeline = _pipeline(checkpoint, blocks)
    pipeline.load_components(names=["scheduler"])
    pipeline.update_components(transformer=transformer)
    pipeline.vae = _VaeConfig(checkpoint.vae_config)
    pipeline.progress = progress  # the very block the pipeline runs (_pipeline)
    return pipeline


class _VaeConfig:
    """What the denoise pipeline reads of its VAE: the config's block_out_channels, for
    vae_scale_factor (Flux3ModularPipeline's property). Holds no weights."""

    def __init__(self, config: dict):
        from types import SimpleNamespace

        self.config = SimpleNamespace(**config)


def _progress_block():
    """A step of ours at the end of the denoising loop: calls its `on_step(step, steps)` (set per
    batch by denoise_batch) after each step; reads nothing, changes nothing. A block class is made
    on first use: diffusers is imported only once a stage runs."""
    from diffusers.modular_pipelines import ModularPipelineBlocks

    class Progress(ModularPipelineBlocks):
        model_name = "flux3"

        def __init__(self):
            super().__init__()
            self.on_step = None

        @property
        def description(self) -> str:
            return "Reports each finished step of the denoising loop (flux-sharded's progress)."

        def __call__(self, components, block_state, i: int, t: torch.Tensor):
            if self.on_step:
                self.on_step(i + 1, len(block_state.timesteps))
            return components, block_state

    return Progress()


def denoise_batch(caller, rows, settings, arguments: dict, on_step=None) -> torch.Tensor:
    """One batch (one prompt's images) through the denoise pipeline: the embeddings cut back to
    their window (`prompt_tokens`), the base model guided by a ClassifierFreeGuidance of
    --guidance's scale, `arguments`' generators (one per image, as the one-piece pipeline takes a
    list with num_images_per_prompt). Returns the loop's packed latents (B, (H/2f)*(W/2f), channels):
    the block's output (B, channels, H/2f, W/2f) packed back as Flux3PrepareLatentsStep packs it."""
    from diffusers.guiders import ClassifierFreeGuidance

    embeddings = {}
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        embeds = getattr(rows, name)
        if embeds is None:
            continue
        windows = set(getattr(rows, _tokens(name)).tolist())
        if len(windows) != 1:  # families.Family.prompt_batches: a batch is one prompt's images
            raise RuntimeError(f"a FLUX.3 batch holds {name} of windows {sorted(windows)}; it takes one prompt's")
        embeddings[name] = embeds[:, : windows.pop()]
    if "guider" in caller.component_names:
        with quiet_logger(*GUIDER_LOGGERS):
            caller.update_components(guider=ClassifierFreeGuidance(guidance_scale=settings.guidance))
    caller.progress.on_step = on_step
    latents = caller(**embeddings, **arguments, height=settings.height, width=settings.width,
                     num_inference_steps=settings.steps, output="latents")
    return latents.flatten(2).transpose(1, 2)


def vae_pipeline(checkpoint, vae, images: bool):
    """The `decode` block's pipeline, or with `images` the `vae_encoder` block's (each with its
    Flux3ImageProcessor made from its spec), holding `vae`."""
    pipeline = _pipeline(checkpoint, _sub_blocks(checkpoint)["vae_encoder" if images else "decode"])
    pipeline.update_components(vae=vae)
    return pipeline


def vae_latents(pipeline, vae, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latents (B, (H/2f)*(W/2f), 4*C) -> what vae.decode takes, (B, C, H/f, W/f): what
    Flux3UnpackLatentsStep and Flux3DecodeStep do before vae.decode (unpack to the token grid, undo
    the batch-norm with the VAE's running statistics and batch_norm_eps, undo the 2x2 patches)."""
    from diffusers.modular_pipelines.flux3.decoders import Flux3DecodeStep

    factor = pipeline.vae_scale_factor
    rows, columns = height // (2 * factor), width // (2 * factor)
    batch, _, channels = packed.shape
    latents = packed.view(batch, rows, columns, channels).permute(0, 3, 1, 2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                           latents.dtype)
    return Flux3DecodeStep._unpatchify_latents(latents * std + mean).to(vae.dtype)


def guidance_ignored(checkpoint) -> str | None:
    """Why --guidance cannot change the pixels: the step-distilled checkpoint has no guider."""
    if checkpoint.family.second_pass:
        return None
    return "the checkpoint is step-distilled: its transformer's flow_map, no classifier-free guidance"


def guidance_note(checkpoint, guidance: float) -> str | None:
    """None: a --guidance the step-distilled checkpoint would ignore is refused before the run
    (families.Family.guided), not noted."""
    return None


# ---------------------------------------------------------------- reference images (image=[...])
# The auto blocks' vae_encoder block preprocesses the references (one kept whole on a reflect-padded
# canvas, several each cropped) and encodes each with the VAE's mode, patchified and normalised, to
# its own (1, C, h, w); the denoise block's image_conditioned branch packs them into tokens with their
# positions. encode_image runs the vae_encoder block; denoise hands its latents to that branch, so
# packing, positions and noise are the blocks' own. The run's size is --height/--width, given to the
# blocks, which then crop nothing back (Flux3ImageCondInputStep).

SEEDED_ENCODE = False  # the VAE's mode (argmax), no generator


def input_sizes(settings, sizes: list[tuple[int, int]], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
    """(height, width) the VAE encodes each reference of (width, height) `sizes` at (families.flux3_reference_sizes)."""
    return flux3_reference_sizes(sizes)


def encode_images(pipeline, images: list, settings, batch: range, mask=None) -> dict[str, torch.Tensor]:
    """{"input_latents_I": (len(batch), C, h_I, w_I)} for each reference I: the vae_encoder block's
    image_cond_latents, one row per image (the same for every image)."""
    latents = pipeline(image=list(images), output="image_cond_latents")
    return {f"input_latents_{index}": tensor.expand(len(batch), *tensor.shape[1:]).contiguous()
            for index, tensor in enumerate(latents)}


def image_pipeline(pipeline, settings):
    """The denoise pipeline itself, or for a run with references its image_conditioned branch."""
    return pipeline.image_conditioned if settings.images else pipeline


def call_arguments(pipeline, inputs: dict[str, torch.Tensor], settings, batch: range) -> dict:
    """The batch's encoded references as the image_conditioned branch's image_cond_latents, in
    --image order; nothing for a run without (guidance is the guider's: denoise_batch)."""
    if not inputs:
        return {}
    return {"image_cond_latents": [inputs[f"input_latents_{index}"] for index in range(len(settings.images))]}


# ---------------------------------------------------------------- the prompt upsampler (--upsample-prompt)
# The auto blocks' prompt_upsampler block (Flux3AutoPromptUpsampleStep) runs before their text_encoder
# block: the one-piece pipeline encodes what it wrote. The upsample stage runs that block, made a
# pipeline of its own, holding the loaded upsampler and its processor; encode then encodes its text.


def upsample_pipeline(checkpoint, upsampler, processor):
    """The auto blocks' `prompt_upsampler` block as a pipeline holding `upsampler` (the loaded
    Qwen3.5 model, placed) and `processor` (checkpoint.upsampler_processor)."""
    pipeline = _pipeline(checkpoint, _sub_blocks(checkpoint)["prompt_upsampler"])
    with quiet_logger(*GUIDER_LOGGERS):  # a TextProcessor stand-in is not made from the processor's spec
        pipeline.update_components(prompt_upsampler=upsampler, prompt_upsampler_processor=processor)
    return pipeline


def upsample(pipeline, prompt: str, settings) -> str:
    """`prompt` as the block rewrites it (its text-to-image branch: a run without --image): one greedy
    generation of at most --upsample-max-tokens tokens."""
    return pipeline(prompt=prompt, max_new_tokens=settings.upsample_max_tokens, output="prompt")
