"""The dry-run plans of every model family on common budgets, from the shipped configs alone (no
weights, no GPU): FLUX.1-dev, FLUX.2-dev, FLUX.2-klein-9B and -4B on 2x24 GB, 2x16 GB and 1x12 GB
cards, each with cpu=M GB of RAM for what misses the cards; then FLUX.2 with --quantize (the
family's transformer and text encoder) on the cards it should fit; then FLUX.3 klein on 12 and 8 GB.

    python benchmarks/family_dry_runs.py [--size 1024] [--cpu-gb 64] [--models FLUX.3-klein ...]

Per plan: the planned bytes per device of each stage (weights counted exactly on the meta device,
activations estimated), what streams host-to-GPU per denoising step and per image (at the family's
default steps) and the copy time per step at report.OFFLOAD_BANDWIDTH_BYTES_PER_SECOND. Prints a
Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.errors import PlanError
from flux_sharded.families import family_of
from flux_sharded.plan import PlanInputs, plan_run
from flux_sharded.report import OFFLOAD_BANDWIDTH_BYTES_PER_SECOND

MODELS = ("FLUX.1-dev", "FLUX.2-dev", "FLUX.2-klein-9B", "FLUX.2-klein-4B")
CARDS = ({0: 24, 1: 24}, {0: 16, 1: 16}, {0: 12})


@dataclass(frozen=True)
class Scenario:
    model: str
    cards: dict[int, int]  # GPU index -> GB
    quantize: str | None = None  # a --quantize method for the family's large_components


SCENARIOS = (
    *(Scenario(model, cards) for model in MODELS for cards in CARDS),
    Scenario("FLUX.2-dev", {0: 24, 1: 24}, "fp8"),
    Scenario("FLUX.2-dev", {0: 24, 1: 24}, "nf4"),
    Scenario("FLUX.2-dev", {0: 16, 1: 16}, "nf4"),
    Scenario("FLUX.2-dev", {0: 16}, "fp8"),
    Scenario("FLUX.2-dev", {0: 16}, "nf4"),
    Scenario("FLUX.2-klein-9B", {0: 12}, "fp8"),
    Scenario("FLUX.2-klein-9B", {0: 12}, "nf4"),
    Scenario("FLUX.2-klein-4B", {0: 8}, "nf4"),
    # FLUX.3 klein (planned only; reconstructed configs: flux_sharded/configs/README.md)
    *(Scenario(model, cards) for model in ("FLUX.3-klein", "FLUX.3-klein-base") for cards in ({0: 12}, {0: 8})),
)


def _per_device(stage) -> str:
    # A stage that does not fit keeps what finds no room under "disk" with no disk budget (as the report shows it).
    return ", ".join(f"{device if device != 'disk' or 'disk' in stage.budget else 'no room'}: {size / 1e9:.2f}"
                     for device, size in stage.planned_bytes.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cpu-gb", type=int, default=64)
    parser.add_argument("--models", nargs="+", help="only these shipped configs (default: every scenario's)")
    args = parser.parse_args()
    print(f"{args.size}x{args.size}, bfloat16, each family's default prompt tokens (512; FLUX.3 640), batch size 1, "
          f"cpu={args.cpu_gb}GB; GB = 10^9 bytes")
    print("| model | --quantize | budget | fits | encode GB per device | denoise GB per device | decode GB | "
          "streamed per step | per image (steps) | copy s/step at 25 GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for scenario in SCENARIOS:
        if args.models and scenario.model not in args.models:
            continue
        model = scenario.model
        family = family_of(shipped_config_dir(model))
        quantize = tuple((name, scenario.quantize) for name in family.large_components) if scenario.quantize else ()
        inputs = PlanInputs(shipped_config_dir(model), torch.bfloat16, args.size, args.size, family.max_sequence_length,
                            vae_scale_factor=8, quantize=quantize)
        budget = {**{index: gb * 10**9 for index, gb in scenario.cards.items()}, "cpu": args.cpu_gb * 10**9}
        spec = ",".join(f"{key}={value // 10**9}GB" for key, value in budget.items())
        try:
            stages, fits = plan_run(inputs, budget).stages, True
        except PlanError as error:
            stages, fits = error.stages, False
        encode, denoise, decode = stages
        per_step = denoise.offload_bytes_per_step if fits else 0  # a refused plan streams nothing
        row = {
            "model": model, "quantize": scenario.quantize or "none", "budget": spec, "fits": fits,
            "steps": family.steps,
            "planned_bytes": {stage.name: {str(device): size for device, size in stage.planned_bytes.items()}
                              for stage in stages},
            "offload_bytes_per_step": per_step,
        }
        rows.append(row)
        print(f"| {model} | {scenario.quantize or 'none'} | {spec} | {'yes' if fits else 'no'} | "
              f"{_per_device(encode)} | {_per_device(denoise)} | {_per_device(decode)} | {per_step / 1e9:.2f} GB | "
              f"{per_step * family.steps / 1e9:.1f} GB ({family.steps}) | "
              f"{per_step / OFFLOAD_BANDWIDTH_BYTES_PER_SECOND:.2f} |")
    print(json.dumps({"size": args.size, "cpu_gb": args.cpu_gb, "rows": rows}))


if __name__ == "__main__":
    main()
