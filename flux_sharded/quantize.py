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

The planner counts quantized bytes on the meta device (`quantized_meta`): fp8 by applying the very
layerwise casting to the meta model; int8 and nf4 by giving each layer that the library converts
its stored tensors' shapes and dtypes (weights, scales, block statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SettingsError
from .families import FAMILIES, FLUX_1, Family

METHODS = ("none", "fp8", "int8", "nf4")
# Every family's components, for a spec read without its checkpoint (run.json, the handoff) and for
# the folders a pre-quantized checkpoint may hold; the family's own list is checked where it is known.
COMPONENTS = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.names))
FP8_STORAGE = torch.float8_e4m3fn
# bitsandbytes' 4-bit layout (bitsandbytes/functional.py quantize_4bit): two 4-bit codes per byte,
# one float32 absmax per block of 64 weights, no double quantization (our BitsAndBytesConfig).
NF4_BLOCK_SIZE = 64
NF4_NESTED_BLOCK_SIZE = 256  # bitsandbytes' blocks of absmax values under double quantization


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


def fp8_cast(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """diffusers' layerwise casting to float8 storage, with the model's own skip patterns (a
    diffusers model) or diffusers' default ones (a transformers text encoder)."""
    if hasattr(model, "enable_layerwise_casting"):
        model.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype)
        return
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    # As ModelMixin.enable_layerwise_casting does for a diffusers model, the modules the model keeps
    # in float32 are skipped too: T5's `wo` casts its input to its own weight's dtype, which would
    # be float8 while the hook upcasts the weight.
    # Token embeddings stay in the compute dtype too: FluxPipeline.encode_prompt casts the embeddings
    # to the encoder's dtype, which transformers takes from its first parameter, the token embedding.
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    apply_layerwise_casting(model, storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype,
                            skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + keep,
                            skip_modules_classes=(torch.nn.Embedding,))


@dataclass(frozen=True)
class Nf4Layout:
    """What a bitsandbytes 4-bit quantization_config changes in the stored bytes: ours (asked for
    with --quantize nf4) is the default; a pre-quantized component's config.json may differ."""

    # llm_int8_skip_modules: the modules left unconverted, in place of transformers' own choice
    # (get_keys_to_not_convert) and on top of diffusers' (_keep_in_fp32_modules); None: the defaults.
    skip_modules: tuple[str, ...] | None = None
    # bnb_4bit_use_double_quant: each block's absmax stored in 8 bits, with float32 second-level
    # statistics (one absmax per NF4_NESTED_BLOCK_SIZE blocks, a 256-entry code, an offset).
    double_quant: bool = False


def saved_nf4_layout(config_root, component: str) -> Nf4Layout:
    """The Nf4Layout of `component`'s config.json quantization_config (the default without one)."""
    import json
    from pathlib import Path

    path = Path(config_root) / component / "config.json"
    try:
        quantization = json.loads(path.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return Nf4Layout()  # a missing or broken config is the checkpoint checks' to report
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsandbytes":
        return Nf4Layout()
    skip = quantization.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(name, str) for name in skip)):
        raise QuantizeError(f"{path}: quantization_config llm_int8_skip_modules {skip!r} is not a list of module "
                            "names; fix or remove it")
    return Nf4Layout(tuple(skip) if skip is not None else None, quantization.get("bnb_4bit_use_double_quant") is True)


def quantized_linears(model: torch.nn.Module, method: str,
                      skip_modules: tuple[str, ...] | None = None) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear layers torchao's int8 weight-only (`method` "int8") or bitsandbytes ("nf4")
    converts, as the library's own quantizer chooses them:

    - a diffusers model: every Linear but its `_keep_in_fp32_modules` and, for nf4, `skip_modules`
      (diffusers' quantizers add them to modules_to_not_convert and match a name as
      replace_with_bnb_linear does: the layer's own name, or a dotted part of its path);
    - a transformers model, int8: every Linear, T5's `wo` included (transformers' torchao quantizer
      matches its skip list against parameter names, "...wo.weight", which "wo" does not end);
    - a transformers model, nf4: every Linear but those transformers' bitsandbytes quantizer skips,
      matched on module names: `_keep_in_fp32_modules` (T5's `wo`) and `skip_modules` (a saved
      llm_int8_skip_modules), or else `get_keys_to_not_convert` (tied and output embeddings, the
      last module).

    The transformers rules are pinned by tests/test_quantize.py and tests/test_quantize_flux2.py,
    which load T5 and Qwen3 through the real quantizers on the CPU and compare the stored bytes
    with the plan's; the diffusers rule by their test against diffusers' own preprocess_model."""
    is_diffusers = hasattr(model, "enable_layerwise_casting")
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or ())
    if is_diffusers:
        skipped = keep + list(skip_modules or ()) if method == "nf4" else keep
        return [(name, module) for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and not _diffusers_skips(name, skipped)]
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if method == "nf4":
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skipped = [*(skip_modules if skip_modules is not None else get_keys_to_not_convert(model)), *keep]
        linears = [(name, module) for name, module in linears if should_convert_module(name, skipped)]
    return linears


def _diffusers_skips(name: str, skipped: list[str]) -> bool:
    """diffusers' replace_with_bnb_linear test of a Linear at `name` against modules_to_not_convert."""
    return name.rsplit(".", 1)[-1] in skipped or any(f"{key}." in name or key == name for key in skipped)


def quantized_meta(model: torch.nn.Module, method: str, dtype: torch.dtype,
                   nf4_layout: Nf4Layout = Nf4Layout()) -> torch.nn.Module:
    """The meta model `model` with each quantized tensor given the shape and dtype it is stored in,
    so that accelerate's compute_module_sizes(model, dtype) counts the quantized bytes exactly
    (it counts a tensor at min(dtype, its own dtype), integers at their own size).

    fp8: diffusers' layerwise casting itself, applied on meta. int8 (torchao weight-only): an int8
    weight of the same shape plus one `dtype` scale per output row. nf4: numel/2 bytes of packed
    codes plus one float32 absmax per NF4_BLOCK_SIZE weights, or with `nf4_layout.double_quant` a
    uint8 absmax per block and float32 second-level statistics.
    """
    if method == "fp8":
        fp8_cast(model, dtype)
        return model
    special: dict[str, torch.dtype] = {}
    for name, linear in quantized_linears(model, method, nf4_layout.skip_modules):
        weight = linear.weight
        if method == "int8":
            # torchao's Int8Tensor: int8 qdata, a float32 scale and an int8 zero point per row.
            linear.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=torch.int8, device="meta"),
                                               requires_grad=False)
            linear.register_buffer("weight_scale", torch.empty(weight.shape[0], 1, dtype=torch.float32, device="meta"))
            linear.register_buffer("weight_zero_point", torch.empty(weight.shape[0], 1, dtype=torch.int8,
                                                                    device="meta"))
            special[f"{name}.weight_scale"] = torch.float32
        elif method == "nf4":
            linear.weight = torch.nn.Parameter(torch.empty((weight.numel() + 1) // 2, 1, dtype=torch.uint8,
                                                           device="meta"), requires_grad=False)
            blocks = -(-weight.numel() // NF4_BLOCK_SIZE)
            statistics = {"weight_absmax": (blocks,)}
            if nf4_layout.double_quant:  # bitsandbytes' quantize_4bit(compress_statistics=True)
                linear.register_buffer("weight_absmax", torch.empty(blocks, dtype=torch.uint8, device="meta"))
                statistics = {"weight_absmax2": (-(-blocks // NF4_NESTED_BLOCK_SIZE),), "weight_code2": (256,),
                              "weight_offset": ()}
            for buffer, shape in statistics.items():
                linear.register_buffer(buffer, torch.empty(shape, dtype=torch.float32, device="meta"))
                special[f"{name}.{buffer}"] = torch.float32
        else:
            raise ValueError(f"unknown quantization method {method!r}")
    model.quantized_special_dtypes = special
    return model


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes a loaded model really stores: every parameter and buffer once, a torchao tensor by its
    inner tensors (int8 data and scales), a bitsandbytes 4-bit weight with its quantization state."""
    unique = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return sum(_tensor_bytes(tensor) for tensor in unique.values())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # a tensor subclass (torchao): the tensors it holds
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes' 4-bit statistics
    if state is None:
        return size
    size += state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):  # double quantization: the absmax values' own statistics
        size += sum(part.numel() * part.element_size() for part in (state.state2.absmax, state.state2.code, state.offset))
    return size


def from_pretrained(model_class, path, subfolder: str, method: str | None, dtype: torch.dtype,
                    device_map: dict | None = None, **kwargs):
    """`model_class.from_pretrained` with the component's quantization, compute in `dtype`.

    None: as is, with `device_map`. fp8 and int8: loaded on the CPU (int8 quantized as it loads,
    fp8 cast right after), for the caller to place (offload.place): loading in `dtype` straight
    onto a GPU would hold the unquantized weights there, and diffusers' torchao quantizer skips
    every module a device map sends to the CPU. nf4: bitsandbytes quantizes as it loads onto the
    devices of `device_map`, whole (bitsandbytes' 4-bit layers cannot be offloaded): GPUs, or the
    CPU for a text encoder. A pre-quantized component (prequantized) loads as it is stored, with
    its own quantization_config.
    """
    common = dict(subfolder=subfolder, dtype=dtype, use_safetensors=True, **kwargs)
    if not method or subfolder in prequantized(path):  # a pre-quantized component loads as it is stored
        return model_class.from_pretrained(path, device_map=device_map, **common)
    diffusers_model = model_class.__module__.startswith("diffusers")
    if method == "fp8":
        model = model_class.from_pretrained(path, **common)
        fp8_cast(model, dtype)
        return model
    import diffusers
    import transformers

    library = diffusers if diffusers_model else transformers
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return model_class.from_pretrained(path, quantization_config=library.TorchAoConfig(Int8WeightOnlyConfig()),
                                           **common)
    if method == "nf4":
        config = library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return model_class.from_pretrained(path, quantization_config=config, device_map=device_map, **common)
    raise ValueError(f"unknown quantization method {method!r}")


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


def load_quantized(model_class, path, subfolder: str, component_plan, dtype: torch.dtype, gpu_device=None):
    """A quantized component (component_plan.quantization set) loaded and placed as its plan says:
    fp8 and int8 load on the CPU, then move (stages/offload.place: whole, over GPUs, or streamed);
    nf4 loads straight onto its GPUs."""
    from .stages.offload import cuda_device, place

    method = component_plan.quantization
    model = from_pretrained(model_class, path, subfolder, method, dtype,
                            device_map=dict(component_plan.device_map) if method == "nf4" else None)
    if method != "nf4":
        place(model, dict(component_plan.device_map), gpu_device or cuda_device)
    return model
