"""Reading what a user or another program left on disk, bounded before it is used.

- `read_regular_file`: the bytes of a regular file (a link is followed) of at most `max_bytes`; a
  FIFO without a writer, a device (/dev/zero) or a socket would block or never end, a huge file
  would fill the memory, so they are refused before a byte is read.
- `parse_json`: JSON with every object's keys given once (json's default keeps the last of two)
  and nesting at most MAX_JSON_DEPTH deep (Python's parser recurses: 200,000 levels raised
  RecursionError).

Each raises ValueError (or OSError from the file system) whose text says what is wrong; callers
name the file and the fix.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

# Every JSON file flux-sharded reads (run.json, configs, handoff metadata, a prompts line) nests a few
# levels; 32 is far above any of them and far below Python's recursion limit.
MAX_JSON_DEPTH = 32
# A checkpoint's model_index.json and config.json files: a few KiB each (a safetensors index: 100 KiB).
MAX_CONFIG_BYTES = 16 * 2**20


class NotARegularFile(OSError):
    """A FIFO, a device or a socket where a file was expected."""


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`. Raises FileNotFoundError (a dangling link too), IsADirectoryError,
    NotARegularFile, OSError (a link loop, no permission) or ValueError (over `max_bytes`)."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(str(path))
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is not a regular file (a pipe, a device or a socket)")
    with open(path, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {_size(max_bytes)}")
    return data


def _size(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size} bytes"


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f'"{key}" is given twice; give each key once')
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    entry = {}
    for key, value in pairs:
        if key in entry:
            raise DuplicateKey(key)
        entry[key] = value
    return entry


def json_depth(text: str) -> int:
    """How deeply `text` nests JSON arrays and objects, brackets inside strings not counted; an
    upper bound for malformed text, which json.loads refuses anyway."""
    depth = deepest = 0
    in_string = escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads, refusing a key given twice in an object and nesting deeper than `max_depth`.
    Raises ValueError (json.JSONDecodeError, DuplicateKey, or too deep)."""
    if json_depth(text) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    return json.loads(text, object_pairs_hook=_refuse_duplicates)
