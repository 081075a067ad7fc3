"""Prompts from the command line and from a prompts file, expanded to one entry per image.

A prompts file is either plain text, one prompt per line (blank lines and lines starting with #
skipped), or JSON Lines, one object per line with "prompt" and an optional integer "seed"
(recognised by its first non-blank line starting with "{"). Seeds: image k of the run (its index
over the whole run, in prompt order) uses --seed + k; a line that gives its own seed s uses s for
its first image, s + 1 for its second, and so on (--num-images-per-prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError
from .settings import MAX_IMAGES


@dataclass(frozen=True)
class PromptLine:
    prompt: str
    seed: int | None = None  # None: the run's --seed + the image's index


def read_prompts_file(path: Path) -> list[PromptLine]:
    where = f"--prompts-file '{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist; give a text or JSON Lines file of prompts") from None
    except IsADirectoryError:
        raise SettingsError(f"{where} is a folder; give a text or JSON Lines file of prompts") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"{where} cannot be read ({error}); give a UTF-8 text file") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise SettingsError(f"{where} holds no prompt (blank lines and # comments are skipped); add one per line")
    if lines[0][1].startswith("{"):
        return [_json_line(where, number, line) for number, line in lines]
    return [PromptLine(line) for _, line in lines]


def _json_line(where: str, number: int, line: str) -> PromptLine:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{where}, line {number}: not valid JSON ({error.msg}); write one object per line") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise SettingsError(f'{where}, line {number}: needs a non-empty "prompt" string, e.g. {{"prompt": "a dog"}}')
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise SettingsError(f'{where}, line {number}: "seed" must be a whole number >= 0, not {seed!r}')
    unknown = set(entry) - {"prompt", "seed"}
    if unknown:
        raise SettingsError(f'{where}, line {number}: unknown key(s) {", ".join(sorted(unknown))}; use "prompt" and "seed"')
    return PromptLine(entry["prompt"], seed)


def expand(lines: list[PromptLine], seed: int, images_per_prompt: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(prompt, seed) of every image of the run, in order; at most settings.MAX_IMAGES, checked
    before any list is built (raises SettingsError)."""
    images = len(lines) * images_per_prompt
    if images > MAX_IMAGES:
        raise SettingsError(
            f"--num-images-per-prompt {images_per_prompt} for {len(lines)} prompt(s) makes {images} images; a run makes "
            f"at most {MAX_IMAGES} (its run.json lists each image's prompt and seed, and every resume checks each "
            "image): give fewer, or split the prompts over several runs")
    prompts, seeds = [], []
    for line in lines:
        for copy in range(images_per_prompt):
            index = len(prompts)
            prompts.append(line.prompt)
            seeds.append(line.seed + copy if line.seed is not None else seed + index)
    return tuple(prompts), tuple(seeds)
