"""The stages, each a module with one interface (`Stage`); the runner sequences them and frees memory.

A stage's computing side (`load`, `run`, `device_map`) loads only its own components (the family's
`stage_components()[NAME]`, families.py) and returns the next handoff, decode included (its
`images`). Its run side (`todo`, `finish`) says what of the handoff it runs on and what it keeps
of its output, through the `Share` the runner hands it (the share's settings, images and run folder; every
write goes through it). What differs between model families (families.py) lives in one module per
family (flux1.py, flux2.py), typed by code.FamilyCode, which the stages reach through code.family_code.

A component is planned and placed by each stage that names it (families.Component.stages): the VAE
that encodes a run's input images before denoise (encode_image) and decodes after it is loaded,
placed and freed by each of the two. Adapters (LoRA) have their place between loading and placement: a
stage's `load` reads the component's weights (from_pretrained, on the CPU or with the plan's map),
loads the adapter into it, and only then places it as the plan says (offload.py, quantize_load.py),
so that placement moves the adapter's weights with the layers they patch; the plan then counts
them as part of the component.
"""

from __future__ import annotations

from . import decode, denoise, encode, encode_image, upsample
from .code import family_code
from .interface import Share, Stage, Work

STAGES: tuple[Stage, ...] = (upsample, encode, encode_image, denoise, decode)
