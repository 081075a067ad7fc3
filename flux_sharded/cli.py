"""Command line: parses options, calls the runner, turns library errors into one `Error: ...` line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .budget import EXAMPLE, UNITS_HELP, Budget, default_budget, parse_budget
from .checkpoint import DEFAULT_MODEL
from .errors import BudgetError, FluxShardedError

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
    "--dry-run", is_flag=True,
    help="Plan every stage from the configs alone (no weight is read) and show bytes per device; exit 0 if all fit.",
)
@click.version_option(__version__, "--version")
def main(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width, max_sequence_length, dtype,
         report_path, offload_folder, dry_run):
    """Run FLUX.1 text-to-image in three stages (encode, denoise, decode), each loading only its
    own component under a per-device memory budget, and report every stage's peak memory.

    Example: flux-sharded --prompt "a photo of a dog" --max-memory 0=16GB,1=16GB
    """
    try:
        _run(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width, max_sequence_length, dtype,
             report_path, offload_folder, dry_run)
    except FluxShardedError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(error.exit_code)


def _run(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width, max_sequence_length, dtype,
         report_path, offload_folder, dry_run):
    _quiet_libraries()
    from . import runner
    from .budget import check_gpus, format_budget
    from .checkpoint import resolve_checkpoint
    from .handoff import GenerationSettings

    if not prompts:
        raise FluxShardedError('no prompt given; pass --prompt "a photo of a dog" (repeatable)')
    if report_path is not None:
        _check_report_path(report_path)
    budget = max_memory or default_budget()
    if not dry_run:
        check_gpus(budget, _gpu_count())
    checkpoint = resolve_checkpoint(model, need_weights=False)
    settings = GenerationSettings(
        model=model,
        prompts=tuple(prompts),
        seeds=tuple(seed + index for index in range(len(prompts))),
        steps=steps,
        guidance=guidance,
        height=checkpoint.default_size if height is None else height,
        width=checkpoint.default_size if width is None else width,
        max_sequence_length=max_sequence_length,
        dtype=dtype,
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
        report, refusal = runner.execute(request, log=lambda message: click.echo(message, err=True)), None
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
