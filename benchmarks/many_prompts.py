"""N prompts in one run vs N separate runs of flux-sharded, on the same checkpoint (CPU or GPU).

    python benchmarks/many_prompts.py [--preset mini] [--prompts 4] [--size 256] [--steps 4] [--work DIR]

Each run is a fresh process, as a user would start it; load seconds come from the runs' reports.
Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

PROMPTS = ["a photo of a dog", "a red car under the sky", "watercolor portrait of a cat", "night city street",
           "bird flying over a river", "an old house in the forest", "a boat on a green river", "the moon at night"]


@dataclass(frozen=True)
class Scenario:
    preset: str
    prompts: int
    size: int
    steps: int
    max_memory: str


def flux_sharded(checkpoint: Path, out: Path, prompts: list[str], scenario: Scenario) -> tuple[float, dict]:
    args = [sys.executable, "-m", "flux_sharded", "--model", str(checkpoint), "--max-memory", scenario.max_memory,
            "--steps", str(scenario.steps), "--height", str(scenario.size), "--width", str(scenario.size),
            "--out", str(out), "--report", str(out / "report.json")]
    for prompt in prompts:
        args += ["--prompt", prompt]
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - started, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-memory", default="cpu=16GB")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from flux_sharded.tiny import build_tiny_checkpoint

    scenario = Scenario(args.preset, args.prompts, args.size, args.steps, args.max_memory)
    work = args.work or Path(tempfile.mkdtemp(prefix="flux-sharded-bench-"))
    checkpoint = work / args.preset
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset)
    prompts = PROMPTS[: args.prompts]
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        one_wall, one_report = flux_sharded(checkpoint, Path(scratch) / "one-run", prompts, scenario)
        separate = [flux_sharded(checkpoint, Path(scratch) / f"run-{i}", [prompt], scenario)
                    for i, prompt in enumerate(prompts)]
    one_load = sum(stage["load_seconds"] for stage in one_report["stages"])
    separate_wall = sum(wall for wall, _ in separate)
    separate_load = sum(stage["load_seconds"] for _, report in separate for stage in report["stages"])
    result = {**asdict(scenario), "one_run_seconds": round(one_wall, 2), "one_run_load_seconds": round(one_load, 2),
              "separate_runs_seconds": round(separate_wall, 2), "separate_runs_load_seconds": round(separate_load, 2)}
    print("| checkpoint | prompts | size | steps | one run: wall s | load s | separate runs: wall s | load s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {args.prompts} | {args.size}x{args.size} | {args.steps} | {one_wall:.1f} | {one_load:.1f} "
          f"| {separate_wall:.1f} | {separate_load:.1f} |")
    print(json.dumps({"benchmark": "many_prompts", "environment": environment(), "result": result}))


if __name__ == "__main__":
    main()
