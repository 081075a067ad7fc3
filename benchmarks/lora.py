"""--lora on the CPU mini checkpoint: load and run seconds with 0, 1 and 3 LoRAs, planned vs stored
adapter bytes, and what fusing does to the pixels of a quantized transformer.

    python benchmarks/lora.py [--preset mini] [--work .cache/bench] [--rank 16]

1) Runs the command line (256x256, 4 steps, one image, float32, --max-memory cpu=4GB) with 0, 1
   and 3 random LoRAs (flux_sharded.tiny.build_tiny_lora: every attention and feed-forward layer of
   every block, CLIP's attention and fc1, rank --rank), and takes each stage's load and run seconds
   and planned adapter bytes from --report; the stored bytes are counted on the component loaded as
   the stage loads it (stages/adapters.load_adapters), every lora_ tensor PEFT holds. float32: this
   machine's CPU has no bfloat16 kernels for the VAE's convolutions (minutes per decode).
2) Fused or not, under fp8 and int8 (one LoRA, diffusers' one-piece FluxPipeline in float32): the
   mean absolute pixel difference from the unquantized image with the same LoRA, for the LoRA kept
   as adapters (fp8: loaded before the layerwise cast, which then stores the adapters in fp8 too,
   since an adapter added after the cast fails on the CPU; int8: PEFT's torchao layer) and fused
   into the float32 weights before quantizing (fuse_lora, unload_lora_weights, then the cast or
   torchao's quantize_).
Prints Markdown tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from _env import environment

PROMPT, SEED, STEPS, SIZE = "a photo of a dog", 3, 4, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from flux_sharded.tiny import build_tiny_checkpoint, build_tiny_lora

    checkpoint = args.work / f"lora-{args.preset}"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset)
    loras = [build_tiny_lora(checkpoint, args.work / f"lora-{args.preset}-{index}.safetensors", seed=index,
                             rank=args.rank, text_encoder=True, strength=0.5) for index in range(3)]
    print(json.dumps(environment()))

    rows = []
    print(f"| LoRAs | encode load s | encode run s | denoise load s | denoise run s | planned adapter bytes "
          "(encode / denoise) | stored |")
    print("|---|---|---|---|---|---|---|")
    for count in (0, 1, 3):
        report = _staged(checkpoint, loras[:count], args.work / f"lora-run-{count}")
        stages = {stage["name"]: stage for stage in report["stages"]}
        stored = {name: _stored(checkpoint, name, loras[:count]) for name in ("text_encoder", "transformer")}
        row = {"loras": count, **{f"{stage}_{kind}_seconds": stages[stage][f"{kind}_seconds"]
                                 for stage in ("encode", "denoise") for kind in ("load", "run")},
               "planned_adapter_bytes": {stage: stages[stage]["adapter_bytes"] for stage in ("encode", "denoise")},
               "stored_adapter_bytes": stored}
        rows.append(row)
        print(f"| {count} | {row['encode_load_seconds']:.2f} | {row['encode_run_seconds']:.2f} | "
              f"{row['denoise_load_seconds']:.2f} | {row['denoise_run_seconds']:.2f} | "
              f"{row['planned_adapter_bytes']['encode']:,} / {row['planned_adapter_bytes']['denoise']:,} | "
              f"{stored['text_encoder']:,} / {stored['transformer']:,} |")

    # a transformer-only LoRA: fusing concerns the quantized transformer alone
    merged = build_tiny_lora(checkpoint, args.work / f"lora-{args.preset}-transformer.safetensors", seed=5,
                             rank=args.rank, strength=0.5)
    truth = _one_piece(checkpoint, merged, None, fused=False)
    plain = _one_piece(checkpoint, None, None, fused=False)
    merges = []
    print(f"\nthe LoRA itself moves the pixels by {np.abs(truth - plain).mean():.3f} (mean absolute, 0-255)")
    print("| method | kept as adapters | fused before quantizing |")
    print("|---|---|---|")
    for method in ("fp8", "int8"):
        found = {fused: float(np.abs(_one_piece(checkpoint, merged, method, fused) - truth).mean())
                 for fused in (False, True)}
        merges.append({"method": method, "adapters": found[False], "fused": found[True]})
        print(f"| {method} | {found[False]:.3f} | {found[True]:.3f} |")
    print(json.dumps({"preset": args.preset, "rank": args.rank, "rows": rows, "merge": merges,
                      "lora_effect": float(np.abs(truth - plain).mean())}))


def _staged(checkpoint: Path, loras: list[Path], out: Path) -> dict:
    """One run of the command line in a child process (its imports and peak are its own)."""
    report = out / "report.json"
    command = [sys.executable, "-m", "flux_sharded", "--model", str(checkpoint), "--prompt", PROMPT, "--seed",
               str(SEED), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32",
               "--max-memory",
               "cpu=4GB", "--out", str(out), "--report", str(report), "--overwrite",
               *[arg for lora in loras for arg in ("--lora", str(lora))]]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(report.read_text())


def _stored(checkpoint: Path, name: str, loras: list[Path]) -> int:
    """Bytes of the adapter tensors the component holds once the stage loaded its LoRAs (float32)."""
    import diffusers
    import transformers

    from flux_sharded.families import family_of
    from flux_sharded.lora import Adapter
    from flux_sharded.stages.adapters import load_adapters

    family = family_of(checkpoint)
    component = family.component(name)
    library = diffusers if component.library == "diffusers" else transformers
    model = getattr(library, component.class_name).from_pretrained(checkpoint, subfolder=name, dtype=torch.float32)
    load_adapters(family, name, model, tuple(Adapter(f"lora_{index}", path, 1.0) for index, path in enumerate(loras)))
    return sum(tensor.numel() * tensor.element_size() for key, tensor in model.named_parameters() if "lora_" in key)


def _one_piece(checkpoint: Path, lora: Path | None, method: str | None, fused: bool) -> np.ndarray:
    """FluxPipeline's image in float32, its transformer quantized by `method` with `lora` kept as
    adapters or fused first (module docstring)."""
    import diffusers

    dtype = torch.float32
    pipeline = diffusers.FluxPipeline.from_pretrained(checkpoint, dtype=dtype)
    if method == "int8" and not fused:
        from torchao.quantization import Int8WeightOnlyConfig

        pipeline.transformer = diffusers.FluxTransformer2DModel.from_pretrained(
            checkpoint, subfolder="transformer", dtype=dtype,
            quantization_config=diffusers.TorchAoConfig(Int8WeightOnlyConfig()))
    if lora is not None:
        pipeline.load_lora_weights(str(lora), adapter_name="lora_0")
    if fused:
        pipeline.fuse_lora(components=["transformer"])
        pipeline.unload_lora_weights()
    if method == "fp8":
        pipeline.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if method == "int8" and fused:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(pipeline.transformer, Int8WeightOnlyConfig())
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image).astype(np.int16)


if __name__ == "__main__":
    main()
