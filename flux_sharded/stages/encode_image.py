"""Encode image: input images -> their latents, before denoise (a run with --image only).

Loads: the VAE alone, on the single device the plan chose (stages/vae.py), in the pipeline class
that takes the family's input images (families.Family.image_pipeline: FLUX.1's FluxImg2ImgPipeline).
Reads from the handoff: settings (size, seeds, batches); the input images and the --mask come from
the run (Share.input_images, input_mask: decoded once, input_images.py). Writes: the tensors the
family's code makes of them (stages/flux1.py `encode_images`, each named handoff.INPUT_PREFIX...;
for inpainting the mask as the inpainting pipeline prepares it), one row per image, a
batch at a time as the pipeline's own prepare_latents would encode them, and keeps the handoff in
the run folder, so that a resume needs the input files no more. Memory: the VAE's weights (168 MB
in bf16 for FLUX.1) plus one encode's activations at the size the pipeline encodes the input
(activations.vae_encode_activation_bytes).
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import device_key
from ..handoff import Handoff
from .code import family_code, pipeline_family
from .interface import Share, Work
from .vae import vae_pipeline

NAME = "encode_image"


def todo(handoff: Handoff, share: Share) -> Work:
    """The share's images with the run's input images (the runner runs this stage only for a run
    that has some: settings.stages)."""
    return Work(handoff, {"images": share.input_images(), "mask": share.input_mask()})


def finish(output: Handoff, share: Share) -> Handoff:
    """Kept in the run folder: a resume from here needs neither the text encoders nor the input files."""
    share.save_handoff(output, NAME)
    return output


def load(checkpoint, stage_plan, dtype: torch.dtype, offload_folder=None):
    """The family's image pipeline holding only the VAE, on the plan's device (stages/vae.py)."""
    return vae_pipeline(checkpoint, stage_plan, dtype, images=True)


def run(pipeline, handoff: Handoff, on_image_done=None, on_step=None, images=(), mask=None) -> Handoff:
    """The handoff with the encoded input images added, batch_size images at a time (the batches
    denoise runs: the pipelines encode once per call); `images`: the run's input images (PIL, RGB);
    `mask`: its --mask (PIL, RGB) or None. A family whose encode does not depend on the batch's
    seeds (FamilyCode.SEEDED_ENCODE false) encodes once: every image's rows are the first batch's,
    the longest."""
    settings = handoff.settings
    code = family_code(pipeline_family(pipeline))
    rows: dict[str, list[torch.Tensor]] = {}
    first = None
    with torch.inference_mode():
        for batch in settings.batches(pipeline_family(pipeline).prompt_batches):
            if first is None or code.SEEDED_ENCODE:
                encoded = {name: tensor.to("cpu") for name, tensor
                           in code.encode_images(pipeline, list(images), settings, batch, mask).items()}
                first = first or encoded
            else:
                encoded = {name: tensor[:len(batch)] for name, tensor in first.items()}
            for name, tensor in encoded.items():
                rows.setdefault(name, []).append(tensor)
            if on_image_done:
                on_image_done(len(batch))
    encoded = {name: torch.cat(tensors) for name, tensors in rows.items()}
    return dataclasses.replace(handoff, **encoded, finished_stages=handoff.finished_stages + (NAME,))


def device_map(pipeline) -> dict[str, dict[str, str]]:
    return {"vae": {"": device_key(pipeline.vae.device)}}
