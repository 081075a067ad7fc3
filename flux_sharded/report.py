"""What each stage cost: load and run seconds, peak bytes per device, the device map it used.

JSON schema (device keys as strings):
    {"budget": {"0": bytes, ...},
     "stages": [{"name", "load_seconds", "run_seconds", "peak_bytes": {"0": int, "cpu": int}, "device_map": {...}}],
     "images": [paths, in prompt order]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .budget import format_bytes
from .files import atomic_write


@dataclass
class StageReport:
    name: str
    load_seconds: float
    run_seconds: float
    peak_bytes: dict[str, int]  # device ("0", "1", "cpu") -> bytes
    device_map: dict[str, str]  # module -> device, as loaded


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
        """One row per stage and device: seconds, peak and budget, aligned for a terminal."""
        header = ("stage", "device", "load s", "run s", "peak", "budget")
        rows = [header]
        for stage in self.stages:
            for position, (device, peak) in enumerate(stage.peak_bytes.items()):
                budget = self.budget.get(device)
                rows.append(
                    (
                        stage.name if position == 0 else "",
                        device,
                        f"{stage.load_seconds:.2f}" if position == 0 else "",
                        f"{stage.run_seconds:.2f}" if position == 0 else "",
                        format_bytes(peak),
                        format_bytes(budget) if budget is not None else "-",
                    )
                )
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
