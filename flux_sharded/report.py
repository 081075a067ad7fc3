"""What each stage planned and what it cost: bytes per device, seconds, the device map it used.

JSON schema (device keys as strings: "0", "1", "cpu", "disk"):
    {"budget": {"0": bytes, ...},
     "stages": [{"name": "encode" | "denoise" | "decode", "process": int (rank, 0 for one process),
                 "images": int,                                      # images this stage made
                 "load_seconds": float, "run_seconds": float,        # null in a dry-run
                 "handoff_bytes": int,                               # what it passed on, kept in RAM
                 "peak_bytes": {"0": int, "cpu": int},               # measured; null in a dry-run
                 "weight_bytes": {"0": int}, "planned_bytes": {"0": int},   # planned: weights + activations
                 "device_map": {component: {module: device}}}],
     "images": [paths, in prompt order]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .budget import device_key, format_bytes
from .files import atomic_write


@dataclass
class StageReport:
    name: str
    device_map: dict[str, dict[str, str]]  # component -> module -> device
    weight_bytes: dict[str, int]  # planned weights per device
    planned_bytes: dict[str, int]  # planned weights + activations per device
    load_seconds: float | None = None
    run_seconds: float | None = None
    peak_bytes: dict[str, int] | None = None  # measured per device
    handoff_bytes: int | None = None  # the handoff this stage passed on, in CPU memory
    process: int = 0  # rank under several processes
    images: int = 0  # how many images this stage processed

    @classmethod
    def from_plan(cls, stage_plan) -> "StageReport":
        return cls(
            name=stage_plan.name,
            device_map={
                component.name: {module: device_key(device) for module, device in component.device_map.items()}
                for component in stage_plan.components
            },
            weight_bytes={device_key(d): size for d, size in stage_plan.weight_bytes.items()},
            planned_bytes={device_key(d): size for d, size in stage_plan.planned_bytes.items()},
        )


@dataclass
class RunReport:
    budget: dict[str, int]
    stages: list[StageReport] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_json(), indent=2) + "\n"))

    def table(self) -> str:
        """One row per stage and device, aligned for a terminal. A dry-run has no measured columns."""
        measured = any(stage.peak_bytes is not None for stage in self.stages)
        several = len({stage.process for stage in self.stages}) > 1
        header = (["process"] if several else []) + ["stage", "device", "weights", "activations", "planned",
                                                      "budget", "headroom"]
        if measured:
            header += ["peak", "load s", "run s"]
        rows = [header]
        for stage in self.stages:
            devices = list(stage.planned_bytes)
            devices += [device for device in stage.peak_bytes or {} if device not in devices]
            for position, device in enumerate(devices):
                planned = stage.planned_bytes.get(device)
                weights = stage.weight_bytes.get(device, 0)
                budget = self.budget.get(device)
                row = ([str(stage.process) if position == 0 else ""] if several else []) + [
                    stage.name if position == 0 else "",
                    # accelerate puts what fits nowhere on "disk"; unbudgeted, that is a refusal's shortfall
                    device if device != "disk" or budget is not None else "no room",
                    format_bytes(weights) if planned is not None else "-",
                    format_bytes(planned - weights) if planned is not None else "-",
                    format_bytes(planned) if planned is not None else "-",
                    format_bytes(budget) if budget is not None else "none",
                    format_bytes(budget - planned) if budget is not None and planned is not None else "-",
                ]
                if measured:
                    peak = (stage.peak_bytes or {}).get(device)
                    row += [
                        format_bytes(peak) if peak is not None else "-",
                        f"{stage.load_seconds:.2f}" if position == 0 else "",
                        f"{stage.run_seconds:.2f}" if position == 0 else "",
                    ]
                rows.append(row)
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)
