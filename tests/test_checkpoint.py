"""Which files a run fetches from the hub: the diffusers folders' configs, tokenizers and safetensors."""

from __future__ import annotations

from huggingface_hub.utils import filter_repo_objects

from flux_sharded.checkpoint import HUB_PATTERNS

# The files of black-forest-labs/FLUX.1-dev on the hub: the diffusers layout, plus the original
# single-file weights at the root that the diffusers layout does not use.
FLUX_DEV_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "dev_grid.jpg", "model_index.json",
    "flux1-dev.safetensors", "ae.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
    *(f"transformer/diffusion_pytorch_model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)),
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",  # a pickle, as some repos carry beside the safetensors
]


def test_a_run_fetches_the_pipeline_folders_and_nothing_else():
    fetched = set(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=HUB_PATTERNS))
    skipped = set(FLUX_DEV_FILES) - fetched
    assert skipped == {".gitattributes", "LICENSE.md", "README.md", "dev_grid.jpg", "flux1-dev.safetensors",
                       "ae.safetensors", "vae/diffusion_pytorch_model.bin"}
