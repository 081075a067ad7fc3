"""The three stages. Each module exposes `COMPONENTS`, `load(checkpoint, stage_plan, dtype)`,
`run(loaded, handoff, on_image_done, on_step, ...)` and `device_map(loaded)`; the runner sequences them and frees memory."""

from . import decode, denoise, encode

STAGES = (encode, denoise, decode)
