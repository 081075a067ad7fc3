"""One progress bar per stage, progress events for a caller's callback, and the libraries' noise:
silenced where it is not the user's concern, printed above the bars where it is.

diffusers and transformers log through their own stderr handlers, which know nothing of a bar
being drawn: a warning lands in the middle of the bar's line. While a stage's bar is up, their
records go through `tqdm.write` instead (which clears the bar, prints the line, redraws it).
The command line and the Python API (api.py) silence the libraries the same way: quiet_libraries.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

# flux_sharded.stages: a stage's note on what the libraries do silently (stages/flux3.py's cut prompt)
LIBRARY_LOGGERS = ("diffusers", "transformers", "accelerate", "flux_sharded.stages")
# torchao (the optional int8 backend), imported by diffusers whenever it is installed, reports the
# CUDA kernels a CPU build lacks, and torch warns about its enums: noise on every command, set
# before diffusers is first imported. bitsandbytes (the optional nf4 backend, imported by
# transformers' and diffusers' quantizer checks), on a CPU with AVX512-BF16, tries to fetch a gemm
# kernel from the hub's kernels-community and warns that it could not: flux-sharded never runs
# bitsandbytes' CPU gemm for anything but a 4-bit text encoder, which works without that kernel.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                        "bitsandbytes.backends.cpu.ops")


def quiet_import_noise() -> None:
    """Silence the libraries' import-time warnings that are not the user's concern (errors stay)."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Our stage lines replace the libraries' per-file loading bars; transformers' import-time notes
    (e.g. about torchvision, which FLUX does not use) are not the user's concern. diffusers' warnings,
    such as a truncated prompt, stay (printed above the bars, a truncation once: library_logs_above_bars)."""
    quiet_import_noise()
    import diffusers.utils.logging  # here, not at the top: the command line reads this module before its checks
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_logger(*names: str):
    """The loggers `names` at level ERROR for a block (a library's warning about what flux-sharded
    does, not the user: cut layers left unread, a guider it makes)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# FluxPipeline.encode_prompt warns, for every batch and each text encoder, with the whole text it
# cut off (a 1 MB prompt: 2 MB of warnings); FLUX.3's encode block cuts silently, and stages/flux3.py
# warns as FluxPipeline does. Said once per run, short.
TRUNCATION_LOGGERS = ("diffusers.pipelines.flux.pipeline_flux", "flux_sharded.stages.flux3")
TRUNCATION_PREFIX = "The following part of your input was truncated because "
PREVIEW_CHARACTERS = 60


class _AboveTheBars(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a logging handler never raises (logging.Handler.handleError's contract)
            self.handleError(record)


class _TruncationSaidOnce(logging.Filter):
    def __init__(self):
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith(TRUNCATION_PREFIX):
            return True
        if self.said:
            return False
        self.said = True
        reason, _, removed = text.removeprefix(TRUNCATION_PREFIX).partition(" tokens: ")
        removed = removed.strip("[]'\" ")
        preview = removed[:PREVIEW_CHARACTERS] + ("..." if len(removed) > PREVIEW_CHARACTERS else "")
        record.msg = (f"note: a prompt is longer than a text encoder reads ({' '.join(reason.split())} tokens); "
                      f"the text after that, starting '{preview}', does not shape the image (said once per run)")
        record.args = ()
        return True


@contextlib.contextmanager
def library_logs_above_bars() -> Iterator[None]:
    """Route the libraries' log records through tqdm.write, and say a prompt's truncation once."""
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    handler = _AboveTheBars()
    truncations, once = [logging.getLogger(name) for name in TRUNCATION_LOGGERS], _TruncationSaidOnce()
    for truncation in truncations:
        truncation.addFilter(once)
    try:
        for logger in loggers:
            logger.handlers = [handler]
            logger.propagate = False  # printed once, here, not again by the root logger
        yield
    finally:
        for truncation in truncations:
            truncation.removeFilter(once)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


@dataclass(frozen=True)
class Progress:
    """Where a run stands, as a progress callback sees it (runner.execute's on_progress): sent when
    a stage starts, after each denoising step (upsample: each token written), and as each image of a
    stage is done."""

    stage: str  # "upsample", "encode", "encode_image", "denoise" or "decode"
    images_done: int  # of the stage's images
    images: int  # the stage's images (encode: the distinct prompts it encodes)
    # denoise: the step just finished of the current batch, 1-based; upsample: the tokens written for the
    # current prompt (its generation may end before `steps`)
    step: int | None = None
    steps: int | None = None  # denoise: the steps of each batch; upsample: --upsample-max-tokens


def stage_bar(name: str, images: int, shown: bool) -> tqdm:
    """The stage's bar: its name only, so that a 100-column terminal leaves the bar its room."""
    return tqdm(total=images, desc=name, unit="image", disable=not shown)
