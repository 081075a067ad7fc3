"""`--quantize`'s bytes, counted on the meta device: what each method stores, never a weight read.

The planner builds each component on meta (components.empty_component) and `quantized_meta` gives
every tensor the library converts the shape and dtype it is stored in: fp8 by applying diffusers'
very layerwise casting to the meta model; int8 (torchao) and nf4 (bitsandbytes) by giving each
layer that the library converts its stored tensors (weights, scales, block statistics).
`stored_bytes` counts what a loaded model really holds (quantize_load.py loads it), which tests
and benchmarks/quantize_bytes.py compare with the plan. The methods and their trade-offs:
quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import QuantizeError

FP8_STORAGE = torch.float8_e4m3fn
# bitsandbytes' 4-bit layout (bitsandbytes/functional.py quantize_4bit): two 4-bit codes per byte,
# one float32 absmax per block of 64 weights, no double quantization (our BitsAndBytesConfig).
NF4_BLOCK_SIZE = 64
NF4_NESTED_BLOCK_SIZE = 256  # bitsandbytes' blocks of absmax values under double quantization


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
