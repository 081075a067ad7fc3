"""The run folder: everything a run needs to continue after a crash, written as it goes.

    RUN_DIR/run.json                      settings, budget, output folder (written before any stage)
    RUN_DIR/upsample.safetensors + .json  after upsample (the rewritten prompts, in the JSON; --upsample-prompt only)
    RUN_DIR/encode.safetensors + .json    the handoff after encode (prompt embeddings)
    RUN_DIR/encode_image.safetensors + .json   after encode_image (+ the encoded input images; --image only)
    RUN_DIR/denoise.safetensors + .json   the handoff after denoise (latents)

Every file is written atomically (temporary name, fsync, rename), so a process killed at any
moment, SIGKILL included, leaves a folder `--resume` can continue from. Under several processes
each process writes its own handoffs (`encode-process-1-of-2.safetensors`, ...), and the first
process of each machine writes run.json, so that a machine whose disks are its own can resume.
Each handoff's JSON names the images it holds (their indices over the whole run), so a resume
with any number of processes takes each image's state from whichever share saved it; run.json
lists every process count that wrote here, so that the names of the files are known exactly.
The default folder is `OUT/.flux-sharded/run-<hash of the settings>`: the same command finds
the same folder, on every process of a launch.

Every file a resume reads here is sealed (seal.py: an HMAC of its name and bytes under the user's
key) and its seal checked before anything in it is used; a handoff's JSON names its tensors file's
seal and the digest of the weights that made it, a kept batch the digests of its settings and
weights, so that no file of another run, or changed by one byte, is ever used: each is refused,
naming the file (and the files to delete to redo that work).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .budget import Budget, budget_to_json
from .errors import OutputError, SettingsError
from .handoff import GenerationSettings, Handoff
from .safe_read import parse_json, read_regular_file
from .checkpoint import expected_tensors
from .families import IMAGE_STAGE, UPSAMPLE_STAGE
from .seal import PLACEHOLDER, SealError, check_seal, sealed_write
from .validate import JsonFields, check_handoff_tensors, check_share_settings, saved_run_fields, settings_fields

RUN_FILE = "run.json"
# run.json holds every prompt of the run: a 64 MiB prompts file (prompts.MAX_PROMPTS_FILE_BYTES) and
# its seeds fit several times over.
MAX_RUN_FILE_BYTES = 256 * 2**20
FORMAT = 1
SAVED_STAGES = ("upsample", "encode", "encode_image", "denoise")  # decode's output is the images themselves


def saved_stages(settings: GenerationSettings) -> tuple[str, ...]:
    """The saved stages a run goes through (encode_image only with input images), in order."""
    return tuple(stage for stage in SAVED_STAGES if stage in settings.stages)


RUNS_FOLDER = ".flux-sharded"  # inside --out: the default run folders


def default_run_dir(out_dir: Path, settings: GenerationSettings) -> Path:
    return out_dir / RUNS_FOLDER / f"run-{_settings_digest(settings)[:12]}"


# A run folder is bound to the image folder its run started with, so that a run.json whose out_dir
# or settings were edited (or a run folder from someone else) cannot make a resume write elsewhere:
# the default folder by its place (OUT/.flux-sharded/run-<digest of the settings>), any other by a
# record the run writes into OUT/.flux-sharded when it starts, named by the run folder's real path,
# holding the settings' digest and sealed (seal.py) like the run folder's files. Nothing in the run
# folder itself can vouch for it: it is the file that may have been edited.
def _binding_path(out_dir: Path, run_dir: Path) -> Path:
    name = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return out_dir / RUNS_FOLDER / f"run-dir-{name}.json"


def _binding(run_dir: Path, settings: GenerationSettings) -> dict:
    return {"run_dir": str(run_dir.resolve()), "settings": _settings_digest(settings)}


def _is_default(run_dir: Path, out_dir: Path, settings: GenerationSettings) -> bool:
    return run_dir.resolve() == default_run_dir(out_dir, settings).resolve()


def bind_out_dir(run_dir: Path, out_dir: Path, settings: GenerationSettings) -> None:
    """Record in `out_dir` that the run in `run_dir` (not its default folder) writes its images
    there, before its run.json is written; raises OutputError if it cannot be written."""
    if _is_default(run_dir, out_dir, settings):
        return
    path = _binding_path(out_dir, run_dir)
    record = {"seal": PLACEHOLDER, **_binding(run_dir, settings)}  # the seal first: seal.SEAL_WITHIN_BYTES
    try:
        sealed_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
    except OSError as error:
        raise OutputError(f"could not write {path} ({error.strerror or error}); nothing was run yet: free some "
                          "space or fix the folder, then run the same command again") from None


def check_bound(run_dir: Path, out_dir: Path, settings: GenerationSettings, where: str = "--resume") -> None:
    """The run in `run_dir` started with `out_dir` (an existing folder) and these settings
    (bind_out_dir); else SettingsError. Checked after run.json's own checks, whose messages are
    more precise about an edited field."""
    if _is_default(run_dir, out_dir, settings):
        return
    try:  # a regular file of at most 64 KiB (a FIFO in its place hung the resume), sealed by this user
        data = read_regular_file(_binding_path(out_dir, run_dir), 64 * 1024)
        check_seal(_binding_path(out_dir, run_dir), data)
        record = parse_json(data.decode("utf-8"))
        record.pop("seal")
    except (OSError, ValueError, AttributeError, KeyError):  # SealError is a ValueError
        record = None
    if record == _binding(run_dir, settings):
        return
    raise SettingsError(
        f"{where}: {RUN_FILE} names {out_dir} as the run's image folder ('out_dir'), but no run of this folder with "
        f"these settings started there ({out_dir / RUNS_FOLDER} holds no record of it): {RUN_FILE} was edited or "
        "the folder copied; a resume writes only where its run started: start a new run with --out"
    )


def _runs_inside(folder: Path) -> list[Path]:
    """The run folders in an output folder (or in its .flux-sharded), for a --resume given OUT."""
    return sorted(run.parent for pattern in (f"{RUNS_FOLDER}/run-*/{RUN_FILE}", f"run-*/{RUN_FILE}")
                  for run in folder.glob(pattern))


@dataclass(frozen=True)
class SavedRun:
    settings: GenerationSettings
    budget: Budget
    out_dir: Path
    offload_folder: Path | None
    processes: int
    weights: dict | None = None  # checkpoint.weights_fingerprint of the weights the run used
    resumed_processes: tuple[int, ...] = ()  # other process counts that resumed the run and saved here
    # Whether the run's plan decodes with diffusers' tiled VAE decoding, which gives other pixels than
    # untiled decoding (of an image larger than one tile): a resume must decode the same way. None: a
    # run of an earlier version, which did not record it.
    decode_tiled: bool | None = None
    # Each image's prompt as the prompt upsampler rewrote it (--upsample-prompt), recorded once the run has
    # them all (the handoffs from upsample on hold them before: a resume reads those); () without.
    upsampled_prompts: tuple[str, ...] = ()
    # checkpoint.upsampler_fingerprint of the prompt upsampler the run uses (--upsample-prompt); None without
    upsampler_weights: dict | None = None

    @property
    def process_counts(self) -> tuple[int, ...]:
        """Every process count whose handoffs may be in the run folder."""
        return tuple(sorted({self.processes, *self.resumed_processes}))


def write_run(run_dir: Path, saved: SavedRun) -> None:
    data = {
        "seal": PLACEHOLDER,  # first: seal.SEAL_WITHIN_BYTES
        "format": FORMAT,
        "settings": saved.settings.to_json(),
        "max_memory": budget_to_json(saved.budget),
        "out_dir": str(saved.out_dir.absolute()),
        "offload_folder": str(saved.offload_folder.absolute()) if saved.offload_folder else None,
        "processes": saved.processes,
        "weights": saved.weights,
        "resumed_processes": list(saved.resumed_processes),
        "decode_tiled": saved.decode_tiled,
        **({"upsampled_prompts": list(saved.upsampled_prompts)} if saved.upsampled_prompts else {}),
        **({"upsampler_weights": saved.upsampler_weights} if saved.upsampler_weights is not None else {}),
    }
    path = run_dir / RUN_FILE
    try:
        sealed_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
    except OSError as error:
        raise OutputError(f"could not write {path} ({error.strerror or error}); nothing was run yet: free some "
                          "space or fix the folder, then run the same command again") from None


def our_files(run_dir: Path, process_counts, indices) -> list[Path]:
    """Every file a run of the images `indices` (GenerationSettings.image_indices), started or
    resumed with each of `process_counts` processes, may write in its run folder, by exact name."""
    names = [RUN_FILE]
    for stage in SAVED_STAGES:
        for processes in sorted(set(process_counts)):
            for index in range(processes):
                stem = handoff_path(run_dir, stage, index, processes).name
                names += [f"{stem}.safetensors", f"{stem}.json"]
    return [run_dir / name for name in names] + [batch_latents_path(run_dir, index) for index in indices]


# Every name a run writes in its run folder besides run.json (our_files lists them exactly once the
# process counts are known): handoff_path's and batch_latents_path's.
_HANDOFF_NAME = re.compile(r"(encode|encode_image|denoise)(-process-\d+-of-\d+)?\.(json|safetensors)"
                           r"|denoise-batch-from-image-\d+\.safetensors")


def holds_our_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run of ours (a run.json read_run accepts, bound to its image
    folder): True; False when it holds no file of our names; a folder that holds files of our names
    without such a run.json holds someone else's, which no option may replace: SettingsError."""
    if (run_dir / RUN_FILE).exists():
        try:
            saved = read_run(run_dir)
            check_bound(run_dir, saved.out_dir, saved.settings)
        except SettingsError:
            raise SettingsError(
                f"--run-dir: {run_dir} holds a {RUN_FILE} that is not a run of this tool's it can continue; "
                "flux-sharded replaces only files it wrote: give another --run-dir, or move that file away") from None
        return True
    theirs = sorted(path.name for path in run_dir.iterdir() if _HANDOFF_NAME.fullmatch(path.name)) \
        if run_dir.is_dir() else []
    if theirs:
        raise SettingsError(
            f"--run-dir: {run_dir} holds {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}, which no run of "
            f"this tool wrote (there is no {RUN_FILE} beside it); flux-sharded replaces only files it wrote: give "
            "another --run-dir, or move those files away")
    return False


def remove_superseded(run_dir: Path, process_counts, finished_with: int) -> None:
    """Once every share of a run finished under `finished_with` processes, the handoffs that its
    launches with another number of processes saved hold nothing a resume needs: removed by exact
    name, each JSON before its tensors (tensors without their JSON are ignored by a resume)."""
    for stage in SAVED_STAGES:
        for processes in sorted(set(process_counts) - {finished_with}):
            for index in range(processes):
                path = handoff_path(run_dir, stage, index, processes)
                path.with_suffix(".json").unlink(missing_ok=True)
                path.with_suffix(".safetensors").unlink(missing_ok=True)


def clear_run(run_dir: Path, processes: int, indices: tuple[int, ...]) -> None:
    """Remove the files of an earlier run, ours only and by exact name (the earlier run may have had
    another number of processes or other images: its run.json says which); `indices`: this run's
    images (GenerationSettings.image_indices)."""
    sizes = {((processes,), tuple(indices))}
    try:
        earlier = read_run(run_dir)
        sizes.add((earlier.process_counts, earlier.settings.image_indices))
    except SettingsError:  # no run.json, or a damaged one: the names of this run's images
        pass
    for counts, image_indices in sizes:
        for path in our_files(run_dir, counts, image_indices):
            path.unlink(missing_ok=True)  # machines sharing the folder clear it at the same time


def batch_latents_path(run_dir: Path, first_index: int) -> Path:
    """Where denoise keeps a finished batch's latents until the stage's handoff is written; named
    by the batch's first image (its index over the whole run), so names are unique across processes."""
    return run_dir / f"denoise-batch-from-image-{first_index}.safetensors"


def _settings_digest(settings: GenerationSettings) -> str:
    return hashlib.sha256(json.dumps(settings.to_json(), sort_keys=True).encode()).hexdigest()


def save_batch_latents(path: Path, latents, settings: GenerationSettings, weights: str) -> None:
    """One batch's latents, sealed (seal.py), with the digest of the batch's settings (its prompts,
    seeds, steps, ...) and of the weights that made them (checkpoint.fingerprint_digest)."""
    from safetensors.torch import save_file

    tensors = {"latents": latents.detach().to("cpu").contiguous()}
    metadata = {"seal": PLACEHOLDER, "settings": _settings_digest(settings), "weights": weights}
    sealed_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_batch_latents(path: Path, settings: GenerationSettings, shape: tuple, dtype, weights: str) -> "torch.Tensor":
    """A batch's latents saved by save_batch_latents, checked against its seal, the batch's
    settings, the weights' digest, the expected shape and dtype; raises SettingsError naming the
    file to delete to redo that batch."""
    from safetensors import safe_open

    fix = f"delete {path.name} in {path.parent} to denoise that batch again, then resume again"
    _check_sealed(path, fix)
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise SettingsError(f"--resume: {path} cannot be read ({reason}); {fix}") from None
    if metadata.get("settings") != _settings_digest(settings):
        raise SettingsError(f"--resume: {path} belongs to other settings than this batch's; {fix}")
    if metadata.get("weights") != weights:
        raise SettingsError(f"--resume: {path} was made with other weights than the run's (run.json 'weights'); {fix}")
    check_handoff_tensors(tensors, {"latents": shape}, dtype, f"--resume: {path}", fix)
    return tensors["latents"]


def _check_sealed(path: Path, fix: str, data: bytes | None = None) -> str:
    """The seal of a file of the run folder (seal.check_seal); else SettingsError naming it and `fix`."""
    try:
        return check_seal(path, data)
    except SealError as error:
        raise SettingsError(f"--resume: {path} {error}; {fix}") from None
    except OSError as error:
        raise SettingsError(f"--resume: {path} cannot be read ({error.strerror or error}); {fix}") from None


def remove_stale_temporaries(folder: Path, names: list[str]) -> list[Path]:
    """Remove `.NAME.tmp-PID-XXXX` files that files.atomic_write left for one of `names` when its
    process was killed mid-write; a process of this machine still alive keeps its own. Returns them."""
    wanted = {f".{name}.tmp-" for name in names}
    removed = []
    for path in folder.glob(".*.tmp-*") if folder.is_dir() else ():
        prefix, _, rest = path.name.rpartition(".tmp-")
        pid = rest.split("-")[0]
        if f"{prefix}.tmp-" in wanted and pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, where: str, resume_command: str) -> Iterator[None]:
    """Held while one process runs the run in `run_dir` (made if missing): an exclusive flock on the
    folder itself, taken without waiting and let go when the process ends, however it ends (the
    kernel drops the lock of a killed process). Two processes resuming one run, or starting the
    same run in one --out, each wrote the other's handoffs and images over: the second is refused.
    `where`: the option the refusal names (--resume, or --out for a new run). Raises SettingsError."""
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SettingsError(_busy(run_dir, where, resume_command)) from None
        yield
    finally:
        os.close(descriptor)


def check_not_running(run_dir: Path, where: str, resume_command: str) -> None:
    """Refuse (SettingsError) a run folder another process holds the lock of (run_folder_lock), so
    that a command given while it runs is not told to resume it or start it again with --overwrite."""
    try:
        descriptor = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # no folder: nobody runs it
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SettingsError(_busy(run_dir, where, resume_command)) from None
    finally:
        os.close(descriptor)  # lets go of the lock, if it was taken here


def _busy(run_dir: Path, where: str, resume_command: str) -> str:
    return (f"{where}: the run in {run_dir} is being run right now by another flux-sharded process; two would "
            f"write over each other's files: let that one finish or stop it, then continue with: {resume_command}")


def read_run(run_dir: Path) -> SavedRun:
    """run.json, every field checked (validate.saved_run_fields); raises SettingsError naming the field."""
    where = f"--resume '{run_dir}'"
    if not run_dir.is_dir():
        raise SettingsError(f"{where} is not a folder; give the run folder a run printed (it holds {RUN_FILE})")
    try:
        raw = read_regular_file(run_dir / RUN_FILE, MAX_RUN_FILE_BYTES)
        data = parse_json(raw.decode("utf-8"))
    except FileNotFoundError:
        runs = _runs_inside(run_dir)
        if len(runs) == 1:
            raise SettingsError(f"{where} is an output folder, not a run folder; continue the run inside it with "
                                f"`flux-sharded --resume {shlex.quote(str(runs[0]))}`") from None
        if runs:
            raise SettingsError(f"{where} is an output folder, not a run folder; it holds {len(runs)} runs: "
                                f"{', '.join(map(str, runs))}; give one of them to --resume") from None
        raise SettingsError(f"{where} is not a flux-sharded run folder (no {RUN_FILE}); give the folder a run printed") from None
    except (OSError, ValueError) as error:
        raise SettingsError(f"{where}: {RUN_FILE} cannot be read ({error}); the folder is damaged: start a new run") from None
    try:
        check_seal(run_dir / RUN_FILE, raw)
    except SealError as error:
        raise SettingsError(f"{where}: {RUN_FILE} {error}; a run is resumed only from the files flux-sharded wrote: "
                            "restore the file, or start a new run") from None
    if isinstance(data, dict):
        data.pop("seal", None)
    fields = saved_run_fields(data, f"{where}: {RUN_FILE}",
                              "the file was edited or damaged: start a new run (or restore the file)", FORMAT)
    settings = GenerationSettings(**fields["settings"])
    return SavedRun(
        settings=settings,
        budget=fields["budget"],
        out_dir=fields["out_dir"],
        offload_folder=fields["offload_folder"],
        processes=fields["processes"],
        weights=fields["weights"],
        resumed_processes=fields["resumed_processes"],
        decode_tiled=fields["decode_tiled"],
        upsampled_prompts=fields["upsampled_prompts"],
        upsampler_weights=fields["upsampler_weights"],
    )


def handoff_path(run_dir: Path, stage: str, process_index: int, process_count: int) -> Path:
    """Without suffix: Handoff.save adds .safetensors and .json."""
    name = stage if process_count == 1 else f"{stage}-process-{process_index}-of-{process_count}"
    return run_dir / name


def saved_handoffs(run_dir: Path, process_counts, run_settings: GenerationSettings, wanted,
                   checkpoint, weights: str) -> list[Handoff]:
    """The handoffs of the latest finished stage of every share that any launch of the run (with
    each of `process_counts` processes) saved and that holds one of the images `wanted` (indices
    over the whole run). Each is checked against the run's settings for the images it names, and
    against the model's configs, its seals (seal.py) and `weights` (the digest of the weights the
    run used, checkpoint.fingerprint_digest); raises SettingsError naming the damaged file and which
    files to delete to redo that stage."""
    found = []
    for processes in sorted(set(process_counts)):
        for index in range(processes):
            handoff = _latest_handoff(run_dir, index, processes, run_settings, set(wanted), checkpoint, weights)
            if handoff is not None:
                found.append(handoff)
    return found


def _latest_handoff(run_dir: Path, process_index: int, process_count: int, run_settings: GenerationSettings,
                    wanted: set[int], checkpoint, weights: str) -> Handoff | None:
    stages = saved_stages(run_settings)
    for position in reversed(range(len(stages))):
        stage = stages[position]
        path = handoff_path(run_dir, stage, process_index, process_count)
        tensors_file, meta_file = path.with_suffix(".safetensors"), path.with_suffix(".json")
        # Handoff.save writes the tensors, then the JSON: tensors without their JSON are a write
        # that a kill cut short (redone, and replaced, by this run), not a damaged checkpoint.
        if not meta_file.exists():
            continue
        redo = f"{'the start' if position == 0 else stages[position - 1]}"
        fix = (f"delete {tensors_file.name} and {meta_file.name} in {run_dir} to redo {stage} from {redo}, "
               "then resume again")
        for file in (tensors_file, meta_file):
            if not file.is_file():
                raise SettingsError(f"--resume: {file} is missing or not a file; {fix}")
        try:
            raw = read_regular_file(meta_file, MAX_RUN_FILE_BYTES)
            meta = parse_json(raw.decode("utf-8"))
        except (OSError, ValueError) as error:
            raise SettingsError(f"--resume: {meta_file} cannot be read ({error}); {fix}") from None
        _check_sealed(meta_file, fix, raw)
        meta_fields = JsonFields(meta, f"--resume: {meta_file}", fix)
        if meta_fields.string("weights") != weights:
            meta_fields.fail("is not the digest of the weights the run used (run.json 'weights'): another run's file",
                             "weights")
        tensors_seal = meta_fields.string("tensors")
        saved_settings = GenerationSettings(**settings_fields(meta_fields.object("settings"), meta_fields.where, fix))
        finished = meta_fields.list_of("finished_stages", lambda s: isinstance(s, str), "stage names")
        if tuple(finished) != stages[: position + 1]:
            meta_fields.fail(f"is {finished}, not {list(stages[: position + 1])}", "finished_stages")
        saved_settings = check_share_settings(saved_settings, run_settings, meta_file, fix)
        if not wanted & set(saved_settings.image_indices):
            return None  # another share's images: not read further
        if _check_sealed(tensors_file, fix) != tensors_seal:
            raise SettingsError(f"--resume: {tensors_file} is not the tensors file {meta_file.name} was written with "
                                f"(another run's, or one written since); {fix}")
        try:
            from safetensors.torch import load_file

            tensors = load_file(tensors_file)
        except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise SettingsError(f"--resume: {tensors_file} cannot be read ({reason}); {fix}") from None
        expected = expected_tensors(stage, saved_settings, checkpoint)
        check_handoff_tensors(tensors, expected, saved_settings.torch_dtype, f"--resume: {tensors_file}", fix)
        # the rewritten prompts: one text per image, from upsample on, in a run with the upsampler
        images = len(saved_settings.prompts)
        upsampled = meta_fields.list_of("upsampled", lambda text: isinstance(text, str), "texts", images, images,
                                        optional=UPSAMPLE_STAGE not in run_settings.stages)
        # Only the rows of the images wanted are kept: a resume with more processes than the run had
        # would otherwise hold a whole share's tensors in every process.
        handoff = Handoff(settings=saved_settings, finished_stages=tuple(finished),
                          shared=checkpoint.family.shared_tensors, named=tensors, upsampled=tuple(upsampled or ()))
        rows = [row for row, index in enumerate(saved_settings.image_indices) if index in wanted]
        return handoff if len(rows) == len(saved_settings.prompts) else handoff.select(rows)
    return None


def resumed_handoff(settings: GenerationSettings, saved: list[Handoff]) -> tuple[Handoff | None, dict]:
    """This share's handoff (`settings`: the share's), taken row by row from the handoffs earlier
    launches saved (saved_handoffs), whichever share each was: the denoised latents when every image
    of the share has them, else the prompt embeddings when every image has them, else (a run with the
    prompt upsampler) the rewritten prompts, else None (the first stage runs again); carried along,
    the rewritten prompts when every image has them; between the latents and the embeddings, for a
    run with input images, the embeddings and the encoded images when every image has both. Also
    returns {image index: latents row} of every image of the share found denoised, for denoise to
    take whole batches of."""
    wanted = settings.image_indices
    rows, latents = {}, {}  # image index -> (handoff, row); -> latents row
    for handoff in saved:
        for row, index in enumerate(handoff.settings.image_indices):
            if index in wanted:
                rows.setdefault(index, (handoff, row))
                if handoff.latents is not None:
                    latents.setdefault(index, handoff.latents[row])
    if not all(index in rows for index in wanted):
        return None, latents

    def stack(name: str):
        return torch.stack([getattr(rows[index][0], name)[rows[index][1]] for index in wanted])

    denoised = all(index in latents for index in wanted)
    first = rows[wanted[0]][0]
    images_encoded = all(rows[index][0].inputs() for index in wanted)
    embedded = all(rows[index][0].embeddings() for index in wanted)
    upsampled = all(rows[index][0].upsampled for index in wanted)
    # the saved stages every image of the share went through, in order (an image's handoff is its latest)
    done = {UPSAMPLE_STAGE: upsampled, "encode": embedded, IMAGE_STAGE: images_encoded, "denoise": denoised}
    finished = ()
    for stage in saved_stages(settings):
        if not done[stage]:
            break
        finished += (stage,)
    handoff = Handoff(
        settings=settings,
        # the embeddings the family's pipeline takes (FLUX.1: T5 and CLIP pooled; FLUX.2: one or two)
        **({name: stack(name) for name in first.embeddings()} if embedded else {}),
        # the encoded input images (encode_image's), when every image has them
        **({name: stack(name) for name in first.inputs()} if images_encoded else {}),
        # the same for every image (FLUX.1's text positions)
        **{name: tensor for name, tensor in first.tensors().items() if name in first.shared},
        latents=torch.stack([latents[index] for index in wanted]) if denoised else None,
        shared=first.shared,
        finished_stages=finished,
        upsampled=tuple(rows[index][0].upsampled[rows[index][1]] for index in wanted) if upsampled else (),
    )
    return handoff, latents
