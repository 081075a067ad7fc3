"""Planned vs measured bytes per stage and device, from flux-sharded --report files, as Markdown.

    python benchmarks/report_table.py REPORT.json [REPORT.json ...]

For a GPU, "measured" is the CUDA allocator's peak during the stage (weights included), so
measured - weights is the activation peak the planner estimated. Then, for each stage that streamed
blocks from RAM, the host bytes pinned as planned (host_memory.py's layout) and as PyTorch's host
allocator held them (torch.cuda.host_memory_stats' peak).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print("| report | stage | device | weights | planned activations | measured peak | measured - weights | planned / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        report = json.loads(Path(path).read_text())
        for stage in report["stages"]:
            for device, planned in stage["planned_bytes"].items():
                weights = stage["weight_bytes"].get(device, 0)
                peak = (stage.get("peak_bytes") or {}).get(device)
                measured = "-" if peak is None else f"{peak / 1e6:.1f} MB"
                activation = "-" if peak is None else f"{(peak - weights) / 1e6:.1f} MB"
                ratio = "-" if not peak else f"{planned / peak:.2f}"
                print(f"| {Path(path).name} | {stage['name']} | {device} | {weights / 1e6:.1f} MB | "
                      f"{(planned - weights) / 1e6:.1f} MB | {measured} | {activation} | {ratio} |")
    print()
    print("| report | stage | pinned, planned | pinned, measured peak | planned / measured |")
    print("|---|---|---|---|---|")
    for path in paths:
        for stage in json.loads(Path(path).read_text())["stages"]:
            planned, measured = stage.get("pinned_bytes", 0), stage.get("peak_pinned_bytes")
            if not planned and not measured:
                continue
            shown = "-" if measured is None else f"{measured / 1e6:.1f} MB"
            ratio = "-" if not measured else f"{planned / measured:.3f}"
            print(f"| {Path(path).name} | {stage['name']} | {planned / 1e6:.1f} MB | {shown} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
