"""Planned vs stored weight bytes per --quantize method, on random checkpoints built offline (CPU):
FLUX.1 (`--preset`), and the tiny FLUX.2-klein and FLUX.2-dev.

    python benchmarks/quantize_bytes.py [--preset small] [--work .cache/bench]

Loads each large component (the family's large_components) as the runner does
(quantize_load.from_pretrained: fp8 by diffusers' layerwise casting, int8 by torchao) and counts the
bytes it stores (quantize_bytes.stored_bytes), next to what the planner counts on the meta device;
FLUX.2's text encoder cut as the encode loads it. nf4 on the CPU: the text encoders through
transformers' own bitsandbytes loading (which runs on the CPU); the transformer, which diffusers
loads in 4 bits only on a GPU, as diffusers' quantizer picks its layers and bitsandbytes quantizes
each one (Params4bit).
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

    from flux_sharded.components import empty_component, module_sizes
    from flux_sharded.families import family_of
    from flux_sharded.quantize_bytes import stored_bytes
    from flux_sharded.quantize_load import from_pretrained
    from flux_sharded.stages.encode import _model_class  # the cut FLUX.2 encoder, as the encode loads it
    from flux_sharded.tiny import build_tiny_checkpoint, build_tiny_flux2_checkpoint

    checkpoints = {f"FLUX.1 {args.preset}": args.work / f"quantize-{args.preset}",
                   "FLUX.2-klein tiny": args.work / "quantize-klein", "FLUX.2-dev tiny": args.work / "quantize-dev"}
    builders = {f"FLUX.1 {args.preset}": lambda path: build_tiny_checkpoint(path, preset=args.preset),
                "FLUX.2-klein tiny": lambda path: build_tiny_flux2_checkpoint(path, "FLUX.2-klein", seed=0),
                "FLUX.2-dev tiny": lambda path: build_tiny_flux2_checkpoint(path, "FLUX.2-dev", seed=2)}
    rows = []
    print("bfloat16")
    print("| checkpoint | component | method | unquantized | planned | stored | planned - stored |")
    print("|---|---|---|---|---|---|---|")
    for name, checkpoint in checkpoints.items():
        if not (checkpoint / "model_index.json").exists():
            builders[name](checkpoint)
        family = family_of(checkpoint)
        for component in family.large_components:
            plain = module_sizes(empty_component(checkpoint, component), torch.bfloat16)[""]
            model_class = (_model_class(family, component) if family.component(component).library == "transformers"
                           else getattr(diffusers, family.component(component).class_name))
            for method in ("fp8", "int8", "nf4"):
                planned = module_sizes(empty_component(checkpoint, component, method, torch.bfloat16),
                                       torch.bfloat16)[""]
                if method == "nf4":
                    stored = stored_bytes(nf4_on_cpu(model_class, checkpoint, component, torch.bfloat16))
                else:
                    stored = stored_bytes(from_pretrained(model_class, checkpoint, component, method, torch.bfloat16))
                rows.append({"checkpoint": name, "component": component, "method": method, "unquantized": plain,
                             "planned": planned, "stored": stored})
                print(f"| {name} | {component} | {method} | {plain:,} | {planned:,} | {stored:,} | "
                      f"{planned - stored:,} |")
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
