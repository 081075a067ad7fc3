"""Activation estimates vs measurement on the CPU, per stage, for tiny / small / mini checkpoints.

    python benchmarks/activations.py [--presets tiny small mini] [--work DIR]

Measured: exact bytes of the tensors each stage creates (flux_sharded.memory.TensorBytesTracker);
planned: the planner's activation estimate (margin included). Prints a Markdown table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    preset: str
    dtype: str
    height: int
    width: int
    max_sequence_length: int


SCENARIOS = [
    Scenario("tiny", "float32", 256, 256, 512),
    Scenario("small", "float32", 512, 512, 512),
    Scenario("small", "bfloat16", 512, 512, 512),
    Scenario("mini", "bfloat16", 512, 512, 512),
    Scenario("mini", "bfloat16", 1024, 1024, 512),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "mini"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated checkpoints")
    args = parser.parse_args()

    from flux_sharded.calibrate import measure_activations
    from flux_sharded.tiny import build_tiny_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="flux-sharded-bench-"))
    checkpoints, rows = {}, []
    print("| checkpoint | dtype | size | tokens | stage | measured | planned | planned / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in (s for s in SCENARIOS if s.preset in args.presets):
        if scenario.preset not in checkpoints:
            folder = work / scenario.preset
            if not (folder / "model_index.json").exists():
                build_tiny_checkpoint(folder, preset=scenario.preset)
            checkpoints[scenario.preset] = folder
        for result in measure_activations(checkpoints[scenario.preset], scenario.dtype, scenario.height,
                                          scenario.width, scenario.max_sequence_length):
            rows.append({**asdict(scenario), "stage": result.stage, "measured_bytes": result.measured_bytes,
                         "planned_bytes": result.planned_bytes, "ratio": round(result.ratio, 3)})
            print(f"| {scenario.preset} | {scenario.dtype} | {scenario.width}x{scenario.height} | "
                  f"{scenario.max_sequence_length} | {result.stage} | {result.measured_bytes / 1e6:.1f} MB | "
                  f"{result.planned_bytes / 1e6:.1f} MB | {result.ratio:.2f} |", flush=True)
    print(json.dumps({"benchmark": "activations", "environment": environment(), "results": rows}))


if __name__ == "__main__":
    main()
