"""The three stages. Each module exposes `COMPONENTS`, `load(checkpoint, stage_plan, dtype)`,
`run(loaded, handoff, on_image_done, on_step, ...)` and `device_map(loaded)`; the runner sequences them and frees memory.
What differs between model families (families.py) lives in one module per family (flux1.py, flux2.py),
which the stages reach through family_code."""

import importlib

from . import decode, denoise, encode

STAGES = (encode, denoise, decode)


def family_code(family):
    """The module with `family`'s side of the stages (families.Family.code)."""
    return importlib.import_module(f"{__name__}.{family.code}")


def pipeline_family(pipeline):
    """The family (families.py) of a diffusers pipeline object, by its class."""
    from ..families import FAMILIES

    return FAMILIES[type(pipeline).__name__]
