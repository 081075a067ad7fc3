"""Host memory of streamed stages: planned as PyTorch allocates it, from the shipped configs alone.

    python benchmarks/pinned_host.py

For each scenario, the streamed transformer blocks (and top-level modules) of the denoise plan:
their bytes, what pinning each tensor on its own takes (diffusers' group offloading by itself:
each allocation rounded up to a power of two by PyTorch's host allocator), what the packed layout
allocates (flux_sharded/host_memory.py: power-of-two chunks), the set-up the plan adds on top
while loading, and the plan's whole "cpu" line. Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from _env import environment
from flux_sharded.budget import parse_budget
from flux_sharded.checkpoint import shipped_config_dir
from flux_sharded.families import family_of
from flux_sharded.host_memory import host_layout, per_tensor_pinned_bytes
from flux_sharded.plan import PlanInputs, _Components, plan_run


@dataclass(frozen=True)
class Scenario:
    model: str
    quantize: str | None  # a method for the family's large components, or None
    budget: str


SCENARIOS = (
    Scenario("FLUX.1-dev", None, "0=8GiB,cpu=32GB"),
    Scenario("FLUX.1-dev", None, "0=12GB,cpu=32GB"),
    Scenario("FLUX.2-dev", "fp8", "0=16GiB,cpu=64GB"),
    Scenario("FLUX.2-dev", None, "0=24GB,1=24GB,cpu=72GB"),
    Scenario("FLUX.2-klein-9B", None, "0=12GB,cpu=32GB"),
)


def main() -> None:
    gb = lambda size: f"{size / 1e9:.2f} GB"  # noqa: E731
    print("| model | --quantize | budget | streamed bytes | pinned per tensor (diffusers alone) | pinned, packed "
          "(planned) | chunk | set-up on top | plan's cpu line |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for scenario in SCENARIOS:
        config = shipped_config_dir(scenario.model)
        family = family_of(config)
        quantize = tuple((name, scenario.quantize) for name in family.large_components) if scenario.quantize else ()
        inputs = PlanInputs(config, torch.bfloat16, 1024, 1024, 512, vae_scale_factor=8, quantize=quantize)
        denoise = plan_run(inputs, parse_budget(scenario.budget, gpu_count=None)).stage("denoise")
        transformer = denoise.component("transformer")
        components = _Components(inputs)
        model, sizes = components.model("transformer"), components.sizes("transformer")
        streamed = [module for module, device in transformer.device_map.items() if device == "cpu"]
        tensors = list({id(tensor): sizes[f"{module}.{name}"] for module in streamed
                        for name, tensor in [*model.get_submodule(module).named_parameters(),
                                             *model.get_submodule(module).named_buffers()]}.values())
        layout = host_layout(tensors)
        row = {"model": scenario.model, "quantize": scenario.quantize or "none", "budget": scenario.budget,
               "tensors": len(tensors), "streamed_bytes": sum(tensors),
               "per_tensor_pinned_bytes": per_tensor_pinned_bytes(tensors), "pinned_bytes": transformer.pinned_bytes,
               "chunk_bytes": layout.chunk_bytes, "set_up_bytes": transformer.activation_bytes["cpu"],
               "cpu_planned_bytes": denoise.planned_bytes["cpu"]}
        rows.append(row)
        print(f"| {scenario.model} | {row['quantize']} | {scenario.budget} | {gb(row['streamed_bytes'])} "
              f"({len(tensors)} tensors) | {gb(row['per_tensor_pinned_bytes'])} "
              f"({row['per_tensor_pinned_bytes'] / row['streamed_bytes']:.2f}x) | {gb(row['pinned_bytes'])} "
              f"({row['pinned_bytes'] / row['streamed_bytes']:.3f}x) | {layout.chunk_bytes >> 20} MiB | "
              f"{gb(row['set_up_bytes'])} | {gb(row['cpu_planned_bytes'])} |")
    print(json.dumps({"environment": environment(), "rows": rows}))


if __name__ == "__main__":
    main()
