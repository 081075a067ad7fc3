"""What each stage planned and what it cost: bytes per device, seconds, the device map it used.

JSON schema (device keys as strings: "0", "1", "cpu", "disk"):
    {"budget": {"0": bytes, ...},
     "stages": [{"name": "encode" | "denoise" | "decode", "process": int (rank, 0 for one process),
                 "images": int,                                      # images this stage made
                 "load_seconds": float, "run_seconds": float,        # null in a dry-run
                 "handoff_bytes": int,                               # what it passed on, kept in RAM
                 "peak_bytes": {"0": int, "cpu": int},               # measured (GPUs: allocated); null in a dry-run
                 "peak_reserved_bytes": {"0": int},                  # measured per GPU: reserved by the allocator
                 "weight_bytes": {"0": int}, "planned_bytes": {"0": int},   # planned: weights + activations
                 "device_map": {component: {module: device}},
                 "offload_bytes_per_step": int,   # weights copied host-to-GPU per forward (0: none)
                 "offload_bytes_per_image": int,  # the same over a whole image (steps, shared by a batch)
                 "offload": "none" | "streamed" | "hooks",  # diffusers group offloading or accelerate hooks
                 "pinned_bytes": int,             # planned host bytes pinned for streamed blocks (0: none)
                 "adapter_bytes": int,            # planned bytes of unfused LoRA adapters (in weight_bytes)
                 "peak_pinned_bytes": int,        # measured: pinned host memory held (CUDA); null otherwise
                 "kept_bytes": int,               # RAM its weights stay in between the Python API's calls (0: none)
                 "weights_kept": bool,            # measured: this call took them from there, reading nothing
                 "tiled": bool,                   # decode: diffusers' tiled VAE decoding
                 "notes": [str]}],                # what the planner left out or chose
     "loras": [{"source": str, "scale": float, "sha256": str}],  # --lora, in order (lora.py)
     "inputs": [{"path": str, "width": int, "height": int, "sha256": str}],  # --image, in order (input_images.py)
     "mask": {"path": str, "width": int, "height": int, "sha256": str} | null,  # --mask
     "images": [paths, in prompt order],
     "written": [the paths of "images" written by this call: a resumed run's missing ones],
     "upsampled_prompts": [each image's prompt as --upsample-prompt's upsampler rewrote it, as "images"; [] without]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .budget import device_key, format_bytes

# Host-to-GPU copy speed assumed for the offload time estimate: PCIe 4.0 x16 moves 31.5 GB/s raw;
# pinned-memory copies reach about 25 GB/s (NVIDIA's bandwidthTest on such links reports 24-26).
# A GPU run measures nothing yet: benchmarks/gpu_check.sh records real seconds per image.
OFFLOAD_BANDWIDTH_BYTES_PER_SECOND = 25 * 10**9
OFFLOAD_BANDWIDTH_NAME = "PCIe 4.0 x16"
from .files import atomic_write


@dataclass
class StageReport:
    name: str
    device_map: dict[str, dict[str, str]]  # component -> module -> device
    weight_bytes: dict[str, int]  # planned weights per device
    planned_bytes: dict[str, int]  # planned weights + activations per device
    load_seconds: float | None = None
    run_seconds: float | None = None
    peak_bytes: dict[str, int] | None = None  # measured per device (GPUs: allocated)
    peak_reserved_bytes: dict[str, int] | None = None  # measured per GPU: reserved by the caching allocator
    handoff_bytes: int | None = None  # the handoff this stage passed on, in CPU memory
    process: int = 0  # rank under several processes
    images: int = 0  # how many images this stage processed
    offload_bytes_per_step: int = 0  # weights copied host-to-GPU per forward pass
    offload_bytes_per_image: int = 0  # the same summed over one image's forward passes
    offload: str = "none"  # "streamed" (diffusers group offloading), "hooks" (accelerate) or "none"
    tiled: bool = False  # decode: tiled VAE decoding
    pinned_bytes: int = 0  # planned host bytes pinned for streamed blocks, as PyTorch allocates them
    adapter_bytes: int = 0  # planned bytes of the unfused LoRA adapters, part of weight_bytes
    peak_pinned_bytes: int | None = None  # measured: the most pinned host memory PyTorch held (CUDA only)
    kept_bytes: int = 0  # RAM its weights stay in between the Python API's calls (plan.kept_between_calls)
    weights_kept: bool = False  # measured: the stage's components came from that RAM, no weight was read
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_plan(cls, stage_plan, steps: int = 1, images: int = 1) -> "StageReport":
        """The plan's numbers; `steps` forward passes per batch (denoise: the denoising steps; encode
        and decode: 1) and `images` images in the run, for the per-image offload bytes."""
        # A stage that does not fit copies nothing: its "offloaded" bytes are the ones with no room.
        per_step = stage_plan.offload_bytes_per_step if stage_plan.fits else 0
        batch = max(component.batch_size for component in stage_plan.components)
        passes = steps * -(-max(images, 1) // max(batch, 1))  # ceil: a last, partial batch copies as much
        offloading = [component for component in stage_plan.components if component.offload_bytes and per_step]
        return cls(
            offload_bytes_per_step=per_step,
            offload_bytes_per_image=per_step * passes // max(images, 1),
            offload=("streamed" if all(c.streamed for c in offloading) else "hooks") if offloading else "none",
            tiled=any(component.tiled for component in stage_plan.components),
            pinned_bytes=stage_plan.pinned_bytes,
            adapter_bytes=sum(component.adapter_bytes for component in stage_plan.components),
            notes=list(stage_plan.notes),
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
    loras: list[dict] = field(default_factory=list)  # {"source", "scale", "sha256"} of each --lora
    inputs: list[dict] = field(default_factory=list)  # {"path", "width", "height", "sha256"} of each --image
    mask: dict | None = None  # the same of --mask
    images: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    # each image's prompt as the prompt upsampler rewrote it, in the order of `images` ([] without --upsample-prompt)
    upsampled_prompts: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The planner's notes of every stage, each once."""
        return list(dict.fromkeys(note for stage in self.stages for note in stage.notes))

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
        reserved = any(stage.peak_reserved_bytes for stage in self.stages)  # a run on GPUs
        if measured:
            header += ["peak", *(["reserved"] if reserved else []), "load s", "run s"]
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
                    held = (stage.peak_reserved_bytes or {}).get(device)
                    row += [
                        format_bytes(peak) if peak is not None else "-",
                        *([format_bytes(held) if held is not None else "-"] if reserved else []),
                        f"{stage.load_seconds:.2f}" if position == 0 else "",
                        f"{stage.run_seconds:.2f}" if position == 0 else "",
                    ]
                rows.append(row)
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join(lines + self.cost_lines())

    def cost_lines(self) -> list[str]:
        """Under the table: for each stage that offloads, what it copies host-to-GPU and what that costs."""
        lines = []
        for stage in self.stages:
            if stage.kept_bytes:
                on_gpus = any(device not in ("cpu", "disk") for device in stage.weight_bytes)
                lines.append(f"{stage.name}: its weights stay in RAM between calls ({format_bytes(stage.kept_bytes)}, "
                             "counted against the cpu budget of every stage"
                             + ("; moved to its GPUs at each call)" if on_gpus else ")")
                             + ("; this call read none" if stage.weights_kept else ""))
            if stage.tiled:
                lines.append(f"{stage.name}: tiled VAE decoding (the whole image's activations do not fit)")
            if not stage.offload_bytes_per_step:
                continue
            if stage.pinned_bytes:
                measured = (f", {format_bytes(stage.peak_pinned_bytes)} measured"
                            if stage.peak_pinned_bytes is not None else "")
                lines.append(f"{stage.name}: {format_bytes(stage.pinned_bytes)} of RAM pinned for the streamed blocks "
                             f"(planned as allocated{measured}); it is returned when the stage ends")
            seconds = stage.offload_bytes_per_step / OFFLOAD_BANDWIDTH_BYTES_PER_SECOND
            # Streamed blocks are prefetched on a side stream from pinned RAM, except a text encoder's
            # (blocks.BlockStructure.streams), which pins nothing.
            how = ("copied as each block runs (accelerate hooks)" if stage.offload != "streamed"
                   else "streamed ahead of use (diffusers group offloading)" if stage.pinned_bytes
                   else "copied as each block runs (diffusers group offloading)")
            step = "denoising step" if stage.name == "denoise" else "forward pass"
            lines.append(
                f"{stage.name}: offloaded weights {how}: {format_bytes(stage.offload_bytes_per_step)} host-to-GPU per "
                f"{step}, {format_bytes(stage.offload_bytes_per_image)} per image; about {seconds:.2f} s per {step} "
                f"at {OFFLOAD_BANDWIDTH_BYTES_PER_SECOND / 10**9:.0f} GB/s ({OFFLOAD_BANDWIDTH_NAME})"
            )
        return lines
