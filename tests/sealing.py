"""Writing run-folder files as flux-sharded's own writer would, sealed with this user's key (seal.py):
a test that puts a value into a run folder which the tool itself could have written (a run.json of
an earlier version, a handoff of other settings) seals it, so that what it tests is the check of that
value, not the seal; the seal's own tests change files without this."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

from flux_sharded.seal import PLACEHOLDER, seal_file


def write_sealed_json(path: Path, data) -> str:
    """`data` (a JSON object) written to `path` with the seal as its first field, sealed."""
    data = {"seal": PLACEHOLDER, **{key: value for key, value in data.items() if key != "seal"}}
    path.write_text(json.dumps(data, indent=2))
    return seal_file(path, path.name)


def edit_sealed_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    write_sealed_json(path, data)


def write_sealed_tensors(path: Path, tensors: dict, metadata: dict | None = None, named_by_json: bool = True) -> None:
    """Tensors written to `path` and sealed; with `named_by_json`, the handoff JSON beside it (if
    any) names the new seal."""
    save_file(tensors, path, metadata={**(metadata or {}), "seal": PLACEHOLDER})
    value = seal_file(path, path.name)
    meta = path.with_suffix(".json")
    if named_by_json and meta.is_file():
        edit_sealed_json(meta, lambda data: data.update(tensors=value))


def edit_sealed_tensors(path: Path, change: Callable[[dict], object]) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        metadata = {key: value for key, value in (file.metadata() or {}).items() if key != "seal"}
    tensors = load_file(path)
    change(tensors)
    write_sealed_tensors(path, tensors, metadata)
