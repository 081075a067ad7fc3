"""Output file names and atomic PNG writing.

A name is `<index>-<seed>-<slug>.png`: the image's index over the run (zero-padded), its seed,
and a slug of its prompt made of [a-z0-9-] only, so that no prompt can reach outside the output
folder, and two images of one run never share a name.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .files import atomic_write

SLUG_MAX_CHARS = 48  # keeps names well under every filesystem's 255-byte limit


def slugify(prompt: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:SLUG_MAX_CHARS].rstrip("-") or "image"


def image_paths(out_dir: Path, indices, prompts, seeds) -> list[Path]:
    return [out_dir / f"{index:04d}-{seed}-{slugify(prompt)}.png" for index, prompt, seed in zip(indices, prompts, seeds, strict=True)]


def save_png(image, path: Path, metadata: dict[str, str]) -> None:
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
