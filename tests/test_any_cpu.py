"""The suite passes on any x86-64 CPU and in any caller's environment.

- bitsandbytes runs 4-bit layers on a CPU with AVX512-BF16 through a fused kernel of its own,
  which first repacks each weight and refuses narrow layers; every 4-bit layer the nf4 tests run
  on the CPU is one it takes (the checkpoints are built NF4_CPU_TEXT_WIDTH wide for that).
- The variables the libraries read (HF_HUB_OFFLINE, HF_HOME, CUDA_VISIBLE_DEVICES, ...) are the
  tests' own (conftest.py): tests that depend on them pass with the caller's set otherwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _nf4_text_encoder(checkpoint: Path, folder: str, class_name: str) -> torch.nn.Module:
    """The whole text encoder in 4-bit, loaded as the one-piece references of the nf4 tests load it."""
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)
    return getattr(transformers, class_name).from_pretrained(checkpoint, subfolder=folder, quantization_config=config,
                                                             dtype=torch.float32, device_map="cpu")


@pytest.mark.parametrize("fixture, folder, class_name", [
    ("nf4_checkpoint", "text_encoder_2", "T5EncoderModel"),
    ("nf4_klein", "text_encoder", "Qwen3ForCausalLM"),
    ("nf4_dev", "text_encoder", "Mistral3ForConditionalGeneration"),
    ("nf4_flux3", "text_encoder", "Qwen3VLForConditionalGeneration"),
])
def test_every_nf4_layer_the_cpu_tests_run_is_one_bitsandbytes_takes_on_avx512_bf16(request, fixture, folder,
                                                                                     class_name):
    """bitsandbytes' Linear4bit.forward on such a CPU calls functional._convert_weight_packed_for_cpu
    (bitsandbytes 0.50.2) before its first product; this machine may lack AVX512-BF16, so the
    repacking is called here directly, on copies, for every 4-bit layer. The tiny checkpoints' 16-
    and 32-wide encoders fail it ("N must be divisible by block_n", "shape '[32, 0]' is invalid")."""
    bnb = pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes: `make test` installs it (the test extra)")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _nf4_text_encoder(request.getfixturevalue(fixture), folder, class_name)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers, "nothing was loaded in 4-bit"
    for name, layer in layers:
        weight = layer.weight
        try:
            packed, _state = _convert_weight_packed_for_cpu(weight.data.clone(), copy.deepcopy(weight.quant_state))
        except (AssertionError, RuntimeError) as error:
            pytest.fail(f"{fixture} {folder}.{name} {tuple(weight.quant_state.shape)}: bitsandbytes' AVX512-BF16 "
                        f"path refuses it ({error})")
        assert packed.numel() * 2 == weight.quant_state.shape.numel()


CALLERS_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # the README suggests it; it changed the hub's error message
    "HF_HOME": "/nonexistent/hf-home",
    "CUDA_VISIBLE_DEVICES": "0",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "FLUX_SHARDED_DEBUG": "1",
}
# Tests that read one of those variables, directly or through a library.
ENVIRONMENT_DEPENDENT_TESTS = (
    "tests/test_cli_hints.py::test_model_messages_tell_a_typo_from_a_network_failure",
    "tests/test_cli_hints.py::test_offline_hub_id_says_hf_hub_offline",
)


def test_tests_pass_whatever_the_callers_environment(tmp_path):
    """pytest run again, in a child process, with the caller's variables set to values that changed
    those tests' outcome before conftest.py isolated them."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ENVIRONMENT_DEPENDENT_TESTS],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **CALLERS_ENVIRONMENT},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
