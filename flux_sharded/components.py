"""Build FLUX.1 components on the meta device from their configs, and count their weight bytes.

Never reads a weight file. Sizes count the dtype each parameter will really have once loaded:
the requested dtype, except modules that transformers keeps in float32 (T5's `wo` in float16),
and they count tied or shared weights once (T5's `shared` is `encoder.embed_tokens`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes

# Component name -> (library, class) as in FLUX.1's model_index.json.
COMPONENT_CLASSES = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}


def empty_component(config_root: Path, name: str, quantization: str | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The component `name` with every parameter on the meta device, from `config_root/name/config.json`;
    with `quantization` ("fp8", "int8", "nf4"), its tensors as that method stores them for compute in
    `dtype` (quantize.quantized_meta), so that module_sizes counts the quantized bytes."""
    model = _empty_component(config_root, name)
    if quantization:
        from .quantize import quantized_meta

        model = quantized_meta(model, quantization, dtype)
    return model


def _empty_component(config_root: Path, name: str) -> torch.nn.Module:
    library, class_name = COMPONENT_CLASSES[name]
    folder = config_root / name
    if library == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = getattr(transformers, class_name)(config)
        model.tie_weights()  # as from_pretrained does: T5's encoder.embed_tokens is `shared`
        return model
    import diffusers

    model_class = getattr(diffusers, class_name)
    with init_empty_weights():
        return model_class.from_config(model_class.load_config(folder))


def special_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Parameters that loading keeps in float32 whatever the requested dtype (transformers' rules)."""
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    special = {
        name: torch.float32
        for name, _ in model.named_parameters()
        if any(module in name.split(".") for module in keep)
    }
    # Quantization statistics stored in float32 whatever the compute dtype (quantize.quantized_meta).
    special.update(getattr(model, "quantized_special_dtypes", None) or {})
    return special


def module_sizes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per module name ("" is the whole model), shared parameters counted once."""
    return dict(compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes(model, dtype)))


def no_split_modules(model: torch.nn.Module) -> list[str]:
    """Classes that must stay whole on one device (transformer blocks, T5 blocks, ...)."""
    return list(getattr(model, "_no_split_modules", None) or ())
