"""Planned vs stored weight bytes per --quantize method, on a random checkpoint built offline (CPU).

    python benchmarks/quantize_bytes.py [--preset small] [--work .cache/bench]

Loads each large component as the runner does (quantize.from_pretrained: fp8 by diffusers'
layerwise casting, int8 by torchao) and counts the bytes it stores (quantize.stored_bytes), next
to what the planner counts on the meta device. Prints a Markdown table, then one JSON line.
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
        for method in ("fp8", "int8"):
            planned = module_sizes(empty_component(checkpoint, component, method, torch.bfloat16), torch.bfloat16)[""]
            stored = stored_bytes(from_pretrained(model_class, checkpoint, component, method, torch.bfloat16))
            rows.append({"component": component, "method": method, "unquantized": plain, "planned": planned,
                         "stored": stored})
            print(f"| {component} | {method} | {plain:,} | {planned:,} | {stored:,} | {planned - stored:,} |")
    print(json.dumps({"preset": args.preset, "rows": rows}))


if __name__ == "__main__":
    main()
