"""Each model family's side of the stages, typed (`FamilyCode`), and found from a family or a pipeline.

What differs between the families' pipelines once their components are loaded: what encode keeps
of encode_prompt, what decode gives vae.decode, and why a checkpoint ignores --guidance. One module
per family implements it (flux1.py: FluxPipeline; flux2.py: Flux2Pipeline and Flux2KleinPipeline),
and CODE maps each family's `code` (families.Family.code) to it; tests/test_stages.py checks that
every family has one that provides the whole protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..families import FAMILIES, Family
from . import flux1, flux2

if TYPE_CHECKING:
    import torch

    from ..checkpoint import Checkpoint


class FamilyCode(Protocol):
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

    def lora_state_dict(self, family: Family, path) -> tuple[dict[str, "torch.Tensor"], dict | None]:
        """(the LoRA file's weights converted by the family's pipeline, COMPONENT.-prefixed; its network
        alphas or None), as the pipeline's load_lora_weights reads them."""

    def load_lora(self, family: Family, name: str, model, state_dict: dict, alphas: dict | None,
                  adapter_name: str) -> None:
        """Inject one LoRA into component `name` (families.Family.lora_components) as load_lora_weights does."""


CODE: dict[str, FamilyCode] = {"flux1": flux1, "flux2": flux2}


def family_code(family: Family) -> FamilyCode:
    """`family`'s side of the stages (families.Family.code)."""
    return CODE[family.code]


def pipeline_family(pipeline) -> Family:
    """The family (families.py) of a diffusers pipeline object, by its class."""
    return FAMILIES[type(pipeline).__name__]
