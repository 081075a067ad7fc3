"""The plans for one small card plus RAM, from the shipped configs alone (no weights, no GPU).

    python benchmarks/small_cards.py [--model FLUX.1-dev] [--size 1024] [--steps 28] [--cpu-gb 64]

For each single-card budget 0=N GB (N in 4..24) with cpu=M GB: the denoise stage's planned bytes
on the card and in RAM, what streams host-to-GPU per step and per image, and the copy time per
step at report.OFFLOAD_BANDWIDTH_BYTES_PER_SECOND. Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.plan import PlanInputs, plan_run
from flux_sharded.report import OFFLOAD_BANDWIDTH_BYTES_PER_SECOND

CARDS_GB = (4, 6, 8, 10, 12, 16, 24)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="FLUX.1-dev")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cpu-gb", type=int, default=64)
    args = parser.parse_args()
    inputs = PlanInputs(shipped_config_dir(args.model), torch.bfloat16, args.size, args.size, 512, vae_scale_factor=8)
    gb = lambda size: f"{size / 1e9:.2f}"  # noqa: E731
    print(f"{args.model}, {args.size}x{args.size}, bfloat16, {args.steps} steps, cpu={args.cpu_gb}GB")
    print("| budget | encode on GPU | denoise on GPU | denoise in RAM | streamed per step | per image | "
          "copy s/step at 25 GB/s | decode |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for card in CARDS_GB:
        budget = {0: card * 10**9, "cpu": args.cpu_gb * 10**9}
        plan = plan_run(inputs, budget)
        encode, denoise, decode = (plan.stage(name) for name in ("encode", "denoise", "decode"))
        per_step = denoise.offload_bytes_per_step
        vae = decode.component("vae")
        row = {
            "budget": f"0={card}GB,cpu={args.cpu_gb}GB",
            "encode_gpu_bytes": encode.planned_bytes.get(0, 0),
            "denoise_gpu_bytes": denoise.planned_bytes.get(0, 0),
            "denoise_cpu_bytes": denoise.planned_bytes.get("cpu", 0),
            "offload_bytes_per_step": per_step,
            "copy_seconds_per_step": per_step / OFFLOAD_BANDWIDTH_BYTES_PER_SECOND,
            "decode": f"{vae.device_map['']}{' tiled' if vae.tiled else ''}",
        }
        rows.append(row)
        print(f"| {row['budget']} | {gb(row['encode_gpu_bytes'])} GB | {gb(row['denoise_gpu_bytes'])} GB | "
              f"{gb(row['denoise_cpu_bytes'])} GB | {gb(per_step)} GB | {gb(per_step * args.steps)} GB | "
              f"{row['copy_seconds_per_step']:.2f} | GPU {row['decode']} |")
    print(json.dumps({"model": args.model, "size": args.size, "rows": rows}))


if __name__ == "__main__":
    main()
