"""Build a complete small random FLUX checkpoint offline, in the diffusers folder layout.

    python -m flux_sharded.tiny DIR [--family FLUX.1|FLUX.1-Fill|FLUX.2-klein|FLUX.2-dev|FLUX.3-klein|FLUX.3-klein-base]
                                [--preset tiny|small|mini]
                                [--vae-scale-factor 8] [--seed 0]
    python -m flux_sharded.tiny DIR --family FLUX.3-upsampler [--seed 0]   (FLUX.3's prompt upsampler)

Every component has the real classes of FLUX.1-dev, with its configs scaled down: transformer,
CLIP and T5 text encoders, a VAE whose downsampling factor is 2 ** (number of blocks - 1), the
FLUX.1-dev scheduler, and tokenizers trained on the spot (a BPE for CLIP, learnt here, and a
unigram model for T5 with `sentencepiece`). Weights are random but seeded and the tokenizers are
trained deterministically, so the same seed writes byte-identical files. Presets: "tiny" (under
1 MB, for tests), "small" (a few MB, wide enough for activation measurements), "mini" (FLUX.1-dev's
proportions at about 1.2 GB, for benchmarks),
and "flux-dev" / "flux-schnell": the real architectures from the configs shipped in this package,
with random weights (33 GB in bf16: build them on a GPU machine, `--device cuda --dtype bfloat16`);
"klein-4b" / "klein-9b" likewise build FLUX.2-klein's real shapes (16 GB / 35 GB in bf16), and
"flux3-klein" / "flux3-klein-base" FLUX.3 klein's as the shipped configs reconstruct them (20 GB). A real
shape is counted on meta first (`real_shape_bytes`) and refused when its device has less free memory.

`--family FLUX.2-klein` / `FLUX.2-dev` (preset tiny only) builds what Flux2KleinPipeline /
Flux2Pipeline.from_pretrained load: a random Qwen3ForCausalLM with a byte-level BPE Qwen2 tokenizer
and a Qwen3-style chat template, or a random Mistral3ForConditionalGeneration with such a tokenizer
and Mistral's chat markup (_mistral_tokenizer says why not a PixtralProcessor); a
Flux2Transformer2DModel and an AutoencoderKLFlux2 whose batch-norm statistics are random too (so
that decoding without them would give other pixels). The text
encoders are 16 wide but as deep as the pipeline's encode reads (families.encode_layers: 27 for
klein, 30 for dev) plus two layers the encode must not need. klein is built step-distilled
(`is_distilled`, as the published klein checkpoints) unless `distilled=False`.

`--family FLUX.3-klein` / `FLUX.3-klein-base` (preset tiny only) builds what diffusers' FLUX.3
modular pipelines load (build_tiny_flux3_checkpoint): the step-distilled "flow map" or the base
transformer, a Qwen3-VL text encoder deep enough for the encode's deepest stacked layer, and a
Qwen3VLProcessor folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "a an the photo painting drawing portrait of dog cat bird horse fox tree house car boat river "
    "mountain city street forest sky sun moon night day red green blue yellow white black small big "
    "old young happy sitting running flying on in under over with and by near beautiful bright dark "
    "watercolor oil sketch cinematic lighting detailed sharp soft warm cold light shadow"
).split()



@dataclass(frozen=True)
class Shape:
    """The dimensions of one preset. T5's d_model is the transformer's joint_attention_dim, CLIP's
    hidden size its pooled_projection_dim, and it sees 4 x the VAE's latent channels (2x2 packing)."""

    t5_width: int
    t5_feed_forward: int
    t5_heads: int
    t5_layers: int
    clip_width: int
    clip_feed_forward: int
    clip_heads: int
    clip_layers: int
    heads: int
    head_dim: int
    double_blocks: int
    single_blocks: int
    latent_channels: int
    vae_channels: tuple[int, int]  # block_out_channels[0] and the rest
    vae_layers_per_block: int
    vae_groups: int


PRESETS = {
    "tiny": Shape(32, 37, 4, 2, 32, 37, 4, 2, 2, 16, 2, 2, 4, (8, 8), 1, 4),
    "small": Shape(128, 320, 4, 2, 64, 128, 4, 2, 4, 32, 1, 2, 16, (16, 48), 1, 8),
    # FLUX.1-dev divided by 4 in width and depth (heads 24 -> 6, blocks 19/38 -> 5/10), T5 and
    # CLIP likewise; the VAE at FLUX.1's own channel widths / 2.
    "mini": Shape(1024, 2560, 16, 6, 192, 768, 3, 3, 6, 128, 5, 10, 16, (64, 256), 2, 32),
}


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(600)]


def _clip_tokenizer(corpus: list[str]):
    """A CLIP BPE (end-of-word suffix "</w>", like openai/clip-vit-large-patch14) learnt from `corpus`.

    Trained here rather than with `tokenizers`' BpeTrainer: that one numbers the alphabet in hash
    order and breaks ties between equally frequent pairs by those numbers, so two builds with the
    same seed wrote different tokenizers (and so different pixels). Here ties go to the first pair
    in string order, and the same corpus always gives the same file."""
    from transformers import CLIPTokenizer

    specials, suffix = ["<|startoftext|>", "<|endoftext|>"], "</w>"
    counts = Counter(word for line in corpus for word in line.lower().split())
    words = {word: [*word[:-1], word[-1] + suffix] for word in sorted(counts)}
    vocab = [*specials, *sorted({symbol for symbols in words.values() for symbol in symbols})]
    merges = _learn_merges(counts, words, vocab, vocab_size=400)
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(vocab)}, merges=merges, model_max_length=77)


def _learn_merges(counts: Counter, words: dict[str, list[str]], vocab: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges learnt from word `counts` (each word split into `words`' symbols), appended to
    `vocab` (in place) until it has vocab_size entries; ties go to the first pair in string order."""
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:  # every word is one symbol: nothing left to merge
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        if best[0] + best[1] not in vocab:
            vocab.append(best[0] + best[1])
        for word, symbols in words.items():
            merged, position = [], 0
            while position < len(symbols):
                if tuple(symbols[position : position + 2]) == best:
                    merged.append(best[0] + best[1])
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            words[word] = merged
    return merges


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPEs (Qwen2, Mistral's Tekken) use
    for their vocabularies: printable ASCII and Latin-1 bytes stand for themselves, the rest are
    shifted past 255 (a space becomes "Ġ")."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in kept]
    return {**{byte: chr(byte) for byte in kept}, **{byte: chr(256 + n) for n, byte in enumerate(shifted)}}


def _byte_level_bpe(corpus: list[str], specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE's vocabulary (the 256 byte symbols, learnt merges, then `specials`) and merges,
    learnt deterministically from `corpus`, words taken with their leading space as GPT-2 splits them."""
    symbol = _byte_symbols()
    counts = Counter("".join(symbol[byte] for byte in f" {word}".encode()) for line in corpus for word in line.split())
    words = {word: list(word) for word in sorted(counts)}
    vocab = [symbol[byte] for byte in range(256)]
    merges = _learn_merges(counts, words, vocab, vocab_size=400)
    return {token: index for index, token in enumerate(vocab + specials)}, merges


# Qwen3's chat template cut to what Flux2KleinPipeline uses: user turns, the generation prompt, and
# `enable_thinking=False` adding an empty thinking block (as Qwen3's own template does).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen2_tokenizer(corpus: list[str], extra_specials: tuple[str, ...] = ()):
    """A Qwen2 tokenizer (byte-level BPE, <|endoftext|> as padding) with a Qwen3-style chat template,
    and `extra_specials` as special tokens too."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", *extra_specials]
    vocab, merges = _byte_level_bpe(corpus, specials)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Mistral Small 3's chat template cut to what Flux2Pipeline sends: a system and a user turn, each a
# list of text parts, in Mistral's [SYSTEM_PROMPT] / [INST] markup.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
PIXTRAL_PATCH_SIZE = 14  # the tiny vision tower's patch: a 4 x 4 patch image (text-only prompts never use it)


def _mistral_tokenizer(corpus: list[str]):
    """A byte-level BPE with Mistral's special tokens and Mistral Small 3's chat template (cut down).

    What Flux2Pipeline calls on its `tokenizer: AutoProcessor` is apply_chat_template (a batch of
    conversations, padded to max_length) alone; the published FLUX.2-dev has a PixtralProcessor
    there, which also holds Pixtral's image processor (for image prompts, which flux-sharded does
    not offer) and needs torchvision. A plain tokenizer loads through the same from_pretrained path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab, merges = _byte_level_bpe(corpus, specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512, additional_special_tokens=specials[4:],
                                   chat_template=MISTRAL3_CHAT_TEMPLATE)


def _t5_tokenizer(corpus: list[str]):
    import sentencepiece
    from transformers import T5Tokenizer

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,  # T5's layout: <pad>=0, </s>=1, <unk>=2, no <s>
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# The real architectures, from the configs shipped in this package (checkpoint.SHIPPED_CONFIGS).
# FLUX.2-dev (64 GB transformer + 48 GB text encoder in bf16) is left out: no single GPU we borrow
# builds and saves it in one piece.
REAL_SHAPES = {"flux-dev": "FLUX.1-dev", "flux-schnell": "FLUX.1-schnell", "klein-4b": "FLUX.2-klein-4B",
               "klein-9b": "FLUX.2-klein-9B", "flux3-klein": "FLUX.3-klein", "flux3-klein-base": "FLUX.3-klein-base"}


# The narrowest text encoder whose every 4-bit layer bitsandbytes' CPU kernels take on any x86-64
# CPU: on one with AVX512-BF16, bitsandbytes 0.50 repacks each 4-bit weight for its fused kernel
# (bitsandbytes.functional._convert_weight_packed_for_cpu), which needs an input width that is a
# multiple of its 64-weight quantization block and an output width that is a multiple of 32; the
# 16- and 32-wide tiny encoders fail there ("shape '[32, 0]' is invalid", "N must be divisible by
# block_n"). tests/test_any_cpu.py checks every 4-bit layer of the nf4 test checkpoints against it.
NF4_CPU_TEXT_WIDTH = 64


def build_tiny_checkpoint(out_dir: str | Path, vae_scale_factor: int = 8, seed: int = 0, preset: str = "tiny",
                          device: str = "cpu", dtype: str = "float32", text_width: int | None = None,
                          fill: bool = False) -> Path:
    """Write the checkpoint to `out_dir` (atomically: built beside it, then renamed) and return it.

    text_width: T5's d_model instead of the preset's (the transformer's joint_attention_dim with it;
    heads of 32, a feed-forward twice as wide), e.g. NF4_CPU_TEXT_WIDTH for a T5 that bitsandbytes'
    4-bit CPU kernels run on every CPU. fill: a FLUX.1 Fill checkpoint (FluxFillPipeline), whose
    transformer also takes the packed masked image and mask (in_channels 2 x 4C + 4 f^2, out_channels
    4C, as FLUX.1-Fill-dev's 384 and 64)."""
    if preset in REAL_SHAPES:
        from .checkpoint import shipped_config_dir

        return build_real_shape(Path(out_dir), shipped_config_dir(REAL_SHAPES[preset]), seed, device, dtype)
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .checkpoint import shipped_config_dir

    if vae_scale_factor < 1 or 2 ** round(math.log2(vae_scale_factor)) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
    vae_blocks = round(math.log2(vae_scale_factor)) + 1
    shape = PRESETS[preset]
    if text_width is not None:
        shape = dataclasses.replace(shape, t5_width=text_width, t5_feed_forward=2 * text_width,
                                    t5_heads=max(1, text_width // 32))

    corpus = _corpus(seed)
    tokenizer = _clip_tokenizer(corpus)
    tokenizer_2 = _t5_tokenizer(corpus)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.clip_width,
            intermediate_size=shape.clip_feed_forward,
            num_hidden_layers=shape.clip_layers,
            num_attention_heads=shape.clip_heads,
            max_position_embeddings=77,
            projection_dim=shape.clip_width,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=shape.t5_width,
            d_kv=shape.t5_width // shape.t5_heads,
            d_ff=shape.t5_feed_forward,
            num_layers=shape.t5_layers,
            num_heads=shape.t5_heads,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    # FLUX.1 splits the rotary dimensions of a 128-wide head as 16 + 56 + 56.
    rope_first = shape.head_dim // 8 if shape.head_dim >= 64 else shape.head_dim // 4
    rope_rest = (shape.head_dim - rope_first) // 2
    packed = 4 * shape.latent_channels
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=2 * packed + 4 * vae_scale_factor**2 if fill else packed,
        out_channels=packed if fill else None,
        num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=shape.t5_width,
        pooled_projection_dim=shape.clip_width,
        guidance_embeds=True,
        axes_dims_rope=(rope_first, rope_rest, shape.head_dim - rope_first - rope_rest),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=(shape.vae_channels[0],) + (shape.vae_channels[1],) * (vae_blocks - 1),
        layers_per_block=shape.vae_layers_per_block,
        latent_channels=shape.latent_channels,
        norm_num_groups=shape.vae_groups,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(shipped_config_dir("FLUX.1-dev") / "scheduler")
    pipeline = (FluxFillPipeline if fill else FluxPipeline)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )

    return _save(pipeline.to(getattr(torch, dtype)), Path(out_dir))


FLUX2_FAMILIES = ("FLUX.2-klein", "FLUX.2-dev")
# Decoder layers past the deepest one the encode reads: the encode must give the same embeddings
# with them cut (components.encode_only), so there must be some to cut.
FLUX2_EXTRA_LAYERS = 2


def _tiny_flux2_vae(vae_scale_factor: int, latent_channels: int):
    """FLUX.2's VAE (AutoencoderKLFlux2, FLUX.3's too), 8 channels per block, log2(factor) + 1 blocks,
    with random batch-norm statistics: a fresh BatchNorm2d has mean 0, variance 1, and un-normalising
    with those would change nothing. Draws from torch's global generator (the caller seeds it)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    if vae_scale_factor < 1 or 2 ** round(math.log2(vae_scale_factor)) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
    vae_blocks = round(math.log2(vae_scale_factor)) + 1
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=(8,) * vae_blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return vae


def build_tiny_flux2_checkpoint(out_dir: str | Path, family: str = "FLUX.2-klein", vae_scale_factor: int = 8,
                                seed: int = 0, distilled: bool = True, text_width: int = 16) -> Path:
    """A tiny random FLUX.2-klein (Flux2KleinPipeline) or FLUX.2-dev (Flux2Pipeline) checkpoint at
    `out_dir` (atomically, as build_tiny_checkpoint). Text encoders `text_width` wide (16; e.g.
    NF4_CPU_TEXT_WIDTH for one bitsandbytes' 4-bit CPU kernels run on every CPU), encode_layers + 2
    deep; transformer 2 heads of 16, one double and one single block; VAE 8 channels per block, 4
    latent channels (16 after 2x2 patches), random batch-norm statistics. distilled: klein's is_distilled."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from .checkpoint import shipped_config_dir
    from .families import FAMILIES, encode_layers, encode_out_layers

    if family not in FLUX2_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FLUX2_FAMILIES)}, got {family!r}")
    pipeline_name = next(f.pipeline for f in FAMILIES.values() if f.name == family)
    width, latent_channels, head_dim = text_width, 4, 16
    layers = encode_layers(pipeline_name) + FLUX2_EXTRA_LAYERS
    corpus = _corpus(seed)
    klein = family == "FLUX.2-klein"
    tokenizer = words = _qwen2_tokenizer(corpus) if klein else _mistral_tokenizer(corpus)
    decoder = dict(vocab_size=len(words), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=1024,
                   pad_token_id=words.pad_token_id)

    torch.manual_seed(seed)
    if klein:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        text_encoder = Qwen3ForCausalLM(Qwen3Config(**decoder, tie_word_embeddings=True,
                                                    eos_token_id=words.convert_tokens_to_ids("<|im_end|>")))
    else:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(**decoder, bos_token_id=words.bos_token_id, eos_token_id=words.eos_token_id,
                                      tie_word_embeddings=False),
            vision_config=PixtralVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=width // 2,
                                              image_size=4 * PIXTRAL_PATCH_SIZE, patch_size=PIXTRAL_PATCH_SIZE),
            image_token_index=words.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
            tie_word_embeddings=False,
        ))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        # the pipeline stacks the hidden states of len(text_encoder_out_layers) layers
        joint_attention_dim=len(encode_out_layers(pipeline_name)) * width,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=not klein,  # FLUX.2-dev is guidance-distilled; klein guides with a second pass, if at all
    )
    vae = _tiny_flux2_vae(vae_scale_factor, latent_channels)
    configs = shipped_config_dir("FLUX.2-klein-4B" if klein else "FLUX.2-dev")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler")
    import diffusers

    components = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer)
    pipeline = getattr(diffusers, pipeline_name)(**components, **({"is_distilled": distilled} if klein else {}))
    return _save(pipeline, Path(out_dir))


FLUX3_FAMILIES = ("FLUX.3-klein", "FLUX.3-klein-base")
# The special tokens Qwen3VLProcessor looks up in its tokenizer (image and video placeholders).
QWEN3_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_tiny_flux3_checkpoint(out_dir: str | Path, family: str = "FLUX.3-klein", vae_scale_factor: int = 8,
                                seed: int = 0, text_width: int = 16) -> Path:
    """A tiny random FLUX.3 klein checkpoint at `out_dir` (atomically, as build_tiny_checkpoint):
    "FLUX.3-klein" is step-distilled (the transformer's flow_map, Flux3DistilledModularPipeline),
    "FLUX.3-klein-base" is not (Flux3ModularPipeline). model_index.json is the shipped configs' (the
    modular pipelines read it for want of a modular_model_index.json). A Qwen3VLForConditionalGeneration
    `text_width` wide and encode_layers + 2 deep (a one-block vision tower the encode never runs), with
    a byte-level BPE Qwen2 tokenizer, a Qwen3-style chat template and the image and video
    preprocessor configs of a Qwen3VLProcessor folder; a Flux3Transformer2DModel of 2 heads of 16, one
    block per mode and one single block; the VAE of build_tiny_flux2_checkpoint."""
    import torch
    import transformers
    from diffusers import Flux3Transformer2DModel

    from .checkpoint import shipped_config_dir
    from .families import FAMILIES, encode_layers, encode_out_layers

    if family not in FLUX3_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FLUX3_FAMILIES)}, got {family!r}")
    pipeline_name = next(f.pipeline for f in FAMILIES.values() if f.name == family)
    width, latent_channels, head_dim = text_width, 4, 16
    tokenizer = _qwen2_tokenizer(_corpus(seed), QWEN3_VL_TOKENS)
    token = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                     tokenizer.convert_tokens_to_ids(list(QWEN3_VL_TOKENS))))

    torch.manual_seed(seed)
    text_encoder = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=encode_layers(pipeline_name) + FLUX2_EXTRA_LAYERS, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=1024,
                         # Qwen3-VL's interleaved multimodal rotary sections sum to head_dim / 2
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000,
                                          "mrope_section": [width // 8, width // 16, width // 16],
                                          "mrope_interleaved": True},
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True),
        vision_config=dict(depth=1, hidden_size=width, intermediate_size=2 * width, num_heads=2, patch_size=4,
                           out_hidden_size=width, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        tie_word_embeddings=True, **token))
    transformer = Flux3Transformer2DModel(
        in_channels=4 * latent_channels,
        cond_in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=2,
        # the encode stacks the hidden states of len(text_encoder_out_layers) layers
        joint_attention_dim=len(encode_out_layers(pipeline_name)) * width,
        timestep_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        flow_map=family == "FLUX.3-klein",
    )
    vae = _tiny_flux2_vae(vae_scale_factor, latent_channels)
    configs = shipped_config_dir(family)

    components = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
    return _save(_Flux3Folder(components, tokenizer, 4, configs), Path(out_dir))


class _Flux3Folder:
    """A FLUX.3 checkpoint to write (there is no one-piece pipeline class to save_pretrained): its
    models (`components`, as a pipeline's), the tokenizer folder of a Qwen3VLProcessor (the
    tokenizer with its chat template, and image and video preprocessor configs of `patch_size`),
    and the scheduler and model_index.json of the shipped `configs`. Called with a folder: writes it."""

    def __init__(self, components: dict, tokenizer, patch_size: int, configs: Path):
        self.components, self.tokenizer, self.patch_size, self.configs = components, tokenizer, patch_size, configs

    def __call__(self, folder: Path) -> None:
        import transformers
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        for name, model in self.components.items():
            model.save_pretrained(folder / name)
        self.tokenizer.save_pretrained(folder / "tokenizer")  # with chat_template.jinja, which the processor reads too
        transformers.Qwen2VLImageProcessorPil(patch_size=self.patch_size, merge_size=2).save_pretrained(
            folder / "tokenizer")
        Qwen3VLVideoProcessor(patch_size=self.patch_size, merge_size=2).save_pretrained(folder / "tokenizer")
        FlowMatchEulerDiscreteScheduler.from_pretrained(self.configs / "scheduler").save_pretrained(folder / "scheduler")
        shutil.copyfile(self.configs / "model_index.json", folder / "model_index.json")


UPSAMPLER_FAMILY = "FLUX.3-upsampler"
# Qwen3.5's chat template cut to what the prompt upsampler block sends (prompt_upsampler.upsample_prompt):
# a system and a user turn, each a list of text parts, and the generation prompt with an empty thinking
# block (enable_thinking=False), in Qwen's <|im_start|> markup.
QWEN3_5_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_upsampler(out_dir: str | Path, seed: int = 0, width: int = 16) -> Path:
    """A tiny random FLUX.3 prompt upsampler at `out_dir` (atomically, as build_tiny_checkpoint), laid
    out as --upsample-prompt reads one: a Qwen3_5ForConditionalGeneration `width` wide, four layers
    (three linear-attention, one full-attention: Qwen3.5's pattern) and a one-block vision tower, its
    config.json and weights at the folder's root, beside a Qwen3VLProcessor's files (the byte-level BPE
    Qwen2 tokenizer of the FLUX.3 builder, QWEN3_5_CHAT_TEMPLATE, the image and video preprocessor
    configs). Its generation stops at <|im_end|>; greedy generation of random weights writes some text."""
    import torch
    import transformers
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _qwen2_tokenizer(_corpus(seed), QWEN3_VL_TOKENS)
    tokenizer.chat_template = QWEN3_5_CHAT_TEMPLATE
    # its requests hold the system prompt (thousands of this small vocabulary's tokens): no length warning
    tokenizer.model_max_length = 32768
    token = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                     tokenizer.convert_tokens_to_ids(list(QWEN3_VL_TOKENS))))
    head_dim = width // 2
    torch.manual_seed(seed)
    model = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                         linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_num_key_heads=2,
                         linear_num_value_heads=2, max_position_embeddings=32768,
                         # a quarter of each head rotates (Qwen3.5's partial_rotary_factor), in 3 sections
                         rope_parameters={"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.25,
                                          "mrope_section": [1, 1, 0], "mrope_interleaved": True},
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
        vision_config=dict(depth=1, hidden_size=width, intermediate_size=2 * width, num_heads=2, patch_size=4,
                           out_hidden_size=width, num_position_embeddings=16),
        **token)).eval()

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # with chat_template.jinja, which the processor reads too
        transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2).save_pretrained(folder)
        Qwen3VLVideoProcessor(patch_size=4, merge_size=2).save_pretrained(folder)

    return _save(write, Path(out_dir))


def build_real_shape(out_dir: Path, configs: Path, seed: int, device: str, dtype: str) -> Path:
    """The architecture of the configs in `configs` (a FLUX.1 or FLUX.2-klein folder as shipped in
    this package), random weights created on `device` in `dtype`, our small tokenizers (their ids fit
    the real vocabularies)."""
    return _save(real_shape_pipeline(configs, seed, device, dtype), out_dir)


def real_shape_bytes(preset: str, dtype: str) -> int:
    """Bytes of the weights (parameters and buffers, tied ones once) that `--preset` builds in
    `dtype`, counted on the meta device: what its device must hold before anything is saved."""
    from .checkpoint import shipped_config_dir

    pipeline = real_shape_pipeline(shipped_config_dir(REAL_SHAPES[preset]), 0, "meta", dtype)
    tensors = {id(tensor): tensor for module in pipeline.components.values() if hasattr(module, "parameters")
               for tensor in (*module.parameters(), *module.buffers())}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def real_shape_pipeline(configs: Path, seed: int, device: str, dtype: str):
    """The pipeline `build_real_shape` saves, its weights on `device` (meta: shapes only)."""
    from .families import family_of

    family = family_of(configs)
    if family.name == "FLUX.2-klein":
        return _build_real_klein(configs, seed, device, dtype)
    if family.name in FLUX3_FAMILIES:
        return _build_real_flux3(configs, seed, device, dtype)
    if family.name != "FLUX.1":
        raise ValueError(f"{configs}: real shapes are built for FLUX.1, FLUX.2-klein and FLUX.3, not {family.name}")
    import torch
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    corpus = _corpus(seed)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    # Created directly in the target dtype on the target device: FLUX.1-dev in float32 (67 GB) would
    # not fit an 80 GB GPU next to the rest.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            encoders = {
                folder: getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(configs / folder))
                for folder, cls in (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel"))
            }
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(configs / "transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    finally:
        torch.set_default_dtype(default_dtype)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        vae=vae.to(torch_dtype),
        text_encoder=encoders["text_encoder"].to(torch_dtype),
        tokenizer=_clip_tokenizer(corpus),
        text_encoder_2=encoders["text_encoder_2"].to(torch_dtype),
        tokenizer_2=_t5_tokenizer(corpus),
        transformer=transformer.to(torch_dtype),
    )


def _build_real_klein(configs: Path, seed: int, device: str, dtype: str):
    """FLUX.2-klein's real architecture (Qwen3 text encoder, whole, as the hub's text_encoder folder
    holds it), random weights, batch-norm statistics left as created, our small Qwen2 tokenizer."""
    import torch
    import transformers
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    corpus = _corpus(seed)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # created in the target dtype, on the target device
    try:
        with torch.device(device):
            text_encoder = transformers.Qwen3ForCausalLM(transformers.AutoConfig.from_pretrained(configs / "text_encoder"))
            transformer = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(configs / "transformer"))
            vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(configs / "vae"))
    finally:
        torch.set_default_dtype(default_dtype)
    distilled = json.loads((configs / "model_index.json").read_text()).get("is_distilled", False)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        vae=vae, text_encoder=text_encoder, tokenizer=_qwen2_tokenizer(corpus), transformer=transformer,
        is_distilled=distilled,
    )


def _build_real_flux3(configs: Path, seed: int, device: str, dtype: str) -> _Flux3Folder:
    """FLUX.3 klein's architecture as the shipped configs reconstruct it (Qwen3-VL-4B whole, vision
    tower included, as the hub's text_encoder folder would hold it; the transformer, flow_map as the
    config says; FLUX.2's VAE), random weights, our small Qwen2 tokenizer (its ids fit Qwen3-VL's
    vocabulary) with the processor's preprocessor configs at the vision tower's patch size."""
    import torch
    import transformers
    from diffusers import AutoencoderKLFlux2, Flux3Transformer2DModel

    tokenizer = _qwen2_tokenizer(_corpus(seed), QWEN3_VL_TOKENS)
    config = transformers.AutoConfig.from_pretrained(configs / "text_encoder")
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # created in the target dtype, on the target device
    try:
        with torch.device(device):
            components = {
                "text_encoder": transformers.Qwen3VLForConditionalGeneration(config),
                "transformer": Flux3Transformer2DModel.from_config(
                    Flux3Transformer2DModel.load_config(configs / "transformer")),
                "vae": AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(configs / "vae")),
            }
    finally:
        torch.set_default_dtype(default_dtype)
    return _Flux3Folder(components, tokenizer, config.vision_config.patch_size, configs)


# Written into every checkpoint this module builds: only a folder holding it may be replaced.
# The layers build_tiny_lora adapts, by their diffusers names in FLUX.1's transformer (kohya's
# sd-scripts names them after BFL's original modules, BFL_FLUX1 says how), FLUX.2's, FLUX.3's (in
# every per-mode block and single block), and CLIP's.
LORA_TARGETS = {
    "FluxPipeline": ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "norm1.linear", "proj_out",
                     "proj_mlp"),
    "Flux2Pipeline": ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.linear_in", "attn.to_qkv_mlp_proj"),
    "Flux3ModularPipeline": ("attn.to_q", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out"),
    # kohya trains CLIP's attention whole (q, k, v, out): diffusers converts its attention keys only then
    "text_encoder": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"),
}
# diffusers module of block i -> BFL's original module, which kohya's sd-scripts (lora_unet_ + the
# name with underscores) and ComfyUI (diffusion_model. + the name) key their LoRAs by (diffusers'
# _convert_kohya_flux_lora_to_diffusers reads both)
BFL_FLUX1 = {
    "transformer_blocks.{i}.attn.to_out.0": "double_blocks.{i}.img_attn.proj",
    "transformer_blocks.{i}.ff.net.0.proj": "double_blocks.{i}.img_mlp.0",
    "transformer_blocks.{i}.norm1.linear": "double_blocks.{i}.img_mod.lin",
    "single_transformer_blocks.{i}.proj_out": "single_blocks.{i}.linear2",
}
# XLabs' FLUX.1 LoRAs (diffusers' _convert_xlabs_flux_lora_to_diffusers): attention only, one
# down/up pair per BFL projection, q, k and v fused (one down shared, the up split in three)
XLABS_FLUX1 = {
    "transformer_blocks.{i}.attn.to_out.0": "double_blocks.{i}.processor.proj_lora1",
    "transformer_blocks.{i}.attn.to_add_out": "double_blocks.{i}.processor.proj_lora2",
    "single_transformer_blocks.{i}.proj_out": "single_blocks.{i}.processor.proj_lora",
}
XLABS_QKV_FLUX1 = {  # the fused projection -> the diffusers module whose shape each third has
    "double_blocks.{i}.processor.qkv_lora1": "transformer_blocks.{i}.attn.to_q",
    "double_blocks.{i}.processor.qkv_lora2": "transformer_blocks.{i}.attn.add_q_proj",
    "single_blocks.{i}.processor.qkv_lora": "single_transformer_blocks.{i}.attn.to_q",
}
LORA_KINDS = ("diffusers", "kohya", "comfyui", "xlabs")


def build_tiny_lora(checkpoint: str | Path, out_file: str | Path, seed: int = 0, kind: str = "diffusers",
                    rank: int = 4, text_encoder: bool = False, strength: float = 1.0,
                    alpha: float | None = None) -> Path:
    """A random LoRA for a checkpoint built here, in one of LORA_KINDS: diffusers' format (the
    pipeline's save_lora_weights), or for FLUX.1 kohya's (`lora_unet_..._lora_down.weight`,
    `lora_up.weight`, `alpha`, and `lora_te1_...` for CLIP), ComfyUI's (the same keyed
    `diffusion_model.double_blocks.0.img_attn.proj...`, and `text_encoders.clip_l.transformer....`
    for CLIP) or XLabs' (XLABS_FLUX1, XLABS_QKV_FLUX1; no CLIP), over the LORA_TARGETS layers of
    every block (BFL_FLUX1's for kohya and ComfyUI). lora_B (up) is random too, not PEFT's zeros, so
    that the LoRA changes the pixels; `strength` scales it. text_encoder: also CLIP's layers
    (FLUX.1). alpha (diffusers' format): the transformer's lora_alpha, saved in the file's adapter
    metadata as diffusers' training scripts save their LoraConfig (the loaders then scale by
    alpha / rank instead of 1). Returns the file."""
    import torch
    from safetensors.torch import save_file

    from .components import empty_component
    from .families import family_of

    checkpoint, out_file = Path(checkpoint), Path(out_file)
    family = family_of(checkpoint)
    generator = torch.Generator().manual_seed(seed)

    def pair(linear) -> tuple:
        down = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
        up = torch.randn(linear.out_features, rank, generator=generator) * strength / math.sqrt(rank)
        return down, up

    def layers(name: str, suffixes: tuple[str, ...]) -> dict:
        model = empty_component(checkpoint, name)
        return {module: pair(linear) for module, linear in model.named_modules()
                if isinstance(linear, torch.nn.Linear) and module.endswith(suffixes)}

    if kind not in LORA_KINDS or (kind != "diffusers" and family.pipeline != "FluxPipeline"):
        raise ValueError(f"kind {kind!r}: one of {LORA_KINDS}; all but diffusers for FLUX.1 only")
    family_targets = LORA_TARGETS["FluxPipeline" if family.pipeline == "FluxPipeline" else
                                  "Flux3ModularPipeline" if family.code == "flux3" else "Flux2Pipeline"]
    transformer = layers("transformer", family_targets)
    clip = layers("text_encoder", LORA_TARGETS["text_encoder"]) if text_encoder and kind != "xlabs" else {}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("kohya", "comfyui"):
        tensors = {}
        for module, (down, up) in transformer.items():
            block = module.split(".")[1] if module.count(".") else ""
            for pattern, bfl in BFL_FLUX1.items():
                if module == pattern.format(i=block):
                    name = bfl.format(i=block)
                    key = "lora_unet_" + name.replace(".", "_") if kind == "kohya" else "diffusion_model." + name
                    tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                f"{key}.alpha": torch.tensor(float(rank) / 2)}
        for module, (down, up) in clip.items():
            key = ("lora_te1_text_model_" + module.replace(".", "_") if kind == "kohya"
                   else "text_encoders.clip_l.transformer.text_model." + module)
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(rank))}
        save_file(tensors, str(out_file))
        return out_file
    if kind == "xlabs":
        model = empty_component(checkpoint, "transformer")
        modules = dict(model.named_modules())
        blocks = {"transformer_blocks": len(model.transformer_blocks),
                  "single_transformer_blocks": len(model.single_transformer_blocks)}
        tensors = {}
        for patterns, fused in ((XLABS_FLUX1, 1), (XLABS_QKV_FLUX1, 3)):
            for first, second in patterns.items():
                module_pattern, key_pattern = (first, second) if fused == 1 else (second, first)
                for i in range(blocks[module_pattern.split(".")[0]]):
                    linear = modules[module_pattern.format(i=i)]
                    down, up = pair(linear)
                    if fused == 3:  # q, k and v: one down, three ups stacked
                        up = torch.cat([up, *(pair(linear)[1] for _ in range(2))])
                    key = key_pattern.format(i=i)
                    tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
        save_file(tensors, str(out_file))
        return out_file
    import diffusers

    def named(pairs: dict) -> dict:
        return {f"{module}.lora_{part}.weight": tensor for module, (down, up) in pairs.items()
                for part, tensor in (("A", down), ("B", up))}

    layers_of = {"transformer_lora_layers": named(transformer)}
    if alpha is not None:
        layers_of["transformer_lora_adapter_metadata"] = {"r": rank, "lora_alpha": alpha,
                                                          "target_modules": sorted(transformer)}
    if clip:
        layers_of["text_encoder_lora_layers"] = named(clip)
    getattr(diffusers, family.pipeline).save_lora_weights(out_file.parent, weight_name=out_file.name, **layers_of)
    return out_file


MARKER = ".flux-sharded-tiny"


class NotOurFolder(Exception):
    """The target folder holds something this builder did not write."""


def check_replaceable(out_dir: Path) -> None:
    """A folder may be (re)built if it is absent, empty, or a checkpoint this module built."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise NotOurFolder(f"{out_dir} is not a folder; give a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise NotOurFolder(
            f"{out_dir} is not empty and is not a checkpoint this builder made (no {MARKER} in it); "
            "give a new or empty folder, or remove that folder yourself"
        )


def _save(pipeline, out_dir: Path) -> Path:
    """`pipeline` (a diffusers pipeline, or a function writing the checkpoint into the folder it is
    given) saved at `out_dir`, atomically: written beside it, then renamed."""
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if hasattr(pipeline, "save_pretrained"):
            pipeline.save_pretrained(staging, safe_serialization=True)
        else:
            pipeline(staging)
        (staging / MARKER).write_text("built by python -m flux_sharded.tiny: this folder may be replaced by it\n")
        check_replaceable(out_dir)  # again: the build took a while
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _option_mistake(args) -> str | None:
    """What is wrong with the builder's options, before anything is imported or built; None if nothing."""
    if args.family == UPSAMPLER_FAMILY and args.vae_scale_factor is not None:
        return f"--vae-scale-factor: {UPSAMPLER_FAMILY} builds a prompt upsampler, which has no VAE; drop it"
    factor = args.vae_scale_factor = 8 if args.vae_scale_factor is None else args.vae_scale_factor
    if factor < 1 or 2 ** round(math.log2(factor)) != factor:
        return f"--vae-scale-factor: {factor} is not a power of two; use 1, 2, 4, 8 or 16 (FLUX's VAEs: 8)"
    if args.preset in REAL_SHAPES:
        from .checkpoint import shipped_config_dir
        from .families import family_of

        family = family_of(shipped_config_dir(REAL_SHAPES[args.preset])).name
        if args.family not in (None, family):
            return (f"--preset {args.preset} builds {REAL_SHAPES[args.preset]}'s real shape, a {family} checkpoint, "
                    f"not {args.family}: drop --family {args.family}")
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            return f"--device: {args.device!r} is not a device; use cpu or cuda (cuda:1 for the second GPU)"
        if device.type not in ("cpu", "cuda"):
            return (f"--device: {args.device!r} cannot hold weights that are saved ({device.type} is not cpu or cuda); "
                    "use cuda on a GPU machine, or cpu with the RAM it needs")
        if device.type == "cuda" and not torch.cuda.is_available():
            return (f"--device {args.device}: this machine's torch sees no CUDA GPU; build --preset {args.preset} "
                    "on a GPU machine, or with --device cpu where the RAM holds it")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            return (f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                    f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif args.device != "cpu":
        return (f"--device {args.device}: only the real shapes (--preset {', '.join(REAL_SHAPES)}) are built on a "
                f"device; --preset {args.preset} builds on the cpu: drop --device")
    return None


def _memory_shortage(preset: str, device: str, dtype: str) -> str | None:
    """Why `device` cannot hold the weights of `preset` in `dtype` now (counted on meta); None if it can."""
    import psutil
    import torch

    needed = real_shape_bytes(preset, dtype)
    where = torch.device(device)
    if where.type == "cuda":
        free = torch.cuda.mem_get_info(where.index or 0)[0]
    else:
        free = psutil.virtual_memory().available
    if needed <= free:
        return None
    other = ("build it on a GPU machine (--device cuda --dtype bfloat16)" if where.type == "cpu"
             else "use a GPU with more free memory, or --dtype bfloat16")
    return (f"--preset {preset} holds {needed / 1e9:.1f} GB of weights in {dtype}, and {device} has "
            f"{free / 1e9:.1f} GB available; {other}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_sharded.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (a new or empty one, or a checkpoint built here earlier)")
    parser.add_argument("--family", choices=["FLUX.1", "FLUX.1-Fill", *FLUX2_FAMILIES, *FLUX3_FAMILIES,
                                             UPSAMPLER_FAMILY],
                        default="FLUX.1", help="pipeline to build (default: FLUX.1; FLUX.1-Fill: FluxFillPipeline's "
                        "inpainting checkpoint); FLUX.2 and FLUX.3 families take preset tiny only; "
                        f"{UPSAMPLER_FAMILY}: FLUX.3's prompt upsampler (--upsample-prompt)")
    parser.add_argument("--vae-scale-factor", type=int, default=None,
                        help="VAE downsampling: 1, 2, 4, 8, ... (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokenizer corpus")
    parser.add_argument("--preset", choices=sorted([*PRESETS, *REAL_SHAPES]), default="tiny",
                        help="dimensions (default: tiny)")
    parser.add_argument("--device", default="cpu", help="where to create the weights (real shapes only: cuda)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights (the hub's FLUX.1 files are bfloat16)")
    parser.set_defaults(family=None)
    args = parser.parse_args(argv)
    try:
        check_replaceable(Path(args.out_dir))
    except NotOurFolder as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    mistake = _option_mistake(args)
    if mistake:
        print(f"Error: {mistake}", file=sys.stderr)
        return 2
    args.family = args.family or "FLUX.1"
    from .progress import quiet_import_noise

    quiet_import_noise()  # `make demo` runs this first: a new user's first screen
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # diffusers warns on every model.to(dtype), even with no float32 module to keep ("[]")
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    if args.preset in REAL_SHAPES:  # the preset names its family
        from .checkpoint import shipped_config_dir
        from .families import family_of

        args.family = family_of(shipped_config_dir(REAL_SHAPES[args.preset])).name
        short = _memory_shortage(args.preset, args.device, args.dtype)
        if short:
            print(f"Error: {short}", file=sys.stderr)
            return 2
    if args.family not in ("FLUX.1", "FLUX.1-Fill") and args.preset not in REAL_SHAPES:
        if args.preset != "tiny" or args.dtype != "float32" or args.device != "cpu":
            print(f"Error: --family {args.family} builds the tiny preset in float32 on the cpu only (or --preset "
                  "klein-4b / klein-9b / flux3-klein / flux3-klein-base, the real shapes); drop --preset, --dtype "
                  "and --device", file=sys.stderr)
            return 2
        if args.family == UPSAMPLER_FAMILY:
            path = build_tiny_upsampler(args.out_dir, args.seed)
        else:
            build = build_tiny_flux3_checkpoint if args.family in FLUX3_FAMILIES else build_tiny_flux2_checkpoint
            path = build(args.out_dir, args.family, args.vae_scale_factor, args.seed)
    else:
        path = build_tiny_checkpoint(args.out_dir, args.vae_scale_factor, args.seed, args.preset, args.device,
                                     args.dtype, fill=args.family == "FLUX.1-Fill")
    what = "prompt upsampler" if args.family == UPSAMPLER_FAMILY else "checkpoint"
    print(f"{'real-shape' if args.preset in REAL_SHAPES else args.preset} {args.family} {what} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
