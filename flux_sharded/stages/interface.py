"""The interface every stage module provides (`Stage`), and what a stage runs on (`Work`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint
    from ..handoff import Handoff
    from ..plan import StagePlan
    from ..runner import ShareRun


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

    def todo(self, handoff: "Handoff", share: "ShareRun") -> Work | None:
        """What this stage runs on, from the previous stage's handoff; None when nothing is left to do."""

    def load(self, checkpoint: "Checkpoint", stage_plan: "StagePlan", dtype: "torch.dtype",
             offload_folder=None) -> Any:
        """The stage's components, placed as `stage_plan` says; what `run` and `device_map` take."""

    def device_map(self, loaded: Any) -> dict[str, dict[str, str]]:
        """component -> module -> device key, as loaded."""

    def run(self, loaded: Any, handoff: "Handoff", on_image_done: Callable[[int], None] | None = None,
            on_step: Callable[[int, int], None] | None = None, **options) -> "Handoff":
        """The next handoff, with this stage's NAME added to its finished_stages."""

    def finish(self, output: "Handoff", share: "ShareRun") -> "Handoff":
        """What the next stage takes, kept (run folder, PNGs) through `share`."""
