"""`--quantize`: low-bit storage of the large components, compute in `--dtype`.

Methods, in diffusers' words, each a well-kept library's own mechanism:

- `fp8`: float8 (e4m3) storage with per-layer upcast: diffusers' layerwise casting
  (`ModelMixin.enable_layerwise_casting`, `diffusers.hooks.apply_layerwise_casting` for the
  transformers text encoders), with its default skip patterns (norms, embeddings of positions,
  `proj_out`), the model's own `_skip_layerwise_casting_patterns` and its float32 modules. CPU and
  any GPU. FLUX.1's transformer skips "norm", which holds its AdaLN modulation layers (6.4 GB in
  bf16): fp8 stores it in 15.15 GB, not half of 23.8 GB.
- `int8`: int8 weight-only through torchao (`Int8WeightOnlyConfig`, via diffusers' and
  transformers' `TorchAoConfig` at load): every `nn.Linear` weight becomes int8 with one scale
  per output channel. Needs the optional `torchao` (`pip install 'flux-sharded[quantize]'`).
- `nf4`: bitsandbytes 4-bit NormalFloat (`BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")`). The transformer needs CUDA (diffusers loads 4-bit weights onto a
  GPU only): refused before anything loads on a machine without one. Text encoders load through
  transformers, which bitsandbytes 0.50 also runs on the CPU. T5 keeps its `wo` unconverted.

`--quantize fp8` quantizes the family's large components (families.Component.large:
FLUX.1's transformer and T5, FLUX.2's transformer and its Mistral or Qwen3 text encoder);
`--quantize transformer=nf4,text_encoder_2=int8` names components. The other ones (CLIP, the VAE)
stay in `--dtype` unless named.

This module is the option's grammar and the checks made before anything loads (a method this
machine cannot run, a component quantized already); the planner counts the quantized bytes on the
meta device with quantize_bytes.py, and the stages load with quantize_load.py.
"""

from __future__ import annotations

from .errors import SettingsError
from .families import FAMILIES, FLUX_1, Family

METHODS = ("none", "fp8", "int8", "nf4")
# How a LoRA joins a quantized component (a diffusers model: the transformer), measured on the mini
# checkpoint (benchmarks/lora.py, RESULTS.md): fp8 fused into the --dtype weights before they are
# cast (as close to the unquantized image as adapters cast with the layers, without their bytes; an
# adapter added after the cast takes the fp8 storage dtype and its forward fails on the CPU); int8
# unfused (PEFT's torchao LoRA layer keeps the adapter in --dtype beside the int8 weight: 0.15 mean
# pixel difference from the unquantized image, fused 0.24). nf4: not offered.
LORA_MERGE = {"fp8": "fused", "int8": "unfused"}
# Every family's components, for a spec read without its checkpoint (run.json, the handoff) and for
# the folders a pre-quantized checkpoint may hold; the family's own list is checked where it is known.
COMPONENTS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.names))


class QuantizeError(SettingsError):
    """A bad --quantize spec, or a method this machine cannot run."""


def parse_quantize(spec: str | None, family: Family | None = None) -> dict[str, str]:
    """'fp8' -> {"transformer": "fp8", "text_encoder_2": "fp8"} (the family's large_components);
    'none' -> {}; 'transformer=nf4,text_encoder_2=int8' -> those two. family: the checkpoint's, whose
    components a spec may name; None (a spec saved by format_quantize) accepts any family's
    components and COMPONENT=METHOD entries only. Raises QuantizeError naming the bad part."""
    if spec is None or spec.strip().lower() == "none":
        return {}
    spec = spec.strip()
    example = _example(family)
    if "=" not in spec:
        if "," in spec:  # 'none,fp8': a list of methods names no component for each
            raise QuantizeError(f"--quantize: '{spec}' lists methods without components; give one method for the "
                                f"large components, or COMPONENT=METHOD pairs ({example})")
        method = _method(spec, spec, example)
        if family is None:
            raise QuantizeError(f"--quantize: '{spec}' names no component ({example})")
        return dict.fromkeys(family.large_components, method)
    names = family.names if family is not None else COMPONENTS
    chosen: dict[str, str] = {}
    for entry in spec.split(","):
        if entry.count("=") != 1:
            raise QuantizeError(f"--quantize: '{entry.strip()}' is not COMPONENT=METHOD ({example})")
        component, method = (part.strip() for part in entry.split("="))
        if component not in names:
            of = f" of {family.name}" if family is not None else ""
            raise QuantizeError(f"--quantize: '{component}' is not a component{of}; use {', '.join(names)} ({example})")
        if component in chosen:
            raise QuantizeError(f"--quantize: '{component}' is given twice; give each component once ({example})")
        method = _method(method, entry.strip(), example)
        if method != "none":
            chosen[component] = method
    return chosen


def _example(family: Family | None) -> str:
    """'e.g. --quantize fp8, or --quantize transformer=nf4,text_encoder_2=int8' in the family's names
    (FLUX.1's for a spec read without its checkpoint)."""
    encoder = next(name for name in (family or FLUX_1).large_components if name != "transformer")
    return f"e.g. --quantize fp8, or --quantize transformer=nf4,{encoder}=int8"


def _method(method: str, where: str, example: str) -> str:
    method = method.lower()
    if method not in METHODS:
        raise QuantizeError(f"--quantize: '{where}' names an unknown method; use {', '.join(METHODS)} ({example})")
    return method


def format_quantize(chosen: dict[str, str]) -> str:
    """The spec back, as saved in run.json and PNG metadata ('none' when nothing is quantized)."""
    return ",".join(f"{component}={method}" for component, method in sorted(chosen.items())) or "none"


def check_available(chosen: dict[str, str], libraries: dict[str, str]) -> None:
    """Refuse, before anything loads, a method this machine cannot run.

    chosen: component -> method (asked for, or a pre-quantized component's); libraries: component
    -> "diffusers" or "transformers" (its family's registry). nf4 on a diffusers component needs
    CUDA (diffusers' bitsandbytes quantizer refuses to load without a GPU); transformers loads 4-bit
    text encoders on the CPU too, with bitsandbytes 0.50 or later (tests/test_quantize.py runs it)."""
    import torch  # here, not at the top: the command line parses --quantize before it imports torch

    on_gpu_only = sorted(name for name, method in chosen.items()
                         if method == "nf4" and libraries.get(name) == "diffusers")
    if on_gpu_only and not torch.cuda.is_available():
        raise QuantizeError(
            f"--quantize nf4 needs a CUDA GPU for the {' and '.join(on_gpu_only)} (diffusers loads bitsandbytes' 4-bit "
            "weights onto a GPU only); this machine has none: use fp8 or int8 for it, which run on the CPU too"
            + ("" if on_gpu_only == sorted(n for n, m in chosen.items() if m == "nf4") else
               " (nf4 for the text encoders alone runs on the CPU)"))
    if "nf4" in chosen.values():
        _require("bitsandbytes", "nf4")
        if not torch.cuda.is_available():
            import bitsandbytes

            if _version(bitsandbytes.__version__) < (0, 50):
                raise QuantizeError(f"--quantize nf4 on the CPU needs bitsandbytes 0.50 or later (this machine has "
                                    f"{bitsandbytes.__version__}): pip install -U bitsandbytes")
    if "int8" in chosen.values():
        _require("torchao", "int8")


def _version(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _require(package: str, method: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise QuantizeError(f"--quantize {method} needs the {package} package, not installed here: "
                            f"pip install 'flux-sharded[quantize]' (or pip install {package})")


def prequantized(config_root) -> dict[str, str]:
    """Components whose config.json carries a `quantization_config` (a pre-quantized checkpoint such
    as diffusers/FLUX.1-dev-bnb-4bit), and the method it amounts to for the plan: bitsandbytes
    4-bit -> nf4 (counted in its saved layout: saved_nf4_layout), 8-bit or torchao -> int8; a
    layout this tool cannot count is refused."""
    import json
    from pathlib import Path

    found = {}
    for component in COMPONENTS:
        path = Path(config_root) / component / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a missing or broken config is the checkpoint checks' to report
        quantization = config.get("quantization_config") if isinstance(config, dict) else None
        if not quantization:
            continue
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method == "bitsandbytes" and quantization.get("load_in_4bit"):
            found[component] = "nf4"
        elif method in ("bitsandbytes", "torchao"):
            found[component] = "int8"
        else:
            raise QuantizeError(f"{path}: quantization_config {method!r} is a layout this tool cannot plan; use a "
                                "bitsandbytes or torchao checkpoint, or the unquantized one with --quantize")
    return found


def stored_by_torchao(config_root) -> set[str]:
    """The pre-quantized components whose quantization_config is torchao's (prequantized read it)."""
    import json
    from pathlib import Path

    return {component for component in prequantized(config_root)
            if json.loads((Path(config_root) / component / "config.json").read_text())["quantization_config"].get(
                "quant_method") == "torchao"}


def check_prequantized(config_root, chosen: dict[str, str]) -> None:
    """Refuse --quantize on a component that is quantized already."""
    for component, method in prequantized(config_root).items():
        if component in chosen:
            raise QuantizeError(f"--quantize: {component} in {config_root} is quantized already ({method}, its "
                                "config.json has a quantization_config); it loads as it is: drop it from --quantize")


def check_prequantized_dtype(config_root, dtype: str) -> None:
    """Refuse a --dtype other than the one a pre-quantized bitsandbytes component computes in.

    transformers keeps such a component as it was saved, whatever `dtype=` asks (its
    `bnb_4bit_compute_dtype` and its unquantized tensors), so its outputs would reach the next
    stage in the saved dtype (a float32 T5's embeddings against a bfloat16 transformer: a dtype
    error in denoise, and again on every resume). dtype: "bfloat16", "float16" or "float32"."""
    import json
    from pathlib import Path

    for component in prequantized(config_root):
        path = Path(config_root) / component / "config.json"
        quantization = json.loads(path.read_text())["quantization_config"]  # read and checked by prequantized
        saved = quantization.get("bnb_4bit_compute_dtype")
        if isinstance(saved, str) and saved.removeprefix("torch.") != dtype:
            saved = saved.removeprefix("torch.")
            raise QuantizeError(f"--dtype {dtype}: {component} in {config_root} is pre-quantized to compute in {saved} "
                                f"(config.json quantization_config bnb_4bit_compute_dtype), which loading keeps; run "
                                f"with --dtype {saved}")


