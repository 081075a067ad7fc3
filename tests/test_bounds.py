"""Every count bounded before it is used: a huge one is refused in one line, it never hangs the tool."""

from __future__ import annotations

from flux_sharded.settings import MAX_IMAGES
from flux_sharded.validate import MAX_PROCESSES

from .conftest import error_line, invoke
from .sealing import edit_sealed_json

COMMON = ["--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]


def test_a_billion_images_per_prompt_is_refused_before_any_list_is_built(tiny_checkpoint, tmp_path):
    """main built a billion (prompt, seed) entries first: minutes of CPU and tens of GB, deaf to Ctrl-C."""
    result = invoke(["--model", str(tiny_checkpoint), *COMMON, "--out", str(tmp_path / "out"), "--prompt", "a dog",
                     "--prompt", "a cat", "--num-images-per-prompt", "1000000000"])
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --num-images-per-prompt 1000000000 for 2 prompt(s) makes 2000000000 images; a run makes at most "
        f"{MAX_IMAGES} (its run.json lists each image's prompt and seed, and every resume checks each image): give "
        "fewer, or split the prompts over several runs")
    assert not (tmp_path / "out").exists()


def _finished_run(checkpoint, out):
    result = invoke(["--model", str(checkpoint), *COMMON, "--out", str(out), "--prompt", "a dog"])
    assert result.exit_code == 0, result.output
    return next((out / ".flux-sharded").iterdir())


def test_a_run_json_naming_more_processes_than_a_resume_can_look_for_is_refused(tiny_checkpoint, tmp_path):
    """processes 100000 and 1000 resumed counts, each within MAX_PROCESSES: main looked for 10**8 handoff names."""
    run_dir = _finished_run(tiny_checkpoint, tmp_path / "out")
    edit_sealed_json(run_dir / "run.json", lambda run: run.update(
        processes=MAX_PROCESSES, resumed_processes=list(range(MAX_PROCESSES - 1000, MAX_PROCESSES))))
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2
    launched = MAX_PROCESSES + sum(range(MAX_PROCESSES - 1000, MAX_PROCESSES))
    assert error_line(result) == (
        f"Error: --resume '{run_dir}': run.json field 'processes' and 'resumed_processes' name {launched} processes in "
        f"all, more than {MAX_PROCESSES} (a resume looks for the handoffs of each); the file was edited or damaged: "
        "start a new run (or restore the file)")


def test_a_run_json_of_more_images_than_a_run_makes_is_refused(tiny_checkpoint, tmp_path):
    run_dir = _finished_run(tiny_checkpoint, tmp_path / "out")
    count = MAX_IMAGES + 1
    edit_sealed_json(run_dir / "run.json", lambda run: run["settings"].update(prompts=["a dog"] * count,
                                                                              seeds=list(range(count))))
    result = invoke(["--resume", str(run_dir)])
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: --resume '{run_dir}': run.json field 'settings.prompts' has {count} entries, not 1 to {MAX_IMAGES}; "
        "the file was edited or damaged: start a new run (or restore the file)")
