"""Prompts from the command line and from a prompts file, expanded to one entry per image.

A prompts file is either plain text, one prompt per line (blank lines and lines starting with #
skipped), or JSON Lines, one object per line with "prompt" and an optional integer "seed"
(recognised by its first non-blank line starting with "{"). Seeds: image k of the run (its index
over the whole run, in prompt order) uses --seed + k; a line that gives its own seed s uses s for
its first image, s + 1 for its second, and so on (--num-images-per-prompt).

A JSON line may also give its own inputs, each in place of the command line's option for that line:
"image" (a path, or a list of paths for a pipeline that takes several: --image), "mask" (a path:
--mask) and "negative_prompt" (a text: --negative-prompt); null is the same as leaving it out. A
relative path is taken from the prompts file's folder, not the current one, so that a file and the
images beside it run from anywhere. Only their types are checked here: jobs.py reads the images
and makes one run of each set of inputs.

The file is read only if it is a regular file (a link is followed; a FIFO, a device or /dev/zero
would block or never end) of at most MAX_PROMPTS_FILE_BYTES; a UTF-8 byte-order mark (what some
Windows editors write first) is dropped; a JSON line with a key twice or nested deeper than
MAX_JSON_DEPTH is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SettingsError
from .safe_read import NotARegularFile, parse_json, read_regular_file
from .settings import MAX_IMAGES

# A million prompts of 60 characters; any real prompts file is far smaller.
MAX_PROMPTS_FILE_BYTES = 64 * 2**20


# A JSON line's keys: "prompt" and "seed", then the inputs a line may give in place of the command line's.
KEYS = ("prompt", "seed", "image", "mask", "negative_prompt")


@dataclass(frozen=True)
class PromptLine:
    prompt: str
    seed: int | None = None  # None: the run's --seed + the image's index
    # A JSON line's own inputs; None: the command line's (--image, --mask, --negative-prompt)
    images: tuple[Path, ...] | None = None  # absolute
    mask: Path | None = None  # absolute
    negative_prompt: str | None = None
    # Where the line is, for messages: "--prompts-file 'jobs.jsonl', line 3", its number 3; "", None for a --prompt
    where: str = field(default="", compare=False)
    number: int | None = field(default=None, compare=False)

    @property
    def has_inputs(self) -> bool:
        """Whether the line gives an input of its own (image, mask or negative prompt)."""
        return (self.images, self.mask, self.negative_prompt) != (None, None, None)


def read_prompts_file(path: Path) -> list[PromptLine]:
    where = f"--prompts-file '{path}'"
    try:
        data = read_regular_file(path, MAX_PROMPTS_FILE_BYTES)
    except NotARegularFile:
        raise SettingsError(f"{where} is not a regular file (a pipe, a device or a socket); give a text or "
                            "JSON Lines file of prompts") from None
    except ValueError:
        raise SettingsError(f"{where} is larger than {MAX_PROMPTS_FILE_BYTES // 2**20} MiB; split it into several "
                            "runs") from None
    except FileNotFoundError:
        raise SettingsError(f"{where} does not exist (or is a link to nothing); give a text or JSON Lines file of "
                            "prompts") from None
    except IsADirectoryError:
        raise SettingsError(f"{where} is a folder; give a text or JSON Lines file of prompts") from None
    except OSError as error:  # a link loop, no permission
        raise SettingsError(f"{where} cannot be read ({error.strerror or error}); give a readable text file") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, if any, is not part of the first prompt
    except UnicodeDecodeError as error:
        raise SettingsError(f"{where} cannot be read ({error}); give a UTF-8 text file") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise SettingsError(f"{where} holds no prompt (blank lines and # comments are skipped); add one per line")
    if lines[0][1].startswith("{"):
        folder = path.expanduser().absolute().parent
        return [_json_line(where, number, line, folder) for number, line in lines]
    return [PromptLine(line) for _, line in lines]


def _json_line(where: str, number: int, line: str, folder: Path) -> PromptLine:
    try:
        entry = parse_json(line)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{where}, line {number}: not valid JSON ({error.msg}); write one object per line") from None
    except ValueError as error:  # a key twice, or nested past MAX_JSON_DEPTH
        raise SettingsError(f'{where}, line {number}: {error}; write one flat object per line, e.g. '
                            '{"prompt": "a dog"}') from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise SettingsError(f'{where}, line {number}: needs a non-empty "prompt" string, e.g. {{"prompt": "a dog"}}')
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise SettingsError(f'{where}, line {number}: "seed" must be a whole number >= 0, not {seed!r}')
    unknown = set(entry) - set(KEYS)
    if unknown:
        raise SettingsError(f'{where}, line {number}: unknown key(s) {", ".join(sorted(unknown))}; use '
                            + ", ".join(f'"{key}"' for key in KEYS[:-1]) + f' and "{KEYS[-1]}"')
    here = f"{where}, line {number}"
    images, mask, negative = entry.get("image"), entry.get("mask"), entry.get("negative_prompt")
    if images is not None:
        paths = [images] if isinstance(images, str) else images
        if not isinstance(paths, list) or not paths or not all(isinstance(each, str) and each.strip() for each in paths):
            raise SettingsError(f'{here}: "image" must be a path or a list of paths, not {json.dumps(images)}; e.g. '
                                '"image": "photo.png"')
        images = tuple(_path(each, folder) for each in paths)
    if mask is not None:
        if not isinstance(mask, str) or not mask.strip():
            raise SettingsError(f'{here}: "mask" must be the path of a mask image, not {json.dumps(mask)}; e.g. '
                                '"mask": "mask.png"')
        mask = _path(mask, folder)
    if negative is not None and not isinstance(negative, str):
        raise SettingsError(f'{here}: "negative_prompt" must be a text, not {json.dumps(negative)}; e.g. '
                            '"negative_prompt": "blurry"')
    return PromptLine(entry["prompt"], seed, images, mask, negative, where=here, number=number)


def _path(text: str, folder: Path) -> Path:
    """A line's path, absolute: a relative one is taken from the prompts file's `folder`."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


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
