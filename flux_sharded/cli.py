"""Command line: parses options, calls the runner, turns library errors into one `Error: ...` line."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import click
from click.core import ParameterSource

from . import __version__, interrupt
from .budget import EXAMPLE, UNITS_HELP, Budget, parse_budget
from .checkpoint import DEFAULT_MODEL
from .errors import BudgetError, CheckpointError, FluxShardedError, OutputError, SettingsError
from .families import FAMILIES, FLUX_1, VARIANT_DEFAULTS
from .settings import DTYPE_NAMES, image_options, resume_options, setting

# The default model's family's defaults (FluxPipeline.__call__'s, so that a bare run matches
# diffusers); another family's checkpoint takes its own (families.py) unless the option is given.
DEFAULT_STEPS = FLUX_1.steps
DEFAULT_GUIDANCE = FLUX_1.guidance
DEFAULT_MAX_SEQUENCE_LENGTH = FLUX_1.max_sequence_length
DEFAULT_TEXT_TOKEN_LIMIT = FLUX_1.text_token_limit
DEBUG_VARIABLE = "FLUX_SHARDED_DEBUG"  # =1: an error also prints the traceback of its cause
# PYTORCH_CUDA_ALLOC_CONF unless the user set it: expandable segments grow one mapping per stream
# instead of cutting fixed segments, so what group offloading's side stream frees is reused rather
# than left in fragments, which lift the reserved peak (what decides an out-of-memory) above the
# allocated one. It takes effect only when set before CUDA initialises, as main does.
CUDA_ALLOC_CONF = "expandable_segments:True"
# Options that decide the pixels: on --resume they come from the run folder, and one given on the
# command line must agree with it: those that make the prompts and seeds (prompts.expand), each
# setting of the schema set by an option of its own (settings.resume_options), and the folders.
PROMPT_OPTIONS = ("prompts", "prompts_file", "num_images_per_prompt", "seed")
SAVED_OPTIONS = (*PROMPT_OPTIONS, *resume_options(), "out_dir", "run_dir")
ARGUMENTS = "flux_sharded.arguments"  # click's context.meta key of the command line's arguments, as given


class BudgetType(click.ParamType):
    """`0=16GB,1=16GB,cpu=64GB` -> {0: bytes, 1: bytes, "cpu": bytes}; GPU indices are checked
    against this machine later, except in a dry-run, which may plan for another machine."""

    name = "SPEC"

    def convert(self, value, param, ctx) -> Budget:
        if isinstance(value, dict):
            return value
        try:
            return parse_budget(value, gpu_count=None)
        except BudgetError as error:
            self.fail(str(error).removeprefix("--max-memory: "), param, ctx)


class OneLineErrors(click.Command):
    """click answers a bad option value with its usage and a hint before the error; a user mistake
    here is one `Error: ...` line (exit 2) like every other, naming the option and the fix."""

    def make_context(self, info_name, args, parent=None, **extra):
        # The arguments as given, before click takes them apart: a job's continue command repeats them (jobs.py).
        given = list(args)
        context = super().make_context(info_name, args, parent, **extra)
        context.meta[ARGUMENTS] = given
        return context

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.BadParameter as error:  # "--max-memory: ...", not "Invalid value for '--max-memory': --max-memory ..."
            option = error.param.opts[0] if error.param is not None and error.param.opts else None
            message = error.message if option is None or error.message.startswith(option) else f"{option}: {error.message}"
            click.echo(f"Error: {message}", err=True)
            sys.exit(error.exit_code)
        except click.UsageError as error:
            click.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            sys.exit(interrupt.exit_code())
        sys.exit(code if isinstance(code, int) else 0)


class _PathParam(click.Path):
    """click.Path whose refusal of a file for a folder (or a folder for a file) names the fix."""

    def convert(self, value, param, ctx):
        path = Path(value).expanduser()
        if not self.file_okay and path.exists() and not path.is_dir():
            self.fail(f"'{value}' is a file, not a folder; give a folder (created if missing)", param, ctx)
        if not self.dir_okay and path.is_dir():
            self.fail(f"'{value}' is a folder; give a file in it, e.g. {Path(value) / 'report.json'}", param, ctx)
        return super().convert(value, param, ctx)


@click.command("flux-sharded", cls=OneLineErrors,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="Text to draw; repeat for several images.")
@click.option(
    "--prompts-file", type=click.Path(path_type=Path), default=None,
    help='More prompts: one per line (# comments), or JSON Lines {"prompt": ..., "seed": ...}; after --prompt.',
)
@click.option("--num-images-per-prompt", type=int, default=1, show_default=True, help="Images of each prompt.")
@click.option("--batch-size", type=int, default=setting("batch_size").default, show_default=True,
              help="Images per forward pass.")
@click.option(
    "--max-memory",
    type=BudgetType(),
    default=None,
    help=f"Per-device budget, KEY=SIZE,...: KEY a GPU index, cpu or disk; units {UNITS_HELP} ({EXAMPLE}). "
    "Default: each GPU's free memory less 1 GiB, plus 80% of free RAM.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Hub id or local diffusers folder.")
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True,
    help="Folder for the PNG images.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first image; image k uses seed+k.")
@click.option(
    "--steps", type=int, default=DEFAULT_STEPS,
    help="Denoising steps. Default: the model's (" + ", ".join(f"{f.name} {f.steps}" for f in FAMILIES.values())
    + "; " + ", ".join(f"{name} {defaults['steps']}" for name, defaults in VARIANT_DEFAULTS.items()) + ").",
)
@click.option(
    "--guidance", type=float, default=DEFAULT_GUIDANCE,
    help="Guidance scale. Default: the model's (" + ", ".join(f"{f.name} {f.guidance:g}" for f in FAMILIES.values())
    + "; " + ", ".join(f"{name} {defaults['guidance']:g}" for name, defaults in VARIANT_DEFAULTS.items()) + ").",
)
@click.option("--height", type=int, default=None, help="Image height in pixels. Default: 128 x the VAE factor (1024).")
@click.option("--width", type=int, default=None, help="Image width in pixels. Default: 128 x the VAE factor (1024).")
@click.option(
    "--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH,
    help="Prompt tokens the text encoder reads. Default: the model's ("
    + ", ".join(f"{f.name} {f.max_sequence_length}" for f in FAMILIES.values()) + "; "
    + ", ".join(f"{name} {defaults['max_sequence_length']}" for name, defaults in VARIANT_DEFAULTS.items()
                if defaults["max_sequence_length"] != DEFAULT_MAX_SEQUENCE_LENGTH)
    + f"); at most {DEFAULT_TEXT_TOKEN_LIMIT} (" + ", ".join(
        f"{f.name} {f.text_token_limit}" for f in FAMILIES.values() if f.text_token_limit != DEFAULT_TEXT_TOKEN_LIMIT)
    + ").",
)
@click.option(
    "--dtype", type=click.Choice(DTYPE_NAMES), default=setting("dtype").default, show_default=True,
    help="Weights and compute dtype.",
)
@click.option(
    "--quantize", default=setting("quantize").default, show_default=True, metavar="SPEC",
    help="Store weights in fewer bits, compute in --dtype: none, fp8, int8 or nf4 for the transformer and the large "
    "text encoder (T5, Mistral, Qwen3), or per component (transformer=nf4,text_encoder_2=int8).",
)
@click.option(
    "--lora", "lora", multiple=True, metavar="SOURCE[:SCALE]",
    help="Apply a LoRA: a .safetensors file or hub id (user/repo, user/repo/file.safetensors), SCALE its weight "
    "(default 1.0); repeat for several.",
)
@click.option(
    "--image", "images", multiple=True, metavar="PATH",
    help="Input image (PNG, JPEG, ...): FLUX.1 redraws it (image-to-image, --strength); FLUX.2 and FLUX.3 take "
    "it as a reference (repeat for several).",
)
@click.option(
    "--mask", default=setting("mask").default, metavar="PATH",
    help="Inpainting mask for the --image, of its size: white is redrawn, black kept (FLUX.1, FLUX.2-klein).",
)
@click.option(
    "--strength", type=float, default=setting("strength").default, show_default=True,
    help="Image-to-image and inpainting: how much of the --image is redrawn, above 0 and at most 1 "
    "(klein's inpainting: 0.8, its pipeline's default).",
)
@click.option(
    "--negative-prompt", default=setting("negative_prompt").default, metavar="TEXT",
    help="What --true-cfg guides away from (FLUX.1, Kontext). Default: the empty prompt.",
)
@click.option(
    "--true-cfg", type=float, default=setting("true_cfg").default, show_default=True,
    help="True classifier-free guidance scale: above 1, a second transformer pass per step on --negative-prompt.",
)
@click.option(
    "--upsample-prompt", default=setting("upsample_prompt").default, metavar="MODEL",
    help="FLUX.3: rewrite each prompt with this prompt upsampler (hub id or folder, e.g. "
    "black-forest-labs/flux-3-image-klein-pup) in a stage before encode. Default: none, prompts as typed.",
)
@click.option(
    "--upsample-max-tokens", type=int, default=setting("upsample_max_tokens").default, show_default=True,
    help="The most tokens the prompt upsampler writes per prompt.",
)
@click.option(
    "--report", "report_path", type=_PathParam(path_type=Path, dir_okay=False), default=None,
    help="Also write the per-stage report as JSON to this file.",
)
@click.option(
    "--run-dir", type=_PathParam(path_type=Path, file_okay=False), default=None,
    help="Folder for the stage checkpoints. Default: OUT/.flux-sharded/run-<hash of the settings>.",
)
@click.option(
    "--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
    help="Continue the run saved in this run folder from its last finished stage.",
)
@click.option("--overwrite", is_flag=True, help="Replace images that already exist in --out.")
@click.option(
    "--offload-folder", type=_PathParam(path_type=Path, file_okay=False), default=None,
    help="Folder for weights budgeted to disk (needed with a disk=SIZE entry).",
)
@click.option(
    "--gpus-per-process", type=int, default=None,
    help="Local process r uses local GPUs rK..rK+K-1 (budget keys 0..K-1); without a launcher, GPUs 0..K-1. "
    "Default: 1 under accelerate launch / torchrun, all GPUs alone.",
)
@click.option(
    "--dry-run", is_flag=True,
    help="Plan every stage from the configs alone (no weight is read) and show bytes per device; exit 0 if all fit.",
)
@click.version_option(__version__, "--version")
@click.pass_context
def main(ctx: click.Context, **options):
    """Run FLUX.1 text-to-image in three stages (encode, denoise, decode), each loading only its
    own component under a per-device memory budget, and report every stage's peak memory.
    FLUX.1 Kontext, FLUX.2 (dev, klein 4B/9B) and FLUX.3 klein (base and step-distilled)
    checkpoints run the same way; with --image (and --mask, to inpaint) the VAE encodes the input
    images in a stage of their own (encode_image) before denoise.

    Example: flux-sharded --prompt "a photo of a dog" --max-memory 0=16GB,1=16GB
    """
    from .distributed import check_launcher, current_process, launched_processes, record_failure, restrict_gpus

    # Before anything initialises CUDA in this process. Without a launcher the one process is local
    # process 0: --gpus-per-process K then means GPUs 0..K-1 (not silently ignored).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    if launched_processes() > 1 or options["gpus_per_process"] is not None:
        restrict_gpus(options["gpus_per_process"] or 1)
    process, request = None, None
    try:
        with interrupt.remembered():
            check_launcher()
            request = _request(ctx, options)
            process = None if options["dry_run"] else current_process()
            _run(request, options, process)
    except FluxShardedError as error:
        if interrupt.pressed():  # a library turned the KeyboardInterrupt into its own failure
            _interrupted(request, process, options)
        # Under several processes each one says what stopped it (the launcher then stops the rest),
        # but under flux_sharded.launch a refusal all of them share is said once.
        several = process is not None and process.several
        prefix = f"[process {process.index}] " if several else ""
        if os.environ.get(DEBUG_VARIABLE) == "1":
            traceback.print_exception(error.__cause__ or error.__context__ or error)
        if not several or record_failure(process.index, error.exit_code, str(error)):
            click.echo(f"Error: {prefix}{error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _interrupted(request, process, options)
    except Exception:
        if interrupt.pressed():  # a library turned the signal into its own failure (an import: a RecursionError)
            _interrupted(request, process, options)
        raise


def _interrupted(request, process, options: dict) -> NoReturn:
    """Ctrl-C, SIGTERM or SIGHUP (interrupt.py): the main process says how to continue; exit 128 +
    the signal, as a shell does (130, 143, 129)."""
    from .distributed import first_failure, launched_processes

    interrupt.ignore_more()
    if first_failure() is not None:  # the launcher stopped this process because another one failed
        pass
    elif request is not None and (process is None or process.is_main) and not options["dry_run"]:
        click.echo(f"\nInterrupted. Continue with: {request.resume_command}", err=True)
    elif process is None and launched_processes() == 1:  # several processes would each say it
        click.echo("\nInterrupted; nothing was written.", err=True)
    sys.exit(interrupt.exit_code())


def _resumed_checkpoint(model: str):
    """The checkpoint run.json names; its errors say that the model came from run.json, not --model."""
    from .checkpoint import looks_like_path, resolve_checkpoint

    path = Path(model).expanduser()
    if not path.is_absolute() and not path.is_dir() and looks_like_path(model):
        raise SettingsError(  # new runs store a local --model absolute (checkpoint.model_reference)
            f"--resume: run.json 'settings.model' is '{model}', neither a folder that exists from {Path.cwd()} nor a "
            "hub id (owner/name); a run folder of an earlier version kept --model as typed: resume from the folder "
            "the run was started in"
        )
    try:
        return resolve_checkpoint(model, need_weights=False)
    except CheckpointError as error:
        raise CheckpointError(f"--resume: the run's model (run.json 'settings.model'): {error}") from error


def _request(ctx: click.Context, options: dict):
    """Validate the options that need no model, resolve the configs, build the runner's request.

    The cheap checks (numbers, paths, the model's folder) run before torch, diffusers and
    transformers are imported (seconds), so that a typo is refused at once."""
    from .checkpoint import resolve_checkpoint
    from .progress import quiet_import_noise, quiet_libraries

    quiet_import_noise()  # before anything imports diffusers (reading a FLUX.2 checkpoint does)

    for name in ("num_images_per_prompt", "batch_size", "gpus_per_process"):
        if options[name] is not None and options[name] < 1:
            raise SettingsError(f"{_option_of(name)} {options[name]}: give at least 1")
    if options["report_path"] is not None:
        _check_report_path(options["report_path"])
    given = [name for name in SAVED_OPTIONS if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]

    if options["resume_dir"] is not None:
        if options["dry_run"]:
            raise SettingsError("--resume and --dry-run cannot go together; dry-run a new run's options instead")
        from .rundir import read_run
        from .checkpoint import check_resumed_model

        resumed, other = options["resume_dir"], options["run_dir"]
        if other is not None and other.resolve() != resumed.resolve():
            raise SettingsError(f"--resume {resumed} --run-dir {other}: a run continues in the folder it was saved in, "
                                f"which --resume names; drop --run-dir (or give --resume {other} to continue the run "
                                "saved there)")

        saved = read_run(options["resume_dir"])
        checkpoint = _resumed_checkpoint(saved.settings.model)
        check_resumed_model(saved.weights, checkpoint.model, checkpoint.path, options["resume_dir"])
        settings = saved.settings
        from .lora import find_saved

        for text in settings.lora:  # a LoRA file changed since the run began is named, not called a conflict
            find_saved(text, options["resume_dir"])
        if given:
            _check_agrees(given, options, saved, checkpoint)
        quiet_libraries()
        from . import runner

        return runner.RunRequest(
            checkpoint, settings, options["max_memory"] or saved.budget, saved.out_dir,
            options["offload_folder"] or saved.offload_folder, run_dir=options["resume_dir"], resume=True,
            overwrite=options["overwrite"],
        )

    lines = _prompt_lines(options["prompts"], options["prompts_file"])
    checkpoint = resolve_checkpoint(options["model"], need_weights=False)
    family = checkpoint.family
    if not family.runs and not options["dry_run"]:
        raise SettingsError(
            f"--model '{options['model']}' is {family.name} ({family.pipeline}): {family.name} runs are not implemented "
            "yet; "
            "--dry-run plans them (add --dry-run to see the plan under your --max-memory)"
        )
    from . import api
    from .distributed import launched_processes, local_processes

    def note(message: str) -> None:
        click.echo(message, err=True)

    model = api.Model(checkpoint, offload_folder=options["offload_folder"], log=note,
                      max_memory=options["max_memory"] or api.resolve_budget(None, note, local_processes()),
                      dtype=options["dtype"], quantize=options["quantize"], lora=options["lora"])
    # The model's defaults (api.Model.defaults) for the settings not given
    given = {each.name: options[each.name] for each in image_options()
             if ctx.get_parameter_source(each.name) != ParameterSource.DEFAULT}
    from .jobs import continue_command, has_inputs, make_job

    if has_inputs(lines):  # lines with their own image, mask or negative prompt: a run per set of inputs
        if launched_processes() > 1:
            raise SettingsError(f"--prompts-file '{options['prompts_file']}': lines that give their own \"image\", "
                                "\"mask\" or \"negative_prompt\" run in one process; start it without torchrun or "
                                "accelerate launch, or give each set of inputs a command of its own")
        values = {option for param in main.params if isinstance(param, click.Option) and not param.is_flag
                  for option in param.opts}
        return make_job(model, lines, options["seed"], options["num_images_per_prompt"], options["out_dir"],
                        options["run_dir"], options["overwrite"], given,
                        continue_command(ctx.meta[ARGUMENTS], values), options["report_path"], options["dry_run"])
    return model.request(lines, options["seed"], options["num_images_per_prompt"], options["out_dir"],
                         options["run_dir"], options["overwrite"], **given)


def _check_agrees(given: list[str], options: dict, saved, checkpoint) -> None:
    """On --resume, an option that decides the pixels may be repeated but not changed."""
    from .checkpoint import model_reference
    from .prompts import expand

    settings = saved.settings
    if set(PROMPT_OPTIONS) & set(given):
        lines = _prompt_lines(options["prompts"], options["prompts_file"])
        if any(line.has_inputs for line in lines):
            raise SettingsError(f"--resume with --prompts-file '{options['prompts_file']}', whose lines give their own "
                                "\"image\", \"mask\" or \"negative_prompt\" (a run per set of inputs): run the "
                                "same command again, without --resume, to continue them all, or give --resume "
                                f"{options['resume_dir']} alone to continue that one run")
        if expand(lines, options["seed"], options["num_images_per_prompt"]) != (settings.prompts, settings.seeds):
            raise SettingsError("--resume: the prompts or seeds given differ from the saved run's; drop them to "
                                "continue it, or start a new run")
    saved_values = {**{name: getattr(settings, name) for name in resume_options()},
                    "out_dir": saved.out_dir.absolute()}
    if "quantize" in given:
        from .quantize import format_quantize, parse_quantize

        options = dict(options, quantize=format_quantize(parse_quantize(options["quantize"], checkpoint.family)))
    if "lora" in given:
        from .api import lora_texts

        options = dict(options, lora=lora_texts(options["lora"]))
    if "images" in given:
        from .api import image_inputs

        options = dict(options, images=tuple(each.saved_text for each in image_inputs(options["images"])))
    if options.get("mask"):
        from .input_images import read_image

        options = dict(options, mask=read_image(options["mask"], "--mask").saved_text)
    for name, value in saved_values.items():
        if name in given:
            mine = options[name].absolute() if isinstance(options[name], Path) else options[name]
            if name in ("model", "upsample_prompt") and mine:  # as the run saved it: a local folder absolute
                mine = model_reference(mine)
            if mine != value:
                option = _option_of(name)
                shown = (" ".join(f"{option} {each}" for each in options[name]) if isinstance(options[name], tuple)
                         else f"{option} {options[name]}")
                saved = "; ".join(value) or "none" if isinstance(value, tuple) else value
                raise SettingsError(f"--resume: {shown} conflicts with the saved run's {saved}; drop it to continue "
                                    "the run, or start a new run")


def _option_of(name: str) -> str:
    """The command line option that sets the parameter `name` (out_dir -> --out), as click declares it;
    a setting's own option is named after it (settings.py)."""
    return next((param.opts[0] for param in main.params if param.name == name), f"--{name.replace('_', '-')}")


def _prompt_lines(prompts, prompts_file):
    from .prompts import PromptLine, read_prompts_file

    lines = [PromptLine(prompt) for prompt in prompts]
    if prompts_file is not None:
        lines += read_prompts_file(prompts_file)
    if not lines:
        raise SettingsError('no prompt given; pass --prompt "a photo of a dog" (repeatable) or --prompts-file FILE')
    return lines


def _run(request, options: dict, process) -> None:
    """Run (or dry-run) the request, or each run of a job (jobs.Job) in turn through one
    runner.KeptStages, which keeps a component loaded from one run to the next where their plans
    allow (plan.kept_between_calls); the table of each, then the report and the images written."""
    from . import api, runner
    from .jobs import Job

    runs = request.runs if isinstance(request, Job) else None
    requests = [each.request for each in runs] if runs else [request]
    kept = runner.KeptStages() if runs else None
    refusal = None
    try:
        for number, each in enumerate(requests):
            if runs:
                click.echo(runs[number].title, err=True)
            report, refused = _run_one(each, options, process, kept)
            if report is None:  # not the main process: the main one reports for everyone
                return
            refusal = refusal or refused
            if number < len(requests) - 1:  # the last run's, once its report is written
                _echo_written(report)
    finally:
        if kept is not None:
            kept.clear()
    if refusal is not None:
        raise refusal  # a refused budget writes nothing, not even the report
    if options["report_path"] is not None:
        try:
            report.write(options["report_path"])
        except OSError as error:
            raise OutputError(f"--report: could not write {options['report_path']} ({error.strerror or error}); "
                              "the images are written (the table above is the report)") from None
    _echo_written(report)


def _echo_written(report) -> None:
    for path in report.written:
        click.echo(f"wrote {path}")


def _run_one(request, options: dict, process, kept) -> tuple:
    """One run's plan (--dry-run) or run, its table and the images it wrote shown; its report (None
    on a process other than the main one) and a dry-run's refusal."""
    from . import api

    refusal = None
    if options["dry_run"]:
        plan = api.dry_run(request)
        for note in plan.notes:
            click.echo(note, err=True)
        click.echo(plan.summary)
        report, refusal = plan.report, plan.refusal
    else:
        if options["report_path"] is not None:
            from .runner import check_report_path

            check_report_path(request, options["report_path"])
        report = api.run(request, log=lambda message: click.echo(message, err=True), process=process, kept=kept)
        if report is None:
            return None, None
    if report.stages:  # a resume with nothing left to do ran no stage: no table to show
        click.echo(report.table())
    return report, refusal


def _check_report_path(path: Path) -> None:
    from .distributed import launched_processes
    from .files import check_writable_folder

    # Several processes probe at once: none may remove a folder another one is probing.
    check_writable_folder(path.absolute().parent, "--report", keep_created_folders=launched_processes() > 1)
