"""Tiny random FLUX.1, FLUX.2 and FLUX.3 checkpoints, built offline once per test session, the one-piece
reference, and an environment of the tests' own.

The environment: the variables below change what the libraries do (huggingface_hub reads
HF_HUB_OFFLINE and HF_HOME once, when it is first imported), so they are removed here, before any
test module imports a library, and every test (and every subprocess a test starts with
os.environ) sees the same: no GPU named, no offline mode, a Hugging Face home of its own, the
allocator's defaults. A test that needs one sets it itself.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import weakref

ISOLATED_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                      "HF_ENDPOINT", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
                      "PYTORCH_ALLOC_CONF", "FLUX_SHARDED_DEBUG", "LOCAL_RANK", "RANK", "WORLD_SIZE",
                      "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
ISOLATED_PREFIXES = ("ACCELERATE_",)


def _isolate_environment() -> None:
    for name in [name for name in os.environ if name in ISOLATED_VARIABLES or name.startswith(ISOLATED_PREFIXES)]:
        del os.environ[name]
    # An empty Hugging Face home and user cache (the key that seals run folders, the weights'
    # digests): nothing of the caller's cache is read or written.
    os.environ["HF_HOME"] = HF_HOME
    os.environ["XDG_CACHE_HOME"] = USER_CACHE


HF_HOME = tempfile.mkdtemp(prefix="flux-sharded-tests-hf-")
USER_CACHE = tempfile.mkdtemp(prefix="flux-sharded-tests-cache-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
atexit.register(shutil.rmtree, USER_CACHE, ignore_errors=True)
_isolate_environment()

from pathlib import Path  # noqa: E402 (after the environment is set: the imports below read it)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from flux_sharded.checkpoint import pipeline_tokenizer, upsampler_processor  # noqa: E402
from flux_sharded.cli import main  # noqa: E402
from flux_sharded.families import MODULAR_PIPELINES  # noqa: E402
from flux_sharded.tiny import (NF4_CPU_TEXT_WIDTH, build_tiny_checkpoint, build_tiny_flux2_checkpoint,  # noqa: E402
                               build_tiny_flux3_checkpoint, build_tiny_upsampler)


@pytest.fixture(autouse=True)
def isolated_environment():
    """The same environment again for each test: code under an earlier test (the launcher's GPU
    selection, say) may have set one of the variables in os.environ itself. Not monkeypatch: it
    would put such a value back after the test."""
    _isolate_environment()


# Small enough for a CPU, large enough that a wrong latent layout changes the pixels.
STEPS = 3
SIZE = 64
HELP_WIDTH = 100  # columns --help is wrapped to, as in the README's usage block


def invoke(args):
    """The command line, in this process (click's CliRunner)."""
    return CliRunner().invoke(main, args, terminal_width=HELP_WIDTH)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error: ")]


def error_line(result) -> str:
    """The one `Error: ...` line of a refused command, which shows no traceback."""
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """VAE scale factor 8, like FLUX.1."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-f8", vae_scale_factor=8, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_f2(tmp_path_factory) -> Path:
    """VAE scale factor 2: catches any code that assumes FLUX.1's 8."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-f2", vae_scale_factor=2, seed=1)


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> Path:
    """FLUX.2-klein (Flux2KleinPipeline), step-distilled like the published ones, VAE scale factor 8."""
    return build_tiny_flux2_checkpoint(tmp_path_factory.mktemp("ckpt") / "klein", "FLUX.2-klein", seed=0)


@pytest.fixture(scope="session")
def tiny_klein_base(tmp_path_factory) -> Path:
    """FLUX.2-klein not step-distilled (guides with a second pass), VAE scale factor 2."""
    return build_tiny_flux2_checkpoint(tmp_path_factory.mktemp("ckpt") / "klein-base", "FLUX.2-klein",
                                       vae_scale_factor=2, seed=1, distilled=False)


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory) -> Path:
    """FLUX.2-dev (Flux2Pipeline): a Mistral3 text encoder, guidance embedded; VAE scale factor 4."""
    return build_tiny_flux2_checkpoint(tmp_path_factory.mktemp("ckpt") / "dev", "FLUX.2-dev", vae_scale_factor=4,
                                       seed=2)


@pytest.fixture(scope="session")
def tiny_flux3(tmp_path_factory) -> Path:
    """FLUX.3 klein step-distilled (Flux3DistilledModularPipeline), VAE scale factor 8."""
    return build_tiny_flux3_checkpoint(tmp_path_factory.mktemp("ckpt") / "flux3", "FLUX.3-klein", seed=0)


@pytest.fixture(scope="session")
def tiny_flux3_base(tmp_path_factory) -> Path:
    """FLUX.3 klein base (Flux3ModularPipeline: classifier-free guidance), VAE scale factor 2."""
    return build_tiny_flux3_checkpoint(tmp_path_factory.mktemp("ckpt") / "flux3-base", "FLUX.3-klein-base",
                                       vae_scale_factor=2, seed=1)


@pytest.fixture(scope="session")
def tiny_upsampler(tmp_path_factory) -> Path:
    """FLUX.3's prompt upsampler (--upsample-prompt): a tiny random Qwen3.5 and its processor's files."""
    return build_tiny_upsampler(tmp_path_factory.mktemp("ckpt") / "upsampler", seed=0)


@pytest.fixture(scope="session")
def nf4_checkpoint(tmp_path_factory) -> Path:
    """The tiny FLUX.1 with a T5 that bitsandbytes' 4-bit CPU kernels run on every CPU (NF4_CPU_TEXT_WIDTH)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "nf4", seed=0, text_width=NF4_CPU_TEXT_WIDTH)


@pytest.fixture(scope="session")
def nf4_klein(tmp_path_factory) -> Path:
    """tiny_klein with a Qwen3 that bitsandbytes' 4-bit CPU kernels run on every CPU."""
    return build_tiny_flux2_checkpoint(tmp_path_factory.mktemp("ckpt") / "nf4-klein", "FLUX.2-klein", seed=0,
                                       text_width=NF4_CPU_TEXT_WIDTH)


@pytest.fixture(scope="session")
def nf4_dev(tmp_path_factory) -> Path:
    """tiny_dev with a Mistral3 that bitsandbytes' 4-bit CPU kernels run on every CPU."""
    return build_tiny_flux2_checkpoint(tmp_path_factory.mktemp("ckpt") / "nf4-dev", "FLUX.2-dev", vae_scale_factor=4,
                                       seed=2, text_width=NF4_CPU_TEXT_WIDTH)


@pytest.fixture(scope="session")
def nf4_flux3(tmp_path_factory) -> Path:
    """tiny_flux3 with a Qwen3-VL that bitsandbytes' 4-bit CPU kernels run on every CPU."""
    return build_tiny_flux3_checkpoint(tmp_path_factory.mktemp("ckpt") / "nf4-flux3", "FLUX.3-klein", seed=0,
                                       text_width=NF4_CPU_TEXT_WIDTH)


def one_piece_pixels(checkpoint: Path, prompt: str, seed: int, steps: int, height: int, width: int,
                     dtype: torch.dtype = torch.float32, guidance: float = 3.5,
                     max_sequence_length: int = 512, loras: tuple = ()) -> np.ndarray:
    """The checkpoint's diffusers pipeline (model_index.json's FluxPipeline, Flux2KleinPipeline, ...),
    whole, on the CPU: the reference every staged image must equal. loras: (file, scale) pairs,
    loaded as diffusers' documentation does it: load_lora_weights for each, then set_adapters."""
    import json

    import diffusers

    pipeline_name = json.loads((Path(checkpoint) / "model_index.json").read_text())["_class_name"]
    if pipeline_name in MODULAR_PIPELINES:
        (pixels,) = modular_pixels(checkpoint, pipeline_name, prompt, [seed], steps, height, width, dtype, guidance,
                                   loras)
        return pixels
    pipeline_class = getattr(diffusers, pipeline_name)
    pipeline = pipeline_class.from_pretrained(checkpoint, dtype=dtype)
    for index, (path, _) in enumerate(loras):
        pipeline.load_lora_weights(str(path), adapter_name=f"lora_{index}")
    if loras:
        pipeline.set_adapters([f"lora_{index}" for index in range(len(loras))], [scale for _, scale in loras])
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image)


def modular_pixels(checkpoint: Path, pipeline_name: str, prompt: str, seeds: list[int], steps: int, height: int,
                   width: int, dtype: torch.dtype = torch.float32, guidance: float = 3.5,
                   loras: tuple = ()) -> list[np.ndarray]:
    """FLUX.3's reference: modular_pipeline's images of `prompt`, one per seed (modular_images)."""
    return modular_images(modular_pipeline(checkpoint, pipeline_name, dtype, guidance, loras), prompt, seeds, steps,
                          height, width)


def modular_pipeline(checkpoint: Path, pipeline_name: str, dtype: torch.dtype = torch.float32,
                     guidance: float = 3.5, loras: tuple = (), upsampler: Path | None = None):
    """FLUX.3's one-piece pipeline: the modular pipeline's auto blocks (families.MODULAR_PIPELINES)
    without the prompt upsampler (with `upsampler`: with it, its Qwen3.5 model and its processor,
    or where that cannot be built here its text stand-in, checkpoint.upsampler_processor), as
    diffusers' documentation runs them: init_pipeline on the
    checkpoint, load_components; for the base model a classifier-free guider of scale `guidance`;
    loras: (file, scale) pairs, loaded as for the other families (one_piece_pixels) through the
    pipeline's own Flux3LoraLoaderMixin: load_lora_weights for each, then set_adapters.
    Its tokenizer is what the encode takes where the Qwen3VLProcessor cannot be built
    (checkpoint.pipeline_tokenizer; tests/test_flux3.py pins it to the processor's rendering)."""
    import diffusers
    from diffusers.guiders import ClassifierFreeGuidance

    blocks = getattr(diffusers.modular_pipelines, MODULAR_PIPELINES[pipeline_name])()
    if upsampler is None:
        blocks.sub_blocks.pop("prompt_upsampler")
    pipeline = blocks.init_pipeline(str(checkpoint))
    if upsampler is not None:
        import transformers

        pipeline.update_components(
            prompt_upsampler=transformers.Qwen3_5ForConditionalGeneration.from_pretrained(upsampler, dtype=dtype),
            prompt_upsampler_processor=upsampler_processor(upsampler))
    pipeline.load_components(names=["text_encoder", "transformer", "vae", "scheduler"], dtype=dtype)
    tokenizer = pipeline_tokenizer(str(checkpoint), Path(checkpoint), "tokenizer")
    if tokenizer is not None:
        pipeline.update_components(tokenizer=tokenizer)
    else:
        pipeline.load_components(names=["tokenizer"])
    if "guider" in pipeline.component_names:
        pipeline.update_components(guider=ClassifierFreeGuidance(guidance_scale=guidance))
    for index, (path, _) in enumerate(loras):
        pipeline.load_lora_weights(str(path), adapter_name=f"lora_{index}")
    if loras:
        pipeline.set_adapters([f"lora_{index}" for index in range(len(loras))], [scale for _, scale in loras])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def modular_images(pipeline, prompt: str, seeds: list[int], steps: int, height: int, width: int,
                   **inputs) -> list[np.ndarray]:
    """One call of modular_pipeline's pipeline: one prompt, num_images_per_prompt = len(seeds) with
    a generator per image, and the blocks' other `inputs` (max_sequence_length, ...)."""
    images = pipeline(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                      num_images_per_prompt=len(seeds), generator=[torch.Generator("cpu").manual_seed(seed)
                                                                   for seed in seeds], output="images", **inputs)
    return [np.asarray(image) for image in images]


def assert_same_pixels(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() == 0, (
        f"pixels differ: max {difference.max()}, mean {difference.mean():.4f}, "
        f"{(difference > 0).mean():.2%} of values"
    )


def bnb_4bit_transformer_copy(checkpoint: Path, copy: Path) -> Path:
    """A copy of `checkpoint` at `copy` whose transformer config says it is stored in bitsandbytes
    4-bit nf4 (the diffusers/FLUX.*-bnb-4bit layouts): diffusers loads such weights only onto a GPU,
    so only the config matters to what the CPU can test (the plan and the refusals)."""
    import json

    shutil.copytree(checkpoint, copy)
    config_path = copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    config_path.write_text(json.dumps(config))
    return copy


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, str, weakref.ref]]:
    """Every model read from a checkpoint, counted where the libraries read weights: diffusers' and
    transformers' from_pretrained, which every stage's load calls (class, subfolder, a weak
    reference to the model it returned)."""
    import diffusers
    import transformers

    found = []
    for base in (diffusers.ModelMixin, transformers.PreTrainedModel):
        original = base.__dict__["from_pretrained"].__func__

        def counted(cls, *args, _original=original, **kwargs):
            model = _original(cls, *args, **kwargs)
            found.append((cls.__name__, kwargs.get("subfolder"), weakref.ref(model)))
            return model

        monkeypatch.setattr(base, "from_pretrained", classmethod(counted))
    return found
