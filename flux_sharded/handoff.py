"""The typed object that carries tensors and settings from one stage to the next.

encode fills the embeddings its model family's pipeline takes (FLUX.1: `prompt_embeds`,
`pooled_prompt_embeds` and `text_ids`; FLUX.2: `prompt_embeds`, and `negative_prompt_embeds` for a
klein that guides with a second pass; FLUX.3: those zero-padded to --max-sequence-length, with
each prompt's window length in `prompt_tokens` / `negative_prompt_tokens`, stages/flux3.py;
families.Family.encoded names them with their shapes), held
by name: a family that hands on other tensors declares them, not this module; encode_image (a run
with input images) adds the encoded images, each tensor named INPUT_PREFIX... (stages/flux1.py
says which); denoise fills `latents`; decode reads `latents` and fills `images` (PIL images, which are
written as PNGs, never saved with the handoff). Between stages the runner keeps the handoff on the
CPU, and each stage moves it to its own execution device with `to()`. `save()`/`load()` write its
tensors as one safetensors file plus a JSON file of the settings, each sealed (seal.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import settings as schema
from .families import IMAGE_STAGE, STAGES, UPSAMPLE_STAGE
from .quantize import parse_quantize
from .seal import PLACEHOLDER, SealError, check_seal, sealed_write


DTYPES = {name: getattr(torch, name) for name in schema.DTYPE_NAMES}
# The names of the tensors encode_image keeps of the input images (the family's, e.g.
# input_latents) begin with this: denoise hands them to the pipeline as its image, not as embeddings.
INPUT_PREFIX = "input_"


class _Settings:
    """GenerationSettings' methods; its fields are the schema's (settings.SETTINGS, `saved`)."""

    @property
    def quantization(self) -> dict[str, str]:
        """Component -> quantization method ("fp8", "int8", "nf4"); {} when stored in --dtype."""
        return parse_quantize(self.quantize)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run goes through (families.STAGES): upsample only with --upsample-prompt,
        encode_image only with input images."""
        return tuple(stage for stage in STAGES if (stage != IMAGE_STAGE or self.images)
                     and (stage != UPSAMPLE_STAGE or self.upsample_prompt))

    @property
    def image_indices(self) -> tuple[int, ...]:
        return self.indices or tuple(range(len(self.prompts)))

    def batches(self, by_prompt: bool = False) -> list[range]:
        """Positions of the images, batch_size at a time; `by_prompt` (families.Family.prompt_batches):
        a batch also ends where the prompt changes."""
        count = len(self.prompts)
        if not by_prompt:
            return [range(start, min(start + self.batch_size, count)) for start in range(0, count, self.batch_size)]
        batches, start = [], 0
        for position in range(1, count + 1):
            if position == count or position - start == self.batch_size or self.prompts[position] != self.prompts[start]:
                batches.append(range(start, position))
                start = position
        return batches

    def subset(self, positions: list[int]) -> "GenerationSettings":
        """The settings of some of the images (one process's share), keeping their global indices."""
        return dataclasses.replace(self, **{
            each.name: tuple((self.image_indices if each.name == "indices" else getattr(self, each.name))[p]
                             for p in positions)
            for each in schema.saved_settings() if each.per_image})

    def to_json(self) -> dict:
        """Every field, but those left out at their default (settings.Setting.omitted_at_default)."""
        return {each.name: getattr(self, each.name) for each in schema.saved_settings()
                if not schema.at_omitted_default(each, self)}

    @classmethod
    def from_json(cls, data: dict) -> "GenerationSettings":
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})


# Built from the schema, so that a setting is declared once (settings.py).
GenerationSettings = dataclasses.make_dataclass(
    "GenerationSettings",
    [(each.name, each.type, field(default=each.default) if each.optional else field())
     for each in schema.saved_settings()],
    bases=(_Settings,), frozen=True)
GenerationSettings.__module__ = __name__
GenerationSettings.__doc__ = """Everything that decides the pixels, besides the weights; JSON-serialisable. Its
fields, in order, with their types and defaults, are the schema's settings that are `saved`
(settings.SETTINGS)."""


@dataclass(init=False)
class Handoff:
    """Tensors of one run, batch dimension B = number of images, in prompt order: a mapping of the
    tensors its family declares, by name (families.Family.encoded: FLUX.1's prompt_embeds (B, S,
    joint_attention_dim), pooled_prompt_embeds (B, pooled_projection_dim) and text_ids (S, 3);
    FLUX.2's prompt_embeds and, for a klein guided by a second pass, negative_prompt_embeds), then
    denoise's `latents` (B, (H/2f)*(W/2f), 4*latent_channels), packed (f = the VAE scale factor).
    A tensor it does not hold reads as None (`handoff.latents` before denoise)."""

    settings: GenerationSettings
    images: list | None  # decode's: B PIL images (H x W), in prompt order; not saved by save()
    finished_stages: tuple[str, ...]
    # upsample's: each image's prompt as the prompt upsampler rewrote it (B texts, in prompt order), what
    # encode encodes instead of settings.prompts; () for a run without it (or before it ran)
    upsampled: tuple[str, ...]
    # Tensors shared by every image, without a batch dimension (families.Family.shared: FLUX.1's
    # text_ids): select() keeps them whole.
    shared: tuple[str, ...]
    named: dict[str, torch.Tensor]  # name -> tensor

    def __init__(self, settings: GenerationSettings, images: list | None = None,
                 finished_stages: tuple[str, ...] = (), shared: tuple[str, ...] = (),
                 named: dict[str, torch.Tensor] | None = None, upsampled: tuple[str, ...] = (),
                 **tensors: torch.Tensor | None):
        self.settings, self.images, self.finished_stages, self.shared = settings, images, tuple(finished_stages), \
            tuple(shared)
        self.upsampled = tuple(upsampled)
        # keyword tensors win over `named` (dataclasses.replace(handoff, latents=...) passes both)
        self.named = {name: tensor for name, tensor in {**(named or {}), **tensors}.items() if tensor is not None}

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("settings", "images", "finished_stages", "shared", "named", "upsampled"):
            raise AttributeError(name)
        return self.named.get(name)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named)

    def to(self, device: torch.device | str) -> "Handoff":
        return dataclasses.replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    def select(self, positions: list[int]) -> "Handoff":
        """The handoff of some of the images (batch rows); the `shared` tensors are shared by all."""
        rows = {name: tensor[positions] for name, tensor in self.tensors().items() if name not in self.shared}
        images = None if self.images is None else [self.images[position] for position in positions]
        upsampled = tuple(self.upsampled[position] for position in positions) if self.upsampled else ()
        return dataclasses.replace(self, settings=self.settings.subset(positions), images=images, upsampled=upsampled,
                                   **rows)

    def prompt_texts(self) -> tuple[str, ...]:
        """Each image's prompt as encode encodes it: the upsampler's rewriting, else as typed."""
        return self.upsampled or self.settings.prompts

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The per-image tensors the pipeline's __call__ takes by these names (prompt_embeds, ...)."""
        return {name: tensor for name, tensor in self.tensors().items()
                if name not in self.shared and name != "latents" and not name.startswith(INPUT_PREFIX)}

    def inputs(self) -> dict[str, torch.Tensor]:
        """The encoded input images, per image (encode_image's: INPUT_PREFIX...)."""
        return {name: tensor for name, tensor in self.tensors().items() if name.startswith(INPUT_PREFIX)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def save(self, path: str | os.PathLike, weights: str) -> None:
        """Write `<path>.safetensors`, then `<path>.json`, each atomically (temporary name, fsync,
        rename) and sealed (seal.py); the JSON names the tensors file's seal and `weights` (the
        digest of the weights that made the tensors, checkpoint.fingerprint_digest), so that a
        resume takes neither from another run."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.tensors().items()}
        tensors_seal = sealed_write(path.with_suffix(".safetensors"),
                                    lambda tmp: save_file(tensors, tmp, metadata={"seal": PLACEHOLDER}))
        meta = {"seal": PLACEHOLDER,  # first: seal.SEAL_WITHIN_BYTES
                "settings": self.settings.to_json(), "finished_stages": list(self.finished_stages),
                "weights": weights, "tensors": tensors_seal,
                **({"upsampled": list(self.upsampled)} if self.upsampled else {})}
        sealed_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, path: str | os.PathLike, shared: tuple[str, ...] = ()) -> "Handoff":
        """What save() wrote, its seals checked (raises seal.SealError); `shared`: the family's
        (families.Family.shared), which the files do not name. A resume reads the run folder's
        handoffs with every field checked (rundir.saved_handoffs), not with this."""
        from safetensors.torch import load_file

        path = Path(path)
        check_seal(path.with_suffix(".json"))
        meta = json.loads(path.with_suffix(".json").read_text())
        if check_seal(path.with_suffix(".safetensors")) != meta["tensors"]:
            raise SealError(f"{path.with_suffix('.safetensors')} is not the tensors file its JSON was written with")
        tensors = load_file(path.with_suffix(".safetensors"))
        return cls(
            settings=GenerationSettings.from_json(meta["settings"]),
            finished_stages=tuple(meta["finished_stages"]),
            shared=shared,
            named=tensors,
            upsampled=tuple(meta.get("upsampled", ())),
        )
