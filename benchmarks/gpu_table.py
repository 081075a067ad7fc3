"""The table gpu_check.sh prints: flux-sharded's per-stage peaks vs budget, and diffusers' baselines.

    python benchmarks/gpu_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: Path) -> None:
    gb = lambda size: f"{size / 1e9:.2f} GB"  # noqa: E731
    print("| run | stage | device | planned | peak | budget | load s | run s |")
    print("|---|---|---|---|---|---|---|---|")
    per_image = {}
    for path in sorted(folder.glob("staged-*.json")):
        report = json.loads(path.read_text())
        for stage in report["stages"]:
            for device, peak in stage["peak_bytes"].items():
                planned = stage["planned_bytes"].get(device)
                budget = report["budget"].get(device)
                print(f"| {path.stem} | {stage['name']} | {device} | {gb(planned) if planned else '-'} | {gb(peak)} | "
                      f"{gb(budget) if budget else '-'} | {stage['load_seconds']:.1f} | {stage['run_seconds']:.1f} |")
        per_image[path.stem] = sum(s["load_seconds"] + s["run_seconds"] for s in report["stages"]) / len(report["images"])
    print()
    print("| run | GPU peak | seconds per image (load included) |")
    print("|---|---|---|")
    for path in sorted(folder.glob("staged-*.json")):
        report = json.loads(path.read_text())
        peak = max(stage["peak_bytes"].get("0", 0) for stage in report["stages"])
        print(f"| flux-sharded {path.stem.removeprefix('staged-')} | {gb(peak)} | {per_image[path.stem]:.1f} |")
    for path in sorted(folder.glob("one-piece-*.json")):
        result = json.loads(path.read_text())
        print(f"| diffusers {result['mode']} | {gb(result['peak_bytes'].get('0', 0))} | "
              f"{result['load_seconds'] + result['seconds_per_image']:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
