"""`--quantize`'s loader: a component read from its checkpoint folder with its quantization
(quantize.py says which methods, quantize_bytes.py what they store), compute in `--dtype`."""

from __future__ import annotations

from typing import Callable

import torch

from .placement import check_placement, place
from .quantize import LORA_MERGE, prequantized
from .quantize_bytes import fp8_cast


def from_pretrained(model_class, path, subfolder: str, method: str | None, dtype: torch.dtype,
                    device_map: dict | None = None, adapt: Callable | None = None, **kwargs):
    """`model_class.from_pretrained` with the component's quantization, compute in `dtype`.

    None: as is, with `device_map`. fp8 and int8: loaded on the CPU (int8 quantized as it loads,
    fp8 cast right after), for the caller to place (placement.place): loading in `dtype` straight
    onto a GPU would hold the unquantized weights there, and diffusers' torchao quantizer skips
    every module a device map sends to the CPU. nf4: bitsandbytes quantizes as it loads onto the
    devices of `device_map`, whole (bitsandbytes' 4-bit layers cannot be offloaded): GPUs, or the
    CPU for a text encoder. A pre-quantized component (prequantized) loads as it is stored, with
    its own quantization_config.

    adapt(model, fuse): gives the model its LoRAs where quantize.LORA_MERGE says: fp8 before the
    cast (fuse=True), int8 after loading (fuse=False, PEFT's torchao layers).
    """
    common = dict(subfolder=subfolder, dtype=dtype, use_safetensors=True, **kwargs)
    if not method or subfolder in prequantized(path):  # a pre-quantized component loads as it is stored
        return model_class.from_pretrained(path, device_map=device_map, **common)
    diffusers_model = model_class.__module__.startswith("diffusers")
    if method == "fp8":
        model = model_class.from_pretrained(path, **common)
        if adapt is not None:
            adapt(model, LORA_MERGE[method] == "fused")
        fp8_cast(model, dtype)
        return model
    import diffusers
    import transformers

    library = diffusers if diffusers_model else transformers
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        model = model_class.from_pretrained(path, quantization_config=library.TorchAoConfig(Int8WeightOnlyConfig()),
                                            **common)
        if adapt is not None:
            adapt(model, LORA_MERGE[method] == "fused")
        return model
    if method == "nf4":
        config = library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return model_class.from_pretrained(path, quantization_config=config, device_map=device_map, **common)
    raise ValueError(f"unknown quantization method {method!r}")


def load_quantized(model_class, path, subfolder: str, component_plan, dtype: torch.dtype,
                   adapt: Callable | None = None):
    """A quantized component (component_plan.quantization set) loaded and placed as its plan says:
    fp8 and int8 load on the CPU (and take their LoRAs there: `adapt`, see from_pretrained), then
    placement.place puts them on the plan's map (whole, over GPUs by accelerate's dispatch, or with
    streamed blocks); nf4 loads straight onto its GPUs by its map, checked against it."""
    method = component_plan.quantization
    device_map = dict(component_plan.device_map)
    model = from_pretrained(model_class, path, subfolder, method, dtype,
                            device_map=device_map if method == "nf4" else None, adapt=adapt)
    if method == "nf4":
        check_placement(model, device_map, streamed=False)
    else:
        place(model, device_map, streamed=component_plan.streamed)
    return model
