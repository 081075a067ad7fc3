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
            return parse_budget(value, _gpu_count())
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
@click.version_option(__version__, "--version")
def main(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width, max_sequence_length, dtype,
         report_path):
    """Run FLUX.1 text-to-image in three stages (encode, denoise, decode), each loading only its
    own component under a per-device memory budget, and report every stage's peak memory.

    Example: flux-sharded --prompt "a photo of a dog" --max-memory 0=16GB,1=16GB
    """
    try:
        report = _run(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width,
                      max_sequence_length, dtype, report_path)
    except FluxShardedError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(error.exit_code)
    click.echo(report.table())
    for path in report.images:
        click.echo(f"wrote {path}")


def _run(prompts, max_memory, model, out_dir, seed, steps, guidance, height, width, max_sequence_length, dtype,
         report_path):
    _quiet_libraries()
    from .checkpoint import resolve_checkpoint
    from .handoff import GenerationSettings
    from .runner import RunRequest, check_request, execute

    if not prompts:
        raise FluxShardedError('no prompt given; pass --prompt "a photo of a dog" (repeatable)')
    if report_path is not None:
        _check_report_path(report_path)
    checkpoint = resolve_checkpoint(model)
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
    request = RunRequest(checkpoint, settings, max_memory or default_budget(), out_dir)
    check_request(request)
    report = execute(request, log=lambda message: click.echo(message, err=True))
    if report_path is not None:
        report.write(report_path)
    return report


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
