"""Estimated peak activation bytes of each component's forward pass, for one image.

Weights are counted exactly by `components.module_sizes`; activations are not in any config, so
these formulas count the tensors alive at each forward pass's peak. Every formula was checked on
the CPU against `memory.TensorBytesTracker` (exact bytes of the tensors a forward pass creates)
on tiny and larger random checkpoints: tests/test_activations.py keeps each estimate (margin
included) within [measured, 1.6 x measured]; benchmarks/activations.py prints the ratios.
Symbols: b = bytes per element of the dtype, S = tokens, D = width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# CUDA's caching allocator rounds every block up and fragments; kernels take workspaces (cuBLAS,
# cuDNN, attention). The tracker sees none of that, so each estimate gets this margin. It is a
# judgement until it is measured on a GPU (benchmarks/RESULTS.md records that comparison).
ACTIVATION_MARGIN = 1.15
FLOAT32_BYTES = 4
INT64_BYTES = 8


class Geometry(Protocol):
    """What an activation estimate reads of a run (plan.PlanInputs provides it): the compute dtype,
    the image size in pixels, the text tokens and the VAE's scale factor."""

    dtype: "torch.dtype"
    height: int
    width: int
    max_sequence_length: int
    vae_scale_factor: int
    input_sizes: tuple[tuple[int, int], ...]  # (height, width) of each input image as the VAE encodes it
    upsample_prompt_tokens: int  # the most tokens the prompt upsampler's request takes (families.upsample_prompt_tokens)
    upsample_max_tokens: int  # the most tokens it generates (--upsample-max-tokens)


def _with_margin(nbytes: float) -> int:
    return int(nbytes * ACTIVATION_MARGIN)


def image_tokens(height: int, width: int, vae_scale_factor: int) -> int:
    """Packed latent tokens: the VAE divides each side by its factor, then 2x2 patches are packed."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def transformer_activation_bytes(config: dict, height: int, width: int, vae_scale_factor: int,
                                 sequence_length: int, dtype_bytes: int, reference_tokens: int = 0) -> int:
    """FluxTransformer2DModel forward, peak inside a single-stream block, plus the loop's tensors.

    With S = image + text tokens and D = heads x head_dim, the single block holds at its peak
    about 13 S x D tensors in the model dtype (norm output; MLP hidden and its GELU, 4 D each;
    q, k, v and the rotary-embedded q, k; attention output; the 5 D concatenation) and 10 bytes
    per S x D of float32 temporaries (q/k RMS norms upcast, rotary tables). Measured ratio peak /
    (S x D x b): 15.3 in float32, 17.5 in bfloat16; the formula gives 15.5 and 18.
    The denoising loop adds the latents, the noise prediction and the stepped latents
    (3 x image tokens x in_channels) and the T5 embeddings (text tokens x joint_attention_dim).
    FLUX.1 Kontext's input image adds its packed tokens to S (FluxKontextPipeline concatenates them
    to the latents for every forward pass) and, kept for the loop, to the latents.
    """
    tokens_image = image_tokens(height, width, vae_scale_factor)
    tokens = tokens_image + sequence_length + reference_tokens
    width_model = config["num_attention_heads"] * config["attention_head_dim"]
    block = tokens * width_model * (13 * dtype_bytes + 10)
    loop = ((3 * tokens_image + reference_tokens) * config["in_channels"]
            + sequence_length * config["joint_attention_dim"]) * dtype_bytes
    return _with_margin(block + loop)


def text_encoder_activation_bytes(config: dict, sequence_length: int, dtype_bytes: int) -> int:
    """CLIP or T5 encoder forward: the larger of its attention and feed-forward phases.

    Attention: the scores, the scores plus T5's relative-position bias and their softmax (3 x heads
    x S x S in the model dtype), T5's relative-position bucket computation (up to 4 S x S int64
    tensors), and q, k, v and the hidden states (4 S x d). The bucket tensors and the scores do not
    always coexist, so this sum is an upper bound: 1.1-1.6 x the measured peak before the margin on
    T5s of width 32 to 1024 at 128-512 tokens. For T5-XXL at 512 tokens it is 0.13 GB, next to
    9.5 GB of weights. Feed-forward: the hidden states and three d_ff-wide tensors (T5's gated
    GELU: wi_0, wi_1 and their product).
    """
    heads = config.get("num_heads") or config["num_attention_heads"]
    width = config.get("d_model") or config["hidden_size"]
    feed_forward = config.get("d_ff") or config["intermediate_size"]
    attention = (
        3 * heads * sequence_length**2 * dtype_bytes
        + 4 * sequence_length**2 * INT64_BYTES
        + 4 * sequence_length * width * dtype_bytes
    )
    mlp = sequence_length * (width + 3 * feed_forward) * dtype_bytes
    return _with_margin(max(attention, mlp))


def vae_decode_activation_bytes(config: dict, height: int, width: int, dtype_bytes: int) -> int:
    """AutoencoderKL.decode: the last up block, at full resolution, dominates.

    Its first ResNet receives the previous block's output upsampled to H x W, with C1 =
    block_out_channels[1] channels, and turns it into C0 = block_out_channels[0]. At its peak it
    holds either the input, its GroupNorm and its SiLU (3 C1), or the input and four C0-wide
    tensors (C1 + 4 C0), whichever is larger. Measured on five VAEs (C0, C1 from 8, 8 to 64, 256):
    exactly H x W x b x max(3 C1, C1 + 4 C0). FLUX.1 (128, 256): 768 x b bytes per pixel, so 1.61 GB at
    1024x1024 in bf16 before the margin.
    """
    channels = config["block_out_channels"]
    first = channels[0]
    upsampled = channels[1] if len(channels) > 1 else channels[0]
    return _with_margin(height * width * dtype_bytes * max(3 * upsampled, upsampled + 4 * first))


def vae_encode_activation_bytes(config: dict, height: int, width: int, dtype_bytes: int, tiled: bool = False) -> int:
    """AutoencoderKL.encode of one H x W image (and its latent distribution's sample): the first
    down block, at full resolution, dominates. With C0 = block_out_channels[0], a ResNet there holds
    its input, its GroupNorm, its SiLU and its convolution's output at once: 4 C0 x H x W, plus the
    preprocessed image (3 channels). Measured with memory.TensorBytesTracker on five VAEs (C0 from 8
    to 128, one or two layers per block, float32 and bfloat16): exactly 4 C0 x H x W x b besides
    the input. FLUX.1 (C0 = 128) at 1024x1024 in bf16: 1.07 GB before the margin.

    tiled (diffusers' `enable_tiling`, AutoencoderKL.tiled_encode): one sample_size tile at a time,
    plus each tile's moments (2 x latent_channels at 1/f of the tile) kept until blended and the
    result; an image no larger than one tile is not tiled by diffusers.
    """
    tile = config["sample_size"]
    if tiled and (height > tile or width > tile):
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        stride = int(tile * (1 - VAE_TILE_OVERLAP_FACTOR))
        tiles = math.ceil(height / stride) * math.ceil(width / stride)
        moments = 2 * config["latent_channels"]
        kept = (tiles * (tile // factor) ** 2 + 2 * (height // factor) * (width // factor)) * moments * dtype_bytes
        return vae_encode_activation_bytes(config, tile, tile, dtype_bytes) + _with_margin(kept)
    return _with_margin(height * width * dtype_bytes * (4 * config["block_out_channels"][0] + 3))


# diffusers' AutoencoderKL tiling (autoencoder_kl.py, enable_tiling / tiled_decode): latent tiles
# of sample_size / 2**(len(block_out_channels) - 1), overlapping by a quarter.
VAE_TILE_OVERLAP_FACTOR = 0.25


def vae_tiled_decode_activation_bytes(config: dict, height: int, width: int, dtype_bytes: int) -> int:
    """AutoencoderKL.tiled_decode (after `vae.enable_tiling()`): one tile's decode at a time, plus
    every decoded tile (kept until they are blended), the blended rows and the output.

    A tile is config["sample_size"] pixels square (FLUX.1: 1024); tiles start every 3/4 of a tile.
    An image no larger than one tile is not tiled by diffusers: the untiled estimate then. FLUX.1
    at 4096x4096 in bf16: 36 tiles, 1.85 GB for one tile's decode + 0.43 GB of tiles and output,
    against 29.6 GB untiled.
    """
    tile = config["sample_size"]
    if height <= tile and width <= tile:
        return vae_decode_activation_bytes(config, height, width, dtype_bytes)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latent_tile = int(tile / factor)
    stride = int(latent_tile * (1 - VAE_TILE_OVERLAP_FACTOR))
    tiles = math.ceil((height // factor) / stride) * math.ceil((width // factor) / stride)
    channels = config.get("out_channels", 3)
    kept = (tiles * tile * tile + 2 * height * width) * channels * dtype_bytes
    return vae_decode_activation_bytes(config, tile, tile, dtype_bytes) + _with_margin(kept)


def flux2_transformer_activation_bytes(config: dict, height: int, width: int, vae_scale_factor: int,
                                       sequence_length: int, dtype_bytes: int, reference_tokens: int = 0) -> int:
    """Flux2Transformer2DModel forward (FLUX.2-dev, klein), peak inside a single-stream block, plus
    the loop's tensors. An estimate, derived like the FLUX.1 one and checked the same way.

    FLUX.2's latents are 2x2-patchified by the pipeline, so the image tokens are those of FLUX.1's
    packing: (H / 2f) x (W / 2f). With S = image + text tokens and D = heads x head_dim, the single
    block's fused projection gives q, k, v and the SwiGLU input (3 D + 2 x mlp_ratio D = 9 D), then
    the RMS-normed, rotary-embedded q and k, the SwiGLU output (3 D), the attention output, the
    4 D concatenation and the block output: about 20 S x D tensors in the model dtype, plus 8 bytes
    per S x D of float32 temporaries (q/k RMS norms upcast, rotary tables). Measured with
    memory.TensorBytesTracker on scaled-down random transformers (widths 128-256, 640-1536 tokens,
    CPU flash attention: no S x S scores): peak / (S x D x b) = 21.7 in float32, 22.3-23.1 in
    bfloat16; the formula gives 22 and 24, 1.16-1.25 x measured with the margin (tests/test_families.py
    keeps it within 1.0-1.6 x). The denoising loop adds the latents, the noise prediction and the
    stepped latents (3 x image tokens x in_channels) and the prompt embeddings (text tokens x
    joint_attention_dim). FLUX.2-dev at 1024x1024 and 512 tokens in bf16: 1.4 GB before the margin.
    Reference images (image=[...]) add their packed tokens to S (the pipeline concatenates them to the
    latents for every forward pass) and, held for the whole loop, to the latents (reference tokens x
    in_channels).
    """
    tokens_image = image_tokens(height, width, vae_scale_factor)
    tokens = tokens_image + sequence_length + reference_tokens
    width_model = config["num_attention_heads"] * config["attention_head_dim"]
    block = tokens * width_model * (20 * dtype_bytes + 8)
    loop = ((3 * tokens_image + reference_tokens) * config["in_channels"]
            + sequence_length * config["joint_attention_dim"]) * dtype_bytes
    return _with_margin(block + loop)


def flux3_transformer_activation_bytes(config: dict, height: int, width: int, vae_scale_factor: int,
                                       sequence_length: int, dtype_bytes: int, reference_tokens: int = 0) -> int:
    """Flux3Transformer2DModel forward (FLUX.3 klein, base and distilled), peak inside a joint
    single block, plus the loop's tensors. An estimate, derived like the FLUX.2 one and checked the
    same way.

    With S = text + image + reference tokens and D = heads x head_dim: FLUX.3 modulates per token,
    so every token keeps its early and single-block modulations (2 x 3 D) for the whole forward; a
    single block holds the normed inputs and their concatenation, q, k, v, the SwiGLU input (2 x
    mlp_ratio D = 6 D) and output (3 D), the attention output and the sum: about 25 S x D tensors in
    the model dtype, plus 8 bytes per S x D of float32 temporaries (the q/k RMS norms are kept in
    float32, rotary tables). Measured with memory.TensorBytesTracker on scaled-down random
    transformers (widths 128-256, 384-1264 tokens, with and without reference tokens, CPU flash
    attention: no S x S scores): peak / (S x D x b) = 24.3-26.4; the formula gives 27 in float32 and
    29 in bfloat16 before the margin (tests/test_families.py keeps it within 1.0-1.6 x). The loop
    adds the latents, the noise prediction and the stepped latents (3 x image tokens x in_channels)
    and the prompt embeddings (text tokens x joint_attention_dim). The per-mode blocks attend within
    one mode and hold less. FLUX.3 at 1024x1024 with 640 text tokens in bf16: 0.87 GB before the margin.
    """
    tokens_image = image_tokens(height, width, vae_scale_factor)
    tokens = tokens_image + sequence_length + reference_tokens
    width_model = config["num_attention_heads"] * config["attention_head_dim"]
    block = tokens * width_model * (25 * dtype_bytes + 8)
    loop = (3 * tokens_image * config["in_channels"] + sequence_length * config["joint_attention_dim"]) * dtype_bytes
    return _with_margin(block + loop)


def decoder_text_encoder_activation_bytes(text_config: dict, sequence_length: int, dtype_bytes: int,
                                          layers: int) -> int:
    """A decoder-only language model (Mistral, Qwen3) run as FLUX.2's text encoder: a forward pass
    over `layers` decoder layers with output_hidden_states=True. An estimate.

    Every hidden state stays alive until the pipeline stacks the ones it uses: (layers + 1) x S x D.
    On top, the larger of one layer's phases: the gated MLP (gate, up, their SiLU product and the
    down projection's input: 3 x S x intermediate_size, plus 4 S x D for the residual, the norm
    output and its float32 upcast) or the attention (heads x S x S scores and their softmax, as
    an eager or math-kernel attention would hold them, which flash kernels do not), plus the
    S x S mask. Measured with memory.TensorBytesTracker on random cut Qwen3 and Mistral models
    (width 64-256, 128-512 tokens, float32 and bfloat16, CPU): the formula is 1.05-1.15 x the
    measured peak before the margin (tests/test_families.py). The CPU's flash attention never
    holds the scores, so that term is unmeasured here; in the real encoders the MLP phase is the
    larger one anyway. FLUX.2-dev's Mistral at 512 tokens in bf16: 0.16 GB of hidden states + 0.12 GB,
    next to 34.7 GB of weights. The logits are not counted: the encode does not compute them
    (components.encode_only).
    """
    width = text_config["hidden_size"]
    heads = text_config["num_attention_heads"]
    kept = (layers + 1) * sequence_length * width * dtype_bytes
    mlp = sequence_length * (3 * text_config["intermediate_size"] + 4 * width) * dtype_bytes
    attention = 2 * heads * sequence_length**2 * dtype_bytes + 4 * sequence_length * width * dtype_bytes
    mask = sequence_length**2 * dtype_bytes
    return _with_margin(kept + max(mlp, attention) + mask)


def adapter_activation_bytes(shapes: list[tuple[str, list[tuple[int, ...]]]], tokens: int, dtype_bytes: int) -> int:
    """What unfused LoRA adapters add to a component's activation peak, per image (prompt): PEFT's
    LoRA layer computes `result + lora_B(lora_A(x)) * scaling` after the base layer, so beside the
    base output it briefly holds lora_A's (S x rank) and two tensors of the layer's output width
    (lora_B's output, then it scaled) before the sum replaces the base output; the largest wrapped
    layer sets the peak (one adapter at a time: the next starts once the sum is made). `shapes`:
    [(module, [lora_A (rank, in), lora_B (out, rank), ...])] (plan._Components.adapter_shapes)."""
    largest = 0
    for _, tensors in shapes:
        matrices = [shape for shape in tensors if len(shape) == 2]
        if matrices:  # lora_B is (out, rank): the largest first dimension; the rank, the smallest side
            out, rank = max(shape[0] for shape in matrices), max(min(shape) for shape in matrices)
            largest = max(largest, (rank + 2 * out) * tokens)
    return _with_margin(largest * dtype_bytes) if largest else 0


# The chunk of transformers' gated-delta-rule kernels (torch_chunk_gated_delta_rule's and
# flash-linear-attention's default): the linear-attention layers' prefill holds chunk x chunk scores.
LINEAR_ATTENTION_CHUNK = 64


def upsampler_generation_bytes(text_config: dict, prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """FLUX.3's prompt upsampler (a Qwen3.5 decoder: gated-delta-net linear-attention layers and, every
    few layers, full-attention ones; its config's layer_types) generating up to `new_tokens` tokens
    greedily after a prompt of `prompt_tokens` (generate with its cache, one request at a time). An
    estimate, with the margin.

    - The cache at its fullest (prompt + new tokens): each full-attention layer's keys and values
      (2 x num_key_value_heads x head_dim per token, in the dtype); each linear-attention layer's
      recurrent state (value heads x key head dim x value head dim) in float32 and its convolution
      state (the conv width x kernel), whatever the length.
    - On top, the largest phase of the prefill over the prompt's P tokens: the gated MLP (3 x P x
      intermediate_size + 4 P x D, as decoder_text_encoder_activation_bytes counts it), a
      full-attention layer's scores (2 x heads x P^2, as an eager kernel holds them), or a
      linear-attention layer: its projections (P x (conv width + value width) in the dtype, twice:
      before and after the convolution), the kernel's float32 copies of queries, keys and values
      (5: cast, repeated over the value heads, padded, scaled, beta-weighted) and its chunk x chunk
      matrices per value head (4: scores, mask, decay, solve).
    - The last position's logits in float32 (vocab_size), twice (the logits and the greedy choice's).
    The hidden states are not kept (no output_hidden_states). Checked with memory.TensorBytesTracker
    on random small Qwen3.5 models on the CPU (tests/test_upsample.py); the real model's kernels
    (flash-linear-attention, flash attention) hold less than the reference ones counted here.
    """
    width, layers = text_config["hidden_size"], text_config["num_hidden_layers"]
    types = text_config.get("layer_types") or ["full_attention"] * layers
    full, linear = types.count("full_attention"), types.count("linear_attention")
    heads, kv_heads = text_config["num_attention_heads"], text_config["num_key_value_heads"]
    head_dim = text_config.get("head_dim") or width // heads
    key_heads, value_heads = text_config.get("linear_num_key_heads", 0), text_config.get("linear_num_value_heads", 0)
    key_dim, value_dim = text_config.get("linear_key_head_dim", 0), text_config.get("linear_value_head_dim", 0)
    kernel = text_config.get("linear_conv_kernel_dim", 0)
    conv_width = 2 * key_heads * key_dim + value_heads * value_dim
    tokens = prompt_tokens + new_tokens
    cache = (full * 2 * kv_heads * head_dim * tokens * dtype_bytes
             + linear * (value_heads * key_dim * value_dim * 4 + conv_width * kernel * dtype_bytes))
    prompt = prompt_tokens
    mlp = prompt * (3 * text_config["intermediate_size"] + 4 * width) * dtype_bytes
    attention = (2 * heads * prompt**2 + 4 * prompt * width) * dtype_bytes if full else 0
    linear_phase = (prompt * 2 * (conv_width + value_heads * value_dim) * dtype_bytes
                    + prompt * value_heads * (5 * (2 * key_dim + value_dim) + 4 * LINEAR_ATTENTION_CHUNK) * 4
                    if linear else 0)
    logits = 2 * text_config["vocab_size"] * 4
    return _with_margin(cache + max(mlp, attention, linear_phase) + logits)
