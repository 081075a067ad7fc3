"""Which files a run fetches from the hub: the diffusers folders' configs, tokenizers and safetensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub.utils import filter_repo_objects

from flux_sharded.checkpoint import HUB_PATTERNS
from flux_sharded.errors import CheckpointError

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


def test_a_run_fetches_every_file_each_family_saves(tiny_checkpoint, tiny_klein, tiny_dev):
    """What save_pretrained writes for FLUX.1, FLUX.2-klein and FLUX.2-dev (models, tokenizers with
    their chat templates, scheduler) is what from_pretrained reads: a hub download fetches all of it."""
    from flux_sharded.families import FAMILIES
    from flux_sharded.tiny import MARKER

    for checkpoint in (tiny_checkpoint, tiny_klein, tiny_dev):
        saved = sorted(str(path.relative_to(checkpoint)) for path in checkpoint.rglob("*")
                       if path.is_file() and path.name != MARKER)
        assert sorted(filter_repo_objects(saved, allow_patterns=HUB_PATTERNS)) == saved, checkpoint.name
    for family in FAMILIES.values():
        configs = [f"{folder}/config.json" for folder in family.folders]
        assert sorted(filter_repo_objects(configs, allow_patterns=HUB_PATTERNS)) == configs, family.name


def test_a_run_fetches_what_transformers_reads_for_a_tokenizer_or_processor():
    """The files transformers' from_pretrained looks for in FLUX.2's tokenizer folder (Qwen2's
    tokenizer, Pixtral's processor): by the installed library's own names."""
    from transformers.utils import (
        CHAT_TEMPLATE_DIR,
        CHAT_TEMPLATE_FILE,
        FEATURE_EXTRACTOR_NAME,
        IMAGE_PROCESSOR_NAME,
        LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
        PROCESSOR_NAME,
    )
    from transformers.tokenization_utils_base import (
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
    )

    names = [CHAT_TEMPLATE_FILE, f"{CHAT_TEMPLATE_DIR}/default.jinja", LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
             PROCESSOR_NAME, IMAGE_PROCESSOR_NAME, FEATURE_EXTRACTOR_NAME, ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE,
             SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, "tekken.json", "vocab.json", "merges.txt",
             "spiece.model"]
    files = sorted({f"tokenizer/{name}" for name in names})
    assert sorted(filter_repo_objects(files, allow_patterns=HUB_PATTERNS)) == files


def test_the_weights_fingerprint_covers_the_chat_template(tiny_klein, tmp_path):
    """FLUX.2's encoders apply the tokenizer's chat template to every prompt: another template is
    another run, which a resume must not mix."""
    import shutil

    from flux_sharded.checkpoint import weights_fingerprint

    copy = tmp_path / "klein"
    shutil.copytree(tiny_klein, copy)
    before = weights_fingerprint(copy)
    template = copy / "tokenizer" / "chat_template.jinja"
    template.write_text(template.read_text() + "\n")
    assert weights_fingerprint(copy) != before


def test_a_weight_file_whose_header_safetensors_refuses_is_refused_before_any_stage(tmp_path):
    """Sizes that add up are not enough: a tensor of 4 float32 values given 8 bytes is refused by
    safetensors' own header check (safe_open), with its reason, before any stage loads."""
    from flux_sharded.checkpoint import _check_safetensors

    header = json.dumps({"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    file = tmp_path / "model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError) as refused:
        _check_safetensors(file, "m")
    message = str(refused.value)
    assert message.startswith(f"--model: 'm': {file} is truncated or corrupt (safetensors: ")  # its own reason
    assert "invalid shape, data type, or offset" in message and message.endswith("; download that file again")


def _without_tensor(checkpoint: Path, copy: Path, component: str, name: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, copy)
    (file,) = (copy / component).glob("*.safetensors")
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    return copy


def test_a_mistral3_saved_under_its_original_names_is_checked_as_transformers_loads_it(tiny_dev, tmp_path):
    """transformers 5 saves Mistral3 as `language_model.model.*` and loads it as
    `model.language_model.*` (its conversion mapping): the tiny FLUX.2-dev's encoder, saved so, passes
    whole; one tensor the cut encoder reads, taken out, is named as loaded; one of a layer after the
    cut (a layer FLUX.2's encode never reads) may be missing."""
    from flux_sharded.checkpoint import check_weight_files, read_checkpoint

    check_weight_files(read_checkpoint(str(tiny_dev), tiny_dev))
    broken = _without_tensor(tiny_dev, tmp_path / "broken", "text_encoder",
                             "language_model.model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(CheckpointError) as refused:
        check_weight_files(read_checkpoint(str(broken), broken))
    assert str(refused.value) == (
        f"--model: '{broken}': text_encoder's weight files lack model.language_model.layers.0.self_attn.q_proj.weight, "
        "which its config.json builds: the download is incomplete or the weights belong to another model than the "
        "config; fetch the checkpoint again")
    cut = _without_tensor(tiny_dev, tmp_path / "cut", "text_encoder", "language_model.lm_head.weight")
    check_weight_files(read_checkpoint(str(cut), cut))


def test_a_qwen3_tensor_missing_is_refused_before_any_stage(tiny_klein, tmp_path):
    from flux_sharded.checkpoint import check_weight_files, read_checkpoint

    broken = _without_tensor(tiny_klein, tmp_path / "broken", "text_encoder", "model.embed_tokens.weight")
    with pytest.raises(CheckpointError, match=r"text_encoder's weight files lack model.embed_tokens.weight, which"):
        check_weight_files(read_checkpoint(str(broken), broken))


def test_a_chat_template_that_does_not_render_is_refused_before_any_stage(tiny_klein, tmp_path):
    """Flux2KleinPipeline renders every prompt through the Qwen3 tokenizer's chat template: a broken
    one failed inside encode, after run.json."""
    from flux_sharded.checkpoint import check_tokenizers

    broken = tmp_path / "klein"
    shutil.copytree(tiny_klein, broken)
    (broken / "tokenizer" / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }")
    with pytest.raises(CheckpointError) as refused:
        check_tokenizers(str(broken), broken)
    assert str(refused.value).startswith(f"--model: '{broken}': tokenizer's chat template does not render (")
    assert str(refused.value).endswith("; the checkpoint is incomplete: fetch its tokenizer folder again")


def test_a_torchao_quantization_config_over_plain_weights_is_refused(tiny_checkpoint, tmp_path):
    """Weights saved without torchao's layout under a config that says torchao (on a machine with a
    GPU the run's placement checks pass, and the load failed inside denoise)."""
    from flux_sharded.checkpoint import check_weight_files, read_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": {}}
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="transformer/config.json has a torchao quantization_config, but its "
                                              "weight files hold no torchao tensors"):
        check_weight_files(read_checkpoint(str(broken), broken))


def test_a_chat_template_that_leaves_the_prompt_out_is_refused(tiny_klein, tmp_path):
    """One that renders a constant text gave every prompt the same image (found by the fresh-clone tester)."""
    from flux_sharded.checkpoint import check_tokenizers

    broken = tmp_path / "klein"
    shutil.copytree(tiny_klein, broken)
    (broken / "tokenizer" / "chat_template.jinja").write_text("constant text, no prompt")
    with pytest.raises(CheckpointError, match=r"tokenizer's chat template leaves the prompt out of the text it renders; "
                                              r"the checkpoint is incomplete"):
        check_tokenizers(str(broken), broken)
