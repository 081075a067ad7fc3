"""The project's exceptions. Library code raises these; only cli.py turns them into `Error: ...` lines."""


class FluxShardedError(Exception):
    """A mistake the user can fix; its message names the bad value and the fix."""

    exit_code = 2


class BudgetError(FluxShardedError):
    """A `--max-memory` spec that cannot be parsed or does not match this machine."""


class SettingsError(FluxShardedError):
    """A generation setting (size, steps, prompt, output folder, ...) that cannot be used."""


class CheckpointError(FluxShardedError):
    """A model path or hub id that is missing or is not a FLUX.1 diffusers checkpoint."""


class PlanError(FluxShardedError):
    """A stage whose components cannot be placed within the budget; carries every stage's plan."""

    def __init__(self, message: str, stages: tuple = ()):
        super().__init__(message)
        self.stages = stages


class StageOutOfMemory(FluxShardedError):
    """A device ran out of memory inside a stage, although the plan said it fits."""

    exit_code = 3


class OutputError(FluxShardedError):
    """An image or a stage checkpoint could not be written (a full disk, a folder gone or locked)."""

    exit_code = 4


class StageError(FluxShardedError):
    """A stage failed for a reason that is neither the user's input nor memory nor a write (a bug,
    a library failure); the message names the stage and the cause, and the way to continue."""

    exit_code = 1


class PlacementError(StageError):
    """A component placed otherwise than its plan's device map says (placement.check_placement): a
    bug of this tool, never the user's; the message names each module that differs."""
