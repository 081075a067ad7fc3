"""The interface every stage module provides (`Stage`), what a stage runs on (`Work`), and what
its todo and finish see of the run (`Share`, which the runner provides: runner.ShareRun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint
    from ..handoff import GenerationSettings, Handoff
    from ..plan import StagePlan


class Share(Protocol):
    """This process's share of a run, as a stage's todo and finish see it: its settings, images and
    run folder, the log, and every write of the run (each failed write is one message that names
    the work kept and the resume command). A stage reads and writes the run folder through it alone."""

    settings: "GenerationSettings"  # the share's images (their indices over the whole run)
    encoded: "GenerationSettings"  # the prompts its encode runs on (distributed.encode_positions)
    checkpoint: "Checkpoint"
    paths: list[Path]  # the share's images, in prompt order
    denoised: dict  # {image index: latents row} saved by the shares of another number of processes
    run_folder: Path
    resume: bool  # continuing a run (--resume)
    overwrite: bool  # existing images are made again (--overwrite)
    log: Callable[[str], None]

    def save_handoff(self, handoff: "Handoff", stage: str) -> None:
        """The stage's checkpoint in the run folder, what a resume continues from."""

    def save_batch_latents(self, batch: range, latents: "torch.Tensor") -> None:
        """A finished denoise batch's latents (len(batch), tokens, channels), until the stage's handoff is saved."""

    def saved_batch_latents(self, batch: range, shape: tuple) -> "torch.Tensor | None":
        """The latents of `batch` that an interrupted run kept (save_batch_latents), checked against
        the batch's settings, `shape` and the run's dtype; None when resuming nothing or none were kept."""

    def remove_batch_latents(self) -> None:
        """Remove every batch's own latents file: the stage's handoff holds them all now."""

    def write_image(self, position: int, image, upsampled: str | None = None) -> None:
        """The share's image `position` as a PNG with the settings that made it, and `upsampled`: its
        prompt as the prompt upsampler rewrote it (None: a run without one)."""

    def input_images(self) -> list:
        """The run's input images (PIL, RGB, in --image order), decoded once; for encode_image."""

    def input_mask(self):
        """The run's --mask (PIL, RGB), decoded once, or None; for encode_image."""


@dataclass(frozen=True)
class Work:
    """What a stage runs on: the handoff, and the keyword arguments its `run` takes besides it
    (denoise: the batches an interrupted run kept, and where to keep each one as it finishes)."""

    handoff: "Handoff"
    options: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    """What every stage module provides; the runner calls nothing else, in this order:
    todo -> load -> device_map -> run -> (release, flush) -> finish."""

    NAME: str  # "encode", "denoise", "decode": its plan's, report's and run folder's name

    def todo(self, handoff: "Handoff", share: "Share") -> Work | None:
        """What this stage runs on, from the previous stage's handoff; None when nothing is left to do."""

    def load(self, checkpoint: "Checkpoint", stage_plan: "StagePlan", dtype: "torch.dtype",
             offload_folder=None) -> Any:
        """The stage's components, placed as `stage_plan` says; what `run` and `device_map` take."""

    def device_map(self, loaded: Any) -> dict[str, dict[str, str]]:
        """component -> module -> device key, as loaded."""

    def run(self, loaded: Any, handoff: "Handoff", on_image_done: Callable[[int], None] | None = None,
            on_step: Callable[[int, int], None] | None = None, **options) -> "Handoff":
        """The next handoff, with this stage's NAME added to its finished_stages."""

    def finish(self, output: "Handoff", share: "Share") -> "Handoff":
        """What the next stage takes, kept (run folder, PNGs) through `share`."""
