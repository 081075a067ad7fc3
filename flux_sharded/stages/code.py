"""Each model family's side of the stages (stages/flux1.py, flux2.py), found from a family or a pipeline."""

from __future__ import annotations

import importlib

from ..families import FAMILIES


def family_code(family):
    """The module with `family`'s side of the stages (families.Family.code)."""
    return importlib.import_module(f"{__package__}.{family.code}")


def pipeline_family(pipeline):
    """The family (families.py) of a diffusers pipeline object, by its class."""
    return FAMILIES[type(pipeline).__name__]
