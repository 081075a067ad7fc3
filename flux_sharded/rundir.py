"""The run folder: everything a run needs to continue after a crash, written as it goes.

    RUN_DIR/run.json                      settings, budget, output folder (written before any stage)
    RUN_DIR/encode.safetensors + .json    the handoff after encode (prompt embeddings)
    RUN_DIR/denoise.safetensors + .json   the handoff after denoise (latents)

Every file is written atomically (temporary name, fsync, rename), so a process killed at any
moment, SIGKILL included, leaves a folder `--resume` can continue from. Under several processes
each process writes its own handoffs (`encode-process-1-of-2.safetensors`, ...), and the first
process of each machine writes run.json, so that a machine whose disks are its own can resume.
The default folder is `OUT/.flux-sharded/run-<hash of the settings>`: the same command finds
the same folder, on every process of a launch.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .budget import Budget, budget_to_json
from .errors import SettingsError
from .files import atomic_write
from .handoff import GenerationSettings, Handoff

RUN_FILE = "run.json"
FORMAT = 1
SAVED_STAGES = ("encode", "denoise")  # decode's output is the images themselves


RUNS_FOLDER = ".flux-sharded"  # inside --out: the default run folders


def default_run_dir(out_dir: Path, settings: GenerationSettings) -> Path:
    digest = hashlib.sha256(json.dumps(settings.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    return out_dir / RUNS_FOLDER / f"run-{digest}"


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


def write_run(run_dir: Path, saved: SavedRun) -> None:
    data = {
        "format": FORMAT,
        "settings": saved.settings.to_json(),
        "max_memory": budget_to_json(saved.budget),
        "out_dir": str(saved.out_dir.absolute()),
        "offload_folder": str(saved.offload_folder.absolute()) if saved.offload_folder else None,
        "processes": saved.processes,
    }
    atomic_write(run_dir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def clear_run(run_dir: Path) -> None:
    """Remove the files of an earlier run (ours only: run.json and the stages' handoffs)."""
    for stage in SAVED_STAGES:
        for path in run_dir.glob(f"{stage}*"):
            if path.suffix in (".safetensors", ".json"):
                path.unlink(missing_ok=True)  # machines sharing the folder clear it at the same time
    (run_dir / RUN_FILE).unlink(missing_ok=True)


def read_run(run_dir: Path) -> SavedRun:
    where = f"--resume '{run_dir}'"
    if not run_dir.is_dir():
        raise SettingsError(f"{where} is not a folder; give the run folder a run printed (it holds {RUN_FILE})")
    try:
        data = json.loads((run_dir / RUN_FILE).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')}")
        return SavedRun(
            settings=GenerationSettings.from_json(data["settings"]),
            budget={int(key) if key.isdigit() else key: int(value) for key, value in data["max_memory"].items()},
            out_dir=Path(data["out_dir"]),
            offload_folder=Path(data["offload_folder"]) if data.get("offload_folder") else None,
            processes=int(data["processes"]),
        )
    except FileNotFoundError:
        runs = _runs_inside(run_dir)
        if len(runs) == 1:
            raise SettingsError(f"{where} is an output folder, not a run folder; continue the run inside it with "
                                f"`flux-sharded --resume {shlex.quote(str(runs[0]))}`") from None
        if runs:
            raise SettingsError(f"{where} is an output folder, not a run folder; it holds {len(runs)} runs: "
                                f"{', '.join(map(str, runs))}; give one of them to --resume") from None
        raise SettingsError(f"{where} is not a flux-sharded run folder (no {RUN_FILE}); give the folder a run printed") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SettingsError(f"{where}: {RUN_FILE} cannot be read ({error}); the folder is damaged: start a new run") from None


def handoff_path(run_dir: Path, stage: str, process_index: int, process_count: int) -> Path:
    """Without suffix: Handoff.save adds .safetensors and .json."""
    name = stage if process_count == 1 else f"{stage}-process-{process_index}-of-{process_count}"
    return run_dir / name


def last_handoff(run_dir: Path, process_index: int, process_count: int) -> Handoff | None:
    """The handoff of the latest finished stage this process saved, if any."""
    for stage in reversed(SAVED_STAGES):
        path = handoff_path(run_dir, stage, process_index, process_count)
        if path.with_suffix(".json").exists() and path.with_suffix(".safetensors").exists():
            return Handoff.load(path)
    return None
