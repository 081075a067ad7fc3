"""The only place that sequences the stages: check -> plan -> (todo -> load -> run -> release -> flush -> finish) x 3.

Every check that needs no weights runs first; then the plan (plan.py) decides each stage's device
maps from configs alone, and the stages load with exactly those maps. Every stage has the one
interface of stages.Stage, so the sequence has no special case for any of them: what a stage runs
on and what it keeps are its own todo and finish, which write through this module's ShareRun. The handoff lives on the CPU
between stages; each stage's component is dropped and memory flushed before the next stage loads,
so a device holds at most one stage's weights at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch

from . import interrupt
from .budget import Budget, budget_to_json, format_budget, format_bytes, gpu_indices
from .checkpoint import (
    Checkpoint,
    check_same_weights,
    check_unchanged_weights,
    check_tokenizers,
    check_weight_files,
    fingerprint_digest,
    resolve_checkpoint,
    resolve_upsampler,
    upsampler_fingerprint,
    weights_fingerprint,
)
from .components import MODULE_PATCH_LOCK
from .distributed import (
    Process,
    encode_positions,
    finish,
    gather,
    launcher_command,
    local_processes,
    share,
    wait_for_everyone,
)
from .errors import FluxShardedError, OutputError, PlanError, SettingsError, StageError, StageOutOfMemory
from .families import FAMILIES, IMAGE_STAGE, UPSAMPLE_STAGE, generation_defaults, reference_size, upsample_prompt_tokens
from .files import check_writable_folder
from .handoff import GenerationSettings, Handoff
from .images import image_paths, save_png
from .input_images import InputImage, find_saved as find_saved_image, parse_saved as parse_saved_image
from .lora import Adapter, find_saved, parse_saved
from .memory import PeakMemory, flush
from .placement import place_again, placeable, to_host
from .plan import PlanInputs, RunPlan, check_free_cpu_memory, check_free_gpu_memory, kept_between_calls, plan_run
from .progress import Progress, stage_bar
from .quantize import LORA_MERGE, check_prequantized_dtype, format_quantize, prequantized, stored_by_torchao
from .report import RunReport, StageReport
from .rundir import (
    SAVED_STAGES,
    SavedRun,
    batch_latents_path,
    bind_out_dir,
    check_bound,
    check_not_running,
    clear_run,
    default_run_dir,
    handoff_path,
    holds_our_run,
    load_batch_latents,
    our_files,
    read_run,
    run_folder_lock,
    remove_stale_temporaries,
    remove_superseded,
    resumed_handoff,
    save_batch_latents,
    saved_handoffs,
    write_run,
)
from .seal import check_key
from .stages import STAGES, Stage, Work, family_code
from .stages.adapters import check_lora
from .settings import (DEFAULT_STRENGTH, MAX_BATCH_SIZE, MAX_SIDE, MAX_STEPS, MAX_UPSAMPLE_TOKENS, SEED_MAX, SEED_MIN,
                       UPSAMPLE_MAX_TOKENS, png_fields)
from .validate import check_prompts, check_run_image

SINGLE_PROCESS = Process(index=0, count=1)


@dataclass(frozen=True)
class RunRequest:
    checkpoint: Checkpoint  # its configs at least; the weights are fetched only after planning
    settings: GenerationSettings
    budget: Budget
    out_dir: Path
    offload_folder: Path | None = None  # where accelerate puts weights budgeted to "disk"
    run_dir: Path | None = None  # stage checkpoints; None: rundir.default_run_dir
    resume: bool = False  # continue the run saved in run_dir
    overwrite: bool = False  # replace existing images
    # settings.images, then settings.mask (if any), read and decoded once (input_images.read_image), in
    # order; () : the runner reads them itself where it needs them (input_images.find_saved)
    input_images: tuple[InputImage, ...] = ()
    # What continues the work this run is part of, when that is more than the run (one run of a
    # prompts file's, jobs.py: the same command again); None: resume_command's --resume
    continue_command: str | None = None

    @property
    def run_folder(self) -> Path:
        return self.run_dir or default_run_dir(self.out_dir, self.settings)

    @property
    def resume_command(self) -> str:
        """What continues this run, under the same launcher (on each machine, for several); the run
        folder absolute, so that the command works from any folder."""
        if self.continue_command is not None:
            return self.continue_command
        return f"{launcher_command() or 'flux-sharded '}--resume {shlex.quote(str(self.run_folder.absolute()))}"


def check_settings(request: RunRequest) -> None:
    """Every check of the settings and budget that needs no weights and writes nothing."""
    settings, multiple = request.settings, request.checkpoint.size_multiple
    if not settings.prompts:
        raise SettingsError("no prompt given; pass --prompt TEXT (repeatable)")
    check_prompts(settings.prompts)
    check_prequantized_dtype(request.checkpoint.path, settings.dtype)
    family = request.checkpoint.family
    foreign = sorted(set(settings.quantization) - set(family.names))
    if foreign:  # the option is checked against the family earlier; this is run.json's
        raise SettingsError(
            f"quantize {format_quantize(settings.quantization)}: {family.name} has no {' or '.join(foreign)} (its "
            f"components: {', '.join(family.names)}); on --resume the run folder's run.json 'settings.quantize' "
            "names it, so the file was edited: start a new run")
    if any(not prompt.strip() for prompt in settings.prompts):
        raise SettingsError("--prompt: an empty prompt cannot be generated; give some text")
    for index, seed in enumerate(settings.seeds):
        if not SEED_MIN <= seed <= SEED_MAX:
            raise SettingsError(
                f"--seed: image {index} would use seed {seed}, outside {SEED_MIN}..{SEED_MAX} (what "
                "torch.Generator.manual_seed takes); image k uses --seed + k, or its JSON line's seed plus its "
                "number: give a smaller seed"
            )
    wrong = [(name, value) for name, value in (("--height", settings.height), ("--width", settings.width))
             if value < multiple or value % multiple]
    if wrong:  # both named at once, so that a second run does not fail on the other one
        raise SettingsError(
            f"{' and '.join(f'{name} {value}' for name, value in wrong)} "
            f"{'is not a positive multiple' if len(wrong) == 1 else 'are not positive multiples'} of {multiple} "
            f"(the VAE's scale factor {request.checkpoint.vae_scale_factor} x 2 for latent packing); try "
            + " ".join(f"{name} {max(multiple, round(value / multiple) * multiple)}" for name, value in wrong)
        )
    if not 1 <= settings.steps <= MAX_STEPS:
        raise SettingsError(f"--steps {settings.steps}: use 1 to {MAX_STEPS} steps")
    for name, value in (("--height", settings.height), ("--width", settings.width)):
        if value > MAX_SIDE:
            raise SettingsError(f"{name} {value}: at most {MAX_SIDE} pixels")
    if settings.batch_size > MAX_BATCH_SIZE:
        raise SettingsError(f"--batch-size {settings.batch_size}: at most {MAX_BATCH_SIZE}")
    if not settings.guidance >= 0 or math.isinf(settings.guidance):  # also refuses nan
        raise SettingsError(f"--guidance {settings.guidance}: give a finite guidance scale of 0 or more (default 3.5)")
    if not family.guided and settings.guidance != family.guidance:
        raise SettingsError(f"--guidance {settings.guidance:g}: {family.name} ({family.pipeline}) is step-distilled and "
                            "takes no guidance scale; leave out --guidance")
    if not 1 <= settings.max_sequence_length <= family.text_token_limit:
        raise SettingsError(
            f"--max-sequence-length {settings.max_sequence_length}: use 1 to {family.text_token_limit} tokens"
        )
    check_image_settings(settings, family, request.checkpoint.vae_scale_factor)
    if not 1 <= settings.true_cfg < math.inf:  # also refuses nan
        raise SettingsError(f"--true-cfg {settings.true_cfg}: give a finite scale of 1 or more (1: off; e.g. 4)")
    if settings.true_cfg > 1 and not family.true_cfg:
        raise SettingsError(f"--true-cfg {settings.true_cfg:g}: {family.name}'s {family.pipeline} takes no negative "
                            "prompt; leave out --true-cfg and --negative-prompt")
    if settings.negative_prompt and settings.true_cfg <= 1:
        raise SettingsError("--negative-prompt has no effect without true classifier-free guidance: add --true-cfg "
                            "SCALE above 1 (e.g. 4; a second transformer pass per step), or leave it out")
    check_upsample_settings(settings, family)


def check_upsample_settings(settings: GenerationSettings, family) -> None:
    """--upsample-prompt and --upsample-max-tokens against the family (families.Family.upsampler)."""
    if not 1 <= settings.upsample_max_tokens <= MAX_UPSAMPLE_TOKENS:
        raise SettingsError(f"--upsample-max-tokens {settings.upsample_max_tokens}: use 1 to {MAX_UPSAMPLE_TOKENS} "
                            f"tokens (default {UPSAMPLE_MAX_TOKENS}, the upsampler blocks' own)")
    if not settings.upsample_prompt:
        if settings.upsample_max_tokens != UPSAMPLE_MAX_TOKENS:
            raise SettingsError(f"--upsample-max-tokens {settings.upsample_max_tokens} has no effect without "
                                "--upsample-prompt MODEL; add it, or leave out --upsample-max-tokens")
        return
    takers = ", ".join(f.name for f in FAMILIES.values() if f.upsampler)
    if family.upsampler is None:
        raise SettingsError(f"--upsample-prompt: {family.name} ({family.pipeline}) has no prompt upsampler (only "
                            f"{takers} do); leave out --upsample-prompt")
    if settings.images:
        raise SettingsError("--upsample-prompt with --image: the upsampler's image-conditioned requests need its "
                            "processor's image part (Qwen3VLProcessor, which needs torchvision), which flux-sharded "
                            "does not run yet; leave out --upsample-prompt (or --image)")


def check_image_settings(settings: GenerationSettings, family, vae_scale_factor: int) -> None:
    """--image, --mask and --strength against the family's image and inpainting pipelines
    (families.Family.image_pipeline, inpaint_pipeline)."""
    takers = ", ".join(sorted({f.name for f in FAMILIES.values() if f.max_images and f.runs}))
    if family.needs_mask and not (settings.images and settings.mask):
        raise SettingsError(f"{family.name} ({family.pipeline}) only inpaints: it redraws the white part of a --mask "
                            "over an --image; give --image PATH and --mask PATH (of the image's size)")
    if settings.images and not family.max_images:
        raise SettingsError(f"--image: {family.name} ({family.pipeline}) takes no input image here; leave out "
                            f"--image, or use a checkpoint that takes one ({takers})")
    if len(settings.images) > family.max_images:
        raise SettingsError(f"--image given {len(settings.images)} times: {family.image_pipeline} takes at most "
                            f"{family.max_images} input image(s); give at most {family.max_images}")
    for text in settings.images:
        path, (width, height), _ = parse_saved_image(text)
        if min(width, height) < family.min_image_side or max(width, height) > family.max_image_aspect * min(width, height):
            raise SettingsError(
                f"--image {path}: {width}x{height} pixels; {family.image_pipeline} takes images of at least "
                f"{family.min_image_side} pixels a side and at most {family.max_image_aspect:g}:1; give a larger or "
                "less elongated image")
    if settings.mask:
        check_mask_settings(settings, family, vae_scale_factor)
    pipeline = family.inpaint_pipeline if settings.mask else family.image_pipeline
    takes_strength = family.strength or bool(settings.mask)  # every inpainting pipeline takes one
    strength = settings.strength
    if not 0 < strength <= 1:  # also refuses nan
        default = family.inpaint_strength if settings.mask and family.inpaint_pipeline else DEFAULT_STRENGTH
        raise SettingsError(f"--strength {strength}: give a number above 0 and at most 1 (the share of the "
                            f"schedule redrawn from the input image; default {default:g})")
    if strength != DEFAULT_STRENGTH and not takes_strength:
        raise SettingsError(f"--strength {strength:g}: {family.name}'s {pipeline or family.pipeline} "
                            "takes no strength; leave out --strength")
    if strength != DEFAULT_STRENGTH and not settings.images:
        raise SettingsError(f"--strength {strength:g} needs an input image to redraw: give --image PATH, or leave "
                            "out --strength")
    if settings.images and takes_strength and img2img_steps(settings.steps, strength) < 1:
        raise SettingsError(
            f"--strength {strength:g} with --steps {settings.steps} leaves no denoising step ({pipeline} "
            f"runs steps - int(steps x (1 - strength)) of them): raise --strength or --steps")


def check_mask_settings(settings: GenerationSettings, family, vae_scale_factor: int) -> None:
    """--mask against --image and the family's inpainting pipeline (families.Family.inpaint_pipeline)."""
    takers = ", ".join(f"{f.name} ({f.inpaint_pipeline})" for f in FAMILIES.values() if f.inpaint_pipeline)
    if not family.inpaint_pipeline:
        raise SettingsError(f"--mask: {family.name} ({family.pipeline}) does no inpainting here; leave out --mask, "
                            f"or use a checkpoint that does ({takers})")
    if not settings.images:
        raise SettingsError("--mask needs the image it paints into: give --image PATH, or leave out --mask")
    if len(settings.images) > 1 + family.inpaint_references:
        references = (f" and takes {family.inpaint_references} reference image (a second --image)"
                      if family.inpaint_references else "")
        raise SettingsError(f"--image given {len(settings.images)} times: {family.inpaint_pipeline} paints into one "
                            f"image under --mask{references}; give --image at most {1 + family.inpaint_references} "
                            "time(s)")
    (image_path, size, _), (mask_path, mask_size, _) = parse_saved_image(settings.images[0]), \
        parse_saved_image(settings.mask)
    if mask_size != size:
        raise SettingsError(f"--mask {mask_path}: {mask_size[0]}x{mask_size[1]} pixels, but the --image {image_path} "
                            f"is {size[0]}x{size[1]}; give a mask of the image's size (white where it is redrawn)")
    if family.inpaint_at_image_size:
        height, width = reference_size(size, vae_scale_factor)
        if (settings.height, settings.width) != (height, width):
            raise SettingsError(
                f"--height {settings.height} --width {settings.width}: {family.inpaint_pipeline} paints at its input "
                f"image's size, {width}x{height} for the {size[0]}x{size[1]} --image (at most 1024x1024 pixels, cut "
                f"to multiples of 2 x the VAE's factor); leave out --height and --width, or give --height {height} "
                f"--width {width}")


def img2img_steps(steps: int, strength: float) -> int:
    """The steps an image-to-image run denoises: FluxImg2ImgPipeline.get_timesteps skips the first
    int(steps - steps x strength) of the schedule (tests/test_images.py pins it to the installed one)."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


def check_request(request: RunRequest, keep_created_folders: bool = False) -> list[Path]:
    """check_settings, then the output folders; returns the image paths of the whole run."""
    check_settings(request)
    if request.resume and not request.out_dir.is_dir():  # run.json's out_dir is absolute (rundir.read_run)
        what = "is a file, not a folder" if request.out_dir.exists() else "does not exist"
        raise SettingsError(
            f"--resume: the run's image folder {request.out_dir} (run.json 'out_dir') {what}; a resume writes "
            "only where its run started: move that away and make the folder again, or start a new run with --out"
        )
    if request.resume:
        check_bound(request.run_folder, request.out_dir, request.settings)
    if "disk" in request.budget and request.offload_folder is None:  # a dry-run writes nothing: it needs none
        raise SettingsError("--max-memory has a disk entry but no --offload-folder; give a folder for the offloaded weights")
    check_writable_folder(request.out_dir, "--out", keep_created_folders)
    check_writable_folder(request.run_folder, "--run-dir", keep_created_folders)
    if request.offload_folder is not None:
        check_writable_folder(request.offload_folder, "--offload-folder", keep_created_folders)
    settings = request.settings
    paths = image_paths(request.out_dir, settings.image_indices, settings.prompts, settings.seeds)
    existing = [path for path in paths if path.exists()]
    # Files of our names that no run of ours wrote are refused whatever the options (holds_our_run).
    earlier_run = not request.resume and holds_our_run(request.run_folder)
    finished = len(existing) == len(paths) and earlier_run
    if finished and not (request.resume or request.overwrite):
        raise SettingsError(
            f"--out: the run in {request.run_folder} finished: its {len(paths)} image(s) exist, nothing is left to "
            "resume; pass --overwrite to make them again, or choose another --out folder"
        )
    # An unfinished run of these settings first: its images in --out are its own, and resuming
    # is what the user wants, not moving them away.
    if earlier_run and not request.overwrite:
        raise SettingsError(
            f"--run-dir: {request.run_folder} already holds a run; continue it with `{request.resume_command}`, "
            "start it again with --overwrite, or give another --run-dir"
        )
    if existing and not (request.resume or request.overwrite):
        raise SettingsError(
            f"--out: {existing[0]} already exists; choose another --out folder, move it away, or pass --overwrite"
        )
    return paths


def check_report_path(request: RunRequest, report_path: Path) -> None:
    """--report may not replace one of the run's images, be one of its folders, nor land in its run folder."""
    report = report_path.absolute()
    settings = request.settings
    images = image_paths(request.out_dir.absolute(), settings.image_indices, settings.prompts, settings.seeds)
    if report in images:
        raise SettingsError(f"--report {report_path} is one of this run's images; give another file, e.g. report.json")
    folders = {"--out": request.out_dir, "--run-dir": request.run_folder, "--offload-folder": request.offload_folder}
    for option, folder in folders.items():  # a folder the run creates: found now, not after every stage ran
        if folder is not None and report == folder.absolute():
            raise SettingsError(f"--report {report_path} is the run's {option} folder; give a file, e.g. "
                                f"--report {shlex.quote(str(report_path / 'report.json'))}")
    if request.run_folder.absolute() in report.parents:
        raise SettingsError(f"--report {report_path} is inside the run folder {request.run_folder}, which holds the "
                            "run's own files; give a file outside it")


def ignored_guidance_note(request: RunRequest) -> str | None:
    """The note for a guidance the checkpoint ignores (its family's guidance_note: FLUX.1-schnell's
    transformer has no guidance embedding, a step-distilled klein), when the guidance is not the
    model's default (families.generation_defaults: 0 for FLUX.1-schnell), so the user asked for one."""
    checkpoint = request.checkpoint
    default = generation_defaults(checkpoint.family, checkpoint.transformer_config, checkpoint.is_distilled)["guidance"]
    if request.settings.guidance == default:
        return None
    return family_code(checkpoint.family).guidance_note(checkpoint, request.settings.guidance)


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
        # A batch holds at most the run's images (or distinct prompts, for encode); under several
        # processes a share may hold fewer, so this can only over-count.
        images=len(settings.prompts),
        distinct_prompts=len(set(settings.prompts)),
        quantize=tuple(sorted({**prequantized(request.checkpoint.path), **settings.quantization}.items())),
        prequantized=tuple(sorted(prequantized(request.checkpoint.path))),
        adapters=lora_adapters(request),
        input_sizes=family_code(request.checkpoint.family).input_sizes(
            settings, [parse_saved_image(text)[1] for text in settings.images], request.checkpoint.vae_scale_factor)
        if settings.images else (),
        **(dict(upsampler=resolve_upsampler(settings.upsample_prompt, request.checkpoint.family, need_weights=False),
                upsample_prompt_tokens=upsample_prompt_tokens(settings.prompts),
                upsample_max_tokens=settings.upsample_max_tokens) if UPSAMPLE_STAGE in settings.stages else {}),
    )


def lora_adapters(request: RunRequest) -> tuple[Adapter, ...]:
    """The run's LoRAs (settings.lora), each found again (a file changed since the run began is
    refused, lora.find_saved) and checked against the model (stages.adapters.check_lora), as the
    stages load them: adapter names lora_0, lora_1, ... in --lora order. Reads the LoRA files, no
    weight of the model."""
    checkpoint, adapters = request.checkpoint, []
    for index, text in enumerate(request.settings.lora):
        lora = find_saved(text, request.run_folder if request.resume else None)
        changes = check_lora(checkpoint.family, checkpoint.path, lora.path, lora.source)
        adapters.append(Adapter(f"lora_{index}", lora.path, lora.scale,
                                tuple((name, tuple(modules.items())) for name, modules in changes.items())))
    return tuple(adapters)


def new_report(request: RunRequest) -> RunReport:
    """A report of the run's budget, LoRAs and input images, without stages yet."""
    settings = request.settings
    loras = [dict(zip(("source", "scale", "sha256"), parse_saved(text))) for text in settings.lora]
    inputs = [_report_input(text) for text in settings.images]
    mask = _report_input(settings.mask) if settings.mask else None
    return RunReport(budget=budget_to_json(request.budget), loras=loras, inputs=inputs, mask=mask)


def _report_input(text: str) -> dict:
    path, (width, height), digest = parse_saved_image(text)
    return {"path": str(path), "width": width, "height": height, "sha256": digest}


def input_images(request: RunRequest, resumed: Handoff | None) -> tuple[InputImage, ...]:
    """The run's input images, then its mask (if any), decoded, for encode_image; () when it has none
    or a resumed run encoded them already. On a resume every input file that still exists must hold
    the bytes the run began with (refused otherwise, input_images.find_saved); one that is gone is
    needed only while encode_image has not finished."""
    settings = request.settings
    if request.input_images:
        return request.input_images
    encoded = resumed is not None and IMAGE_STAGE in resumed.finished_stages
    found = []
    for option, text in [*(("--image", text) for text in settings.images), *([("--mask", settings.mask)]
                                                                             if settings.mask else [])]:
        if encoded and not parse_saved_image(text)[0].exists():
            continue
        found.append(find_saved_image(text, request.run_folder if request.resume else None, option))
    return () if encoded else tuple(found)


def check_prequantized_placed(plan: RunPlan, request: RunRequest) -> None:
    """A component the checkpoint stores quantized by torchao loads by its device map only onto GPUs:
    diffusers' and transformers' torchao quantizers refuse "cpu" or "disk" in the map of a
    pre-quantized model (diffusers 0.42.1: validate_environment), which failed inside the stage,
    after run.json. Refused before any weight is read, with the ways that work."""
    for name in sorted(stored_by_torchao(request.checkpoint.path)):
        for stage in plan.stages:
            component = next((each for each in stage.components if each.name == name), None)
            if component is None:
                continue
            devices = dict(component.device_map).values()
            off_gpu = sorted({str(device) for device in devices if device in ("cpu", "disk")})
            if off_gpu:
                raise SettingsError(
                    f"--max-memory: the checkpoint stores {name} quantized by torchao, which loads only onto GPUs "
                    f"(diffusers refuses {' and '.join(off_gpu)} in the device map of a pre-quantized torchao model), "
                    f"but the plan puts part of it on {' and '.join(off_gpu)}: give the GPUs room for all of it, or "
                    f"use the unquantized checkpoint with --quantize {name}=int8")


def check_adapters_placed(plan: RunPlan, request: RunRequest) -> None:
    """A LoRA goes into a component before it is placed (stages/adapters.py), which placement.place
    can do whole, over GPUs or with streamed blocks; refuse, before any weight is read, a component
    with LoRAs that the plan offloads through accelerate's hooks (a transformer partly on disk: an
    encoder with LoRAs streams its blocks instead, plan._plan_encode), or
    that is quantized otherwise than quantize.LORA_MERGE says (nf4, a text encoder, a checkpoint's
    own quantization)."""
    family, stored = request.checkpoint.family, prequantized(request.checkpoint.path)
    for stage in plan.stages:
        for component in stage.components:
            name = component.name
            if not component.adapters:
                continue
            if name in stored:
                raise SettingsError(f"--lora: the checkpoint stores {name} quantized ({stored[name]}), which takes no "
                                    "LoRA here; use the checkpoint in --dtype (with --quantize fp8 or int8), or drop "
                                    "--lora")
            method, library = component.quantization, family.component(name).library
            if method and (method not in LORA_MERGE or library != "diffusers"):
                fix = (f"leave {name} in --dtype" if library != "diffusers"
                       else f"use --quantize {name}={' or '.join(LORA_MERGE)}")
                raise SettingsError(f"--lora with --quantize {name}={method}: LoRAs go into a quantized transformer "
                                    f"in {' or '.join(LORA_MERGE)} only; {fix}, or drop --lora")
            if not placeable(dict(component.device_map), component.streamed):
                devices = ", ".join(sorted({str(device) for device in component.device_map.values()}))
                raise SettingsError(
                    f"--lora: under --max-memory {format_budget(plan.budget)} the plan offloads {name} through "
                    f"accelerate's hooks ({devices}), where its LoRA layers could not be placed; give its GPUs room for "
                    "it whole, or cpu=... instead of disk=... so that its blocks are streamed")


def decode_tiled(plan: RunPlan) -> bool:
    """Whether the plan decodes with diffusers' tiled VAE decoding (plan.plan_decode's choice)."""
    return any(component.tiled for component in plan.stage("decode").components)


def check_same_decode(request: RunRequest, plan: RunPlan, saved: SavedRun, paths: list[Path]) -> None:
    """A resume that still decodes images must decode them as the run did: tiled VAE decoding gives
    other pixels than untiled, and the plan chooses it by the budget (plan.plan_decode), so a resume
    under another --max-memory could switch it. Raises SettingsError naming the budget that keeps it."""
    tiled = decode_tiled(plan)
    if saved.decode_tiled is None or tiled == saved.decode_tiled or all(path.exists() for path in paths):
        return
    raise SettingsError(
        f"--resume: under --max-memory {format_budget(request.budget)} decode would use "
        f"{'tiled' if tiled else 'untiled'} VAE decoding, but the run planned {'untiled' if tiled else 'tiled'} "
        f"decoding under its --max-memory {format_budget(saved.budget)}, and the two give different pixels; resume "
        "under a budget that keeps the run's decoding (leave --max-memory out to use the run's own), or start a new run"
    )


def plan_report(stage_plan, settings: GenerationSettings) -> StageReport:
    """The plan's side of a stage's report; denoise runs one transformer forward per step, two with
    true classifier-free guidance (--true-cfg: the negative prompt's pass); the prompt upsampler one
    forward per token it writes, at most --upsample-max-tokens."""
    passes = {"denoise": settings.steps * (2 if settings.true_cfg > 1 else 1),
              UPSAMPLE_STAGE: settings.upsample_max_tokens}.get(stage_plan.name, 1)
    return StageReport.from_plan(stage_plan, steps=passes, images=len(settings.prompts))


def dry_run(request: RunRequest, keeps_weights: bool = False) -> tuple[RunReport, PlanError | None]:
    """Every stage's plan as a report without measurements, and the refusal if a stage does not fit;
    `keeps_weights`: for a caller that keeps weights between calls (KeptStages), each stage's
    kept_bytes (plan.kept_between_calls)."""
    check_settings(request)
    refusal, kept = None, {}
    try:
        plan = plan_run(plan_inputs(request), request.budget)
        check_adapters_placed(plan, request)
        check_prequantized_placed(plan, request)
        stages = plan.stages
        kept = kept_between_calls(plan) if keeps_weights else {}
    except PlanError as error:
        stages, refusal = error.stages, error
    report = new_report(request)
    report.stages = [plan_report(stage, request.settings) for stage in stages]
    for stage in report.stages:
        stage.kept_bytes = kept.get(stage.name, 0)
    return report, refusal


class KeptStages:
    """Stages' loaded components kept in host memory between runs (the Python API's Model holds
    one): stage name -> what it was loaded as and the loaded object. execute keeps only the stages
    its plan keeps (plan.kept_between_calls) and drops the others before any stage runs; a stage
    is taken out while it runs, so that a failure leaves nothing half-used behind."""

    def __init__(self):
        self._loaded: dict[str, tuple[tuple, object]] = {}

    def __contains__(self, stage: str) -> bool:
        return stage in self._loaded

    def retain(self, stages) -> None:
        """Drop every stage not in `stages` (the references: the memory is freed by the collector)."""
        for name in [name for name in self._loaded if name not in stages]:
            del self._loaded[name]

    def take(self, stage: str, key: tuple):
        """The stage's loaded components if they were loaded as `key` says, else None; either way
        none stay here until `keep` puts them back."""
        found = self._loaded.pop(stage, None)
        return found[1] if found is not None and found[0] == key else None

    def keep(self, stage: str, key: tuple, loaded) -> None:
        self._loaded[stage] = (key, loaded)

    def clear(self) -> None:
        self._loaded.clear()


def execute(request: RunRequest, log: Callable[[str], None] = lambda message: None,
            process: Process = SINGLE_PROCESS,
            on_progress: Callable[[Progress], None] | None = None,
            kept: KeptStages | None = None) -> RunReport | None:
    """Run this process's share of the images; the main process returns the whole run's report.
    `on_progress` is called as the share's stages go (progress.Progress), besides the bars; `kept`:
    the loaded stages a caller keeps between runs, which this run takes and keeps as its plan says
    (plan.kept_between_calls). The main process holds the run folder's lock (rundir.run_folder_lock)
    from before it reads a resumed run, or before a new run's first write, to its end."""
    with contextlib.ExitStack() as held:
        return _execute(request, log, process, on_progress, held, kept)


def _execute(request: RunRequest, log: Callable[[str], None], process: Process,
             on_progress: Callable[[Progress], None] | None, held: contextlib.ExitStack,
             kept: KeptStages | None = None) -> RunReport | None:
    if process.is_main and not request.resume:  # a run going on now is neither to resume nor to start again
        check_not_running(request.run_folder, "--out", request.resume_command)
    paths = check_request(request, keep_created_folders=process.several)
    if request.resume and process.is_main:
        held.enter_context(run_folder_lock(request.run_folder, "--resume", request.resume_command))
    positions = share(process, len(request.settings.prompts), request.settings.batch_size)
    saved_run = read_run(request.run_folder) if request.resume else None
    resumed, denoised = None, {}
    if saved_run is not None:  # whatever shares saved this share's images, under any number of processes
        indices = request.settings.image_indices  # the handoffs name images by these
        saved = saved_handoffs(request.run_folder, saved_run.process_counts, request.settings,
                               [indices[position] for position in positions], request.checkpoint,
                               fingerprint_digest(saved_run.weights))
        resumed, denoised = resumed_handoff(request.settings.subset(positions), saved)
        del saved  # the rows this share needs are copied out
    to_run = [stage.NAME for stage in STAGES if resumed is None or stage.NAME not in resumed.finished_stages]
    # The stages left must fit (a resume under a smaller budget was refused for a finished stage).
    plan = plan_run(plan_inputs(request), request.budget, tuple(to_run))
    check_adapters_placed(plan, request)
    check_prequantized_placed(plan, request)
    keeps = kept_between_calls(plan) if kept is not None else {}
    if kept is not None:
        kept.retain(keeps)  # before any stage runs: what this plan does not keep is no longer held
    if saved_run is not None:
        check_same_decode(request, plan, saved_run, paths)
    inputs = input_images(request, resumed)
    for note in check_free_gpu_memory(plan, free_gpu_bytes(request.budget), to_run):
        log(note)
    for note in check_free_cpu_memory(plan, psutil.virtual_memory().available, to_run, local_processes()):
        log(note)
    guidance_note = ignored_guidance_note(request)
    if guidance_note and process.is_main:
        log(guidance_note)
    if process.is_main:
        for note in plan.notes:
            log(note)
    # One process per machine downloads (if needed) into that machine's cache and prepares its run
    # folder (other machines may not share its disks); then the others read them. Everything
    # checkable is checked before run.json is written.
    if process.is_local_main:
        checkpoint = resolve_checkpoint(request.checkpoint.model, need_weights=True)
        upsampler = upsampler_weights(request, checkpoint, saved_run, UPSAMPLE_STAGE in to_run)
        check_weight_files(checkpoint)
        check_tokenizers(checkpoint.model, checkpoint.path)
        if "encode" in to_run:
            family_code(checkpoint.family).check_prompt_lengths(checkpoint, request.settings.prompts)
        fingerprint = weights_fingerprint(checkpoint.path, trust_blob_names=saved_run is None)
        if saved_run is not None:
            check_same_weights(saved_run.weights, fingerprint, checkpoint.model, request.run_folder)
        if saved_run is not None and not request.overwrite:  # an existing image counts only if it is the run's
            settings = request.settings
            for position, path in enumerate(paths):
                if path.exists():
                    check_run_image(path, _png_metadata(settings, position, request.budget,
                                                        fingerprint_digest(fingerprint), checkpoint,
                                                        upsampler_digest=_digest(upsampler)))
        images = request.settings.image_indices
        counts = {process.count, *(saved_run.process_counts if saved_run else ())}
        remove_stale_temporaries(request.run_folder, [path.name for path in our_files(request.run_folder, counts, images)])
        remove_stale_temporaries(request.out_dir, [path.name for path in paths])
        if not request.resume:
            if process.is_main:
                check_key()  # a damaged key is refused before the run folder is made
                held.enter_context(run_folder_lock(request.run_folder, "--out", request.resume_command))
            clear_run(request.run_folder, process.count, images)  # an earlier run's must not be resumed into this one
            bind_out_dir(request.run_folder, request.out_dir, request.settings)
            write_run(request.run_folder, SavedRun(request.settings, request.budget, request.out_dir,
                                                   request.offload_folder, process.count, fingerprint,
                                                   decode_tiled=decode_tiled(plan), upsampler_weights=upsampler))
        elif process.count not in saved_run.process_counts:  # before any process saves under the new names
            write_run(request.run_folder, dataclasses.replace(
                saved_run, resumed_processes=(*saved_run.resumed_processes, process.count)))
    if process.is_main:  # before the barrier: the other processes' lines come after it
        log(f"budget: {format_budget(request.budget)}; {len(positions)} image(s)"
            + (f" on this process, {process.count} processes" if process.several else "")
            + f"; run folder {request.run_folder}")
    wait_for_everyone(process)
    if not process.is_local_main:
        checkpoint = resolve_checkpoint(request.checkpoint.model, need_weights=True)
        fingerprint = weights_fingerprint(checkpoint.path)
        # what this machine's first process recorded
        upsampler = read_run(request.run_folder).upsampler_weights if UPSAMPLE_STAGE in request.settings.stages else None
    # This process's share; the run folder stays the whole run's (its default hashes the settings).
    mine = dataclasses.replace(request, settings=request.settings.subset(positions), run_dir=request.run_folder)
    report = new_report(request)
    if positions:
        encoded = request.settings.subset(encode_positions(request.settings, positions))
        report = _execute_plan(mine, checkpoint, plan, [paths[p] for p in positions], log, process, resumed,
                               denoised, encoded, fingerprint_digest(fingerprint), on_progress,
                               _Keeping(kept, keeps) if kept is not None else None, inputs, _digest(upsampler))
    reports = gather(process, report)
    finish(process)  # every share is finished now
    if process.is_local_main and saved_run is not None:
        remove_superseded(request.run_folder, saved_run.process_counts, process.count)
    if not process.is_main:
        return None
    report.stages = [stage for each in reports for stage in each.stages]
    report.images = [image for each in reports for image in each.images]  # shares are contiguous, in order
    report.written = [image for each in reports for image in each.written]
    report.upsampled_prompts = [text for each in reports for text in each.upsampled_prompts]
    if len(report.upsampled_prompts) != len(report.images):  # a share without them: none is said
        report.upsampled_prompts = []
    elif report.upsampled_prompts:  # run.json records them beside the prompts as typed
        saved = read_run(request.run_folder)
        if saved.upsampled_prompts != tuple(report.upsampled_prompts):
            write_run(request.run_folder, dataclasses.replace(saved, upsampled_prompts=tuple(report.upsampled_prompts)))
    return report


@dataclass
class ShareRun:
    """This process's share of a run as the stages' todo and finish see it (stages.Share): its
    settings, images and run folder, the log, and every write of the run, each of which fails with
    one message that names the work kept and the resume command (_writing)."""

    request: RunRequest  # the share's settings; the whole run's folders
    checkpoint: Checkpoint
    paths: list[Path]  # the share's images, in prompt order
    encoded: GenerationSettings  # the prompts its encode runs on (distributed.encode_positions)
    denoised: dict  # {image index: latents row} saved by the shares of another number of processes
    weights: str  # checkpoint.fingerprint_digest of the weights, in every PNG
    log: Callable[[str], None]
    process: Process = SINGLE_PROCESS  # this share's, which names its checkpoints
    saved: Path | None = None  # the latest stage checkpoint on disk, named when a later step fails
    written: list[str] = dataclasses.field(default_factory=list)  # the images written, absolute
    inputs: tuple[InputImage, ...] = ()  # the run's input images and mask, while encode_image has not run
    upsampler_digest: str | None = None  # the prompt upsampler's weights (fingerprint_digest), in every PNG

    def input_images(self) -> list:
        """The run's input images (PIL, RGB, settings.images' order) for encode_image."""
        return [each.image for each in self.inputs[:len(self.settings.images)]]

    def input_mask(self):
        """The run's --mask (PIL, RGB) for encode_image, or None."""
        return self.inputs[len(self.settings.images)].image if self.settings.mask else None

    @property
    def settings(self) -> GenerationSettings:
        return self.request.settings

    @property
    def run_folder(self) -> Path:
        return self.request.run_folder

    @property
    def resume(self) -> bool:
        return self.request.resume

    @property
    def overwrite(self) -> bool:
        return self.request.overwrite

    def save_handoff(self, handoff: Handoff, stage: str) -> None:
        """The stage's checkpoint in the run folder, what a resume continues from."""
        target = handoff_path(self.request.run_folder, stage, self.process.index, self.process.count)
        with _writing(target.with_suffix(".safetensors"), self.request, self.saved):
            handoff.save(target, self.weights)
        self.saved = target

    def save_batch_latents(self, batch: range, latents: torch.Tensor) -> None:
        """A finished denoise batch's latents (len(batch), tokens, channels), until the stage's handoff is saved."""
        settings = self.settings
        path = batch_latents_path(self.request.run_folder, settings.image_indices[batch.start])
        with _writing(path, self.request, self.saved):
            save_batch_latents(path, latents, settings.subset(list(batch)), self.weights)

    def saved_batch_latents(self, batch: range, shape: tuple) -> torch.Tensor | None:
        """The latents of `batch` an interrupted run kept, checked (rundir.load_batch_latents); None
        when this run resumes nothing or none were kept."""
        settings = self.settings
        path = batch_latents_path(self.request.run_folder, settings.image_indices[batch.start])
        if not (self.request.resume and path.exists()):
            return None
        return load_batch_latents(path, settings.subset(list(batch)), shape, settings.torch_dtype, self.weights)

    def remove_batch_latents(self) -> None:
        """Every batch's own latents file, once the stage's handoff holds them all."""
        settings = self.settings
        for batch in settings.batches(self.checkpoint.family.prompt_batches):
            batch_latents_path(self.request.run_folder, settings.image_indices[batch.start]).unlink(missing_ok=True)

    def write_image(self, position: int, image, upsampled: str | None = None) -> None:
        """The share's image `position` as a PNG with the settings that made it (and its prompt as the
        upsampler rewrote it: `upsampled`)."""
        settings, path = self.settings, self.paths[position]
        with _writing(path, self.request, self.saved):
            save_png(image, path, _png_metadata(settings, position, self.request.budget, self.weights,
                                                self.checkpoint, upsampled, self.upsampler_digest))
        self.written.append(str(path.absolute()))


def _execute_plan(request: RunRequest, checkpoint: Checkpoint, plan: RunPlan, paths: list[Path], log,
                  process: Process, resumed: Handoff | None, denoised: dict, encoded: GenerationSettings,
                  weights: str, on_progress: Callable[[Progress], None] | None = None,
                  keeping: "_Keeping | None" = None, inputs: tuple[InputImage, ...] = (),
                  upsampler_digest: str | None = None) -> RunReport:
    """This share's stages; `encoded`: the prompts its encode runs on (distributed.encode_positions);
    `upsampler_digest`: the prompt upsampler's (fingerprint_digest), for the PNGs."""
    if not process.is_main:  # each process says what it did with its own share, named as its errors are
        say = log

        def log(message: str) -> None:
            say(f"[process {process.index}] {message}")

    settings = request.settings
    report = new_report(request)
    handoff = resumed if resumed is not None else Handoff(settings=settings)
    share = ShareRun(request, checkpoint, paths, encoded, denoised, weights, log, process=process, inputs=inputs,
                     upsampler_digest=upsampler_digest)
    if handoff.finished_stages:
        share.saved = handoff_path(request.run_folder, handoff.finished_stages[-1], process.index, process.count)
    if share.saved is not None and not share.saved.with_suffix(".json").exists():
        # Taken from the shares of a launch with another number of processes: kept under this
        # share's name, so that this share's checkpoint is one file again.
        with _writing(share.saved.with_suffix(".safetensors"), request, None):
            handoff.save(share.saved, weights)
    upsampled = handoff.upsampled  # each image's rewritten prompt, once upsample ran (or a resume read them)
    for stage in STAGES:
        interrupt.check()
        if stage.NAME not in settings.stages:  # encode_image in a run without input images
            continue
        if stage.NAME in handoff.finished_stages:
            log(f"{stage.NAME}: finished earlier, its handoff is in {request.run_folder}")
            continue
        # 1) what the stage runs on, 2) load, run, release, flush, 3) what it keeps and passes on
        work = stage.todo(handoff, share)
        if work is None:
            continue
        check_unchanged_weights(checkpoint, weights, stage.NAME, request.resume_command)
        result = _run_stage(stage, request, checkpoint, plan.stage(stage.NAME), work, process, share.saved,
                            on_progress, keeping, weights)
        handoff = stage.finish(result.output, share)
        result.report.images = len(handoff.settings.prompts)
        if stage.NAME in SAVED_STAGES:  # the handoff waits in RAM for the next stage; decode's images are written
            result.report.handoff_bytes = handoff.nbytes()
        report.stages.append(result.report)
        if len(handoff.upsampled) == len(paths):  # decode hands on the rows it decoded alone
            upsampled = handoff.upsampled
    report.written = share.written
    report.upsampled_prompts = list(upsampled)
    # Absolute, as on a resumed run (run.json keeps the absolute --out): the same image is named the
    # same way however the run was started, and the report still finds it read from elsewhere.
    report.images = [str(path.absolute()) for path in paths]  # written now or, on a resumed run, earlier
    return report


def upsampler_weights(request: RunRequest, checkpoint: Checkpoint, saved_run: SavedRun | None,
                      to_run: bool) -> dict | None:
    """The fingerprint of the run's prompt upsampler (checkpoint.upsampler_fingerprint; None for a run
    without one): a new run's, fetched (a hub id's weights) and fingerprinted; a resume's as run.json
    recorded it, refused (SettingsError) where the upsample stage still has to run and its files
    differ now. A resume past the upsample stage needs no upsampler: its rewritten prompts are kept."""
    settings = request.settings
    if UPSAMPLE_STAGE not in settings.stages:
        return None
    if saved_run is not None and not to_run:
        return saved_run.upsampler_weights
    folder = resolve_upsampler(settings.upsample_prompt, checkpoint.family, need_weights=True)
    current = upsampler_fingerprint(folder, checkpoint.family.upsampler.name, trust_blob_names=saved_run is None)
    if saved_run is not None and saved_run.upsampler_weights != current:
        raise SettingsError(
            f"--resume: the files of the prompt upsampler '{settings.upsample_prompt}' differ from those the run in "
            f"{request.run_folder} began with (run.json 'upsampler_weights'), and its upsample stage has not finished; "
            "restore those files, or start a new run with these")
    return current


def _digest(fingerprint: dict | None) -> str | None:
    return fingerprint_digest(fingerprint) if fingerprint is not None else None


def free_gpu_bytes(budget: Budget) -> dict[int, int]:
    """Free memory now on each GPU the budget names (this creates the CUDA context on each)."""
    return {index: torch.cuda.mem_get_info(index)[0] for index in gpu_indices(budget)}


@dataclass(frozen=True)
class _Keeping:
    """A run's side of KeptStages: the store, and the RAM each stage it keeps holds (by the plan)."""

    store: KeptStages
    stages: dict[str, int]  # plan.kept_between_calls


@dataclass
class _StageResult:
    report: StageReport
    output: Handoff  # the stage's run's


def _on_gpus(stage_plan) -> list:
    """The stage's components that its plan puts on a GPU (each a part of the loaded pipeline, by name)."""
    return [component for component in stage_plan.components if set(component.device_map.values()) != {"cpu"}]


def _place_kept(loaded, stage_plan) -> None:
    """A kept stage's components, in RAM between calls, onto the devices of its plan again (placement.place_again)."""
    for component in _on_gpus(stage_plan):
        place_again(getattr(loaded, component.name), dict(component.device_map), streamed=component.streamed)


def _to_host_kept(loaded, stage_plan) -> None:
    """A kept stage's components off its GPUs, into RAM until the next call (placement.to_host)."""
    for component in _on_gpus(stage_plan):
        to_host(getattr(loaded, component.name), streamed=component.streamed)


def _run_stage(stage: Stage, request: RunRequest, checkpoint: Checkpoint, stage_plan, work: Work, process: Process,
               saved: Path | None, on_progress: Callable[[Progress], None] | None = None,
               keeping: _Keeping | None = None, weights: str = "") -> _StageResult:
    """Load, run, release and flush one stage; failures become the project's errors with the way on.
    A stage that `keeping` keeps is taken from its store when it was loaded as this plan loads it
    (the same weights, dtype and placement: ComponentPlan.loaded_as), and put back after it ran."""
    handoff = work.handoff
    settings = handoff.settings
    stage_report = plan_report(stage_plan, settings)
    stage_report.process, stage_report.images = process.index, len(settings.prompts)
    progress = stage_bar(stage.NAME, len(settings.prompts), shown=process.is_main)
    tell = on_progress or (lambda event: None)
    tell(Progress(stage.NAME, 0, len(settings.prompts)))

    def on_step(step: int, steps: int) -> None:
        interrupt.check()  # a Ctrl-C that a finalizer or a library swallowed still stops the run here
        first, last = progress.n + 1, min(progress.n + settings.batch_size, len(settings.prompts))  # this batch's
        images = f"image {first}" if first == last else f"images {first}-{last}"
        progress.set_postfix_str(f"step {step}/{steps} of {images}", refresh=True)
        tell(Progress(stage.NAME, progress.n, len(settings.prompts), step, steps))

    def on_image_done(images: int) -> None:
        interrupt.check()
        progress.update(images)
        tell(Progress(stage.NAME, progress.n, len(settings.prompts)))

    with (
        _stage_offload_folder(request.offload_folder, stage_plan, process) as offload_folder,
        PeakMemory(gpu_indices=gpu_indices(request.budget)) as peak,
    ):
        keeps = keeping is not None and stage.NAME in keeping.stages
        key = (str(checkpoint.path), weights, settings.dtype, tuple(c.loaded_as for c in stage_plan.components))
        loaded = None
        try:
            started = time.perf_counter()
            loaded = keeping.store.take(stage.NAME, key) if keeps else None
            stage_report.weights_kept = loaded is not None
            if loaded is None:
                with MODULE_PATCH_LOCK:  # no plan builds on meta in another thread meanwhile
                    loaded = stage.load(checkpoint, stage_plan, settings.torch_dtype, offload_folder)
            else:
                _place_kept(loaded, stage_plan)
            loaded_at = time.perf_counter()
            stage_report.device_map = stage.device_map(loaded)
            output = stage.run(loaded, handoff, on_image_done, on_step=on_step, **work.options)
            finished = time.perf_counter()
            if keeps:  # only after a run that went through: a failed one may leave it half-used
                _to_host_kept(loaded, stage_plan)
                keeping.store.keep(stage.NAME, key, loaded)
                stage_report.kept_bytes = keeping.stages[stage.NAME]
        except FluxShardedError:
            raise
        except (torch.OutOfMemoryError, MemoryError) as error:
            raise StageOutOfMemory(_out_of_memory_message(stage.NAME, error, request, stage_plan, saved)) from error
        except RuntimeError as error:
            if not _is_out_of_memory(error):
                raise StageError(_failure_message(stage.NAME, error, request, saved)) from error
            raise StageOutOfMemory(_out_of_memory_message(stage.NAME, error, request, stage_plan, saved)) from error
        except Exception as error:  # a bug or a library's failure: say which stage, keep the work before it
            raise StageError(_failure_message(stage.NAME, error, request, saved)) from error
        finally:
            loaded = None  # the only reference: the component is freed here, before the next stage
            progress.close()
    flush(gpu_indices(request.budget))
    stage_report.load_seconds, stage_report.run_seconds = loaded_at - started, finished - loaded_at
    stage_report.peak_bytes, stage_report.peak_reserved_bytes = peak.peak_bytes, peak.reserved_bytes or None
    stage_report.peak_pinned_bytes = peak.peak_pinned_bytes
    return _StageResult(stage_report, output)


@contextlib.contextmanager
def _stage_offload_folder(offload_folder: Path | None, stage_plan, process: Process) -> Iterator[Path | None]:
    """A fresh folder inside --offload-folder for a stage that puts weights on disk, removed when the
    stage ends: accelerate writes every offloaded weight there (FLUX.1's transformer: up to 24 GB),
    and processes sharing one --offload-folder must not write the same file names at once."""
    on_disk = any("disk" in component.device_map.values() for component in stage_plan.components)
    if offload_folder is None or not on_disk:
        yield offload_folder
        return
    offload_folder.mkdir(parents=True, exist_ok=True)  # the run's checks probe it but leave no new folder
    folder = Path(tempfile.mkdtemp(prefix=f".flux-sharded-{stage_plan.name}-{process.index}-", dir=offload_folder))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _writing(path: Path, request: RunRequest, saved: Path | None) -> Iterator[None]:
    """Turn a failed write (atomic: nothing half-written is left) into one message with the way on:
    a disk's failure (_disk_error: a full disk, a folder gone, read-only or locked) says to free space
    or fix the folder; anything else (a bug, a library's failure) says so, as a stage's failure does."""
    try:
        yield
    except FluxShardedError:
        raise
    except Exception as error:
        kept = f"{saved}.safetensors holds the work before it" if saved else "nothing was kept"
        if not _disk_error(error):
            raise StageError(f"could not write {path} ({_first_line(error)}), not for a lack of space or access; "
                             f"{kept}. FLUX_SHARDED_DEBUG=1 shows the traceback; once the cause is fixed, "
                             f"continue with: {request.resume_command}") from error
        reason = getattr(error, "strerror", None) or _first_line(error)
        raise OutputError(
            f"could not write {path} ({reason}); {kept}. Free some space or fix the folder, then "
            f"continue with: {request.resume_command}"
        ) from error


# The OS errors of a disk or folder (errno): full, over quota, too large a file, read-only, no
# access, gone, not a folder, an I/O error, a vanished network file.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO, errno.ESTALE})


def _disk_error(error: BaseException) -> bool:
    """An OSError of DISK_ERRNOS, or safetensors' error wrapping one: its Rust I/O error names the OS
    code ('IoError(Os { code: 28, kind: StorageFull, ... })'), the only place safetensors keeps it."""
    if isinstance(error, OSError):
        return error.errno in DISK_ERRNOS
    if type(error).__name__ == "SafetensorError":
        code = re.search(r"\bOs \{ code: (\d+)", str(error))
        return code is not None and int(code.group(1)) in DISK_ERRNOS
    return False


# Out-of-memory by type: torch.OutOfMemoryError (CUDA's caching allocator) and MemoryError are caught
# as such. These report it only inside a RuntimeError, by a fixed status name: PyTorch's CPU
# allocator (c10's "DefaultCPUAllocator: can't allocate memory"), the CUDA runtime's
# cudaErrorMemoryAllocation outside the caching allocator ("CUDA error: out of memory"), and cuBLAS
# failing to allocate its handle or workspace (CUBLAS_STATUS_ALLOC_FAILED).
OUT_OF_MEMORY_STATUSES = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory",
                          "CUBLAS_STATUS_ALLOC_FAILED")


def _is_out_of_memory(error: RuntimeError) -> bool:
    return any(status in str(error) for status in OUT_OF_MEMORY_STATUSES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _failure_message(stage: str, error: BaseException, request: RunRequest, saved: Path | None) -> str:
    kept = f"{saved}.safetensors holds the work before it" if saved else "nothing was kept"
    return (f"{stage} failed ({_first_line(error)}); {kept}. FLUX_SHARDED_DEBUG=1 shows the traceback; once the "
            f"cause is fixed, continue with: {request.resume_command}")


def _out_of_memory_message(stage: str, error: Exception, request: RunRequest, stage_plan, saved: Path | None) -> str:
    text = str(error).strip()
    detail = text.splitlines()[0] if text else "out of memory"
    gpu = re.search(r"GPU (\d+)", text)  # PyTorch names the device: "... GPU 0 has a total capacity of ..."
    where = f" on GPU {gpu.group(1)}" if gpu else ""
    planned = ", ".join(f"{device}={format_bytes(size)}" for device, size in stage_plan.planned_bytes.items())
    kept = f"{saved}.safetensors holds the work before it" if saved else "nothing to keep yet"
    return (
        f"{stage} ran out of memory{where} ({detail}) under --max-memory {format_budget(request.budget)}; "
        f"the plan was {planned}; {kept}. Lower the budget of that device (more room for activations) or add "
        f"cpu=... for offload, then continue with: {request.resume_command} --max-memory ..."
    )


# The PNG text fields of an image's prompt as the prompt upsampler rewrote it (`prompt` keeps it as
# typed) and of the upsampler's weights (as `weights` names the checkpoint's).
UPSAMPLED_PROMPT_FIELD = "upsampled_prompt"
UPSAMPLER_WEIGHTS_FIELD = "upsampler_weights"


def _png_metadata(settings: GenerationSettings, position: int, budget: Budget, weights: str,
                  checkpoint: Checkpoint, upsampled: str | None = None,
                  upsampler_digest: str | None = None) -> dict[str, str]:
    """Every setting the schema records in the PNGs (settings.png_fields: those that decide the
    pixels, and the budget), the weights (checkpoint.fingerprint_digest) and, for a run with the
    prompt upsampler, the prompt it wrote (`upsampled`, UPSAMPLED_PROMPT_FIELD) and its weights'
    digest (`upsampler_digest`, UPSAMPLER_WEIGHTS_FIELD)."""
    fields = png_fields(settings, position, {"max_memory": format_budget(budget)})
    ignored = family_code(checkpoint.family).guidance_ignored(checkpoint)
    if ignored:
        fields["guidance"] = f"none ({ignored})"
    if upsampled is not None:
        fields[UPSAMPLED_PROMPT_FIELD] = upsampled
    if upsampler_digest is not None:
        fields[UPSAMPLER_WEIGHTS_FIELD] = upsampler_digest
    return {**fields, "weights": weights, "software": "flux-sharded"}
