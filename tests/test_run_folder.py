"""Writes where they belong: a resume writes only to the folder its run started with, and a run
folder's files of our names that no run of ours wrote are never replaced, whatever the options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import error_line, invoke
from .sealing import edit_sealed_json

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]
NOT_STARTED_THERE = ("no run of this folder with these settings started there ({elsewhere}/.flux-sharded holds no "
                     "record of it): run.json was edited or the folder copied; a resume writes only where its run "
                     "started: start a new run with --out")


def _run(checkpoint, out: Path, *extra):
    result = invoke(["--model", str(checkpoint), *COMMON, "--out", str(out), "--prompt", "a dog", *extra])
    assert result.exit_code == 0, result.output
    return result


def _edit_run_json(run_dir: Path, **fields) -> None:
    """Sealed again (tests/sealing.py): the binding to --out holds even for a run.json this user's
    tool sealed (one edited by hand is refused by its seal first, tests/test_faults.py)."""
    edit_sealed_json(run_dir / "run.json", lambda data: data.update(fields))


@pytest.mark.parametrize("run_dir_option", [False, True])
@pytest.mark.parametrize("spelling", ["absolute", "dot-dot"])
def test_a_run_json_whose_out_dir_was_edited_writes_nothing_elsewhere(tiny_checkpoint, tmp_path, run_dir_option,
                                                                       spelling):
    """A run folder may come from someone else: its out_dir may name any folder of the user's."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    run_dir = tmp_path / "run" if run_dir_option else None
    _run(tiny_checkpoint, out, *(["--run-dir", str(run_dir)] if run_dir_option else []))
    run_dir = run_dir or next((out / ".flux-sharded").iterdir())
    elsewhere.mkdir()
    named = elsewhere if spelling == "absolute" else out / ".." / "elsewhere"
    _edit_run_json(run_dir, out_dir=str(named))
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert error_line(result) == (f"Error: --resume: run.json names {named} as the run's image folder ('out_dir'), but "
                                  + NOT_STARTED_THERE.format(elsewhere=named))
    assert list(elsewhere.iterdir()) == []


def test_a_run_json_whose_settings_were_edited_is_refused(tiny_checkpoint, tmp_path):
    """The default run folder is named by its settings: edited ones are not the run's."""
    out = tmp_path / "out"
    _run(tiny_checkpoint, out)
    (run_dir,) = (out / ".flux-sharded").iterdir()
    edit_sealed_json(run_dir / "run.json", lambda data: data["settings"].update(seeds=[7]))
    (image,) = out.glob("*.png")
    image.unlink()  # something left to do
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert error_line(result) == (f"Error: --resume: run.json names {out} as the run's image folder ('out_dir'), but "
                                  + NOT_STARTED_THERE.format(elsewhere=out))
    assert not list(out.glob("*.png"))


def test_a_run_with_its_own_run_dir_resumes(tiny_checkpoint, tmp_path):
    """The record in --out binds a run folder elsewhere to it; a resume of that run goes on."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    _run(tiny_checkpoint, out, "--run-dir", str(run_dir))
    (image,) = out.glob("*.png")
    image.unlink()
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert image.exists()


USERS_FILES = {"encode.json": b'{"mine": 1}', "denoise.json": b'{"mine": 2}', "denoise.safetensors": b"my tensors"}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("files", [USERS_FILES, {"run.json": b'{"my": "settings"}'}], ids=["handoff-names", "run-json"])
def test_a_run_dir_holding_files_of_our_names_we_did_not_write_is_refused(tiny_checkpoint, tmp_path, files,
                                                                          overwrite):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    for name, content in files.items():
        (run_dir / name).write_bytes(content)
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path / "out"), "--run-dir",
                     str(run_dir), "--prompt", "a dog", *overwrite])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    if "run.json" in files:
        assert line == (f"Error: --run-dir: {run_dir} holds a run.json that is not a run of this tool's it can "
                        "continue; flux-sharded replaces only files it wrote: give another --run-dir, or move that "
                        "file away")
    else:
        assert line == (f"Error: --run-dir: {run_dir} holds denoise.json, denoise.safetensors, encode.json, which no "
                        "run of this tool wrote (there is no run.json beside it); flux-sharded replaces only files it "
                        "wrote: give another --run-dir, or move those files away")
    assert "--overwrite" not in line
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == files
    assert not (tmp_path / "out").exists()


def test_a_copied_run_folder_is_not_ours_to_overwrite(tiny_checkpoint, tmp_path):
    """Someone else's run folder, copied into --run-dir: its run.json is valid but not bound to this --out."""
    theirs = tmp_path / "theirs"
    _run(tiny_checkpoint, tmp_path / "their-out", "--run-dir", str(theirs))
    mine = tmp_path / "mine"
    mine.mkdir()
    for path in theirs.iterdir():
        (mine / path.name).write_bytes(path.read_bytes())
    before = {path.name: path.read_bytes() for path in mine.iterdir()}
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path / "out"), "--run-dir", str(mine),
                     "--prompt", "a cat", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "holds a run.json that is not a run of this tool's it can continue" in error_line(result)
    assert {path.name: path.read_bytes() for path in mine.iterdir()} == before


def test_resume_with_another_run_dir_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    _run(tiny_checkpoint, out)
    (run_dir,) = (out / ".flux-sharded").iterdir()
    other = tmp_path / "other"
    result = invoke(["--resume", str(run_dir), "--run-dir", str(other)])
    assert result.exit_code == 2, result.output
    assert error_line(result) == (
        f"Error: --resume {run_dir} --run-dir {other}: a run continues in the folder it was saved in, which --resume "
        f"names; drop --run-dir (or give --resume {other} to continue the run saved there)")
    assert not other.exists()


def test_a_run_dir_record_that_is_a_fifo_is_refused_not_waited_on(tiny_checkpoint, tmp_path):
    """Found by the fresh-clone tester: the record in --out was read with read_text, and a FIFO in
    its place (no writer) hung the resume for ever."""
    import os

    out, run_dir = tmp_path / "out", tmp_path / "run"
    _run(tiny_checkpoint, out, "--run-dir", str(run_dir))
    (record,) = (out / ".flux-sharded").glob("run-dir-*.json")
    record.unlink()
    os.mkfifo(record)
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert error_line(result).endswith(NOT_STARTED_THERE.format(elsewhere=out))


def test_a_run_dir_record_written_by_hand_is_refused(tiny_checkpoint, tmp_path):
    """The record in --out that binds a run folder elsewhere to it is sealed like the run folder's
    files: one written by hand with the right fields (anyone who can read run.json can compute
    them) vouches for nothing; the record flux-sharded wrote resumes."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    _run(tiny_checkpoint, out, "--run-dir", str(run_dir))
    (record,) = (out / ".flux-sharded").glob("run-dir-*.json")
    written = record.read_text()
    fields = json.loads(written)
    del fields["seal"]
    record.write_text(json.dumps(fields) + "\n")
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert error_line(result).endswith(NOT_STARTED_THERE.format(elsewhere=out))
    record.write_text(written)
    resumed = invoke(["--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
