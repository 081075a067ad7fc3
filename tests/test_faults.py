"""Faults and bad inputs, as a hostile or unlucky user meets them: one table, one assertion recipe.

Every case asserts the exit code, exactly one `Error:` line naming the problem, no traceback, the
user's own files (in the output folder and in the run folder) byte for byte untouched, nothing
written before the refusal (a new run leaves no run.json), and, where the error names a way out,
that following it gives the run's images, pixel-identical to an undisturbed run's.

Runs share two session-built folders (a finished run, and the tiny checkpoint) and copy them per
case, so each case costs one CLI call, plus one resume where the case is resumable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from flux_sharded import rundir, seal
from flux_sharded.checkpoint import fingerprint_digest
from flux_sharded.handoff import GenerationSettings
from flux_sharded.stages import decode, denoise

from .conftest import assert_same_pixels, error_line, invoke
from .sealing import edit_sealed_json, edit_sealed_tensors, write_sealed_tensors

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]
PROMPTS = ("a dog", "a cat")
# The user's own files, beside and inside the run's folders: no case may touch them. Their names
# start like the tool's own (the run folder's used to be cleared by pattern).
USER_FILES = {"out": ("notes.txt", "0000-mine.png"), "run": ("encode-notes.json", "denoise.txt", "run.json.bak")}


def prompt_args():
    return [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]


@pytest.fixture(scope="session")
def finished_run(tiny_checkpoint, tmp_path_factory) -> Path:
    """An output folder after a whole run of PROMPTS (its images, run folder and both checkpoints)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), *prompt_args()])
    assert result.exit_code == 0, result.output
    return out


@dataclass
class Workspace:
    checkpoint: Path  # a copy, free to damage
    out: Path
    run_dir: Path
    reference: list[Path]  # the undisturbed run's images
    user_files: dict[Path, bytes] = field(default_factory=dict)

    def resume(self):
        return invoke(["--resume", str(self.run_dir)])

    def new_run(self, *extra):
        return invoke(["--model", str(self.checkpoint), *COMMON, "--out", str(self.out), *prompt_args(), *extra])


@pytest.fixture
def workspace(tiny_checkpoint, finished_run, tmp_path) -> Workspace:
    """The finished run copied, its images removed (a run stopped before decode), run.json pointing
    at the copies; a copy of the checkpoint; the user's files beside and inside."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    for image in out.glob("*.png"):
        image.rename(reference_dir / image.name)
    (run_dir,) = (out / ".flux-sharded").iterdir()
    edit_sealed_json(run_dir / "run.json", lambda data: data.update(out_dir=str(out)))
    for handoff in run_dir.glob("*.json"):  # each checkpoint names its model: point them at the copy
        if handoff.name != "run.json":
            edit_sealed_json(handoff, lambda data: data["settings"].update(model=str(checkpoint)))
    edit_sealed_json(run_dir / "run.json", lambda data: data["settings"].update(model=str(checkpoint)))
    # A run made with the copy: its default folder is named by its settings (rundir.default_run_dir).
    run_dir = run_dir.rename(rundir.default_run_dir(out, rundir.read_run(run_dir).settings))
    space = Workspace(checkpoint, out, run_dir, sorted(reference_dir.glob("*.png")))
    for where, names in USER_FILES.items():
        for name in names:
            path = (out if where == "out" else run_dir) / name
            path.write_bytes(f"the user's own {name}".encode())
            space.user_files[path] = path.read_bytes()
    return space


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- how each case damages things


def run_json(change):
    """run.json changed and sealed again: a value the tool's own writer could have put there."""
    return lambda space: edit_sealed_json(space.run_dir / "run.json", change)


def setting(name, value):
    return run_json(lambda data: data["settings"].__setitem__(name, value))


def dropped_setting(name):
    return run_json(lambda data: data["settings"].pop(name))


def top(name, value):
    return run_json(lambda data: data.__setitem__(name, value))


def write_file(relative: str, content: bytes):
    def damage(space):
        (space.run_dir / relative).write_bytes(content)
    return damage


def fifo(relative: str):
    """`relative` replaced by a FIFO without a writer: opening it would block forever."""
    def damage(space):
        (space.run_dir / relative).unlink()
        os.mkfifo(space.run_dir / relative)
    return damage


def truncated(relative: str, keep: float = 0.5):
    def damage(space):
        path = space.run_dir / relative
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return damage


def tensors(stage: str, change: Callable[[dict], object]):
    """The stage's tensors changed, sealed again, and named by its JSON (sealed again)."""
    return lambda space: edit_sealed_tensors(space.run_dir / f"{stage}.safetensors", change)


def handoff_json(stage: str, change: Callable[[dict], object]):
    """The stage's JSON changed and sealed again."""
    return lambda space: edit_sealed_json(space.run_dir / f"{stage}.json", change)


def unsealed_tensors(stage: str, change: Callable[[dict], object]):
    """The stage's tensors changed by hand, keeping their seal's field: no seal of ours matches."""
    def damage(space):
        path = space.run_dir / f"{stage}.safetensors"
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
        loaded = load_file(path)
        change(loaded)
        save_file(loaded, path, metadata=metadata)
    return damage


def only_encode(damage=None):
    """The run stopped after encode (denoise's checkpoint gone), then `damage`."""
    def setup(space):
        for suffix in (".safetensors", ".json"):
            (space.run_dir / f"denoise{suffix}").unlink()
        if damage:
            damage(space)
    return setup


def config(component: str, change: Callable[[dict], object], file: str = "config.json"):
    def damage(space):
        edit_json(space.checkpoint / component / file, change)
    return damage


def model_file(relative: str, content: bytes | None):
    def damage(space):
        path = space.checkpoint / relative
        path.unlink()
        if content is not None:
            path.write_bytes(content)
    return damage


def edit_tensors(path: Path, change: Callable[[dict], object]) -> None:
    loaded = load_file(path)
    change(loaded)
    save_file(loaded, path, metadata={"format": "pt"})


def weight_tensors(relative: str, change: Callable[[dict], object]):
    """The checkpoint's weight file `relative` with its tensors changed by `change`."""
    return lambda space: edit_tensors(space.checkpoint / relative, change)


def weights_file(component: str, header, data_bytes: int = 0):
    """The component's weights replaced by a safetensors file of this header and `data_bytes` zeros."""
    def damage(space):
        encoded = json.dumps(header).encode()
        (space.checkpoint / component / "diffusion_pytorch_model.safetensors").write_bytes(
            len(encoded).to_bytes(8, "little") + encoded + bytes(data_bytes))
    return damage


def symlink(relative: str, target: Path):
    def damage(space):
        path = space.checkpoint / relative
        path.unlink()
        path.symlink_to(target)
    return damage


def symlink_to_nowhere(relative: str):
    def damage(space):
        path = space.checkpoint / relative
        path.unlink()
        path.symlink_to(space.checkpoint / "nowhere.json")
    return damage


def replaced_model_weights(space):
    """The checkpoint rebuilt with other random weights of the same shapes."""
    path = space.checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    loaded = load_file(path)
    save_file({name: tensor + 1 for name, tensor in loaded.items()}, path, metadata={"format": "pt"})


def unsealed_json(relative: str, change: Callable[[dict], object]):
    """A JSON file of the run folder edited by hand: its seal's field kept, no longer matching."""
    return lambda space: edit_json(space.run_dir / relative, change)


def run_weights(space) -> str:
    """The digest of the weights the workspace's run used, as its handoffs record it."""
    return fingerprint_digest(rundir.read_run(space.run_dir).weights)


def kept_batch(change: Callable[[torch.Tensor], torch.Tensor], sealed: bool = True, weights: str | None = None):
    """A run stopped inside denoise: its first batch's latents (image 0) kept as denoise keeps them
    (rundir.save_batch_latents), changed by `change`, and no denoise handoff. Sealed by the tool's
    writer, or (sealed=False) changed by hand afterwards."""
    def damage(space):
        latents = load_file(space.run_dir / "denoise.safetensors")["latents"][:1]
        only_encode()(space)
        settings = rundir.read_run(space.run_dir).settings.subset([0])
        path = space.run_dir / BATCH
        rundir.save_batch_latents(path, change(latents) if sealed else latents, settings, weights or run_weights(space))
        if not sealed:
            with safe_open(path, "pt") as file:
                metadata = file.metadata()
            save_file({"latents": change(latents).contiguous()}, path, metadata=metadata)
    return damage


def flipped_in_the_middle(relative: str):
    """One byte in the middle of a model file flipped in place, its size and mtime put back."""
    def damage(space):
        path = space.checkpoint / relative
        stat = path.stat()
        with open(path, "r+b") as file:
            file.seek(stat.st_size // 2)
            byte = file.read(1)[0]
            file.seek(stat.st_size // 2)
            file.write(bytes([byte ^ 1]))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return damage


def delete(*names):
    def fix(space):
        for name in names:
            (space.run_dir / name).unlink()
    return fix


DENOISE_FILES = ("denoise.safetensors", "denoise.json")
ENCODE_FILES = ("encode.safetensors", "encode.json")
RUN_JSON = "--resume '{run_dir}': run.json field "
BATCH = "denoise-batch-from-image-0.safetensors"  # denoise's first batch, kept until its handoff is written


@dataclass(frozen=True)
class Case:
    damage: Callable[[Workspace], object]
    message: str  # in the one Error line; {run_dir} and {checkpoint} are filled in
    new_run: bool = False  # a new run (refused before run.json), else a --resume of the workspace
    exit_code: int = 2
    fix: Callable[[Workspace], object] | None = None  # the way out the message names, then resume
    extra: tuple[str, ...] = ()


CASES = {
    # run.json: each field of the wrong type, out of range, or missing
    "steps-a-string": Case(setting("steps", "2"), RUN_JSON + "'settings.steps' is \"2\", not a whole number"),
    "steps-zero": Case(setting("steps", 0), RUN_JSON + "'settings.steps' is 0, outside 1..100000"),
    "steps-missing": Case(dropped_setting("steps"), RUN_JSON + "'settings.steps' is missing"),
    "prompts-not-a-list": Case(setting("prompts", "a dog"), RUN_JSON + "'settings.prompts' is \"a dog\", not a list"),
    "prompt-empty": Case(setting("prompts", ["a dog", " "]), "'settings.prompts' is [\"a dog\", \" \"], not a list"),
    "seeds-too-few": Case(setting("seeds", [0]),
                          RUN_JSON + "'settings.seeds' has 1 entry for 2 prompts (one per image)"),
    "seeds-too-many": Case(setting("seeds", [0, 1, 2]),
                           RUN_JSON + "'settings.seeds' has 3 entries for 2 prompts (one per image)"),
    "seed-out-of-range": Case(setting("seeds", [0, 2**70]), RUN_JSON + "'settings.seeds' is [0, 1180591620717411303424]"),
    "guidance-negative": Case(setting("guidance", -1), RUN_JSON + "'settings.guidance' is -1, not a finite number >= 0"),
    "guidance-a-string": Case(setting("guidance", "nan"), RUN_JSON + "'settings.guidance' is \"nan\""),
    "height-a-float": Case(setting("height", 32.0), RUN_JSON + "'settings.height' is 32.0, not a whole number"),
    "width-missing": Case(dropped_setting("width"), RUN_JSON + "'settings.width' is missing"),
    "dtype-unknown": Case(setting("dtype", "float64"), RUN_JSON + "'settings.dtype' is \"float64\", not one of"),
    "max-sequence-length-too-long": Case(setting("max_sequence_length", 9000),
                                         RUN_JSON + "'settings.max_sequence_length' is 9000, outside 1..8192"),
    "batch-size-zero": Case(setting("batch_size", 0), RUN_JSON + "'settings.batch_size' is 0, outside 1..1048576"),
    "indices-wrong-length": Case(setting("indices", [0]),
                                 RUN_JSON + "'settings.indices' has 1 entry for 2 prompts (one per image)"),
    "settings-unknown-field": Case(setting("sampler", "euler"), RUN_JSON + "'settings.sampler' is not a setting"),
    "model-not-text": Case(setting("model", 7), RUN_JSON + "'settings.model' is 7, not a text"),
    # run.json naming another model: refused before any plan (a budget refusal would mislead) or fetch
    "model-a-hub-id": Case(setting("model", "black-forest-labs/FLUX.1-schnell"),
                           "--resume: run.json 'settings.model' is 'black-forest-labs/FLUX.1-schnell', but the run in "
                           "{run_dir} used a local folder (run.json 'weights'); the file was edited"),
    "model-another-folder": Case(lambda space: (shutil.copytree(space.checkpoint, space.out / "other"),
                                                setting("model", str(space.out / "other"))(space),
                                                (space.out / "other" / "vae" / "config.json").write_text(
                                                    (space.checkpoint / "vae" / "config.json").read_text() + " ")),
                                 "--resume: the vae files of the model '{out}/other' differ from those the run in "
                                 "{run_dir} used"),
    "model-relative": Case(setting("model", "./tiny-checkpoint"),
                           "--resume: run.json 'settings.model' is './tiny-checkpoint', neither a folder that exists "
                           "from "),
    "format-other": Case(top("format", 2), RUN_JSON + "'format' is 2, outside 1..1"),
    "resumed-processes-not-a-list": Case(top("resumed_processes", 2),
                                         RUN_JSON + "'resumed_processes' is 2, not a list of process counts"),
    "resumed-processes-zero": Case(top("resumed_processes", [0]), RUN_JSON + "'resumed_processes' is [0], not a list"),
    "processes-a-string": Case(top("processes", "1"), RUN_JSON + "'processes' is \"1\", not a whole number"),
    "max-memory-bad-key": Case(top("max_memory", {"gpu0": 10}), RUN_JSON + "'max_memory' has 'gpu0': 10"),
    # str.isdigit accepts a superscript two, int() does not: a traceback before
    "max-memory-superscript-key": Case(top("max_memory", {"²": 10}), RUN_JSON + "'max_memory' has '²': 10"),
    "max-memory-empty": Case(top("max_memory", {}), RUN_JSON + "'max_memory' is empty"),
    "max-memory-absurd": Case(top("max_memory", {"cpu": 10**20}), RUN_JSON + "'max_memory' has 'cpu': "
                              "100000000000000000000; keys are GPU indices, cpu or disk, sizes 1..1000000000000000"),
    "out-dir-relative": Case(top("out_dir", "out"), RUN_JSON + "'out_dir' is 'out', not an absolute path"),
    "out-dir-gone": Case(top("out_dir", "/nonexistent/flux-sharded-out"),
                         "the run's image folder /nonexistent/flux-sharded-out (run.json 'out_dir') does not exist"),
    "out-dir-a-file": Case(lambda space: ((space.out.parent / "a-file").write_text("mine"),
                                          top("out_dir", str(space.out.parent / "a-file"))(space)),
                           "(run.json 'out_dir') is a file, not a folder"),
    "run-json-a-list": Case(write_file("run.json", b"[]"), "--resume '{run_dir}': run.json carries no seal of "
                            "flux-sharded's"),
    "run-json-truncated": Case(truncated("run.json"), "run.json cannot be read"),
    # json keeps the last of two keys; 200,000 levels of nesting raised RecursionError; a FIFO hung
    "run-json-key-twice": Case(write_file("run.json", b'{"format": 1, "format": 1}'),
                               "run.json cannot be read (\"format\" is given twice; give each key once)"),
    "run-json-nested": Case(write_file("run.json", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                            "run.json cannot be read (nested more than 32 levels deep)"),
    "run-json-a-fifo": Case(fifo("run.json"), "run.json cannot be read"),
    "weights-changed": Case(replaced_model_weights, "--resume: the transformer files of the model '{checkpoint}' differ "
                            "from those the run in {run_dir} used"),
    # one byte in the middle of a weight file, its size and mtime kept (the fingerprint hashed the
    # first and last 64 KiB of each file: a tensor changed in the middle was not noticed)
    **{f"{component}-weights-one-byte-in-the-middle": Case(
        flipped_in_the_middle(f"{component}/{file}"),
        f"--resume: the {component} files of the model '{{checkpoint}}' differ from those the run in {{run_dir}} used")
       for component, file in (("transformer", "diffusion_pytorch_model.safetensors"),
                               ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors"))},
    # the stage checkpoints: truncated, swapped, wrong shape or dtype, extra or missing tensors
    "denoise-truncated": Case(truncated("denoise.safetensors"), "--resume: {run_dir}/denoise.safetensors does not "
                              "match its seal", fix=delete(*DENOISE_FILES)),
    "denoise-garbage": Case(write_file("denoise.safetensors", b"\xff" * 64), "denoise.safetensors carries no seal",
                            fix=delete(*DENOISE_FILES)),
    # the seal covers the file's name: encode's tensors cannot stand in for denoise's
    "denoise-is-encode": Case(lambda space: shutil.copy(space.run_dir / "encode.safetensors",
                                                        space.run_dir / "denoise.safetensors"),
                              "denoise.safetensors does not match its seal: it was changed after flux-sharded wrote "
                              "it, or it was sealed with another key than this user's",
                              fix=delete(*DENOISE_FILES)),
    "denoise-is-encode-sealed": Case(lambda space: write_sealed_tensors(
        space.run_dir / "denoise.safetensors", load_file(space.run_dir / "encode.safetensors")),
        "denoise.safetensors lacks latents; delete denoise.safetensors and denoise.json in {run_dir} to redo denoise "
        "from encode", fix=delete(*DENOISE_FILES)),
    "latents-wrong-shape": Case(tensors("denoise", lambda t: t.update(latents=t["latents"][:, :2].contiguous())),
                                "latents has shape (2, 2, 16), not (2, 4, 16)", fix=delete(*DENOISE_FILES)),
    "latents-wrong-dtype": Case(tensors("denoise", lambda t: t.update(latents=t["latents"].half())),
                                "latents is float16, not the run's float32", fix=delete(*DENOISE_FILES)),
    "latents-missing": Case(tensors("denoise", lambda t: t.pop("latents")), "denoise.safetensors lacks latents",
                            fix=delete(*DENOISE_FILES)),
    "denoise-extra-tensor": Case(tensors("denoise", lambda t: t.update(noise=torch.zeros(1))),
                                 "denoise.safetensors holds unexpected noise", fix=delete(*DENOISE_FILES)),
    "denoise-json-garbage": Case(write_file("denoise.json", b"{"), "denoise.json cannot be read",
                                 fix=delete(*DENOISE_FILES)),
    "denoise-safetensors-missing": Case(delete("denoise.safetensors"), "denoise.safetensors is missing or not a file",
                                        fix=delete("denoise.json")),
    "denoise-json-other-seed": Case(handoff_json("denoise", lambda data: data["settings"].update(seeds=[5, 6])),
                                    "denoise.json belongs to other settings", fix=delete(*DENOISE_FILES)),
    "denoise-json-indices-out-of-range": Case(handoff_json("denoise", lambda data: data["settings"].update(indices=[0, 7])),
                                              "denoise.json field 'settings.indices' names images outside 0..1",
                                              fix=delete(*DENOISE_FILES)),
    "denoise-json-stages": Case(handoff_json("denoise", lambda data: data.update(finished_stages=["denoise"])),
                                "field 'finished_stages' is ['denoise'], not ['encode', 'denoise']",
                                fix=delete(*DENOISE_FILES)),
    "prompt-embeds-cut-to-10-tokens": Case(
        only_encode(tensors("encode", lambda t: t.update(prompt_embeds=t["prompt_embeds"][:, :10].contiguous()))),
        "prompt_embeds has shape (2, 10, 32), not (2, 512, 32)", fix=delete(*ENCODE_FILES)),
    "pooled-wrong-dtype": Case(only_encode(tensors("encode", lambda t: t.update(
        pooled_prompt_embeds=t["pooled_prompt_embeds"].bfloat16()))), "pooled_prompt_embeds is bfloat16",
        fix=delete(*ENCODE_FILES)),
    "encode-truncated": Case(only_encode(truncated("encode.safetensors", 0.9)),
                             "encode.safetensors does not match its seal", fix=delete(*ENCODE_FILES)),
    "kept-batch-garbage": Case(only_encode(write_file(BATCH, b"\xff" * 64)), f"{BATCH} carries no seal",
                               fix=delete(BATCH)),
    "kept-batch-of-other-settings": Case(only_encode(lambda space: rundir.save_batch_latents(
        space.run_dir / BATCH, torch.zeros(1, 4, 16), GenerationSettings("x", ("a",), (0,), 1, 3.5, 32, 32, 512,
                                                                         "float32"), run_weights(space))),
        f"{BATCH} belongs to other settings than this batch's; delete {BATCH}", fix=delete(BATCH)),
    # every file a resume reads is sealed with this user's key (seal.py): changed without it, refused
    "run-json-steps-edited": Case(unsealed_json("run.json", lambda data: data["settings"].update(steps=2)),
                                  "--resume '{run_dir}': run.json does not match its seal"),
    "run-json-weights-null": Case(unsealed_json("run.json", lambda data: data.update(weights=None)),
                                  "--resume '{run_dir}': run.json does not match its seal"),
    # ... and one the tool's own writer could make (an earlier version's) is refused for what it says
    "run-json-weights-null-sealed": Case(top("weights", None), "recorded no weights (run.json 'weights' is null)"),
    "encode-of-another-run": Case(only_encode(lambda space: write_sealed_tensors(
        space.run_dir / "encode.safetensors", {name: tensor.flip(0).contiguous() for name, tensor in
                                               load_file(space.run_dir / "encode.safetensors").items()},
        named_by_json=False)), "encode.safetensors is not the tensors file encode.json was written with (another "
        "run's, or one written since)", fix=delete(*ENCODE_FILES)),
    "latents-halved": Case(unsealed_tensors("denoise", lambda t: t.update(latents=t["latents"] * 0.5)),
                           "{run_dir}/denoise.safetensors does not match its seal", fix=delete(*DENOISE_FILES)),
    "latents-nan": Case(unsealed_tensors("denoise", lambda t: t["latents"].fill_(float("nan"))),
                        "{run_dir}/denoise.safetensors does not match its seal", fix=delete(*DENOISE_FILES)),
    "denoise-json-other-weights": Case(handoff_json("denoise", lambda data: data.update(weights="0" * 16)),
                                       "denoise.json field 'weights' is not the digest of the weights the run used",
                                       fix=delete(*DENOISE_FILES)),
    "kept-batch-halved": Case(kept_batch(lambda latents: latents * 0.5, sealed=False),
                              f"{BATCH} does not match its seal", fix=delete(BATCH)),
    "kept-batch-of-other-weights": Case(kept_batch(lambda latents: latents, weights="0" * 16),
                                        f"{BATCH} was made with other weights than the run's", fix=delete(BATCH)),
    # broken checkpoint folders: refused before run.json is written
    "model-index-a-list": Case(lambda space: (space.checkpoint / "model_index.json").write_text("[]"),
                               "--model: '{checkpoint}': model_index.json holds a list, not a JSON object",
                               new_run=True),
    "transformer-100000-layers": Case(config("transformer", lambda c: c.update(num_layers=100000)),
                                      "transformer/config.json field 'num_layers' is 100000, outside 0..256",
                                      new_run=True),
    "vae-without-block-out-channels": Case(config("vae", lambda c: c.pop("block_out_channels")),
                                           "vae/config.json field 'block_out_channels' is missing", new_run=True),
    "transformer-in-channels-text": Case(config("transformer", lambda c: c.update(in_channels="64")),
                                         "'in_channels' is \"64\", not a whole number", new_run=True),
    "t5-width-mismatch": Case(config("text_encoder_2", lambda c: c.update(d_model=64)),
                              "text_encoder_2/config.json field 'd_model' is 64, but the transformer's "
                              "joint_attention_dim is 32", new_run=True),
    "vae-config-not-json": Case(model_file("vae/config.json", b"{oops"), "cannot read vae/config.json", new_run=True),
    "transformer-config-dangling-symlink": Case(symlink_to_nowhere("transformer/config.json"),
                                                "not a FLUX.1 diffusers checkpoint (missing transformer)",
                                                new_run=True),
    # within validate's bounds, yet 3.5 trillion parameters: the meta-device build allocated each
    # layer's weight on the CPU first (103 GB for 256+256 layers), now it allocates nothing and is refused
    "transformer-of-trillions-of-parameters": Case(config("transformer", lambda c: c.update(
        num_layers=16, num_single_layers=16, num_attention_heads=512, attention_head_dim=128,
        axes_dims_rope=[16, 56, 56])), "transformer/config.json describes a transformer of 3,526 billion parameters, over 200 billion", new_run=True,
        extra=("--dry-run",)),
    # JSON read as safe_read reads: 200,000 levels raised RecursionError; a key given twice took the last
    "model-index-nested": Case(model_file("model_index.json", b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
                               "model_index.json (nested more than 32 levels deep)", new_run=True),
    "transformer-config-key-twice": Case(model_file("transformer/config.json", b'{"num_layers": 1, "num_layers": 9}'),
                                         "cannot read transformer/config.json (\"num_layers\" is given twice",
                                         new_run=True),
    # decode divides the latents by it: 0 gave black images
    "vae-scaling-factor-zero": Case(config("vae", lambda c: c.update(scaling_factor=0)),
                                    "vae/config.json field 'scaling_factor' is 0, not a positive number", new_run=True),
    "vae-scaling-factor-nan": Case(config("vae", lambda c: c.update(scaling_factor=float("nan"))),
                                   "vae/config.json field 'scaling_factor' is NaN, not a finite number", new_run=True),
    # a broken scheduler config failed inside denoise, after run.json
    "scheduler-shift-a-string": Case(config("scheduler", lambda c: c.update(shift="3"), "scheduler_config.json"),
                                     "scheduler/scheduler_config.json field 'shift' is \"3\", not a finite number",
                                     new_run=True),
    "scheduler-seq-lens-equal": Case(config("scheduler", lambda c: c.update(base_image_seq_len=4096,
                                                                    max_image_seq_len=4096), "scheduler_config.json"),
                                     "scheduler/scheduler_config.json field 'max_image_seq_len' is 4096, not above "
                                     "base_image_seq_len 4096", new_run=True),
    "scheduler-shift-zero": Case(config("scheduler", lambda c: c.update(shift=0.0, use_dynamic_shifting=False),
                                        "scheduler_config.json"),
                                 "scheduler/scheduler_config.json field 'shift' is 0, not a positive number",
                                 new_run=True),
    "scheduler-karras-and-beta-sigmas": Case(config("scheduler", lambda c: c.update(use_karras_sigmas=True,
                                                                            use_beta_sigmas=True),
                                                    "scheduler_config.json"),
                                             "scheduler/scheduler_config.json field 'use_beta_sigmas' is true, and so "
                                             "is use_karras_sigmas: the scheduler takes one kind of sigmas at most",
                                             new_run=True),
    "scheduler-another-class": Case(config("scheduler", lambda c: c.update(_class_name="DDIMScheduler"),
                                           "scheduler_config.json"),
                                    "field '_class_name' is \"DDIMScheduler\", not one of "
                                    "FlowMatchEulerDiscreteScheduler", new_run=True),
    # a component of another model (a klein folder holding FLUX.2-dev's Mistral encoder built a Qwen3
    # from a Mistral3 config, inside encode)
    "t5-of-another-architecture": Case(config("text_encoder_2", lambda c: c.update(architectures=["UMT5EncoderModel"])),
                                       "text_encoder_2/config.json field 'architectures' is \"UMT5EncoderModel\": the "
                                       "folder holds another model's text_encoder_2, not the T5EncoderModel FLUX.1 "
                                       "needs", new_run=True),
    "model-index-another-t5": Case(lambda space: edit_json(space.checkpoint / "model_index.json", lambda index: index.update(
        text_encoder_2=["transformers", "UMT5EncoderModel"])), "model_index.json field 'text_encoder_2' is "
        "[\"transformers\", \"UMT5EncoderModel\"], but FLUX.1's pipeline (FluxPipeline) loads a T5EncoderModel there",
        new_run=True),
    # weight files whose header safetensors refuses, or that are links to nothing (a Hugging Face
    # cache without its blob) or to themselves; checked once the run folder is: --overwrite
    "transformer-weights-header-a-list": Case(weights_file("transformer", [1, 2]),
                                              "diffusion_pytorch_model.safetensors is truncated or corrupt (its header "
                                              "is a JSON list, not an object)", new_run=True, extra=("--overwrite",)),
    "transformer-weights-header-a-string": Case(weights_file("transformer", "weights"),
                                                "is truncated or corrupt (its header is a JSON str, not an object)",
                                                new_run=True, extra=("--overwrite",)),
    "transformer-weights-dtype-f99": Case(weights_file("transformer", {"w": {"dtype": "F99", "shape": [2],
                                                                             "data_offsets": [0, 8]}}, 8),
                                          "unknown variant `F99`", new_run=True, extra=("--overwrite",)),
    "transformer-weights-overlapping-offsets": Case(weights_file("transformer", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
        "invalid offset for tensor", new_run=True, extra=("--overwrite",)),
    "vae-weights-dangling-link": Case(lambda space: symlink("vae/diffusion_pytorch_model.safetensors",
                                                            space.checkpoint / "blobs" / ("0" * 64))(space),
                                      "vae/diffusion_pytorch_model.safetensors cannot be opened (No such file or "
                                      "directory: a link to a file that is not there, or a link loop)",
                                      new_run=True, extra=("--overwrite",)),
    "vae-weights-link-loop": Case(lambda space: symlink("vae/diffusion_pytorch_model.safetensors",
                                                        space.checkpoint / "vae" / "diffusion_pytorch_model.safetensors")(
        space), "diffusion_pytorch_model.safetensors cannot be opened (Too many levels of symbolic links",
        new_run=True, extra=("--overwrite",)),
    # weights of another shape than the config makes, and a quantization_config the weights were not saved
    # with: both failed inside a stage after run.json (with diffusers' advice to pass ignore_mismatched_sizes)
    "transformer-weights-of-another-shape": Case(
        weight_tensors("transformer/diffusion_pytorch_model.safetensors",
                       lambda t: t.update({"proj_out.bias": torch.zeros(8)})),
        "transformer/diffusion_pytorch_model.safetensors holds proj_out.bias of shape (8,), but transformer/config.json "
        "makes it (16,): the weights belong to another model than the config", new_run=True, extra=("--overwrite",)),
    # a tensor missing from the weights, or a config of fewer blocks than the weights: a text encoder
    # ran to exit 0 with that tensor at transformers' random initialization, a transformer with the
    # blocks the config left out dropped; a missing transformer tensor failed inside denoise
    "t5-tensor-missing": Case(
        weight_tensors("text_encoder_2/model.safetensors",
                       lambda t: t.pop("encoder.block.0.layer.1.DenseReluDense.wo.weight")),
        "--model: '{checkpoint}': text_encoder_2's weight files lack encoder.block.0.layer.1.DenseReluDense.wo.weight, "
        "which its config.json builds: the download is incomplete", new_run=True, extra=("--overwrite",)),
    "transformer-tensor-missing": Case(
        weight_tensors("transformer/diffusion_pytorch_model.safetensors",
                       lambda t: [t.pop(name) for name in list(t) if name.startswith("norm_out.")]),
        "transformer's weight files lack norm_out.linear.bias, norm_out.linear.weight, which its config.json builds",
        new_run=True, extra=("--overwrite",)),
    "transformer-config-of-fewer-blocks": Case(
        config("transformer", lambda c: c.update(num_single_layers=c["num_single_layers"] - 1)),
        "transformer's weight files hold single_transformer_blocks.", new_run=True, extra=("--overwrite",)),
    "clip-extra-tensor": Case(
        weight_tensors("text_encoder/model.safetensors",
                       lambda t: t.update({"text_model.encoder.layers.99.mlp.fc1.bias": torch.zeros(4)})),
        "text_encoder's weight files hold text_model.encoder.layers.99.mlp.fc1.bias, which its config.json does not "
        "build: the config describes a smaller model than the weights", new_run=True, extra=("--overwrite",)),
    "t5-quantization-config-without-its-state": Case(
        config("text_encoder_2", lambda c: c.update(quantization_config={"quant_method": "bitsandbytes",
                                                                          "load_in_4bit": True})),
        "text_encoder_2/config.json has a bitsandbytes quantization_config (nf4), but its weight files hold no "
        "bitsandbytes quantization state", new_run=True, extra=("--overwrite",)),
    # The tokenizers are checked once the run folder is, which the copy's own run holds: --overwrite starts it again.
    "t5-tokenizer-deleted": Case(model_file("tokenizer_2/tokenizer.json", None),
                                 "tokenizer_2 lacks tokenizer.json or spiece.model", new_run=True, extra=("--overwrite",)),
    "clip-tokenizer-garbage": Case(model_file("tokenizer/tokenizer.json", b"{not json"),
                                   "tokenizer cannot be loaded", new_run=True, extra=("--overwrite",)),
    # bad inputs
    # safetensors takes UTF-8 file names only: every handoff under such a folder was unreadable
    "out-not-utf8": Case(lambda space: None, "--out: b'", new_run=True, extra=("--out", "{out}/caf\udce9")),
    "prompt-not-utf8": Case(lambda space: None, "--prompt: prompt 2 (b'caf?"
                            , new_run=True, extra=("--prompt", "caf\udce9")),
    "report-is-an-image": Case(lambda space: None, "is one of this run's images", new_run=True,
                               extra=("--overwrite", "--report", "{out}/0001-1-a-cat.png")),
    "report-is-the-out-folder": Case(lambda space: None, "is the run's --out folder; give a file", new_run=True,
                                     extra=("--out", "{out}/fresh", "--report", "{out}/fresh")),
    "report-in-run-folder": Case(lambda space: None, "is inside the run folder", new_run=True,
                                 extra=("--overwrite", "--run-dir", "{out}/run", "--report", "{out}/run/report.json")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault(workspace, name):
    case = CASES[name]
    case.damage(workspace)
    fill = lambda text: text.format(run_dir=workspace.run_dir, checkpoint=workspace.checkpoint,  # noqa: E731
                                    out=workspace.out)
    before = run_folder_files(workspace)
    result = workspace.new_run(*map(fill, case.extra)) if case.new_run else workspace.resume()
    assert result.exit_code == case.exit_code, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert fill(case.message) in line
    assert not list(workspace.out.glob("0*-a-*.png")), "an image was written"
    assert run_folder_files(workspace) == before, "the refusal changed the run folder"
    assert list(workspace.out.rglob("run.json")) == [workspace.run_dir / "run.json"], "a new run was started"
    assert_user_files_untouched(workspace)
    if case.fix is not None:
        case.fix(workspace)
        resumed = workspace.resume()
        assert resumed.exit_code == 0, resumed.output
        assert_reference_images(workspace)


# Each kind of file a resume reads; the handoff a resume starts from is the latest one, so encode's
# files and a kept batch are read only once denoise's handoff is gone (a run stopped before it).
READ_ON_RESUME = {"run.json": None, "denoise.json": None, "denoise.safetensors": None,
                  "encode.json": only_encode(), "encode.safetensors": only_encode(),
                  BATCH: kept_batch(lambda latents: latents)}


@pytest.mark.parametrize("name", list(READ_ON_RESUME))
def test_a_resume_refuses_any_file_of_its_run_folder_with_one_byte_changed(workspace, name):
    """The first, a middle and the last byte of each kind of file, each flipped alone: refused with
    one line naming the file, nothing written; the file as the tool wrote it resumes to the
    undisturbed run's pixels."""
    if READ_ON_RESUME[name] is not None:
        READ_ON_RESUME[name](workspace)
    path = workspace.run_dir / name
    written = path.read_bytes()
    for position in (0, len(written) // 2, len(written) - 1):
        path.write_bytes(written[:position] + bytes([written[position] ^ 1]) + written[position + 1:])
        before = run_folder_files(workspace)
        result = workspace.resume()
        assert result.exit_code == 2, (position, result.output)
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert name in line and "Traceback" not in result.output
        assert not list(workspace.out.glob("0*-a-*.png")) and run_folder_files(workspace) == before
    path.write_bytes(written)
    resumed = workspace.resume()
    assert resumed.exit_code == 0, resumed.output
    assert_reference_images(workspace)
    assert_user_files_untouched(workspace)


def test_a_run_folder_sealed_with_another_users_key_is_refused(workspace, tmp_path, monkeypatch):
    """A run folder copied from someone else, every file intact: their key is not this user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-user"))
    key = tmp_path / "another-user" / "flux-sharded" / "run-folder-key"
    key.parent.mkdir(parents=True)
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    result = workspace.resume()
    assert result.exit_code == 2
    assert error_line(result) == (f"Error: --resume '{workspace.run_dir}': run.json does not match its seal: it was "
                                  "changed after flux-sharded wrote it, or it was sealed with another key than this "
                                  f"user's ({tmp_path}/another-user/flux-sharded/run-folder-key); a run is resumed "
                                  "only from the files flux-sharded wrote: restore the file, or start a new run")
    assert not list(workspace.out.glob("0*-a-*.png"))


def run_folder_files(space: Workspace) -> dict[str, bytes | str]:
    # a FIFO (a damage case) is named, not read: opening it would wait for a writer forever
    return {path.name: path.read_bytes() if path.is_file() else "not a regular file" for path in space.run_dir.iterdir()}


def assert_user_files_untouched(space: Workspace) -> None:
    for path, content in space.user_files.items():
        assert path.read_bytes() == content, f"{path} was changed"


def assert_reference_images(space: Workspace) -> None:
    images = sorted(space.out.glob("0*-a-*.png"))
    assert [image.name for image in images] == [image.name for image in space.reference]
    for image, reference in zip(images, space.reference):
        assert_same_pixels(np.asarray(Image.open(image)), np.asarray(Image.open(reference)))


# ---------------------------------------------------------------- failures while running


def cpu_out_of_memory(*args, **kwargs):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")


def a_bug(*args, **kwargs):
    raise ValueError("something the stage did not expect")


def cublas_out_of_memory(*args, **kwargs):
    # what PyTorch raises when cuBLAS cannot allocate its handle on a full GPU
    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def a_bug_in_a_write(tensors, filename, metadata=None):
    raise TypeError("save_file() got tensors it cannot serialise")


def safetensors_disk_full(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"part of the tensors")
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


def run_json_disk_full(target, write, _real=seal.atomic_write):
    if Path(target).name != "run.json":  # the other sealed files come after it
        return _real(target, write)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@dataclass(frozen=True)
class Failure:
    target: object
    attribute: str
    replacement: Callable
    exit_code: int
    message: str
    then: str  # "resume" (the run continues from its checkpoint) or "rerun" (the same command again)


FAILURES = {
    "cpu-out-of-memory-in-denoise": Failure(
        denoise, "run", cpu_out_of_memory, 3, "denoise ran out of memory (DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 68719476736 bytes.) under --max-memory cpu=2.00 GB", "resume"),
    "python-memory-error-in-decode": Failure(decode, "run", lambda *a, **k: (_ for _ in ()).throw(MemoryError()),
                                             3, "decode ran out of memory", "resume"),
    "cublas-out-of-memory-in-denoise": Failure(
        denoise, "run", cublas_out_of_memory, 3, "denoise ran out of memory (CUDA error: CUBLAS_STATUS_ALLOC_FAILED "
        "when calling `cublasCreate(handle)`)", "resume"),
    "a-bug-in-decode": Failure(decode, "run", a_bug, 1, "decode failed (ValueError: something the stage did not "
                               "expect); {run_dir}/denoise.safetensors holds the work before it", "resume"),
    "disk-full-writing-a-checkpoint": Failure(
        safetensors_torch, "save_file", safetensors_disk_full, 4,
        "could not write {run_dir}/encode.safetensors (SafetensorError: Error while serializing", "resume"),
    "a-bug-writing-a-checkpoint": Failure(
        safetensors_torch, "save_file", a_bug_in_a_write, 1,
        "could not write {run_dir}/encode.safetensors (TypeError: save_file() got tensors it cannot serialise), not "
        "for a lack of space or access", "resume"),
    "disk-full-writing-run-json": Failure(seal, "atomic_write", run_json_disk_full, 4,
                                          "could not write {run_dir}/run.json (No space left on device); nothing was "
                                          "run yet", "rerun"),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failure_while_running(tiny_checkpoint, finished_run, tmp_path, monkeypatch, name):
    failure = FAILURES[name]
    out = tmp_path / "out"
    run_dir = out / "run"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--run-dir", str(run_dir), *prompt_args()]
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as patch:
        patch.setattr(failure.target, failure.attribute, failure.replacement)
        result = invoke(args)
    assert result.exit_code == failure.exit_code, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert failure.message.format(run_dir=run_dir) in line
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name], "a temporary file was left"
    assert (out / "notes.txt").read_text() == "mine"
    if failure.then == "resume":
        assert f"continue with: flux-sharded --resume {run_dir}" in line
    again = invoke(["--resume", str(run_dir)] if failure.then == "resume" else args)
    assert again.exit_code == 0, again.output
    expected = sorted(finished_run.glob("*.png"))
    images = sorted(out.glob("*.png"))
    assert [image.name for image in images] == [image.name for image in expected]
    for image, reference in zip(images, expected):
        assert_same_pixels(np.asarray(Image.open(image)), np.asarray(Image.open(reference)))


def test_weights_changed_between_two_stages_of_a_run_are_refused(tiny_checkpoint, finished_run, tmp_path, monkeypatch):
    """One byte in the middle of the transformer's weights flipped once encode's handoff is saved (its
    size and mtime put back): denoise does not load them, the run stops with one line, encode's work
    is kept; the weights restored, the resume makes the undisturbed run's pixels."""
    import shutil

    from flux_sharded import runner

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    weights = checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    out, run_dir = tmp_path / "out", tmp_path / "run"

    def save_then_change_the_weights(share, handoff, stage, _real=runner.ShareRun.save_handoff):
        _real(share, handoff, stage)
        if stage == "encode":
            flipped_in_the_middle("transformer/diffusion_pytorch_model.safetensors")(
                Workspace(checkpoint, out, run_dir, []))

    monkeypatch.setattr(runner.ShareRun, "save_handoff", save_then_change_the_weights)
    result = invoke(["--model", str(checkpoint), *COMMON, "--out", str(out), "--run-dir", str(run_dir), *prompt_args()])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(f"Error: --model: the files of '{checkpoint}' changed while the run was going "
                                         "on, before denoise loaded them; its images would mix two sets of weights")
    assert (run_dir / "encode.json").exists() and not (run_dir / "denoise.json").exists()
    assert not list(out.glob("*.png"))
    weights.write_bytes(original)
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    for image, reference in zip(sorted(out.glob("*.png")), sorted(finished_run.glob("*.png")), strict=True):
        assert_same_pixels(np.asarray(Image.open(image)), np.asarray(Image.open(reference)))


def test_debug_variable_shows_the_traceback(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "run", a_bug)
    monkeypatch.setenv("FLUX_SHARDED_DEBUG", "1")
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path), *prompt_args()])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ValueError: something the stage did not expect" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error: ")]) == 1


# ---------------------------------------------------------------- files the tool may touch


def test_a_new_run_deletes_only_its_own_files_by_name(tiny_checkpoint, tmp_path):
    """Starting again with --overwrite replaces the earlier run's files, and only those."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--run-dir", str(run_dir), "--prompt", "a dog"]
    assert invoke(args).exit_code == 0
    mine = {name: f"the user's {name}".encode() for name in USER_FILES["run"] + ("denoise-process-0-of-2.txt",)}
    for name, content in mine.items():
        (run_dir / name).write_bytes(content)
    again = invoke([*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert {name: (run_dir / name).read_bytes() for name in mine} == mine
    assert {path.name for path in run_dir.iterdir()} - set(mine) == {
        "run.json", "encode.safetensors", "encode.json", "denoise.safetensors", "denoise.json"}


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_the_next_resume_removes_stale_temporary_files_of_its_own(workspace):
    pid = dead_pid()
    ours = [workspace.run_dir / f".denoise.safetensors.tmp-{pid}-0a1b2c3d",
            workspace.run_dir / f".run.json.tmp-{pid}-0a1b2c3d",
            workspace.out / f".{workspace.reference[0].name}.tmp-{pid}-0a1b2c3d"]
    theirs = [workspace.run_dir / f".notes.txt.tmp-{pid}-0a1b2c3d", workspace.out / f".thesis.tex.tmp-{pid}-00"]
    for path in ours + theirs:
        path.write_bytes(b"half a file")
    result = workspace.resume()
    assert result.exit_code == 0, result.output
    assert not [path for path in ours if path.exists()]
    assert all(path.read_bytes() == b"half a file" for path in theirs)
    assert_user_files_untouched(workspace)
    assert_reference_images(workspace)


def test_png_records_every_setting_that_decides_the_pixels(workspace):
    result = workspace.resume()
    assert result.exit_code == 0, result.output
    text = Image.open(sorted(workspace.out.glob("0*-a-*.png"))[0]).text
    assert text["max_sequence_length"] == "512"
    assert text["batch_size"] == "1"
    assert len(text["weights"]) == 16
    assert text["weights"] == Image.open(workspace.reference[0]).text["weights"]  # the same weights


def re_saved(change: Callable[[dict], object]):
    """The run's own image of that name (made from the workspace's copy of the checkpoint), its PNG
    text changed (another run's image, as it would be)."""
    def damage(space, path):
        with Image.open(space.reference[0]) as image:
            text = dict(image.text, model=str(space.checkpoint))
            change(text)
            info = PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
            image.save(path, format="PNG", pnginfo=info)
    return damage


def plain_png(space, path):
    Image.new("RGB", (32, 32), "red").save(path, format="PNG")


FOREIGN_IMAGES = {
    "other-seed": (re_saved(lambda text: text.update(seed="5")), "its seed is '5', the run's '0'"),
    "other-prompt": (re_saved(lambda text: text.update(prompt="a cow")), "its prompt is 'a cow', the run's 'a dog'"),
    "other-weights": (re_saved(lambda text: text.update(weights="0123456789abcdef")),
                      "its weights is '0123456789abcdef'"),
    "other-steps": (re_saved(lambda text: text.update(steps="9")), "its steps is '9', the run's '1'"),
    "a-png-of-the-users": (plain_png, "is not an image flux-sharded wrote"),
    "not-a-png": (lambda space, path: path.write_bytes(b"my notes"), "is not an image flux-sharded wrote"),
}


@pytest.mark.parametrize("name", list(FOREIGN_IMAGES))
def test_an_existing_image_counts_on_resume_only_if_it_is_the_runs(workspace, name):
    """The run stopped before decode; an image of the run's name that the run did not write is
    refused, untouched; moved away, or with --overwrite, the run makes its own."""
    damage, message = FOREIGN_IMAGES[name]
    image = workspace.out / workspace.reference[0].name
    damage(workspace, image)
    theirs = image.read_bytes()
    before = run_folder_files(workspace)
    result = workspace.resume()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert f"--resume: {image} exists but" in line and message in line
    assert "move it away (or pass --overwrite to make it again)" in line
    assert image.read_bytes() == theirs
    assert [path.name for path in workspace.out.glob("0*-a-*.png")] == [image.name], "an image was written"
    assert run_folder_files(workspace) == before
    assert_user_files_untouched(workspace)
    overwritten = invoke(["--resume", str(workspace.run_dir), "--overwrite"])
    assert overwritten.exit_code == 0, overwritten.output
    assert_reference_images(workspace)


def test_the_runs_own_images_are_kept_on_resume(workspace):
    re_saved(lambda text: None)(workspace, workspace.out / workspace.reference[0].name)
    kept = (workspace.out / workspace.reference[0].name).stat().st_mtime_ns
    result = workspace.resume()
    assert result.exit_code == 0, result.output
    assert (workspace.out / workspace.reference[0].name).stat().st_mtime_ns == kept
    assert f"wrote {workspace.out / workspace.reference[0].name}" not in result.output
    assert_reference_images(workspace)


def test_a_checkpoint_without_guidance_embeds_says_guidance_is_ignored(workspace):
    edit_json(workspace.checkpoint / "transformer" / "config.json", lambda c: c.update(guidance_embeds=False))
    for stage in ("encode", "denoise"):
        for suffix in (".safetensors", ".json"):
            (workspace.run_dir / f"{stage}{suffix}").unlink()
    # the denoiser now has no guidance embedding: its weights differ, a new run is needed
    weights = workspace.checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    loaded = load_file(weights)
    save_file({name: t for name, t in loaded.items() if not name.startswith("time_text_embed.guidance_embedder")},
              weights)
    result = workspace.new_run("--guidance", "7")
    assert result.exit_code == 0, result.output
    assert "--guidance 7 has no effect" in result.output
    image = sorted(workspace.out.glob("0*-a-*.png"))[0]
    assert Image.open(image).text["guidance"] == "none (the transformer has no guidance embedding)"


def test_non_finite_pixels_after_decode_are_named_per_image(workspace, monkeypatch):
    """A float16 overflow inside the VAE (the latents were fine): the PNG would be silently black."""
    from diffusers import AutoencoderKL

    real_decode = AutoencoderKL.decode

    def overflowing(self, latents, *args, **kwargs):
        decoded = real_decode(self, latents, *args, **kwargs)
        decoded[0][-1, 0, 0, 0] = float("inf")  # the last image of the batch
        return decoded

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    result = workspace.resume()
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ") and "after decode" in line]
    assert notes == [f"note: {name} held NaN or infinite values after decode, so some pixels are black or "
                     "saturated; are the checkpoint's weights sound?" for name in (p.name for p in workspace.reference)]


# Runs flux-sharded with every atomic write of the file named by the first argument killed
# (SIGKILL) right after the temporary file is written, before its rename.
KILL_AT_WRITE = """
import os, signal, sys
from flux_sharded import images, seal
from flux_sharded.cli import main

target = sys.argv.pop(1)

def killing(real):
    def atomic_write(path, write):
        def write_then_die(tmp):
            write(tmp)
            if path.name == target:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(path, write_then_die)
    return atomic_write

for module in (seal, images):  # rundir writes through seal.sealed_write
    module.atomic_write = killing(module.atomic_write)
main(sys.argv[1:])
"""


@pytest.mark.parametrize("target", ["run.json", "encode.safetensors", "encode.json", BATCH, "denoise.safetensors",
                                    "denoise.json", "0001-1-a-cat.png"])
def test_a_kill_at_each_write_leaves_a_run_that_continues(tiny_checkpoint, finished_run, tmp_path, target):
    import subprocess
    import sys

    out = tmp_path / "out"
    run_dir = out / "run"
    args = ["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), "--run-dir", str(run_dir), *prompt_args()]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_WRITE, target, *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    (stale,) = [path for path in out.rglob(f".{target}.tmp-*")]  # the half-done write
    # run.json is written first: without it the same command starts again; else --resume continues
    again = invoke(args if target == "run.json" else ["--resume", str(run_dir)])
    assert again.exit_code == 0, again.output
    assert not stale.exists() and not [path for path in out.rglob("*") if ".tmp-" in path.name]
    expected = sorted(finished_run.glob("*.png"))
    images = sorted(out.glob("*.png"))
    assert [image.name for image in images] == [image.name for image in expected]
    for image, reference in zip(images, expected):
        assert_same_pixels(np.asarray(Image.open(image)), np.asarray(Image.open(reference)))


# Runs flux-sharded with the address space capped, just before decode runs, at what the process
# uses then plus a little: the stage's first large allocation fails as on a machine out of RAM.
CAP_MEMORY_IN_DECODE = """
import resource, sys
from flux_sharded.cli import main
from flux_sharded.stages import decode

real_run = decode.run

def capped(*args, **kwargs):
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * resource.getpagesize()
    limit = used + 32 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return real_run(*args, **kwargs)

decode.run = capped
main(sys.argv[1:])
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the address space from /proc")
def test_out_of_memory_on_the_cpu_under_a_resource_limit(tiny_checkpoint, tmp_path):
    """PyTorch's CPU allocator raises a plain RuntimeError: exit 3 with the resume command all the same."""
    import subprocess
    import sys

    out = tmp_path / "out"
    run_dir = out / "run"
    # 1024 x 1024: each of the VAE decoder's activations at full size is 32 MiB
    args = ["--model", str(tiny_checkpoint), "--max-memory", "cpu=8GB", "--steps", "1", "--height", "1024",
            "--width", "1024", "--dtype", "float32", "--out", str(out), "--run-dir", str(run_dir), "--prompt", "a dog"]
    failed = subprocess.run([sys.executable, "-c", CAP_MEMORY_IN_DECODE, *args], capture_output=True, text=True)
    assert failed.returncode == 3, failed.stderr
    assert "Traceback" not in failed.stderr
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("Error: ")]
    assert "decode ran out of memory (" in line and "can't allocate memory" in line
    assert f"{run_dir / 'denoise'}.safetensors holds the work before it" in line
    assert f"continue with: flux-sharded --resume {run_dir}" in line
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "denoise: finished earlier" in resumed.output
    assert len(list(out.glob("*.png"))) == 1


def test_a_lost_key_is_named_as_lost_not_as_a_changed_file(workspace, tmp_path, monkeypatch):
    """The user's cache folder cleared (the key with it): every seal read as "changed after
    flux-sharded wrote it", and a new key was made. It says the key is gone and makes none."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cleared"))
    result = workspace.resume()
    assert result.exit_code == 2
    assert error_line(result).startswith(
        f"Error: --resume '{workspace.run_dir}': run.json cannot be checked: the key that sealed it, "
        f"{tmp_path}/cleared/flux-sharded/run-folder-key, is gone (the user's cache folder was cleared, or the run "
        "folder was made on another machine or by another user: copying that key file back lets it be resumed)")
    assert not (tmp_path / "cleared" / "flux-sharded" / "run-folder-key").exists()
    assert not list(workspace.out.glob("0*-a-*.png"))


def test_a_key_others_can_read_is_made_private_again(workspace):
    """A key others can read lets them seal files this user's resumes would take."""
    from flux_sharded.seal import key_path

    key_path().chmod(0o644)
    resumed = workspace.resume()
    assert resumed.exit_code == 0, resumed.output
    assert key_path().stat().st_mode & 0o777 == 0o600


def test_beta_sigmas_without_scipy_are_refused_before_the_run(workspace, monkeypatch):
    """diffusers' scheduler needs scipy for beta sigmas and raised inside denoise; whether scipy is
    installed here is the environment's, so its absence is what find_spec reports for it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "scipy" else real(name, *rest))
    edit_json(workspace.checkpoint / "scheduler" / "scheduler_config.json", lambda c: c.update(use_beta_sigmas=True))
    result = workspace.new_run()
    assert result.exit_code == 2
    assert error_line(result) == (f"Error: --model: '{workspace.checkpoint}': scheduler/scheduler_config.json field "
                                  "'use_beta_sigmas' is true: the scheduler's beta sigmas need scipy, which "
                                  "flux-sharded does not install: pip install scipy")


def test_a_key_that_is_a_link_keeps_its_targets_mode(workspace, tmp_path):
    """Making a key private again must not change a file elsewhere that the key links to."""
    from flux_sharded.seal import key_path

    target = tmp_path / "elsewhere-key"
    target.write_bytes(key_path().read_bytes())
    target.chmod(0o644)
    key_path().unlink()
    key_path().symlink_to(target)
    try:
        resumed = workspace.resume()
        assert resumed.exit_code == 0, resumed.output
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        key_path().unlink()
        key_path().write_bytes(target.read_bytes())
        key_path().chmod(0o600)


def test_a_damaged_key_leaves_no_run_folder_behind(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    key = tmp_path / "cache" / "flux-sharded" / "run-folder-key"
    key.parent.mkdir(parents=True)
    key.write_text("")
    out = tmp_path / "out"
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(out), *prompt_args()])
    assert result.exit_code == 2
    assert error_line(result).startswith(f"Error: the key that seals run folders, {key}, is damaged")
    assert not out.exists()
