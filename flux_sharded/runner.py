"""The only place that sequences the stages: check -> plan -> (load -> run -> release -> flush) x 3.

Every check that needs no weights runs first; then the plan (plan.py) decides each stage's device
maps from configs alone, and the stages load with exactly those maps. The handoff lives on the CPU
between stages; each stage's component is dropped and memory flushed before the next stage loads,
so a device holds at most one stage's weights at a time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .budget import Budget, budget_to_json, format_budget, format_bytes
from .checkpoint import Checkpoint, resolve_checkpoint
from .distributed import Process, gather, share, wait_for_everyone
from .errors import PlanError, SettingsError, StageOutOfMemory
from .files import check_writable_folder
from .handoff import GenerationSettings, Handoff
from .images import image_paths, save_png
from .memory import PeakMemory, flush
from .plan import PlanInputs, RunPlan, plan_run
from .report import RunReport, StageReport
from .stages import STAGES, decode

SINGLE_PROCESS = Process(index=0, count=1, local_index=0)
MAX_SEQUENCE_LENGTH_LIMIT = 512  # FluxPipeline refuses more: T5 was trained on 512 tokens


@dataclass(frozen=True)
class RunRequest:
    checkpoint: Checkpoint  # its configs at least; the weights are fetched only after planning
    settings: GenerationSettings
    budget: Budget
    out_dir: Path
    offload_folder: Path | None = None  # where accelerate puts weights budgeted to "disk"


def check_settings(request: RunRequest) -> None:
    """Every check of the settings and budget that needs no weights and writes nothing."""
    settings, multiple = request.settings, request.checkpoint.size_multiple
    if not settings.prompts:
        raise SettingsError("no prompt given; pass --prompt TEXT (repeatable)")
    if any(not prompt.strip() for prompt in settings.prompts):
        raise SettingsError("--prompt: an empty prompt cannot be generated; give some text")
    for name, value in (("--height", settings.height), ("--width", settings.width)):
        if value < multiple or value % multiple:
            raise SettingsError(
                f"{name} {value} is not a positive multiple of {multiple} (the VAE's scale factor "
                f"{request.checkpoint.vae_scale_factor} x 2 for latent packing); "
                f"try {max(multiple, round(value / multiple) * multiple)}"
            )
    if settings.steps < 1:
        raise SettingsError(f"--steps {settings.steps}: at least 1 step is needed")
    if settings.guidance < 0:
        raise SettingsError(f"--guidance {settings.guidance}: the guidance scale cannot be negative")
    if not 1 <= settings.max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise SettingsError(
            f"--max-sequence-length {settings.max_sequence_length}: use 1 to {MAX_SEQUENCE_LENGTH_LIMIT} tokens"
        )
    if "disk" in request.budget and request.offload_folder is None:
        raise SettingsError("--max-memory has a disk entry but no --offload-folder; give a folder for the offloaded weights")


def check_request(request: RunRequest, keep_created_folders: bool = False) -> list[Path]:
    """check_settings, then the output folders; returns the image paths of the whole run."""
    check_settings(request)
    check_writable_folder(request.out_dir, "--out", keep_created_folders)
    if request.offload_folder is not None:
        check_writable_folder(request.offload_folder, "--offload-folder", keep_created_folders)
    settings = request.settings
    paths = image_paths(request.out_dir, settings.image_indices, settings.prompts, settings.seeds)
    existing = [path for path in paths if path.exists()]
    if existing:
        raise SettingsError(f"--out: {existing[0]} already exists; choose another --out folder or move it away")
    return paths


def plan_inputs(request: RunRequest) -> PlanInputs:
    settings = request.settings
    return PlanInputs(
        config_root=request.checkpoint.path,
        dtype=settings.torch_dtype,
        height=settings.height,
        width=settings.width,
        max_sequence_length=settings.max_sequence_length,
        vae_scale_factor=request.checkpoint.vae_scale_factor,
        batch_size=settings.batch_size,
    )


def dry_run(request: RunRequest) -> tuple[RunReport, PlanError | None]:
    """Every stage's plan as a report without measurements, and the refusal if a stage does not fit."""
    check_settings(request)
    refusal = None
    try:
        stages = plan_run(plan_inputs(request), request.budget).stages
    except PlanError as error:
        stages, refusal = error.stages, error
    report = RunReport(budget=budget_to_json(request.budget))
    report.stages = [StageReport.from_plan(stage) for stage in stages]
    return report, refusal


def execute(request: RunRequest, log: Callable[[str], None] = lambda message: None,
            process: Process = SINGLE_PROCESS) -> RunReport | None:
    """Run this process's share of the images; the main process returns the whole run's report."""
    paths = check_request(request, keep_created_folders=process.several)
    plan = plan_run(plan_inputs(request), request.budget)
    if process.is_main:  # one download (if any) into the shared cache, then the others read it
        checkpoint = resolve_checkpoint(request.checkpoint.model, need_weights=True)
    wait_for_everyone(process)
    if not process.is_main:
        checkpoint = resolve_checkpoint(request.checkpoint.model, need_weights=True)
    positions = share(process, len(request.settings.prompts))
    mine = dataclasses.replace(request, settings=request.settings.subset(positions))
    report = RunReport(budget=budget_to_json(request.budget))
    if positions:
        report = _execute_plan(mine, checkpoint, plan, [paths[p] for p in positions], log, process)
    reports = gather(process, report)
    if not process.is_main:
        return None
    report.stages = [stage for each in reports for stage in each.stages]
    report.images = [image for each in reports for image in each.images]  # shares are contiguous, in order
    return report


def _execute_plan(request: RunRequest, checkpoint: Checkpoint, plan: RunPlan, paths: list[Path], log,
                  process: Process) -> RunReport:
    settings = request.settings
    report = RunReport(budget=budget_to_json(request.budget))
    handoff = Handoff(settings=settings)
    images = None
    if process.is_main:
        log(f"budget: {format_budget(request.budget)}; {len(settings.prompts)} image(s)"
            + (f" on this process, {process.count} processes" if process.several else ""))
    for stage in STAGES:
        stage_plan = plan.stage(stage.NAME)
        stage_report = StageReport.from_plan(stage_plan)
        stage_report.process, stage_report.images = process.index, len(settings.prompts)
        progress = tqdm(total=len(settings.prompts), desc=f"{stage.NAME} ({', '.join(stage.COMPONENTS)})",
                        unit="image", disable=not process.is_main, leave=True)
        with PeakMemory(gpu_indices=plan.gpu_indices) as peak:
            try:
                started = time.perf_counter()
                loaded = stage.load(checkpoint, stage_plan, settings.torch_dtype, request.offload_folder)
                loaded_at = time.perf_counter()
                stage_report.device_map = stage.device_map(loaded)
                output = stage.run(loaded, handoff, progress.update)
                finished = time.perf_counter()
            except torch.OutOfMemoryError as error:
                raise StageOutOfMemory(
                    f"{stage.NAME}: out of memory ({str(error).splitlines()[0]}) under --max-memory "
                    f"{format_budget(request.budget)}; the plan was "
                    + ", ".join(f"{device}={format_bytes(size)}" for device, size in stage_plan.planned_bytes.items())
                    + "; lower the budget on that device (leaving more room for activations) or add cpu=... for offload"
                ) from None
            finally:
                loaded = None  # the only reference: the component is freed here, before the next stage
                progress.close()
        flush()
        stage_report.load_seconds, stage_report.run_seconds = loaded_at - started, finished - loaded_at
        stage_report.peak_bytes = peak.peak_bytes
        if stage is decode:
            images = output
        else:
            handoff = output
            stage_report.handoff_bytes = handoff.nbytes()
        report.stages.append(stage_report)
    request.out_dir.mkdir(parents=True, exist_ok=True)
    for image, path, prompt, seed in zip(images, paths, settings.prompts, settings.seeds):
        save_png(image, path, _png_metadata(settings, prompt, seed, request.budget))
        report.images.append(str(path))
    return report


def _png_metadata(settings: GenerationSettings, prompt: str, seed: int, budget: Budget) -> dict[str, str]:
    return {
        "prompt": prompt,
        "seed": str(seed),
        "steps": str(settings.steps),
        "guidance": str(settings.guidance),
        "size": f"{settings.width}x{settings.height}",
        "model": settings.model,
        "dtype": settings.dtype,
        "max_memory": format_budget(budget),
        "software": "flux-sharded",
    }
