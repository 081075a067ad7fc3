"""Build a complete tiny random FLUX.1 checkpoint offline, in the diffusers folder layout.

    python -m flux_sharded.tiny DIR [--vae-scale-factor 8] [--seed 0]

Every component has the real classes and configs' shape of FLUX.1-dev, scaled down to a few
hundred kilobytes: transformer (2 double + 2 single blocks), CLIP and T5 text encoders, a VAE whose
downsampling factor is 2 ** (number of blocks - 1), the FLUX.1-dev scheduler, and tokenizers
trained on the spot (a BPE for CLIP with `tokenizers`, a unigram model for T5 with
`sentencepiece`). Weights are random but seeded, so the same seed writes the same tensors.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

WORDS = (
    "a an the photo painting drawing portrait of dog cat bird horse fox tree house car boat river "
    "mountain city street forest sky sun moon night day red green blue yellow white black small big "
    "old young happy sitting running flying on in under over with and by near beautiful bright dark "
    "watercolor oil sketch cinematic lighting detailed sharp soft warm cold light shadow"
).split()

# Dimensions shared by the components so that their outputs fit each other's inputs.
TEXT_DIM = 32  # T5 d_model == transformer joint_attention_dim
POOLED_DIM = 32  # CLIP hidden size == transformer pooled_projection_dim
LATENT_CHANNELS = 4  # VAE latent channels; the transformer sees 4x that after 2x2 packing


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(600)]


def _clip_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


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


def build_tiny_checkpoint(out_dir: str | Path, vae_scale_factor: int = 8, seed: int = 0) -> Path:
    """Write the checkpoint to `out_dir` (atomically: built beside it, then renamed) and return it."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .checkpoint import shipped_config_dir

    if vae_scale_factor < 1 or 2 ** round(math.log2(vae_scale_factor)) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
    vae_blocks = round(math.log2(vae_scale_factor)) + 1

    corpus = _corpus(seed)
    tokenizer = _clip_tokenizer(corpus)
    tokenizer_2 = _t5_tokenizer(corpus)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=POOLED_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=POOLED_DIM,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as 16+56+56 = 128 in FLUX.1
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=(8,) * vae_blocks,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(shipped_config_dir("FLUX.1-dev") / "scheduler")
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux_sharded.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--vae-scale-factor", type=int, default=8, help="VAE downsampling: 1, 2, 4, 8, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokenizer corpus")
    args = parser.parse_args(argv)
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    path = build_tiny_checkpoint(args.out_dir, args.vae_scale_factor, args.seed)
    print(f"tiny FLUX.1 checkpoint written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
