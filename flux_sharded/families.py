"""Model families: what each FLUX pipeline is made of, said once.

A checkpoint's `model_index.json` names its pipeline class (`_class_name`); that class selects
one `Family` here. A family lists its components (the folder name, the library and class that
load it, the stages that load it with the activation estimate of one forward pass in each, a text encoder's
tokenizer folder, whether `--quantize METHOD` takes it as large), its
generation defaults, whether flux-sharded can run it or only plan it, and the module with its side
of the stages (stages/flux1.py, flux2.py). Everything else (components.py building on meta,
plan.py's stages, the stages, the checkpoint checks, the hub download's folders) derives from it.

    FluxPipeline        FLUX.1 (dev, schnell): CLIP + T5 -> FluxTransformer2DModel -> AutoencoderKL
    FluxKontextPipeline FLUX.1 Kontext: FLUX.1's components, editing one input image
    Flux2Pipeline       FLUX.2-dev: Mistral Small 3 -> Flux2Transformer2DModel -> AutoencoderKLFlux2
    Flux2KleinPipeline  FLUX.2-klein (4B, 9B): Qwen3 -> Flux2Transformer2DModel -> AutoencoderKLFlux2
    Flux3(Distilled)ModularPipeline  FLUX.3 klein: [Qwen3.5 prompt upsampler ->] Qwen3-VL ->
                        Flux3Transformer2DModel -> AutoencoderKLFlux2 (the upsampler a folder of its own)

This module imports no torch, diffusers or transformers (the command line reads it before them);
the hidden-state layers FLUX.2's encode uses are read from the installed diffusers on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import activations
from .activations import Geometry
from .errors import CheckpointError
from .json_fields import JsonFields, is_int
from .safe_read import MAX_CONFIG_BYTES, parse_json, read_regular_file

# upsample runs only for a run with --upsample-prompt (FLUX.3's prompt upsampler rewrites each prompt
# before encode); encode_image only for a run with input images (--image): the VAE encodes them before denoise.
STAGES = ("upsample", "encode", "encode_image", "denoise", "decode")
UPSAMPLE_STAGE = "upsample"
IMAGE_STAGE = "encode_image"
# The handoff tensor that holds random generators' states (torch.Generator.get_state(), bytes), not
# values in the run's dtype (stages/flux1.py keeps them for image-to-image).
GENERATOR_STATES = "input_generator_states"
# Handoff tensors whose dtype is their own, not the run's: name -> torch dtype name.
# input_latent_ids: FLUX.2's positions; *_tokens: the length of each FLUX.3 prompt's window (_flux3_encoded)
INPUT_DTYPES = {GENERATOR_STATES: "uint8", "input_latent_ids": "int64", "prompt_tokens": "int64",
                "negative_prompt_tokens": "int64"}
# Flux2Pipeline and Flux2KleinPipeline shrink a reference image above this many pixels to it
# (Flux2ImageProcessor._resize_to_target_area), then crop it to multiples of 2 x the VAE's factor.
REFERENCE_MAX_AREA = 1024 * 1024


def _dtype_bytes(inputs: Geometry) -> int:
    import torch

    return torch.finfo(inputs.dtype).bits // 8


# ---------------------------------------------------------------- activation estimates, per image (or prompt)
# Each takes (the component's config as a dict, the plan's inputs, tiled) and returns bytes; the
# formulas and how they were checked are in activations.py.

Estimate = Callable[[dict, Geometry, bool], int]


def _clip(config: dict, inputs: Geometry, tiled: bool) -> int:
    # CLIP always runs its full 77-token window (FluxPipeline pads to tokenizer.model_max_length).
    return activations.text_encoder_activation_bytes(config, config["max_position_embeddings"], _dtype_bytes(inputs))


def _clip_tokens(config: dict, inputs: Geometry) -> int:
    return config["max_position_embeddings"]  # its full window, as _clip says


def _transformer_tokens(config: dict, inputs: Geometry) -> int:
    # the single blocks see the image and text tokens together (FLUX.1 and FLUX.2 alike)
    return activations.image_tokens(inputs.height, inputs.width, inputs.vae_scale_factor) + inputs.max_sequence_length


def _flux_kontext_tokens(config: dict, inputs: Geometry) -> int:
    # FLUX.1 Kontext adds its input image's tokens to the image tokens (FluxKontextPipeline.__call__'s loop)
    return _transformer_tokens(config, inputs) + _reference_tokens(inputs)


def _flux2_transformer_tokens(config: dict, inputs: Geometry) -> int:
    # FLUX.2 adds its reference images' tokens to the image tokens (Flux2Pipeline.__call__'s loop)
    return _transformer_tokens(config, inputs) + _reference_tokens(inputs)


def _reference_tokens(inputs: Geometry) -> int:
    """The tokens of every reference image, at the sizes the VAE encodes them (plan.PlanInputs.input_sizes)."""
    return sum(activations.image_tokens(height, width, inputs.vae_scale_factor) for height, width in inputs.input_sizes)


def kontext_size(size: tuple[int, int], vae_scale_factor: int) -> tuple[int, int]:
    """(height, width) at which FluxKontextPipeline encodes its input image of (width, height) `size`:
    the preferred resolution (diffusers' PREFERRED_KONTEXT_RESOLUTIONS) nearest its aspect ratio, cut to
    multiples of 2 x the VAE's factor (__call__'s step 3 with _auto_resize; tests/test_images.py checks
    it against the encoded shapes)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    width, height = size
    multiple = 2 * vae_scale_factor
    # the image processor's get_default_height_width first cuts the image's own size to multiples of 2f
    aspect = (width // multiple * multiple) / (height // multiple * multiple)
    _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return (height // multiple) * multiple, (width // multiple) * multiple


def reference_size(size: tuple[int, int], vae_scale_factor: int) -> tuple[int, int]:
    """(height, width) at which Flux2Pipeline / Flux2KleinPipeline encode a reference image of
    (width, height) `size`: shrunk to REFERENCE_MAX_AREA pixels when larger (as
    Flux2ImageProcessor._resize_to_target_area rounds), then cropped down to multiples of 2 x the VAE's
    factor (__call__'s step 4; tests/test_images.py checks it against the encoded shapes)."""
    import math

    width, height = size
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    multiple = 2 * vae_scale_factor
    return (height // multiple) * multiple, (width // multiple) * multiple


def flux3_reference_sizes(sizes: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """(height, width) at which FLUX.3's vae_encoder block encodes references of (width, height)
    `sizes`: the shapes its image processor (made from its spec, as the block's pipeline makes it)
    gives blank images of those sizes, one reference kept whole on its padded canvas ("fill"),
    several each cropped ("crop"), as Flux3ProcessImagesInputStep chooses."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3ProcessImagesInputStep
    from PIL import Image

    (spec,) = Flux3ProcessImagesInputStep().expected_components
    processor, mode = spec.create(), "fill" if len(sizes) == 1 else "crop"
    return tuple(tuple(processor.preprocess(Image.new("RGB", size), resize_mode=mode)[0].shape[-2:])
                 for size in sizes)


def _t5(config: dict, inputs: Geometry, tiled: bool) -> int:
    return activations.text_encoder_activation_bytes(config, inputs.max_sequence_length, _dtype_bytes(inputs))


def _flux_transformer(config: dict, inputs: Geometry, tiled: bool) -> int:
    return activations.transformer_activation_bytes(config, inputs.height, inputs.width, inputs.vae_scale_factor,
                                                    inputs.max_sequence_length, _dtype_bytes(inputs))


def _kontext_transformer(config: dict, inputs: Geometry, tiled: bool) -> int:
    # FLUX.1 Kontext: the input image's tokens join the sequence (FluxKontextPipeline's loop)
    return activations.transformer_activation_bytes(config, inputs.height, inputs.width, inputs.vae_scale_factor,
                                                    inputs.max_sequence_length, _dtype_bytes(inputs),
                                                    _reference_tokens(inputs))


def _vae(config: dict, inputs: Geometry, tiled: bool) -> int:
    # AutoencoderKLFlux2 decodes with the same Decoder and the same tiling code as AutoencoderKL.
    if tiled:
        return activations.vae_tiled_decode_activation_bytes(config, inputs.height, inputs.width, _dtype_bytes(inputs))
    return activations.vae_decode_activation_bytes(config, inputs.height, inputs.width, _dtype_bytes(inputs))


def _vae_encode(config: dict, inputs: Geometry, tiled: bool) -> int:
    # one input image at a time, the largest the run encodes; AutoencoderKLFlux2 encodes with the
    # same Encoder and tiling code as AutoencoderKL
    return max((activations.vae_encode_activation_bytes(config, height, width, _dtype_bytes(inputs), tiled)
                for height, width in inputs.input_sizes), default=0)


def _flux2_transformer(config: dict, inputs: Geometry, tiled: bool) -> int:
    return activations.flux2_transformer_activation_bytes(config, inputs.height, inputs.width, inputs.vae_scale_factor,
                                                          inputs.max_sequence_length, _dtype_bytes(inputs),
                                                          _reference_tokens(inputs))


def _flux3_transformer(config: dict, inputs: Geometry, tiled: bool) -> int:
    # the reference images' tokens join the single blocks' sequence (Flux3PrepareImageCondLatentsStep)
    return activations.flux3_transformer_activation_bytes(config, inputs.height, inputs.width, inputs.vae_scale_factor,
                                                          inputs.max_sequence_length, _dtype_bytes(inputs),
                                                          _reference_tokens(inputs))


def _decoder_text_encoder(pipeline: str) -> Estimate:
    def estimate(config: dict, inputs: Geometry, tiled: bool) -> int:
        text_config = config.get("text_config") or config  # Mistral3 nests its language model's config
        return activations.decoder_text_encoder_activation_bytes(
            text_config, inputs.max_sequence_length, _dtype_bytes(inputs), encode_layers(pipeline))
    return estimate


def _upsampler(config: dict, inputs: Geometry, tiled: bool) -> int:
    # one greedy generation: the prompt's prefill, then a token at a time over the cache (activations.py)
    return activations.upsampler_generation_bytes(config.get("text_config") or config, inputs.upsample_prompt_tokens,
                                                  inputs.upsample_max_tokens, _dtype_bytes(inputs))


# What the upsampler's chat template adds to the system prompt and the request: two turns' markup and
# the generation prompt with an empty thinking block (Qwen3.5's template renders about 60 bytes of it).
UPSAMPLE_CHAT_MARKUP_BYTES = 128


def upsample_prompt_tokens(prompts) -> int:
    """The most tokens one request of the prompt upsampler takes, for the longest of `prompts`: at most
    its templated text's UTF-8 bytes (a byte-level BPE, Qwen3.5's, gives every token at least one
    byte): the text-to-image system prompt shipped with the blocks (diffusers' flux3
    prompt_upsampler.SYSTEM_PROMPTS["t2i"]), the prompt and the chat markup."""
    from diffusers.modular_pipelines.flux3.prompt_upsampler import SYSTEM_PROMPTS

    longest = max((len(prompt.encode("utf-8")) for prompt in prompts), default=0)
    return len(SYSTEM_PROMPTS["t2i"].encode("utf-8")) + longest + UPSAMPLE_CHAT_MARKUP_BYTES


# ---------------------------------------------------------------- the embeddings encode hands on
# Each takes (the transformer's config as a dict, images, text tokens, whether the pipeline guides
# with a second pass on the empty prompt) and returns name -> shape of what the family's encode
# keeps for the whole run (stages/flux1.py, flux2.py compute them; a resume checks saved ones).


def _flux1_encoded(config: dict, images: int, tokens: int, second_pass: bool) -> dict[str, tuple]:
    embeds, pooled = (images, tokens, config["joint_attention_dim"]), (images, config["pooled_projection_dim"])
    return {
        "prompt_embeds": embeds,  # T5's last hidden state
        "pooled_prompt_embeds": pooled,  # CLIP's pooled output
        "text_ids": (tokens, 3),  # zeros
        # true classifier-free guidance: the negative prompt's, one row per image
        **({"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled} if second_pass else {}),
    }


def _flux2_encoded(config: dict, images: int, tokens: int, second_pass: bool) -> dict[str, tuple]:
    # joint_attention_dim = len(text_encoder_out_layers) x the text encoder's width (validate.py)
    shape = (images, tokens, config["joint_attention_dim"])
    return {"prompt_embeds": shape, **({"negative_prompt_embeds": shape} if second_pass else {})}


def _flux3_encoded(config: dict, images: int, tokens: int, second_pass: bool) -> dict[str, tuple]:
    # each prompt's window (its tokens rounded up to a multiple of 80) zero-padded to --max-sequence-length,
    # and the window's length (stages/flux3.py)
    shapes = {"prompt_embeds": (images, tokens, config["joint_attention_dim"]), "prompt_tokens": (images,)}
    if second_pass:
        shapes.update({"negative_prompt_embeds": shapes["prompt_embeds"], "negative_prompt_tokens": (images,)})
    return shapes


def _above_one(guidance: float) -> bool:
    """Flux2KleinPipeline's do_classifier_free_guidance (and FLUX.1's true CFG): a scale above 1."""
    return guidance > 1


def _cfg_enabled(guidance: float) -> bool:
    """diffusers' ClassifierFreeGuidance guides with a second pass at any scale but 1
    (_is_cfg_enabled, use_original_formulation false; tests/test_flux3.py compares them)."""
    import math

    return not math.isclose(guidance, 1.0)


# ---------------------------------------------------------------- the encoded input images encode_image hands on
# Each takes (the transformer's config as a dict, the VAE's scale factor, the run's settings) and
# returns name -> shape of what the family's encode_image keeps for the whole run's input images
# (stages/flux1.py computes them; a resume checks saved ones); {} for a run without input images.


def packed_latent_channels(config: dict) -> int:
    """The packed latents' width, 4 x the VAE's latent channels (2x2 patches), from the transformer's
    config as a dict: its out_channels where it sets one (FLUX.1 Fill: 64, whose in_channels, 384,
    add the packed masked image and mask), else in_channels."""
    return config.get("out_channels") or config["in_channels"]


def _flux1_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    if not settings.images:
        return {}
    import torch

    images, factor = len(settings.prompts), vae_scale_factor
    packed = (images, activations.image_tokens(settings.height, settings.width, factor), config["in_channels"])
    return {
        # the input image encoded at the run's size, sampled (FluxImg2ImgPipeline._encode_vae_image)
        "input_latents": (images, config["in_channels"] // 4, settings.height // factor, settings.width // factor),
        GENERATOR_STATES: (images, torch.Generator().get_state().numel()),  # each image's, after sampling
        # inpainting: FluxInpaintPipeline.prepare_mask_latents' packed mask and masked image
        **({"input_mask": packed, "input_masked_latents": packed} if settings.mask else {}),
    }


def _fill_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    if not settings.images:
        return {}
    import torch

    images, factor, width = len(settings.prompts), vae_scale_factor, packed_latent_channels(config)
    tokens = activations.image_tokens(settings.height, settings.width, factor)
    return {
        # the input image encoded at the run's size, sampled (FluxFillPipeline.prepare_latents)
        "input_latents": (images, width // 4, settings.height // factor, settings.width // factor),
        GENERATOR_STATES: (images, torch.Generator().get_state().numel()),  # each image's, after sampling
        # prepare_mask_latents' packed mask (each latent pixel's f x f mask pixels) and masked image
        "input_mask": (images, tokens, 4 * factor * factor),
        "input_masked_latents": (images, tokens, width),
    }


def _kontext_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    if not settings.images:
        return {}
    from .input_images import parse_saved

    (text,) = settings.images
    height, width = kontext_size(parse_saved(text)[1], vae_scale_factor)
    # the input image encoded at its preferred resolution (the VAE's mode, FluxKontextPipeline._encode_vae_image)
    return {"input_latents": (len(settings.prompts), config["in_channels"] // 4, height // vae_scale_factor,
                              width // vae_scale_factor)}


def _flux2_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    if not settings.images:
        return {}
    if settings.mask:  # Flux2KleinInpaintPipeline: the run's size is its input image's (runner.check_image_settings)
        from .input_images import parse_saved

        factor, images = 2 * vae_scale_factor, len(settings.prompts)
        references = [reference_size(parse_saved(text)[1], vae_scale_factor) for text in settings.images[1:]]
        return {
            # the input image encoded (the VAE's mode), patchified and normalised (_encode_vae_image)
            "input_latents": (images, config["in_channels"], settings.height // factor, settings.width // factor),
            "input_mask": (images,  # prepare_mask_latents' packed mask, one channel
                           activations.image_tokens(settings.height, settings.width, vae_scale_factor), 1),
            # its image_reference (a second --image), encoded as the image is
            **{"input_reference_latents": (images, config["in_channels"], height // factor, width // factor)
               for height, width in references},
        }
    from .input_images import parse_saved

    images, sizes = len(settings.prompts), [reference_size(parse_saved(text)[1], vae_scale_factor)
                                            for text in settings.images]
    tokens = sum(activations.image_tokens(height, width, vae_scale_factor) for height, width in sizes)
    return {
        # every reference's packed tokens, one after another (Flux2Pipeline.prepare_image_latents)
        "input_latents": (images, tokens, config["in_channels"]),
        "input_latent_ids": (images, tokens, 4),  # their (T, H, W, L) positions
    }


def _flux3_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    if not settings.images:
        return {}
    from .input_images import parse_saved

    factor, images = 2 * vae_scale_factor, len(settings.prompts)
    sizes = flux3_reference_sizes([parse_saved(text)[1] for text in settings.images])
    # each reference encoded (the VAE's mode), patchified and normalised (Flux3VaeEncoderStep), at its own size
    return {f"input_latents_{index}": (images, config["in_channels"], height // factor, width // factor)
            for index, (height, width) in enumerate(sizes)}


def _no_inputs(config: dict, vae_scale_factor: int, settings) -> dict[str, tuple]:
    return {}


# ---------------------------------------------------------------- config checks, per architecture
# Each takes (a function giving a component's config.json as JsonFields, the family, the names of its
# transformer, VAE and text encoders) and raises CheckpointError (validate.check_checkpoint_configs).

Fields = Callable[[str], JsonFields]

# Generous ceilings, far above every FLUX.1 variant (19 double and 38 single blocks, width 3072,
# T5 with 24 layers of width 4096 and 32128 tokens), yet small enough that building the component
# on the meta device stays cheap: a config past them is damaged or hostile, not a bigger FLUX.
MAX_LAYERS = 256
MAX_WIDTH = 65536
MAX_VOCAB = 1_000_000
MAX_VAE_BLOCKS = 6  # a scale factor of 2**5 = 32; FLUX.1's VAE has 4 blocks (factor 8)



def _check_flux1_configs(fields: Fields, family: Family, transformer_name: str, vae_name: str, encoders: tuple[str, ...]) -> None:
    """FLUX.1's configs: FluxTransformer2DModel, AutoencoderKL, CLIP and T5, bounded, and the widths
    they share (CLIP's = pooled_projection_dim, T5's = joint_attention_dim)."""
    clip_name, t5_name = encoders
    transformer = fields(transformer_name)
    in_channels, joint = _check_transformer(transformer, rope_axes=3)
    latents = transformer.integer("out_channels", 4, MAX_WIDTH, optional=True) or in_channels
    if latents % 4:
        transformer.fail(f"is {latents}, not a multiple of 4 (2x2 latent packing)",
                         "out_channels" if latents != in_channels else "in_channels")
    transformer.integer("patch_size", 1, 1, optional=True)
    pooled = transformer.integer("pooled_projection_dim", 1, MAX_WIDTH)

    vae = fields(vae_name)
    _check_vae(vae, latents)
    # FluxFillPipeline concatenates the latents, the masked image (as wide) and the mask (4 x f^2, each
    # latent pixel's f x f mask pixels, f the VAE's scale factor); the other pipelines the latents alone.
    factor = 2 ** (len(vae.data["block_out_channels"]) - 1)
    taken = 2 * latents + 4 * factor * factor if family.needs_mask else latents
    if in_channels != taken:
        what = (f"{family.pipeline} hands it {taken} channels (the latents and the masked image, {latents} each, and "
                f"the mask, 4 x {factor}^2 for the VAE's scale factor {factor})" if family.needs_mask
                else f"{family.pipeline} hands it the latents alone ({latents} channels, out_channels)")
        transformer.fail(f"is {in_channels}, but {what}", "in_channels")
    if not vae.number("scaling_factor") > 0:  # decode divides the latents by it: 0 gave black images
        vae.fail(f"is {vae.data['scaling_factor']}, not a positive number (decode divides the latents by it)",
                 "scaling_factor")
    if vae.data.get("shift_factor") is not None:
        vae.number("shift_factor")

    clip = fields(clip_name)
    clip_width = clip.integer("hidden_size", 1, MAX_WIDTH)
    clip.integer("num_hidden_layers", 1, MAX_LAYERS)
    clip.integer("intermediate_size", 1, 4 * MAX_WIDTH)
    clip.integer("vocab_size", 1, MAX_VOCAB)
    clip.integer("max_position_embeddings", 1, MAX_WIDTH)
    if clip_width != pooled:
        clip.fail(f"is {clip_width}, but the transformer's pooled_projection_dim is {pooled}", "hidden_size")
    t5 = fields(t5_name)
    t5_width = t5.integer("d_model", 1, MAX_WIDTH)
    t5.integer("num_layers", 1, MAX_LAYERS)
    t5.integer("d_ff", 1, 4 * MAX_WIDTH)
    t5.integer("vocab_size", 1, MAX_VOCAB)
    t5.integer("num_heads", 1, MAX_WIDTH)
    t5.integer("d_kv", 1, MAX_WIDTH)
    if t5_width != joint:
        t5.fail(f"is {t5_width}, but the transformer's joint_attention_dim is {joint}", "d_model")


def _check_transformer(transformer: JsonFields, rope_axes: int) -> tuple[int, int]:
    """Both families' transformer: bounded blocks and widths, `rope_axes` rotary axes summing to the
    head width. Returns (in_channels, joint_attention_dim)."""
    for name in ("num_layers", "num_single_layers"):
        transformer.integer(name, 0, MAX_LAYERS)
    heads = transformer.integer("num_attention_heads", 1, MAX_WIDTH)
    head_dim = transformer.integer("attention_head_dim", 1, MAX_WIDTH)
    if heads * head_dim > MAX_WIDTH:
        transformer.fail(f"times num_attention_heads is {heads * head_dim}, over {MAX_WIDTH}", "attention_head_dim")
    in_channels = transformer.integer("in_channels", 4, MAX_WIDTH)
    joint = transformer.integer("joint_attention_dim", 1, MAX_WIDTH)
    transformer.boolean("guidance_embeds", optional=True)
    rope = transformer.list_of("axes_dims_rope", is_int, "whole numbers", rope_axes, rope_axes, optional=True)
    if rope is not None and sum(rope) != head_dim:
        transformer.fail(f"sums to {sum(rope)}, not attention_head_dim {head_dim}", "axes_dims_rope")
    return in_channels, joint


def _check_vae(vae: JsonFields, in_channels: int) -> None:
    """Both families' VAE: bounded widths, and latent_channels matching the transformer, which takes
    2x2 patches of the latents (in_channels = 4 x latent_channels)."""
    vae.list_of("block_out_channels", lambda c: is_int(c) and 1 <= c <= MAX_WIDTH, "whole numbers 1..65536",
                1, MAX_VAE_BLOCKS)
    latent_channels = vae.integer("latent_channels", 1, MAX_WIDTH)
    vae.integer("layers_per_block", 1, MAX_LAYERS, optional=True)
    if 4 * latent_channels != in_channels:
        vae.fail(f"is {latent_channels}, but the transformer takes in_channels {in_channels} = 4 x latent_channels "
                 "(2x2 patches)", "latent_channels")


def _check_flux2_configs(fields: Fields, family: Family, transformer_name: str, vae_name: str, encoders: tuple[str, ...]) -> None:
    """FLUX.2's configs: Flux2Transformer2DModel, AutoencoderKLFlux2 and the decoder-only text encoder
    (Mistral3's text_config, or Qwen3's), bounded, and the widths they share: the transformer takes
    the stacked hidden states of len(text_encoder_out_layers) layers (joint_attention_dim = 3 x the
    text encoder's hidden_size) and 2x2-patchified latents (in_channels = 4 x latent_channels)."""
    (encoder_name,) = encoders
    transformer = fields(transformer_name)
    in_channels, joint = _check_transformer(transformer, rope_axes=4)
    transformer.number("mlp_ratio", 0, optional=True)

    _check_vae(fields(vae_name), in_channels)

    encoder = fields(encoder_name)
    if "text_config" in encoder.data:  # Mistral3ForConditionalGeneration: the language model's config
        encoder = JsonFields(encoder.object("text_config"), encoder.where, encoder.fix, CheckpointError,
                             prefix="text_config.")
    _check_stacked_text_encoder(encoder, family, joint)


def _check_stacked_text_encoder(encoder: JsonFields, family: Family, joint: int) -> None:
    """A decoder-only text encoder whose hidden states the encode stacks (FLUX.2, FLUX.3): bounded,
    deep enough for the deepest layer read, and as wide as the transformer's joint_attention_dim
    divided by the number of stacked layers."""
    width = encoder.integer("hidden_size", 1, MAX_WIDTH)
    layers = encoder.integer("num_hidden_layers", 1, MAX_LAYERS)
    encoder.integer("intermediate_size", 1, 4 * MAX_WIDTH)
    encoder.integer("vocab_size", 1, MAX_VOCAB)
    encoder.integer("num_attention_heads", 1, MAX_WIDTH)
    used = encode_layers(family.pipeline)
    if layers < used:
        encoder.fail(f"is {layers}, but {family.pipeline} reads the hidden states of layer {used}", "num_hidden_layers")
    stacked = len(encode_out_layers(family.pipeline))
    if joint != stacked * width:
        encoder.fail(f"is {width}, but the transformer's joint_attention_dim {joint} is {stacked} x the text encoder's "
                     f"width ({stacked} stacked hidden states)", "hidden_size")


def _check_flux3_configs(fields: Fields, family: Family, transformer_name: str, vae_name: str,
                         encoders: tuple[str, ...]) -> None:
    """FLUX.3's configs: Flux3Transformer2DModel, AutoencoderKLFlux2 and Qwen3-VL's language model,
    bounded, and the widths they share: the transformer takes the stacked hidden states of
    len(text_encoder_out_layers) layers (joint_attention_dim = 8 x the text encoder's hidden_size)
    and 2x2-patchified latents (in_channels = 4 x latent_channels)."""
    (encoder_name,) = encoders
    transformer = fields(transformer_name)
    in_channels, joint = _check_transformer(transformer, rope_axes=4)
    transformer.integer("cond_in_channels", 1, MAX_WIDTH, optional=True)
    transformer.number("mlp_ratio", 0, optional=True)
    transformer.boolean("flow_map", optional=True)
    _check_vae(fields(vae_name), in_channels)
    encoder = fields(encoder_name)
    encoder = JsonFields(encoder.object("text_config"), encoder.where, encoder.fix, CheckpointError,
                         prefix="text_config.")
    _check_stacked_text_encoder(encoder, family, joint)


# ---------------------------------------------------------------- the registry

# A tokenizer folder is whole with one of these sets of vocabulary files (transformers builds a
# tokenizer of the special tokens alone when they are missing): byte-level BPE (CLIP, Qwen2,
# Mistral's tokenizer.json) and T5's SentencePiece.
BPE_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
SENTENCEPIECE_FILES = (("tokenizer.json",), ("spiece.model",))
# The pipeline's folder that is neither a model nor a tokenizer; every family has it.
SCHEDULER = "scheduler"


@dataclass(frozen=True)
class Component:
    name: str  # the checkpoint's folder and model_index.json key
    library: str  # "transformers" or "diffusers"
    class_name: str  # as in model_index.json
    # The stages that load it ("encode", "denoise", "decode"), in stage order, each with the
    # activation estimate of one image's (a text encoder's: one prompt's) forward pass there; each
    # stage plans and places it for its own pass: a VAE that encodes reference images before
    # denoise and decodes after it names two, with two estimates.
    passes: dict[str, Estimate]
    # A decoder-only text encoder whose encode reads intermediate hidden states: only its first
    # encode_layers(pipeline) decoder layers are planned (components.encode_only).
    truncated: bool = False
    # A text encoder's tokenizer folder (model_index.json key), and the vocabulary files one set of
    # which makes it whole (checkpoint.check_tokenizers).
    tokenizer: str | None = None
    tokenizer_files: tuple[tuple[str, ...], ...] = ()
    # Whether its pipeline applies the tokenizer's chat template to every prompt (FLUX.2's encoders):
    # without one, encode failed after run.json was written.
    chat_template: bool = False
    # One of the family's large components, which `--quantize METHOD` without component names
    # quantizes (FLUX.1: the transformer, 23.8 GB in bf16, and T5, 9.5 GB; CLIP's 0.25 GB and the
    # VAE's 0.17 GB gain little and lose quality).
    large: bool = False
    # diffusers loads a LoRA's weights for it (the pipeline's LoRA loader mixin takes them: FluxPipeline
    # the transformer and CLIP, Flux2Pipeline and Flux2KleinPipeline the transformer): the tokens of one
    # image (prompt) its layers see, from its config and the geometry; None: it takes no LoRA.
    lora_tokens: Callable[[dict, Geometry], int] | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.passes)

    def activation(self, stage: str, config: dict, inputs: Geometry, tiled: bool = False) -> int:
        """Bytes of one image's (prompt's) forward pass in `stage`, from the component's config as a dict."""
        return self.passes[stage](config, inputs, tiled)


@dataclass(frozen=True)
class Family:
    name: str  # "FLUX.1", "FLUX.2-dev", "FLUX.2-klein"
    pipeline: str  # the diffusers pipeline class, model_index.json's _class_name
    components: tuple[Component, ...]
    steps: int  # default --steps
    guidance: float  # default --guidance
    max_sequence_length: int  # default --max-sequence-length
    sample_size: int  # default height and width = sample_size x the VAE's scale factor (pipeline.default_sample_size)
    runs: bool  # the stages can run it; otherwise only --dry-run plans it
    # The most text tokens the pipeline takes: FluxPipeline refuses more than 512 (T5 was trained
    # on 512 tokens); Flux2Pipeline's default and the length its chat template pads to is 512.
    text_token_limit: int = 512
    # The multiple of tokens each prompt is padded to (FLUX.3: Flux3TextEncoderStep's pad_multiple, 80;
    # tests/test_flux3.py reads it from the installed diffusers); 1: the pipeline pads to
    # --max-sequence-length itself.
    text_window: int = 1
    # name -> shape of the embeddings its encode keeps (the handoff's tensors before denoise)
    encoded: Callable[[dict, int, int, bool], dict[str, tuple]] = _flux1_encoded
    # Those of `encoded` shared by every image, without a batch dimension (FLUX.1's text_ids).
    shared_tensors: tuple[str, ...] = ("text_ids",)
    # name -> shape of the encoded input images encode_image keeps (handoff.INPUT_PREFIX...)
    inputs_encoded: Callable[[dict, int, object], dict[str, tuple]] = _no_inputs
    # Guides with a second transformer pass on the empty prompt when the checkpoint is not
    # step-distilled and `guides` says so for --guidance (Flux2KleinPipeline's do_classifier_free_guidance:
    # above 1; FLUX.3 base's ClassifierFreeGuidance: any scale but 1).
    second_pass: bool = False
    guides: Callable[[float], bool] = _above_one
    # Whether --guidance reaches the pipeline: False where it has no guidance at all (FLUX.3 klein's
    # step-distilled flow map), and a --guidance other than the default is refused.
    guided: bool = True
    # A batch holds one prompt's images only: FLUX.3's encode pads each prompt to a window of its own
    # length, and the transformer attends to the padding, so prompts cannot share a batch without
    # changing pixels (the one-piece pipeline takes one prompt per call).
    prompt_batches: bool = False
    # The module in flux_sharded/stages/ with the family's side of the stages (what encode keeps,
    # what decode gives the VAE, why guidance is ignored): the key of stages.code.CODE.
    code: str = "flux1"
    # Its optional prompt upsampler (--upsample-prompt): a model of its own folder, not of the checkpoint
    # (never in `components`, `names` or `folders`), loaded by the upsample stage alone; None: it has none.
    upsampler: Component | None = None
    # Its components' config.json checks: bounds and the widths they share (the section above).
    config_checks: Callable[[Fields, Family, str, str, tuple[str, ...]], None] = _check_flux1_configs
    # The diffusers pipeline class that takes input images (--image) for this family's checkpoints,
    # and how many it takes; None and 0: the family takes none.
    image_pipeline: str | None = None
    max_images: int = 0
    # Whether the image pipeline takes a strength (how much of the input image is noised: image-to-image).
    strength: bool = False
    # The diffusers pipeline class that inpaints one input image under a --mask (it takes a strength),
    # None: the family does no inpainting; and whether it paints at the input image's own size (capped
    # and cut as its references are: reference_size) rather than at --height/--width.
    inpaint_pipeline: str | None = None
    inpaint_at_image_size: bool = False
    # How many reference images it takes beside the one it paints (klein's image_reference: a second --image).
    inpaint_references: int = 0
    # Its __call__'s default strength, an inpainting run's where --strength is not given
    # (tests/test_images.py reads them from the installed diffusers).
    inpaint_strength: float | None = None
    # Whether every run inpaints (an --image and a --mask): FLUX.1 Fill's transformer takes a mask at every step.
    needs_mask: bool = False
    # Whether the pipeline takes a negative prompt with true classifier-free guidance (true_cfg_scale).
    true_cfg: bool = False
    # The smallest side and the most elongated aspect ratio of an input image the image pipeline takes
    # (Flux2ImageProcessor.check_image_input's defaults for FLUX.2; tests/test_images.py reads them).
    min_image_side: int = 1
    max_image_aspect: float = float("inf")

    def check_configs(self, fields: Fields) -> None:
        """Raises CheckpointError (through `fields`) for a config outside this family's architecture."""
        stages = self.stage_components()
        (transformer,), (vae,) = stages["denoise"], stages["decode"]
        self.config_checks(fields, self, transformer, vae, stages["encode"])

    def component(self, name: str) -> Component:
        """One of its components, or its upsampler."""
        return next(component for component in (*self.components, *filter(None, [self.upsampler]))
                    if component.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(component.name for component in self.components)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folders of its text encoders, in component order."""
        return tuple(component.tokenizer for component in self.components if component.tokenizer)

    @property
    def folders(self) -> tuple[str, ...]:
        """Every folder of the family's pipeline in a checkpoint (model_index.json's keys), sorted."""
        return tuple(sorted((SCHEDULER, *self.names, *self.tokenizers)))

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The components a LoRA may carry weights for (Component.lora_tokens)."""
        return tuple(component.name for component in self.components if component.lora_tokens)

    @property
    def large_components(self) -> tuple[str, ...]:
        """What `--quantize METHOD` applies to (Component.large)."""
        return tuple(component.name for component in self.components if component.large)

    def stage_components(self) -> dict[str, tuple[str, ...]]:
        """Stage -> the components it loads, in stage order (upsample: the upsampler, if the family has one)."""
        every = (*self.components, *filter(None, [self.upsampler]))
        return {stage: tuple(c.name for c in every if stage in c.stages) for stage in STAGES}


FLUX_1 = Family(
    name="FLUX.1",
    pipeline="FluxPipeline",
    components=(
        Component("text_encoder", "transformers", "CLIPTextModel", {"encode": _clip},
                  tokenizer="tokenizer", tokenizer_files=BPE_FILES, lora_tokens=_clip_tokens),
        Component("text_encoder_2", "transformers", "T5EncoderModel", {"encode": _t5},
                  tokenizer="tokenizer_2", tokenizer_files=SENTENCEPIECE_FILES, large=True),
        Component("transformer", "diffusers", "FluxTransformer2DModel", {"denoise": _flux_transformer}, large=True,
                  lora_tokens=_transformer_tokens),
        Component("vae", "diffusers", "AutoencoderKL", {"encode_image": _vae_encode, "decode": _vae}),
    ),
    steps=28,  # FluxPipeline.__call__'s defaults, so that a bare run matches diffusers
    guidance=3.5,
    max_sequence_length=512,
    sample_size=128,
    runs=True,
    image_pipeline="FluxImg2ImgPipeline",  # image-to-image from one input image
    max_images=1,
    strength=True,
    inpaint_pipeline="FluxInpaintPipeline",
    inpaint_strength=0.6,
    true_cfg=True,
    inputs_encoded=_flux1_inputs,
)
# FLUX.1 Kontext (black-forest-labs/FLUX.1-Kontext-dev): FLUX.1-dev's components and shapes, run by
# FluxKontextPipeline, which edits one input image (optional) whose tokens join the transformer's
# sequence. Defaults are FluxKontextPipeline.__call__'s (28 steps, guidance 3.5).
FLUX_1_KONTEXT = dataclasses.replace(
    FLUX_1,
    name="FLUX.1-Kontext",
    pipeline="FluxKontextPipeline",
    components=tuple(
        dataclasses.replace(component, passes={"denoise": _kontext_transformer}, lora_tokens=_flux_kontext_tokens)
        if component.name == "transformer" else component for component in FLUX_1.components),
    code="kontext",
    image_pipeline="FluxKontextPipeline",
    max_images=1,
    strength=False,
    inpaint_pipeline=None,
    inputs_encoded=_kontext_inputs,
)
# FLUX.1 Fill (FluxFillPipeline, black-forest-labs/FLUX.1-Fill-dev): FLUX.1 with a transformer that
# also takes the masked image and the mask; it only inpaints (every run an --image and a --mask).
# Defaults are FluxFillPipeline.__call__'s: 50 steps, guidance 30, strength 1.
FLUX_1_FILL = dataclasses.replace(
    FLUX_1,
    name="FLUX.1-Fill",
    pipeline="FluxFillPipeline",
    steps=50,
    guidance=30.0,
    code="fill",
    image_pipeline="FluxFillPipeline",
    max_images=1,
    strength=False,  # a strength with the mask only: inpainting
    inpaint_pipeline="FluxFillPipeline",
    inpaint_strength=1.0,
    needs_mask=True,
    true_cfg=False,  # FluxFillPipeline has no negative prompt
    inputs_encoded=_fill_inputs,
)
FLUX_2_DEV = Family(
    name="FLUX.2-dev",
    pipeline="Flux2Pipeline",
    components=(
        Component("text_encoder", "transformers", "Mistral3ForConditionalGeneration",
                  {"encode": _decoder_text_encoder("Flux2Pipeline")}, truncated=True, tokenizer="tokenizer",
                  tokenizer_files=BPE_FILES, chat_template=True, large=True),
        Component("transformer", "diffusers", "Flux2Transformer2DModel", {"denoise": _flux2_transformer}, large=True,
                  lora_tokens=_flux2_transformer_tokens),
        Component("vae", "diffusers", "AutoencoderKLFlux2", {"encode_image": _vae_encode, "decode": _vae}),
    ),
    steps=50,  # Flux2Pipeline.__call__'s defaults
    guidance=4.0,
    max_sequence_length=512,
    sample_size=128,
    runs=True,
    encoded=_flux2_encoded,
    shared_tensors=(),
    code="flux2",
    config_checks=_check_flux2_configs,
    image_pipeline="Flux2Pipeline",  # reference images (image=[...])
    max_images=10,  # the references FLUX.2-dev is made for (BFL's model card); diffusers sets no limit
    min_image_side=64,
    max_image_aspect=8,
    inputs_encoded=_flux2_inputs,
)
FLUX_2_KLEIN = Family(
    name="FLUX.2-klein",
    pipeline="Flux2KleinPipeline",
    components=(
        Component("text_encoder", "transformers", "Qwen3ForCausalLM",
                  {"encode": _decoder_text_encoder("Flux2KleinPipeline")}, truncated=True, tokenizer="tokenizer",
                  tokenizer_files=BPE_FILES, chat_template=True, large=True),
        Component("transformer", "diffusers", "Flux2Transformer2DModel", {"denoise": _flux2_transformer}, large=True,
                  lora_tokens=_flux2_transformer_tokens),
        Component("vae", "diffusers", "AutoencoderKLFlux2", {"encode_image": _vae_encode, "decode": _vae}),
    ),
    # The published klein checkpoints are step-distilled for 4 steps (BFL's README, the model
    # cards); Flux2KleinPipeline's code default is 50. Guidance is ignored when is_distilled.
    steps=4,
    guidance=1.0,
    max_sequence_length=512,
    sample_size=128,
    runs=True,
    encoded=_flux2_encoded,
    shared_tensors=(),
    second_pass=True,
    code="flux2",
    config_checks=_check_flux2_configs,
    image_pipeline="Flux2KleinPipeline",  # reference images (image=[...])
    inpaint_pipeline="Flux2KleinInpaintPipeline",
    inpaint_at_image_size=True,  # __call__'s step 2 takes the input image's size
    inpaint_references=1,
    inpaint_strength=0.8,
    max_images=4,  # klein's multi-reference editing (BFL's model card); diffusers sets no limit
    min_image_side=64,
    max_image_aspect=8,
    inputs_encoded=_flux2_inputs,
)
# FLUX.3 klein (FLUX 3 Image Klein): diffusers 0.42.1 runs it only through its modular pipelines
# (modular_pipelines/flux3), whose blocks the stages run (stages/flux3.py). Defaults
# are the blocks' own: the step-distilled "flow map" checkpoint 16 steps without guidance, the base
# checkpoint 50 steps with classifier-free guidance on an empty negative prompt (scale 3.5). The
# encode right-pads each prompt to a multiple of 80 tokens up to max_sequence_length (8192 in
# diffusers): flux-sharded plans 640 (8 x 80, so a prompt of up to 640 tokens is padded exactly as
# diffusers pads it), and --max-sequence-length up to 8192 plans longer ones.
_FLUX_3_COMPONENTS = (
    Component("text_encoder", "transformers", "Qwen3VLForConditionalGeneration",
              {"encode": _decoder_text_encoder("Flux3ModularPipeline")}, truncated=True, tokenizer="tokenizer",
              tokenizer_files=BPE_FILES, chat_template=True, large=True),  # add_generation_prompt=True
    # a LoRA's layers see text + image (+ reference) tokens in the single blocks, as FLUX.2's do
    Component("transformer", "diffusers", "Flux3Transformer2DModel", {"denoise": _flux3_transformer}, large=True,
              lora_tokens=_flux2_transformer_tokens),
    Component("vae", "diffusers", "AutoencoderKLFlux2", {"encode_image": _vae_encode, "decode": _vae}),
)
# The prompt upsampler (black-forest-labs/flux-3-image-klein-pup, a Qwen3.5-9B fine-tune): its folder holds
# the model's config.json and weights and its processor (tokenizer, chat template); diffusers' blocks name
# the two components prompt_upsampler and prompt_upsampler_processor (modular_pipelines/flux3/prompt_upsampler.py).
FLUX_3_UPSAMPLER = Component("prompt_upsampler", "transformers", "Qwen3_5ForConditionalGeneration",
                             {"upsample": _upsampler}, tokenizer="prompt_upsampler_processor",
                             tokenizer_files=BPE_FILES, chat_template=True)
FLUX_3_KLEIN = Family(
    name="FLUX.3-klein",
    pipeline="Flux3DistilledModularPipeline",
    components=_FLUX_3_COMPONENTS,
    steps=16,  # Flux3DistilledAutoBlocks' denoise default
    guidance=0.0,  # no classifier-free guidance: the flow map jumps to target_timestep each step
    max_sequence_length=640,
    sample_size=128,  # 1024x1024, the blocks' default size
    runs=True,
    text_token_limit=8192,
    text_window=80,
    encoded=_flux3_encoded,
    shared_tensors=(),
    code="flux3",
    config_checks=_check_flux3_configs,
    guided=False,
    prompt_batches=True,
    image_pipeline="Flux3DistilledModularPipeline",  # reference images: the auto blocks' vae_encoder block
    max_images=10,  # Flux3AutoBlocks' own limit (its docstring: "at most 10")
    inputs_encoded=_flux3_inputs,
    upsampler=FLUX_3_UPSAMPLER,
)
FLUX_3_KLEIN_BASE = dataclasses.replace(
    FLUX_3_KLEIN,
    name="FLUX.3-klein-base",
    pipeline="Flux3ModularPipeline",
    image_pipeline="Flux3ModularPipeline",
    steps=50,  # Flux3AutoBlocks' denoise default
    guidance=3.5,  # the guider's default scale (BFL's README says 4)
    second_pass=True,
    guides=_cfg_enabled,
    guided=True,
)
FAMILIES = {family.pipeline: family for family in (FLUX_1, FLUX_1_KONTEXT, FLUX_1_FILL, FLUX_2_DEV, FLUX_2_KLEIN,
                                                   FLUX_3_KLEIN, FLUX_3_KLEIN_BASE)}
# Every folder any family's pipeline reads (what a hub download fetches, what the weights' fingerprint covers).
PIPELINE_FOLDERS = tuple(sorted({folder for family in FAMILIES.values() for folder in family.folders}))

# FLUX.1-schnell is a FLUX.1 whose transformer has no guidance embedding (config guidance_embeds
# false): timestep-distilled, it is run with 4 steps, guidance 0 and 256 T5 tokens (its model card,
# diffusers' FLUX.1-schnell example); FluxPipeline's own defaults (28 steps) would be 7x slower.
FLUX_1_SCHNELL_DEFAULTS = {"steps": 4, "guidance": 0.0, "max_sequence_length": 256}

# A FLUX.2-klein that is not step-distilled (model_index.json is_distilled false, the "base"
# checkpoints) guides with a second pass and needs the full schedule: Flux2KleinPipeline.__call__'s
# own defaults (tests/test_families.py reads them from the installed diffusers).
FLUX_2_KLEIN_BASE_DEFAULTS = {"steps": 50, "guidance": 4.0, "max_sequence_length": 512}
# The checkpoints whose defaults differ from their family's, as --help names them.
VARIANT_DEFAULTS = {"FLUX.1-schnell": FLUX_1_SCHNELL_DEFAULTS, "klein not distilled": FLUX_2_KLEIN_BASE_DEFAULTS}


def generation_defaults(family: Family, transformer_config: dict, distilled: bool = True) -> dict[str, int | float]:
    """--steps, --guidance and --max-sequence-length where the user gives none: the family's, or
    FLUX_1_SCHNELL_DEFAULTS for a FLUX.1 transformer without a guidance embedding, or
    FLUX_2_KLEIN_BASE_DEFAULTS for a klein whose model_index.json says is_distilled false
    (`distilled`, checkpoint.Checkpoint.is_distilled)."""
    if family is FLUX_1 and transformer_config.get("guidance_embeds") is False:
        return dict(FLUX_1_SCHNELL_DEFAULTS)
    if family is FLUX_2_KLEIN and not distilled:
        return dict(FLUX_2_KLEIN_BASE_DEFAULTS)
    return {"steps": family.steps, "guidance": family.guidance, "max_sequence_length": family.max_sequence_length}


def supported(last: str = "and") -> str:
    """'FluxPipeline (FLUX.1), Flux2Pipeline (FLUX.2-dev) and Flux2KleinPipeline (FLUX.2-klein)'"""
    named = [f"{family.pipeline} ({family.name})" for family in FAMILIES.values()]
    return ", ".join(named[:-1]) + f" {last} " + named[-1]


def family_for(pipeline: object, model: str) -> Family:
    """The family of model_index.json's `_class_name`; raises CheckpointError naming the supported ones."""
    family = FAMILIES.get(pipeline) if isinstance(pipeline, str) else None
    if family is None:
        raise CheckpointError(
            f"--model: '{model}' holds a {pipeline}, not a {supported('or')}, the pipelines flux-sharded supports "
            "(model_index.json '_class_name'); give a checkpoint of one of those"
        )
    return family


def family_of(config_root: Path) -> Family:
    """The family of the checkpoint (or shipped config folder) at `config_root`; raises OSError or
    ValueError (safe_read's) for a model_index.json that cannot be read."""
    index = parse_json(read_regular_file(Path(config_root) / "model_index.json", MAX_CONFIG_BYTES).decode("utf-8"))
    return family_for(index.get("_class_name") if isinstance(index, dict) else None, str(config_root))


# diffusers' modular pipelines and the blocks they run (FLUX.3 has no one-piece pipeline class).
MODULAR_PIPELINES = {"Flux3ModularPipeline": "Flux3AutoBlocks",
                     "Flux3DistilledModularPipeline": "Flux3DistilledAutoBlocks"}


@functools.lru_cache(maxsize=None)
def encode_out_layers(pipeline: str) -> tuple[int, ...]:
    """The hidden states FLUX.2's encode stacks into the prompt embeddings: the pipeline's
    `text_encoder_out_layers` (Flux2Pipeline: (10, 20, 30); Flux2KleinPipeline: (9, 18, 27)), read
    from the installed diffusers' public __call__ signature, which passes them on to
    `_get_mistral_3_small_prompt_embeds` / `_get_qwen3_prompt_embeds` as hidden_states_layers."""
    import inspect

    import diffusers

    if pipeline in MODULAR_PIPELINES:
        # FLUX.3: the text_encoder block's own input default ((4, 8, ..., 32) in diffusers 0.42.1)
        blocks = getattr(diffusers.modular_pipelines, MODULAR_PIPELINES[pipeline])()
        inputs = {param.name: param.default for param in blocks.sub_blocks["text_encoder"].inputs}
        return tuple(inputs["text_encoder_out_layers"])
    return tuple(inspect.signature(getattr(diffusers, pipeline).__call__).parameters["text_encoder_out_layers"].default)


def encode_layers(pipeline: str) -> int:
    """How many decoder layers of the text encoder FLUX.2's encode needs: the deepest of
    encode_out_layers. The encode stacks `hidden_states[k]` for those k; hidden_states[0] is the
    token embeddings and hidden_states[k] the output of decoder layer k, which a causal decoder
    computes from layers 1..k alone."""
    return max(encode_out_layers(pipeline))
