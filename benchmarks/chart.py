"""One PNG per scenario: measured peak and planned bytes per stage and device, against the budget
and the one-piece pipeline's peak. Needs matplotlib (pip install -e .[bench])."""

from __future__ import annotations

from pathlib import Path


def draw(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, peaks, planned = [], [], []
    for stage in result["stages"]:
        for device, peak in stage["peak_bytes"].items():
            labels.append(f"{stage['name']}\n{device}")
            peaks.append(peak / 1e9)
            planned.append(stage["planned_bytes"].get(device, 0) / 1e9)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], peaks, width=0.4, label="measured peak (whole process)")
    axes.bar([p + 0.2 for p in positions], planned, width=0.4, label="planned (weights + activations)")
    for device, budget in result["budget"].items():
        axes.axhline(budget / 1e9, color="tab:red", linestyle="--", linewidth=1, label=f"budget {device}")
    axes.axhline(result["one_piece_peak_bytes"] / 1e9, color="tab:gray", linestyle=":", linewidth=1.5,
                 label="diffusers one-piece peak")
    axes.axhline(result["baseline_peak_bytes"] / 1e9, color="tab:green", linestyle=":", linewidth=1,
                 label="process baseline (imports)")
    scenario = result["scenario"]
    axes.set_title(f"{scenario['name']}: {scenario['size']}x{scenario['size']}, {scenario['steps']} steps, "
                   f"{scenario['dtype']}, --max-memory {scenario['max_memory']}", fontsize=9)
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.set_ylabel("GB")
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
