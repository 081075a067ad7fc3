"""The baselines: diffusers' one-piece FluxPipeline, as users run it without flux-sharded.

    python benchmarks/one_piece.py CHECKPOINT --out-json FILE [--mode whole|model-offload|group-offload]
        [--device cpu|cuda] [--size 1024] [--steps 28] [--prompts 1] [--dtype bfloat16]
    (--mode also sequential-offload)

whole: every component on --device. model-offload: `enable_model_cpu_offload()` (GPU only).
group-offload: `enable_group_offload(onload_device, offload_type="block_level", use_stream=True)`
(GPU only). sequential-offload: `enable_sequential_cpu_offload()` (GPU only: accelerate's per-module
hooks, the least GPU memory and the slowest). Writes load seconds, run seconds per image, and the peak memory (CUDA allocator peak
per GPU; the process's peak resident memory for the CPU) as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

PROMPTS = ["a photo of a dog", "a red car under the sky", "watercolor portrait of a cat", "night city street"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--mode", choices=["whole", "model-offload", "group-offload", "sequential-offload"], default="whole")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import torch
    from diffusers import FluxPipeline

    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    pipeline = FluxPipeline.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    if args.mode == "whole":
        pipeline.to(args.device)
    elif args.mode == "model-offload":
        pipeline.enable_model_cpu_offload(device=args.device)
    elif args.mode == "sequential-offload":
        pipeline.enable_sequential_cpu_offload(device=args.device)
    else:
        pipeline.enable_group_offload(onload_device=torch.device(args.device), offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = time.perf_counter()
    pipeline.set_progress_bar_config(disable=True)
    for index in range(args.prompts):
        pipeline(PROMPTS[index % len(PROMPTS)], height=args.size, width=args.size, num_inference_steps=args.steps,
                 generator=torch.Generator("cpu").manual_seed(index))
    if cuda:
        torch.cuda.synchronize()
    finished = time.perf_counter()
    peak = {"cpu": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        peak["0"] = torch.cuda.max_memory_allocated()
    args.out_json.write_text(json.dumps({
        "mode": args.mode, "load_seconds": loaded - started, "seconds_per_image": (finished - loaded) / args.prompts,
        "peak_bytes": peak,
    }))


if __name__ == "__main__":
    main()
