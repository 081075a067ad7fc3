"""Staged flux-sharded vs diffusers' one-piece FluxPipeline: peak memory per stage and device, time.

    python benchmarks/bench.py [--scenarios tiny mini] [--work DIR] [--charts DIR]

Each variant runs in its own process. The one-piece pipeline's CPU peak is its process's peak
resident memory (os.wait4); the staged run's is the largest of its per-stage peaks from its report
(flux-sharded resets the kernel's high-water mark at each stage, so os.wait4 would only see the
last stage). GPU peaks come from the CUDA allocator. On the CPU every figure includes the Python
process itself (the "baseline" row: a process that imports the same libraries and loads nothing)
and, while weights load, the pages of the memory-mapped safetensors files. Checkpoints are saved
in bfloat16, as the hub's FLUX.1 files are. Prints a Markdown
summary, then, last, one JSON line with "staged_peak_bytes" and "one_piece_peak_bytes" for the
mini scenario. --charts DIR also draws one PNG per scenario (needs matplotlib: pip install -e .[bench]).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Scenario:
    name: str
    preset: str  # flux_sharded.tiny preset
    size: int
    steps: int
    prompts: int
    dtype: str
    max_memory: str


SCENARIOS = {
    "tiny": Scenario("tiny", "tiny", 256, 4, 2, "bfloat16", "cpu=1GB"),
    "mini": Scenario("mini", "mini", 256, 4, 2, "bfloat16", "cpu=1.5GB"),
}


def measured(command: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak resident bytes of a child process (os.wait4: that child alone)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        result = subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status), stdout.read(), stderr.read())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024, result


def run_scenario(scenario: Scenario, work: Path) -> dict:
    # Built in a child process, like everything else here: this process must stay small, because
    # Linux passes a parent's resident size on to the peak (ru_maxrss) of every child it starts.
    checkpoint = work / f"{scenario.preset}-bf16"
    if not (checkpoint / "model_index.json").exists():
        measured([sys.executable, "-m", "flux_sharded.tiny", str(checkpoint), "--preset", scenario.preset,
                  "--dtype", "bfloat16"])
    out = work / f"out-{scenario.name}"
    report_path = work / f"staged-{scenario.name}.json"
    staged_command = [sys.executable, "-m", "flux_sharded", "--model", str(checkpoint), "--max-memory",
                      scenario.max_memory, "--steps", str(scenario.steps), "--height", str(scenario.size),
                      "--width", str(scenario.size), "--dtype", scenario.dtype, "--out", str(out), "--overwrite",
                      "--report", str(report_path)]
    for index in range(scenario.prompts):
        staged_command += ["--prompt", f"benchmark prompt {index}"]
    staged_wall, _, _ = measured(staged_command)
    report = json.loads(report_path.read_text())
    staged_peak = max(max(stage["peak_bytes"].values()) for stage in report["stages"])

    one_piece_json = work / f"one-piece-{scenario.name}.json"
    one_piece_wall, one_piece_peak, _ = measured(
        [sys.executable, str(HERE / "one_piece.py"), str(checkpoint), "--out-json", str(one_piece_json),
         "--size", str(scenario.size), "--steps", str(scenario.steps), "--prompts", str(scenario.prompts),
         "--dtype", scenario.dtype])
    one_piece = json.loads(one_piece_json.read_text())
    _, baseline_peak, _ = measured([sys.executable, "-c",
                                    "import torch, diffusers, transformers, accelerate; from diffusers import FluxPipeline"])
    stage_seconds = sum(stage["load_seconds"] + stage["run_seconds"] for stage in report["stages"])
    return {
        "scenario": asdict(scenario),
        "stages": [{key: stage[key] for key in ("name", "load_seconds", "run_seconds", "peak_bytes", "planned_bytes",
                                                  "weight_bytes")} for stage in report["stages"]],
        "budget": report["budget"],
        "staged_peak_bytes": staged_peak,
        "staged_wall_seconds": staged_wall,
        "staged_seconds_per_image": stage_seconds / scenario.prompts,
        "one_piece_peak_bytes": one_piece_peak,
        "one_piece_wall_seconds": one_piece_wall,
        "one_piece_load_seconds": one_piece["load_seconds"],
        "one_piece_seconds_per_image": (one_piece["load_seconds"] + one_piece["seconds_per_image"] * scenario.prompts)
        / scenario.prompts,
        "baseline_peak_bytes": baseline_peak,
        "peak_ratio": staged_peak / one_piece_peak,
        "peak_ratio_above_baseline": (staged_peak - baseline_peak) / max(one_piece_peak - baseline_peak, 1),
    }


def summary(result: dict) -> str:
    scenario = result["scenario"]
    mb = lambda size: f"{size / 1e6:.0f} MB"  # noqa: E731
    lines = [
        f"### {scenario['name']}: {scenario['preset']} checkpoint, {scenario['size']}x{scenario['size']}, "
        f"{scenario['steps']} steps, {scenario['prompts']} images, {scenario['dtype']}, --max-memory {scenario['max_memory']}",
        "",
        "| stage | device | planned | measured peak | load s | run s |",
        "|---|---|---|---|---|---|",
    ]
    for stage in result["stages"]:
        for device, peak in stage["peak_bytes"].items():
            planned = stage["planned_bytes"].get(device)
            lines.append(f"| {stage['name']} | {device} | {mb(planned) if planned else '-'} | {mb(peak)} | "
                         f"{stage['load_seconds']:.2f} | {stage['run_seconds']:.2f} |")
    lines += [
        "",
        "| variant | peak (process) | above baseline | seconds per image (load included) | wall s |",
        "|---|---|---|---|---|",
        f"| flux-sharded staged | {mb(result['staged_peak_bytes'])} | "
        f"{mb(result['staged_peak_bytes'] - result['baseline_peak_bytes'])} | {result['staged_seconds_per_image']:.2f} | "
        f"{result['staged_wall_seconds']:.1f} |",
        f"| diffusers FluxPipeline, one piece | {mb(result['one_piece_peak_bytes'])} | "
        f"{mb(result['one_piece_peak_bytes'] - result['baseline_peak_bytes'])} | "
        f"{result['one_piece_seconds_per_image']:.2f} | {result['one_piece_wall_seconds']:.1f} |",
        f"| baseline (imports only) | {mb(result['baseline_peak_bytes'])} | - | - | - |",
        "",
        f"Staged peak / one-piece peak: {result['peak_ratio']:.2f} for the whole process, "
        f"{result['peak_ratio_above_baseline']:.2f} above the baseline.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=["tiny", "mini"])
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints and outputs (reused)")
    parser.add_argument("--charts", type=Path, default=None, help="draw one PNG per scenario into this folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="flux-sharded-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.scenarios:
        results[name] = run_scenario(SCENARIOS[name], work)
        print(summary(results[name]), flush=True)
        if args.charts:
            from chart import draw

            args.charts.mkdir(parents=True, exist_ok=True)
            print(f"chart: {draw(results[name], args.charts / f'{name}.png')}\n", flush=True)
    from _env import environment  # imports torch: only once every child has run

    last = results.get("mini") or next(iter(results.values()))
    print(json.dumps({"benchmark": "staged_vs_one_piece", "environment": environment(),
                      "staged_peak_bytes": last["staged_peak_bytes"], "one_piece_peak_bytes": last["one_piece_peak_bytes"],
                      "results": results}))


if __name__ == "__main__":
    main()
