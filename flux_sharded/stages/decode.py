"""Decode: packed latents -> images.

Loads: the VAE alone, on the single device the plan chose (the one with the largest budget).
Reads from the handoff: latents and settings (size). Writes: `images`, PIL images in prompt
order; only the images the run still lacks are decoded, with their batch mates (todo), and written
as PNGs (finish). What
comes between the packed latents and vae.decode is the family's pipeline's own (stages/flux1.py:
unpack, un-scale and shift; flux2.py: unpack by position, undo the batch-norm and the 2x2 patches),
and so is the post-processing (the pipeline's image_processor). Memory: the VAE's weights (168 MB
in bf16 for FLUX.1) plus decoder activations, which grow with H*W and dominate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..budget import device_key
from ..handoff import Handoff
from .code import family_code, pipeline_family
from .interface import Share, Work
from .vae import vae_pipeline

NAME = "decode"


def _missing(share: Share) -> list[int]:
    """The share's images to write: on a resumed run, those not written yet (all with --overwrite)."""
    return [position for position, path in enumerate(share.paths)
            if not (share.resume and not share.overwrite and path.exists())]


def _decoded(share: Share, missing: list[int]) -> list[int]:
    """Whole batches as the run grouped them: a batch rounds differently from its images decoded
    alone (by a level), so an image is redone with its batch mates."""
    batches = share.settings.batches(share.checkpoint.family.prompt_batches)
    return [position for batch in batches if set(batch) & set(missing) for position in batch]


def _hint(settings) -> str:
    if settings.dtype == "float16":
        return "float16 overflows where bfloat16, with float32's range, does not: use --dtype bfloat16"
    return "are the checkpoint's weights and the --lora scales sound?" if settings.lora else (
        "are the checkpoint's weights sound?")


def _black(handoff: Handoff, positions: list[int]) -> list[int]:
    """The positions whose latents hold NaN or infinity: their images will be black."""
    return [position for position in positions if not torch.isfinite(handoff.latents[position]).all()]


def todo(handoff: Handoff, share: Share) -> Work | None:
    """The batches that hold an image still to write; None when every image exists. Names the
    images whose latents are not finite before decoding them."""
    missing = _missing(share)
    if not missing:
        share.log(f"nothing to do: every image of the run in {share.run_folder} exists")
        return None
    for position in _black(handoff, missing):
        share.log(f"note: the latents of {share.paths[position].name} hold NaN or infinite values, so the image "
                  f"will be black; {_hint(share.settings)}")
    return Work(handoff.select(_decoded(share, missing)))


def finish(output: Handoff, share: Share) -> Handoff:
    """Write the images still missing as PNGs (a batch mate's image exists already); name those
    whose decoded values were not finite though their latents were (a float16 overflow in the VAE)."""
    missing = _missing(share)
    decoded = _decoded(share, missing)
    for row, position in enumerate(decoded):
        if position not in missing:  # decoded only for its batch mates: the image exists already
            continue
        image = output.images[row]
        if image.info.get(NON_FINITE) and not _black(output, [row]):
            share.log(f"note: {share.paths[position].name} held NaN or infinite values after decode, so some "
                      f"pixels are black or saturated; {_hint(share.settings)}")
        share.write_image(position, image, output.upsampled[row] if output.upsampled else None)
    return output


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None):
    """The family's pipeline holding only the VAE, on the plan's device (stages/vae.py): tiled
    decoding and one image at a time where the plan says so."""
    return vae_pipeline(checkpoint, stage_plan, dtype, images=False)


# Set in the `info` of an image whose decoded values held NaN or infinity (a float16 overflow in
# the VAE): NaN becomes black and infinity saturates, so the runner names the image.
NON_FINITE = "flux_sharded_non_finite"


def run(pipeline, handoff: Handoff, on_image_done=None, on_step=None) -> Handoff:
    """The handoff with its PIL images, in its order, decoded batch_size at a time; see NON_FINITE."""
    settings, vae = handoff.settings, pipeline.vae
    code = family_code(pipeline_family(pipeline))
    images = []
    with torch.inference_mode():
        for batch in settings.batches(pipeline_family(pipeline).prompt_batches):  # the VAE decodes it image by image where the plan says (load)
            # one batch on the VAE's device at a time
            packed = handoff.latents[batch.start : batch.stop].to(vae.device)
            latents = code.vae_latents(pipeline, vae, packed, settings.height, settings.width)
            decoded = vae.decode(latents, return_dict=False)[0]
            finite = torch.isfinite(decoded).flatten(1).all(1).tolist()
            with np.errstate(invalid="ignore"):  # NaN pixels become 0; the runner names those images
                batch_images = pipeline.image_processor.postprocess(decoded, output_type="pil")
            for image, is_finite in zip(batch_images, finite, strict=True):
                if not is_finite:
                    image.info[NON_FINITE] = True
            images.extend(batch_images)
            if on_image_done:
                on_image_done(len(batch))
    return dataclasses.replace(handoff, images=images, finished_stages=handoff.finished_stages + (NAME,))


def device_map(pipeline) -> dict[str, dict[str, str]]:
    return {"vae": {"": device_key(pipeline.vae.device)}}
