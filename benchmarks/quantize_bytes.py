"""Planned vs stored weight bytes per --quantize method, on a random checkpoint built offline (CPU).

    python benchmarks/quantize_bytes.py [--preset small] [--work .cache/bench]

Loads each large component as the runner does (quantize.from_pretrained: fp8 by diffusers'
layerwise casting, int8 by torchao) and counts the bytes it stores (quantize.stored_bytes), next
to what the planner counts on the meta device. nf4 on the CPU: T5 through transformers' own
bitsandbytes loading (which runs on the CPU); the transformer, which diffusers loads in 4 bits only
on a GPU, as diffusers' quantizer picks its layers and bitsandbytes quantizes each one (Params4bit).
Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()

    import diffusers
    import transformers

    from flux_sharded.components import empty_component, module_sizes
    from flux_sharded.quantize import from_pretrained, stored_bytes
    from flux_sharded.tiny import build_tiny_checkpoint

    checkpoint = args.work / f"quantize-{args.preset}"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset)
    classes = {"transformer": diffusers.FluxTransformer2DModel, "text_encoder_2": transformers.T5EncoderModel}
    rows = []
    print(f"checkpoint: {args.preset}, bfloat16")
    print("| component | method | unquantized | planned | stored | planned - stored |")
    print("|---|---|---|---|---|---|")
    for component, model_class in classes.items():
        plain = module_sizes(empty_component(checkpoint, component), torch.bfloat16)[""]
        for method in ("fp8", "int8", "nf4"):
            planned = module_sizes(empty_component(checkpoint, component, method, torch.bfloat16), torch.bfloat16)[""]
            if method == "nf4":
                stored = stored_bytes(nf4_on_cpu(model_class, checkpoint, component, torch.bfloat16))
            else:
                stored = stored_bytes(from_pretrained(model_class, checkpoint, component, method, torch.bfloat16))
            rows.append({"component": component, "method": method, "unquantized": plain, "planned": planned,
                         "stored": stored})
            print(f"| {component} | {method} | {plain:,} | {planned:,} | {stored:,} | {planned - stored:,} |")
    print(json.dumps({"preset": args.preset, "rows": rows}))


def nf4_on_cpu(model_class, checkpoint: Path, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """The component as bitsandbytes stores it in nf4, built on the CPU (see the module docstring)."""
    import bitsandbytes as bnb
    import diffusers

    if not model_class.__module__.startswith("diffusers"):
        import transformers

        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=dtype)
        return model_class.from_pretrained(checkpoint, subfolder=component, quantization_config=config, dtype=dtype,
                                           device_map="cpu")
    from diffusers.quantizers import DiffusersAutoQuantizer

    from flux_sharded.components import empty_component

    picked = empty_component(checkpoint, component)
    config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    DiffusersAutoQuantizer.from_config(config).preprocess_model(picked, device_map=None, keep_in_fp32_modules=[])
    model = model_class.from_pretrained(checkpoint, subfolder=component, dtype=dtype)
    for name, module in picked.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            linear = model.get_submodule(name)
            linear.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                              compress_statistics=False).to("cpu")
    return model


if __name__ == "__main__":
    main()
