"""Each model family's side of the stages, typed (`FamilyCode`), and found from a family or a pipeline.

What differs between the families' pipelines once their components are loaded: what encode keeps
of encode_prompt, what decode gives vae.decode, and why a checkpoint ignores --guidance. One module
per family implements it (flux1.py: FluxPipeline; kontext.py: FluxKontextPipeline; fill.py:
FluxFillPipeline; flux2.py:
Flux2Pipeline and Flux2KleinPipeline, all three with pipelines.py's stage pipelines; flux3.py: FLUX.3's
modular pipelines),
and CODE maps each family's `code` (families.Family.code) to it; tests/test_stages.py checks that
every family has one that provides the whole protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..families import FAMILIES, Family
from . import fill, flux1, flux2, flux3, kontext

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint


class FamilyCode(Protocol):
    # Whether encode_images depends on the batch's seeds (FLUX.1 samples the VAE's distribution with
    # each batch's generators); False: its rows are the same for every image, so it runs once a run.
    SEEDED_ENCODE: bool

    def encode_pipeline(self, checkpoint: "Checkpoint", encoders: dict, dtype: "torch.dtype"):
        """The pipeline encode runs: the family's, holding the loaded text encoders `encoders`, the
        tokenizers and nothing else."""

    def denoise_pipeline(self, checkpoint: "Checkpoint", transformer):
        """The pipeline denoise runs: the family's, holding the loaded `transformer`, the scheduler
        and nothing else."""

    def vae_pipeline(self, checkpoint: "Checkpoint", vae, images: bool):
        """The pipeline decode (and, `images`, encode_image) runs: holding the loaded `vae` alone."""

    def denoise_batch(self, caller, rows, settings, arguments: dict, on_step=None) -> "torch.Tensor":
        """One batch's packed latents (len(rows), tokens, channels) after the last step, from `caller`
        (image_pipeline's), `rows` (the batch's handoff on the execution device), `arguments` (the
        generators, one per image, and call_arguments'); on_step(step, steps) after each step."""

    def check_prompt_lengths(self, checkpoint: "Checkpoint", prompts) -> None:
        """Raises SettingsError for a prompt the family's encode would cut without a word beyond the most
        it reads (families.Family.text_token_limit), before any weight is read; its tokenizers only."""

    def encode_batch(self, pipeline, prompts: list[str],
                     settings) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
        """({name: (len(prompts), ...) rows, one per prompt}, {name: tensor shared by every image}):
        the tensors families.Family.encoded names, for these prompts."""

    def vae_latents(self, pipeline, vae, packed: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
        """Packed latents (B, (H/2f)*(W/2f), 4*C) -> what vae.decode takes, (B, C, H/f, W/f)."""

    def guidance_ignored(self, checkpoint: "Checkpoint") -> str | None:
        """Why --guidance cannot change the pixels of this checkpoint, or None when it does."""

    def guidance_note(self, checkpoint: "Checkpoint", guidance: float) -> str | None:
        """The note for a --guidance the checkpoint ignores, or None."""

    def lora_state_dict(self, family: Family, path) -> tuple[dict[str, "torch.Tensor"], dict]:
        """(the LoRA file's weights converted by the family's pipeline, COMPONENT.-prefixed; the keyword
        arguments its load_lora_weights hands the loaders beside them: network alphas, the file's
        adapter metadata), as the pipeline's load_lora_weights reads them."""

    def load_lora(self, family: Family, name: str, model, state_dict: dict, options: dict,
                  adapter_name: str) -> None:
        """Inject one LoRA into component `name` (families.Family.lora_components) as load_lora_weights
        does; `options`: lora_state_dict's."""

    def input_sizes(self, settings, sizes: list[tuple[int, int]], vae_scale_factor: int) -> tuple[tuple[int, int], ...]:
        """(height, width) at which the VAE encodes each input image of (width, height) `sizes`, as
        the image pipeline resizes it: what the plan counts encode_image's activations for."""

    def encode_images(self, pipeline, images: list, settings, batch: range, mask=None) -> dict[str, "torch.Tensor"]:
        """{name (handoff.INPUT_PREFIX...): (len(batch), ...) rows}: the input images (PIL, RGB) as the
        image pipeline (holding the VAE) encodes them for the images of `batch`; with a `mask` (PIL,
        RGB; settings.mask), as the family's inpainting pipeline prepares the image and the mask."""

    def image_pipeline(self, pipeline, settings):
        """The pipeline denoise calls: `pipeline` (the family's, holding the transformer) for a run
        without input images, else the image pipeline sharing its components."""

    def call_arguments(self, pipeline, inputs: dict[str, "torch.Tensor"], settings, batch: range) -> dict:
        """The keyword arguments the image pipeline (image_pipeline's) __call__ takes besides the
        embeddings: for the encoded input images of `batch` (`inputs`: their rows, encode_images'
        tensors, {} without input images), their generators included, and what the family adds to
        every call (Kontext: max_area)."""


CODE: dict[str, FamilyCode] = {"fill": fill, "flux1": flux1, "flux2": flux2, "flux3": flux3, "kontext": kontext}


def family_code(family: Family) -> FamilyCode:
    """`family`'s side of the stages (families.Family.code)."""
    return CODE[family.code]


def pipeline_family(pipeline) -> Family:
    """The family (families.py) of a diffusers pipeline object, by its class: the family's own
    pipeline, or one that takes its input images (families.Family.image_pipeline, inpaint_pipeline)."""
    name = type(pipeline).__name__
    return FAMILIES.get(name) or next(family for family in FAMILIES.values()
                                      if name in (family.image_pipeline, family.inpaint_pipeline))
