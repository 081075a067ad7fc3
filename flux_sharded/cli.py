"""Command line: parses options, calls the runner, turns library errors into one `Error: ...` line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .budget import EXAMPLE, UNITS_HELP, Budget, default_budget, parse_budget
from .checkpoint import DEFAULT_MODEL
from .errors import BudgetError, FluxShardedError, StageOutOfMemory

# FluxPipeline.__call__'s own defaults, so that a bare run matches diffusers.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class BudgetType(click.ParamType):
    """`0=16GB,1=16GB,cpu=64GB` -> {0: bytes, 1: bytes, "cpu": bytes}, checked against this machine's GPUs."""

    name = "SPEC"

    def convert(self, value, param, ctx) -> Budget:
        if isinstance(value, dict):
            return value
        try:
            return parse_budget(value, gpu_count=None)  # GPU indices are checked once we know it is no dry-run
        except BudgetError as error:
            self.fail(str(error).removeprefix("--max-memory: "), param, ctx)


@click.command("flux-sharded", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="Text to draw; repeat for several images.")
@click.option(
    "--prompts-file", type=click.Path(path_type=Path), default=None,
    help='More prompts: one per line (# comments), or JSON Lines {"prompt": ..., "seed": ...}; after --prompt.',
)
@click.option("--num-images-per-prompt", type=int, default=1, show_default=True, help="Images of each prompt.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per forward pass.")
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
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True, help="Guidance scale.")
@click.option("--height", type=int, default=None, help="Image height in pixels. Default: 128 x the VAE factor (1024).")
@click.option("--width", type=int, default=None, help="Image width in pixels. Default: 128 x the VAE factor (1024).")
@click.option(
    "--max-sequence-length", type=int, default=DEFAULT_MAX_SEQUENCE_LENGTH, show_default=True,
    help="T5 prompt tokens (1-512).",
)
@click.option(
    "--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
    help="Weights and compute dtype.",
)
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Also write the per-stage report as JSON to this file.",
)
@click.option(
    "--offload-folder", type=click.Path(path_type=Path, file_okay=False), default=None,
    help="Folder for weights budgeted to disk (needed with a disk=SIZE entry).",
)
@click.option(
    "--gpus-per-process", type=int, default=None,
    help="Under accelerate launch / torchrun: local process r uses local GPUs rK..rK+K-1 (budget keys 0..K-1). "
    "Default 1.",
)
@click.option(
    "--dry-run", is_flag=True,
    help="Plan every stage from the configs alone (no weight is read) and show bytes per device; exit 0 if all fit.",
)
@click.version_option(__version__, "--version")
def main(prompts, prompts_file, num_images_per_prompt, batch_size, max_memory, model, out_dir, seed, steps, guidance,
         height, width, max_sequence_length, dtype, report_path, offload_folder, gpus_per_process, dry_run):
    """Run FLUX.1 text-to-image in three stages (encode, denoise, decode), each loading only its
    own component under a per-device memory budget, and report every stage's peak memory.

    Example: flux-sharded --prompt "a photo of a dog" --max-memory 0=16GB,1=16GB
    """
    from .distributed import launched_processes, restrict_gpus

    if launched_processes() > 1:
        restrict_gpus(gpus_per_process or 1)  # before anything initialises CUDA in this process
    process = None
    try:
        if gpus_per_process is not None and gpus_per_process < 1:
            raise FluxShardedError(f"--gpus-per-process {gpus_per_process}: give at least 1")
        lines = _prompt_lines(prompts, prompts_file)
        if num_images_per_prompt < 1:
            raise FluxShardedError(f"--num-images-per-prompt {num_images_per_prompt}: give at least 1")
        if batch_size < 1:
            raise FluxShardedError(f"--batch-size {batch_size}: give at least 1")
        from .distributed import current_process

        process = None if dry_run else current_process()
        _run(lines, num_images_per_prompt, batch_size, max_memory, model, out_dir, seed, steps, guidance, height,
             width, max_sequence_length, dtype, report_path, offload_folder, dry_run, process)
    except FluxShardedError as error:
        # Under several processes every process meets the same input error: the main one says it,
        # except for an error of its own stage (out of memory), which every process reports.
        if process is None or process.is_main or isinstance(error, StageOutOfMemory):
            prefix = f"[process {process.index}] " if process is not None and process.several else ""
            click.echo(f"Error: {prefix}{error}", err=True)
        sys.exit(error.exit_code)


def _prompt_lines(prompts, prompts_file):
    from .prompts import PromptLine, read_prompts_file

    lines = [PromptLine(prompt) for prompt in prompts]
    if prompts_file is not None:
        lines += read_prompts_file(prompts_file)
    if not lines:
        raise FluxShardedError('no prompt given; pass --prompt "a photo of a dog" (repeatable) or --prompts-file FILE')
    return lines


def _run(lines, num_images_per_prompt, batch_size, max_memory, model, out_dir, seed, steps, guidance, height, width,
         max_sequence_length, dtype, report_path, offload_folder, dry_run, process):
    _quiet_libraries()
    from . import runner
    from .budget import check_gpus, format_budget
    from .checkpoint import resolve_checkpoint
    from .handoff import GenerationSettings
    from .prompts import expand

    if report_path is not None:
        _check_report_path(report_path)
    budget = max_memory or default_budget()
    if not dry_run:
        check_gpus(budget, _gpu_count())
    checkpoint = resolve_checkpoint(model, need_weights=False)
    prompts, seeds = expand(lines, seed, num_images_per_prompt)
    settings = GenerationSettings(
        model=model,
        prompts=prompts,
        seeds=seeds,
        steps=steps,
        guidance=guidance,
        height=checkpoint.default_size if height is None else height,
        width=checkpoint.default_size if width is None else width,
        max_sequence_length=max_sequence_length,
        dtype=dtype,
        batch_size=batch_size,
    )
    request = runner.RunRequest(checkpoint, settings, budget, out_dir, offload_folder)
    if dry_run:
        missing = [key for key in budget if isinstance(key, int) and key >= _gpu_count()]
        if missing:
            click.echo(f"note: planning for GPU(s) {', '.join(map(str, missing))}, which this machine does not have",
                       err=True)
        report, refusal = runner.dry_run(request)
        click.echo(f"plan for {settings.width}x{settings.height}, {dtype}, --max-memory {format_budget(budget)}")
    else:
        report = runner.execute(request, log=lambda message: click.echo(message, err=True), process=process)
        refusal = None
        if report is None:  # not the main process: the main one reports for everyone
            return
    click.echo(report.table())
    if refusal is not None:
        raise refusal  # a refused budget writes nothing, not even the report
    if report_path is not None:
        report.write(report_path)
    for path in report.images:
        click.echo(f"wrote {path}")


def _quiet_libraries() -> None:
    """Our stage lines replace the libraries' per-file loading bars; transformers' import-time notes
    (e.g. about torchvision, which FLUX does not use) are not the user's concern. diffusers' warnings,
    such as a truncated prompt, stay."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _check_report_path(path: Path) -> None:
    from .files import check_writable_folder

    check_writable_folder(path.absolute().parent, "--report")
