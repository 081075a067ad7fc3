"""`--lora SOURCE[:SCALE]`: which LoRA files a run applies, found and fingerprinted before anything loads.

SOURCE is a local `.safetensors` file (kept absolute, as --model's folder is) or a Hugging Face hub
id, `user/repo` (its one LoRA file: diffusers' `pytorch_lora_weights.safetensors`, or the only
`.safetensors` file it holds) or `user/repo/path/file.safetensors`, found in the Hugging Face cache
first, downloaded otherwise. SCALE (default 1.0) is the adapter's weight, as diffusers'
`set_adapters(names, weights)` takes it.

A run records each LoRA as one text (`saved_text`): `SOURCE:SCALE sha256:DIGEST`, the SHA-256 of
the file's whole content, so that the run's hash, run.json, the PNGs and --resume all name the
bytes that made the pixels; `find_saved` locates the file again and refuses one that changed.

This module reads files and the hub cache but imports no torch (the command line reads it first);
what the LoRA holds is checked against the model by stages/adapters.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .digests import file_digests
from .errors import CheckpointError, SettingsError

# diffusers' LORA_WEIGHT_NAME_SAFE: the file save_lora_weights writes, which load_lora_weights
# takes from a repository holding several .safetensors files.
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
SAVED_HASH = " sha256:"  # between `SOURCE:SCALE` and the digest in a saved text


@dataclass(frozen=True)
class Lora:
    source: str  # as the run names it: a local file's absolute path, or the hub id as given
    scale: float  # the adapter weight (set_adapters)
    sha256: str  # hex digest of the file's content
    path: Path  # the file read: the local file or its copy in the Hugging Face cache

    @property
    def saved_text(self) -> str:
        """How run.json, the run's hash and the PNGs record it: `SOURCE:SCALE sha256:DIGEST`."""
        return f"{self.source}:{self.scale!r}{SAVED_HASH}{self.sha256}"


@dataclass(frozen=True)
class Adapter:
    """A LoRA as a stage loads it into a component: diffusers' adapter name, file and weight."""

    name: str  # "lora_0", "lora_1", ... in --lora order
    path: Path
    scale: float
    # ((component, ((module, (shape of each adapter tensor there, ...)), ...)), ...): what PEFT adds
    # to each layer it wraps (stages/adapters.check_lora), which the plan counts
    changes: tuple[tuple[str, tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]], ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.changes)


# The bound of a LoRA's scale, ComfyUI's LoraLoader's (strength_model: -100..100): a scale of 1e30
# ran to a black image, with a note that blamed the checkpoint's weights.
MAX_SCALE = 100.0


def split_option(text: str) -> tuple[str, float]:
    """'SOURCE[:SCALE]' -> (SOURCE, SCALE); SCALE defaults to 1.0. A SOURCE that is an existing
    file is taken whole (a file name may hold a colon). Raises SettingsError for a scale that is
    not a number within -MAX_SCALE..MAX_SCALE."""
    text = text.strip()
    if not text:
        raise SettingsError("--lora: empty; give a LoRA file or hub id, e.g. --lora style.safetensors:0.8")
    if Path(text).expanduser().is_file() or ":" not in text:
        return text, 1.0
    source, scale_text = text.rsplit(":", 1)
    try:
        scale = float(scale_text)
    except ValueError:
        raise SettingsError(f"--lora '{text}': the scale '{scale_text}' is not a number; give SOURCE:SCALE, e.g. "
                            f"--lora {source or 'style.safetensors'}:0.8") from None
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise SettingsError(f"--lora '{text}': the scale {scale_text} is outside -{MAX_SCALE:g}..{MAX_SCALE:g} (a "
                            f"LoRA's usual weights lie in 0..1.5; larger ones overflow to NaN, a black image); e.g. "
                            f"--lora {source or 'style.safetensors'}:0.8")
    if not source:
        raise SettingsError(f"--lora '{text}': no file or hub id before the scale; e.g. --lora style.safetensors:0.8")
    return source, scale


def resolve(text: str) -> Lora:
    """An --lora value, found and hashed. Raises SettingsError (a bad value) or CheckpointError (a
    file or hub LoRA that cannot be found), each naming the value and the fix."""
    source, scale = split_option(text)
    path, source = _locate(source)
    return Lora(source, scale, file_digests([path], trust_blob_names=True)[path], path)  # a new run's first look


def parse_saved(text: str) -> tuple[str, float, str]:
    """A saved text (Lora.saved_text) -> (source, scale, sha256); raises SettingsError if malformed."""
    head, found, digest = text.rpartition(SAVED_HASH)
    source, colon, scale_text = head.rpartition(":")
    try:
        scale = float(scale_text)
    except ValueError:
        scale = math.nan
    if not (found and colon and source and math.isfinite(scale) and abs(scale) <= MAX_SCALE and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise SettingsError(f"--lora: '{text}' is not SOURCE:SCALE sha256:DIGEST")
    return source, scale, digest


def canonical_saved(text: str) -> str:
    """A saved text as Lora.saved_text writes it (the schema's check of run.json's entries)."""
    source, scale, digest = parse_saved(text)
    return f"{source}:{scale!r}{SAVED_HASH}{digest}"


def find_saved(text: str, run_dir: Path | None = None) -> Lora:
    """The LoRA a run recorded, found again; raises SettingsError if its file's content changed since
    (a resume must apply the bytes that made the run's images), CheckpointError if it is gone."""
    source, scale, digest = parse_saved(text)
    if run_dir is not None and source.startswith("/") and not Path(source).is_file():
        now = "not a regular file now (a pipe, a device or a folder)" if Path(source).exists() else "gone"
        raise CheckpointError(
            f"--resume: the LoRA file {source}, which the run in {run_dir} applies (run.json 'settings.lora'), is "
            f"{now}; restore it (SHA-256 {digest[:12]}...), or start a new run")
    path, source = _locate(source)
    found = file_digests([path])[path]
    if found != digest and run_dir is None:
        raise SettingsError(f"--lora: the LoRA file {path} changed while the run started; run it again")
    if found != digest:
        raise SettingsError(
            f"--resume: the LoRA file {path} changed since the run in {run_dir} began (SHA-256 {found[:12]}..., "
            f"the run's {digest[:12]}...); its images would mix both: restore that file, or start a new run with it")
    return Lora(source, scale, digest, path)


def _locate(source: str) -> tuple[Path, str]:
    """(the file, the source as the run records it: a local file absolute, a hub id as given)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.absolute(), str(path.absolute())
    if path.is_dir():
        raise SettingsError(f"--lora: '{source}' is a folder; give the LoRA's .safetensors file in it")
    if path.exists():  # neither a file nor a folder: reading it could wait forever (a FIFO)
        raise SettingsError(f"--lora: '{source}' is not a regular file (a pipe, a device or a socket); give the "
                            "LoRA's .safetensors file")
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2 or not all(parts):
        raise SettingsError(f"--lora: '{source}' is neither a file that exists nor a hub id (user/repo or "
                            "user/repo/file.safetensors); check the path")
    repo_id, file_name = "/".join(parts[:2]), "/".join(parts[2:]) or None
    return _hub_file(repo_id, file_name), source


def _hub_file(repo_id: str, file_name: str | None) -> Path:
    """The LoRA file of a hub repository: from the Hugging Face cache, else downloaded."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    what = f"{repo_id}/{file_name}" if file_name else repo_id
    try:
        if file_name is not None:
            try:
                return Path(hf_hub_download(repo_id, file_name, local_files_only=True))
            except Exception:  # not cached (the exception types vary across huggingface_hub versions)
                return Path(hf_hub_download(repo_id, file_name))
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.safetensors"]))
    except Exception as error:
        if constants.is_offline_mode():
            reason = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache; unset HF_HUB_OFFLINE to let "
                      "flux-sharded fetch it")
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            reason = f"the hub could not give it ({first}); check the id and the connection"
        raise CheckpointError(f"--lora: '{what}' is not a local file and {reason}, or give a local .safetensors "
                              "file") from None
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors"))
    if DIFFUSERS_LORA_FILE in files:
        return folder / DIFFUSERS_LORA_FILE
    if len(files) == 1:
        return folder / files[0]
    listed = ", ".join(files[:5]) if files else "none"
    raise SettingsError(f"--lora: the hub repository '{repo_id}' holds {len(files)} .safetensors files ({listed}); "
                        f"name one: --lora {repo_id}/FILE")
