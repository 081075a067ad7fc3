"""The public Python API: open a model under a memory budget, see its plan, generate images, close it.

    import flux_sharded

    with flux_sharded.open_model("black-forest-labs/FLUX.1-dev", max_memory="0=16GB,cpu=64GB") as model:
        print(model.plan(height=768, width=768))     # what `flux-sharded --dry-run` prints
        result = model.generate("a photo of a dog", seed=0, steps=28)
        result.images[0].save("dog.png")             # PIL images; .info holds the PNG's text fields
        print(result.report.table())                 # the per-stage report (planned and measured bytes)
        for event in model.generate_iter("a cat"):   # progress.Progress events, then the Generation
            print(event)

The command line is a thin layer over this module: cli.py parses options and prints, this module
builds the run's request (checkpoint, settings, budget) and hands it to runner.py. The keyword
arguments come from the settings schema (settings.py), nowhere listed again: `open_model` takes the
option settings that decide which weights load (`Setting.opens`: dtype, quantize, lora), and
`generate` and `plan` the others (steps, guidance, height, width, ...), each defaulting to the
model's own as on the command line. A bad argument raises a FluxShardedError subclass (errors.py:
SettingsError, BudgetError, CheckpointError, PlanError, ...) whose message names it and the fix, the
exception the command line prints as its one `Error: ...` line.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .progress import Progress, library_logs_above_bars, quiet_import_noise, quiet_libraries

quiet_import_noise()  # before the imports below bring in diffusers, whose torchao import warns

from . import runner  # noqa: E402 (and below)
from .activations import ACTIVATION_MARGIN
from .budget import DEFAULT_CPU_FRACTION, DEFAULT_GPU_RESERVE_BYTES, Budget, check_gpus, default_budget, \
    format_budget, parse_budget
from .checkpoint import DEFAULT_MODEL, UPSAMPLER_HUB_ID, Checkpoint, model_reference, resolve_checkpoint
from .errors import PlanError, SettingsError
from .families import generation_defaults, reference_size
from .handoff import GenerationSettings
from .json_fields import JsonFields
from .input_images import InputImage, read_image
from .lora import resolve as resolve_lora
from .prompts import PromptLine, expand
from .quantize import check_available, check_prequantized, format_quantize, parse_quantize, prequantized
from .report import RunReport
from .rundir import holds_our_run
from .settings import (FAMILY, MAX_INPUT_IMAGES, MAX_LORAS, UPSAMPLE_MAX_TOKENS, Setting, image_options,
                       open_options)
from .validate import setting_field

LOGGER = logging.getLogger("flux_sharded")  # the runner's lines (budget, notes), silent unless configured
# The prompt a plan is made for when none is given: a plan depends on the number of images and of
# distinct prompts (batch bounds), never on the text.
PLAN_PROMPT = "a photo"
# The settings open_model takes besides the model, which is its first argument.
OPENED = tuple(each for each in open_options() if each.name != "model")


def gpu_count() -> int:
    """The GPUs this process sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_budget(max_memory: str | Budget | None, log: Callable[[str], None], processes: int = 1) -> Budget:
    """`max_memory` in the command line's grammar (budget.parse_budget: "0=16GB,cpu=64GB"), a Budget
    as is, or None: the machine's free memory (budget.default_budget), which is logged. GPU indices
    are checked against this machine when a run starts, not here: a plan may be for another one."""
    if isinstance(max_memory, Budget):
        return max_memory
    if max_memory is not None:
        if not isinstance(max_memory, str):
            raise SettingsError(f"max_memory={max_memory!r}: give a text such as '0=16GB,cpu=64GB' (the command "
                                "line's --max-memory), or None for the machine's free memory")
        return parse_budget(max_memory, gpu_count=None)
    budget = default_budget(processes)
    gpus = f"each GPU's free memory less {DEFAULT_GPU_RESERVE_BYTES / 2**30:.0f} GiB, " if budget.gpus else ""
    shared = f" shared by this machine's {processes} processes" if processes > 1 else ""
    log(f"note: no --max-memory given: using {format_budget(budget)} ({gpus}{DEFAULT_CPU_FRACTION:.0%} of the free "
        f"RAM{shared})")
    return budget


def checked_settings(function: str, given: dict[str, Any], accepted: tuple[Setting, ...]) -> dict[str, Any]:
    """`given` keyword arguments, each a setting of `accepted` of its type and range (the schema's),
    in its canonical form; raises SettingsError naming an unknown keyword or a bad value."""
    given = {name: value for name, value in given.items() if value is not None}  # None: the default
    names = [each.name for each in accepted]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise SettingsError(f"{function}: unknown keyword argument '{unknown[0]}'; it takes {', '.join(names)}")
    fields = JsonFields(given, f"{function}:", "leave it out (or None) for the model's default",
                        SettingsError)
    checked = {}
    for each in accepted:
        if each.name not in given:
            continue
        if each.type is tuple:  # LoRAs: a text or a sequence of texts, each resolved when the model opens
            value = given[each.name]
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
                fields.fail(f"is {value!r}, not a text or a list of texts", each.name)
            checked[each.name] = tuple(value)
        elif each.canonical is not None:  # a text checked against the model when it opens (quantize: _quantize)
            checked[each.name] = fields.string(each.name)
        else:
            checked[each.name] = setting_field(fields, each)
    return checked


def _quantize(spec: str, checkpoint: Checkpoint) -> str:
    """--quantize, parsed and checked against the checkpoint (a pre-quantized component is refused)."""
    chosen = parse_quantize(spec, checkpoint.family)
    check_prequantized(checkpoint.path, chosen)
    return format_quantize(chosen)


def image_inputs(values: tuple[str | InputImage, ...]) -> tuple[InputImage, ...]:
    """--image's values, each read, checked whole and hashed (input_images.read_image), in order;
    one read already (an InputImage) as it is."""
    if len(values) > MAX_INPUT_IMAGES:
        raise SettingsError(f"--image given {len(values)} times: no pipeline here takes more than "
                            f"{MAX_INPUT_IMAGES} input image(s); give at most {MAX_INPUT_IMAGES}")
    return tuple(value if isinstance(value, InputImage) else read_image(str(value)) for value in values)


def lora_texts(values: tuple[str, ...]) -> tuple[str, ...]:
    """--lora's values, each found and hashed (lora.resolve), as the run records them."""
    if len(values) > MAX_LORAS:
        raise SettingsError(f"--lora given {len(values)} times: at most {MAX_LORAS} LoRAs in one run")
    return tuple(resolve_lora(value).saved_text for value in values)


@dataclass(frozen=True)
class Plan:
    """Every stage's plan, as `flux-sharded --dry-run` prints it (str() gives the same lines).

    `report.stages`: one report.StageReport per stage (device map, planned weights and activation
    bytes per device, offloaded bytes, notes), not measured; `refusal`: the PlanError of a stage
    that does not fit the budget (None when all fit); `notes`: what the planner chose or left out."""

    report: RunReport
    refusal: PlanError | None
    notes: tuple[str, ...]
    summary: str  # "plan for 1024x1024, 28 steps, ...": the settings the plan is for

    @property
    def fits(self) -> bool:
        return self.refusal is None

    @property
    def stages(self) -> list:
        return self.report.stages

    def __str__(self) -> str:
        lines = [*self.notes, self.summary, *([self.report.table()] if self.stages else [])]
        return "\n".join(lines + ([f"Error: {self.refusal}"] if self.refusal else []))


def dry_run(request: runner.RunRequest, keeps_weights: bool = False) -> Plan:
    """The plan of `request` from its configs alone (no weight is read), with the notes the command
    line's --dry-run prints; raises the settings' errors, returns a budget's refusal in the Plan.
    `keeps_weights`: for a Model, which keeps weights between calls (each stage's kept_bytes)."""
    settings, budget = request.settings, request.budget
    notes = []
    missing = [key for key in budget.gpus if key >= gpu_count()]
    if missing:
        notes.append(f"note: planning for GPU(s) {', '.join(map(str, missing))}, which this machine does not have")
    if "disk" in budget and request.offload_folder is None:
        notes.append("note: a run with this disk entry will need --offload-folder DIR, for the weights it puts on disk")
    report, refusal = runner.dry_run(request, keeps_weights)
    notes += [*report.notes(), *filter(None, [runner.ignored_guidance_note(request)])]
    summary = (f"plan for {settings.width}x{settings.height}, {settings.steps} steps, guidance {settings.guidance:g}, "
               f"{settings.max_sequence_length} prompt tokens, batch size {settings.batch_size}, {settings.dtype}, "
               f"--max-memory {format_budget(budget)}; activations are estimates with a "
               f"{ACTIVATION_MARGIN - 1:.0%} margin (flux_sharded/activations.py)")
    return Plan(report, refusal, tuple(notes), summary)


def run(request: runner.RunRequest, log: Callable[[str], None], process: runner.Process = runner.SINGLE_PROCESS,
        on_progress: Callable[[Progress], None] | None = None,
        kept: runner.KeptStages | None = None) -> RunReport | None:
    """Check what a run needs of this machine (its GPUs, the quantization backends), then run it
    (runner.execute) with the libraries' warnings above the bars; the main process's report.
    `kept`: the loaded stages kept between runs (a Model's), None to keep nothing (the CLI)."""
    check_gpus(request.budget, gpu_count())
    checkpoint = request.checkpoint
    # nf4 without CUDA (asked for, or a pre-quantized 4-bit checkpoint), a missing optional package
    check_available({**prequantized(checkpoint.path), **request.settings.quantization},
                    {component.name: component.library for component in checkpoint.family.components})
    with library_logs_above_bars():
        return runner.execute(request, log=log, process=process, on_progress=on_progress, kept=kept)


@dataclass
class Generation:
    """What Model.generate made: the images in prompt order (PIL, each loaded from its PNG, with
    the PNG's text fields in `.info`: prompt, seed, steps, ... as settings.png_fields writes them),
    the run's per-stage report, and the PNGs' paths (none when no out_dir was given)."""

    images: list[Image.Image]
    report: RunReport
    paths: list[Path] = field(default_factory=list)

    @property
    def metadata(self) -> list[dict[str, str]]:
        """Each image's PNG text fields."""
        return [dict(image.text) for image in self.images]


class Model:
    """A FLUX checkpoint opened under a memory budget (see open_model); generate() runs the three
    stages for some prompts, plan() shows how they would be placed, close() frees what it holds.

    Weights kept between calls: a stage stays loaded in RAM after a call (one placed on GPUs moved
    back to RAM, placed again at the next call: placement.hostable) while the budget's cpu entry leaves room for all its
    weights beside every stage's own plan (plan.kept_between_calls; each stage's kept_bytes in
    plan() and in the report), so that the next call with the same placement reads none of its
    weights again."""

    def __init__(self, model: str | Path | Checkpoint = DEFAULT_MODEL, *, max_memory: str | Budget | None = None,
                 offload_folder: str | Path | None = None, log: Callable[[str], None] | None = None, **settings):
        if not isinstance(model, (str, Path, Checkpoint)):
            raise SettingsError(f"open_model(): model={model!r}: give a hub id (owner/name) or a local folder")
        opened = checked_settings("open_model()", settings, OPENED)
        self.log = log or LOGGER.info
        quiet_libraries()  # before the checkpoint is read: reading a FLUX.2 one imports diffusers
        # a Checkpoint: resolved already (the command line checks the folder before importing torch)
        self.checkpoint = model if isinstance(model, Checkpoint) else resolve_checkpoint(str(model), need_weights=False)
        self.model = model_reference(self.checkpoint.model)
        defaults = {each.name: each.default for each in open_options()}
        self.dtype = opened.get("dtype", defaults["dtype"])
        self.quantize = _quantize(opened.get("quantize", defaults["quantize"]), self.checkpoint)
        self.lora = lora_texts(opened.get("lora", defaults["lora"]))
        self.budget = resolve_budget(max_memory, self.log)
        self.offload_folder = Path(offload_folder).expanduser() if offload_folder is not None else None
        self.kept = runner.KeptStages()
        self.closed = False

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Free what the model holds (the weights kept between calls); a later generate() or plan()
        raises SettingsError."""
        self.kept.clear()
        self.closed = True

    def defaults(self) -> dict[str, Any]:
        """Each per-call setting's value when not given: the checkpoint's (families.generation_defaults,
        its default image size) or the schema's."""
        checkpoint = self.checkpoint
        model = {**generation_defaults(checkpoint.family, checkpoint.transformer_config, checkpoint.is_distilled),
                 "height": checkpoint.default_size, "width": checkpoint.default_size}
        return {each.name: model[each.name] if each.default is FAMILY else each.default for each in image_options()}

    def request(self, lines: list[PromptLine], seed: int, num_images_per_prompt: int, out_dir: Path,
                run_dir: Path | None = None, overwrite: bool = False, **settings) -> runner.RunRequest:
        """The runner's request for these prompts (seed k + image k, as prompts.expand gives them) and
        per-call settings, checked already (the rest: the model's defaults)."""
        prompts, seeds = expand(lines, seed, num_images_per_prompt)
        return self.request_images(prompts, seeds, (), out_dir, run_dir, overwrite, **settings)

    def request_images(self, prompts: tuple[str, ...], seeds: tuple[int, ...], indices: tuple[int, ...],
                       out_dir: Path, run_dir: Path | None = None, overwrite: bool = False,
                       **settings) -> runner.RunRequest:
        """request() for images given one by one: their prompts, seeds and indices over the whole job
        (GenerationSettings.indices; () for 0, 1, ...). `images` and `mask` may be given read already
        (input_images.InputImage)."""
        if self.closed:
            raise SettingsError("this model is closed; open another with flux_sharded.open_model(...)")
        inputs = image_inputs(settings.pop("images", ()))  # read once, before anything is written
        mask = settings.pop("mask", None)  # given empty (an unset shell variable): refused, not taken for none
        masks = () if mask is None else (mask,) if isinstance(mask, InputImage) else (read_image(str(mask), "--mask"),)
        if settings.get("upsample_prompt") == "":  # given empty (an unset shell variable): refused, not taken for none
            raise SettingsError(f"--upsample-prompt: empty; give the prompt upsampler's folder or hub id (e.g. "
                                f"{UPSAMPLER_HUB_ID}), or leave out --upsample-prompt")
        if settings.get("upsample_prompt"):  # recorded as --model is: a local folder by its absolute path
            settings["upsample_prompt"] = model_reference(settings["upsample_prompt"])
        generation = GenerationSettings(model=self.model, prompts=prompts, seeds=seeds, indices=indices,
                                        dtype=self.dtype,
                                        quantize=self.quantize, lora=self.lora,
                                        **{**self.defaults(), **self.inpaint_defaults(inputs, masks),
                                           **self.upsample_defaults(settings), **settings,
                                           "images": tuple(each.saved_text for each in inputs),
                                           "mask": "".join(each.saved_text for each in masks)})
        return runner.RunRequest(self.checkpoint, generation, self.budget, out_dir, self.offload_folder,
                                 run_dir=run_dir, overwrite=overwrite, input_images=inputs + masks)

    def upsample_defaults(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A run with the prompt upsampler (`settings`' upsample_prompt), where --max-sequence-length is
        not given: a window that holds the caption it writes, as diffusers' blocks read it whole (their
        max_sequence_length is 8192): --upsample-max-tokens plus one window (families.Family.text_window,
        80 tokens) for the chat template's markup, rounded up to whole windows, at most the family's
        limit (3680 tokens for the default 3584; the family's own 640 would cut most captions). The plan
        counts that window; a caption the encode still cuts (the encode's tokenizer is not the
        upsampler's) is noted as any prompt is. {} for another run."""
        if not settings.get("upsample_prompt"):
            return {}
        family = self.checkpoint.family
        tokens = settings.get("upsample_max_tokens", UPSAMPLE_MAX_TOKENS) + family.text_window
        windows = -(-tokens // family.text_window)
        return {"max_sequence_length": min(family.text_token_limit, windows * family.text_window)}

    def inpaint_defaults(self, inputs: tuple[InputImage, ...], masks: tuple[InputImage, ...]) -> dict[str, Any]:
        """An inpainting run's defaults where none are given: its pipeline's strength
        (families.Family.inpaint_strength) and, where it paints at its input image's size
        (Family.inpaint_at_image_size: klein), that "height" and "width"; {} for another run."""
        family = self.checkpoint.family
        if not (masks and family.inpaint_pipeline):
            return {}
        defaults = {"strength": family.inpaint_strength}
        if inputs and family.inpaint_at_image_size:  # the first --image is the one painted
            defaults["height"], defaults["width"] = reference_size(inputs[0].size, self.checkpoint.vae_scale_factor)
        return defaults

    def plan(self, prompt: str | Sequence[str] | None = None, *, seed: int = 0, num_images_per_prompt: int = 1,
             **settings) -> Plan:
        """How every stage would be placed for these prompts and settings (the dry-run): no weight is
        read. The plan depends on the number of images, not on their text (PLAN_PROMPT when none)."""
        lines = _prompt_lines(PLAN_PROMPT if prompt is None else prompt)
        checked = checked_settings("plan()", settings, image_options())
        _check_images("plan()", seed, num_images_per_prompt)
        return dry_run(self.request(lines, seed, num_images_per_prompt, Path("."), **checked), keeps_weights=True)

    def generate(self, prompt: str | Sequence[str], *, seed: int = 0, num_images_per_prompt: int = 1,
                 out_dir: str | Path | None = None, run_dir: str | Path | None = None, overwrite: bool = False,
                 resume: bool = False, progress: Callable[[Progress], None] | None = None,
                 **settings) -> Generation:
        """Images of `prompt` (a text, or a list: one image each, times num_images_per_prompt); image k
        uses seed + k, as on the command line, so the same arguments give the CLI's pixels.

        The PNGs and the run folder are written to `out_dir` (the images then stay there); without
        one, to a temporary folder removed before this returns. A call stopped before its end (an
        error, a signal, generate_iter left early) leaves its run folder in `out_dir`: the same call
        with `resume=True` continues it (its finished stages are not run again), as does
        `flux-sharded --resume`; without `resume`, a run folder in the way is refused (SettingsError),
        and `overwrite=True` starts it again. `progress` is called as the stages go (progress.Progress)."""
        family = self.checkpoint.family
        if not family.runs:
            raise SettingsError(f"model '{self.model}' is {family.name} ({family.pipeline}): {family.name} runs are "
                                "not implemented yet; plan() plans them")
        lines = _prompt_lines(prompt)
        checked = checked_settings("generate()", settings, image_options())
        _check_images("generate()", seed, num_images_per_prompt)
        temporary = None if out_dir is not None else Path(tempfile.mkdtemp(prefix="flux-sharded-"))
        try:
            folder = Path(out_dir).expanduser() if out_dir is not None else temporary
            request = self.request(lines, seed, num_images_per_prompt, folder,
                                   Path(run_dir).expanduser() if run_dir is not None else None, overwrite, **checked)
            if resume and not overwrite and holds_our_run(request.run_folder):
                request = dataclasses.replace(request, resume=True)
            generation = self.run(request, progress)
        finally:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
        if temporary is not None:  # the files are gone: the report names none
            generation.report.images, generation.report.written, generation.paths = [], [], []
        return generation

    def generate_iter(self, prompt: str | Sequence[str], **arguments) -> Iterator[Progress | Generation]:
        """generate() as an iterator: each progress.Progress as the stages go (a stage's start, each
        denoising step, each image done), then the Generation, last. Takes generate()'s arguments
        but `progress`; raises what generate() raises, at the first next() for a bad argument.

        Leaving the loop early (break, or an exception in its body) stops the run at its next
        event, a denoising step or an image, and returns once it has stopped: with an `out_dir`, its
        run folder keeps the work done, which the same call with `resume=True` continues."""
        if "progress" in arguments:
            raise SettingsError("generate_iter(): it yields the progress itself; call generate() for a callback")
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def progress(event: Progress) -> None:
            if stop.is_set():
                raise _Stopped()  # out of the runner, which releases the stage as for any error
            events.put(event)

        def work() -> None:
            try:
                events.put(_Finished(self.generate(prompt, progress=progress, **arguments), None))
            except BaseException as error:  # handed to the caller's thread, raised there
                events.put(_Finished(None, error))

        worker = threading.Thread(target=work, name="flux-sharded-generate", daemon=True)
        worker.start()
        try:
            while not isinstance(event := events.get(), _Finished):
                yield event
        finally:
            stop.set()
            worker.join()
        if event.error is not None:
            raise event.error
        yield event.generation

    def check(self, request: runner.RunRequest) -> None:
        """Everything of `request` checkable without weights: its settings (runner.check_settings)
        and that its plan fits the budget (the PlanError of the stage that does not)."""
        plan = dry_run(request, keeps_weights=True)
        if plan.refusal is not None:
            raise plan.refusal

    def run(self, request: runner.RunRequest, progress: Callable[[Progress], None] | None = None) -> Generation:
        """Run a request made by `request` (or one continuing a run folder: resume=True), keeping
        weights between calls as its plan says; its images read back from its PNGs."""
        if self.closed:
            raise SettingsError("this model is closed; open another with flux_sharded.open_model(...)")
        report = run(request, self.log, on_progress=progress, kept=self.kept)
        return Generation([_read_image(Path(path)) for path in report.images], report,
                          [Path(path) for path in report.images])


class _Stopped(Exception):
    """The caller of Model.generate_iter left its loop: the run stops at its next event."""


@dataclass(frozen=True)
class _Finished:
    """generate_iter's last event from its worker: the generation, or what stopped it."""

    generation: Generation | None
    error: BaseException | None


def open_model(model: str = DEFAULT_MODEL, *, max_memory: str | Budget | None = None,
               offload_folder: str | Path | None = None, log: Callable[[str], None] | None = None,
               **settings) -> Model:
    """Open a FLUX checkpoint (a hub id or a local diffusers folder) under a memory budget.

    `max_memory`: the command line's --max-memory grammar ("0=16GB,1=16GB,cpu=64GB"; a disk=SIZE
    entry needs `offload_folder`), or None for each GPU's free memory less 1 GiB plus 80% of the
    free RAM. The other keywords are the settings that decide which weights load (dtype, quantize,
    lora; settings.open_options). Only the configs are read here; the weights are read by each
    stage as it runs. `log`: where the run's lines go (default: the "flux_sharded" logger)."""
    return Model(model, max_memory=max_memory, offload_folder=offload_folder, log=log, **settings)


def _prompt_lines(prompt) -> list[PromptLine]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(each, str) for each in prompts):
        raise SettingsError(f"prompt={prompt!r}: give a text, or a non-empty list of texts (one image each)")
    return [PromptLine(each) for each in prompts]


def _check_images(function: str, seed, num_images_per_prompt) -> None:
    """`seed` and `num_images_per_prompt` as generate() and plan() take them: whole numbers, at
    least one image (SettingsError naming the argument)."""
    for name, value in (("seed", seed), ("num_images_per_prompt", num_images_per_prompt)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingsError(f"{function}: {name}={value!r}: give a whole number")
    if num_images_per_prompt < 1:
        raise SettingsError(f"{function}: num_images_per_prompt={num_images_per_prompt}: give at least 1")


def _read_image(path: Path) -> Image.Image:
    """The PNG, loaded into memory (its file may be removed next), with its text fields in .info."""
    with Image.open(path) as image:
        image.load()
    return image


def _keyword(each: Setting, default: Any) -> inspect.Parameter:
    annotation = {"int": int, "float": float, "str": str}.get(each.type.__name__, Any)
    return inspect.Parameter(each.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _with_settings(function, settings: tuple[Setting, ...], default) -> None:
    """Give `function` a signature that lists the schema's settings in place of **settings, so that
    help() and editors show them (their value when left out: `default`, the model's own)."""
    signature = inspect.signature(function)
    fixed = [parameter for parameter in signature.parameters.values()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    function.__signature__ = signature.replace(parameters=[*fixed, *(_keyword(each, default) for each in settings)])


_with_settings(Model.generate, image_options(), None)
_with_settings(Model.plan, image_options(), None)
# generate_iter takes generate()'s arguments, less the callback it replaces
Model.generate_iter.__signature__ = inspect.signature(Model.generate).replace(
    parameters=[each for each in inspect.signature(Model.generate).parameters.values() if each.name != "progress"],
    return_annotation="Iterator[Progress | Generation]")
_with_settings(Model.__init__, OPENED, None)
_with_settings(open_model, OPENED, None)
