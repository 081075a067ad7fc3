"""What a new user meets in the first runs: each mistake refused at once, naming the value and the fix."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flux_sharded.cli import main

from .conftest import error_line, error_lines, invoke

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ("the checkpoints flux-sharded knows are black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell, "
         "black-forest-labs/FLUX.1-Kontext-dev, black-forest-labs/FLUX.2-dev, black-forest-labs/FLUX.2-klein-4B, black-forest-labs/FLUX.2-klein-9B, "
         "black-forest-labs/flux-3-image-klein and black-forest-labs/flux-3-image-klein-base")


def test_a_missing_model_folder_is_refused_before_torch_is_imported(tmp_path):
    """The check that costs nothing runs before the imports that cost seconds."""
    script = (
        "import sys\n"
        "from flux_sharded.cli import main\n"
        "try:\n"
        "    main(['--model', './nonexistent', '--prompt', 'a dog'], standalone_mode=False)\n"
        "except SystemExit as stop:\n"
        "    print('exit code', stop.code)\n"
        "print('heavy imports:', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "exit code 2" in result.stdout, result.stdout + result.stderr
    assert "Error: --model: folder './nonexistent' does not exist" in result.stderr
    assert "heavy imports: []" in result.stdout


def _hub_error(kind: str) -> Exception:
    import httpx2
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    response = httpx2.Response(401 if kind == "gated" else 404,
                               request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return {
        "gated": lambda: GatedRepoError("401 Client Error: access to model x is restricted", response=response),
        "missing": lambda: RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response),
        "unreachable": lambda: LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known"),
    }[kind]()


MODEL_CASES = [
    # (--model, what the hub answers, message fragments)
    ("./nonexistent", None, ["--model: folder './nonexistent' does not exist", KNOWN]),
    ("FLUX.1-dev", None, ["folder 'FLUX.1-dev' does not exist", "did you mean black-forest-labs/FLUX.1-dev?"]),
    ("flux-schnell", None, ["did you mean black-forest-labs/FLUX.1-schnell?"]),
    ("black-forest-labs/FLUX.1-dve", "missing",
     ["'black-forest-labs/FLUX.1-dve' is not a model on the Hugging Face hub", "did you mean black-forest-labs/FLUX.1-dev?",
      KNOWN]),
    ("no-such-user/no-such-model", "missing", ["'no-such-user/no-such-model' is not a model on the Hugging Face hub", KNOWN]),
    ("black-forest-labs/FLUX.1-dve", "unreachable",
     ["the Hugging Face hub could not be reached (Got: ConnectError", "check the connection",
      "did you mean black-forest-labs/FLUX.1-dev?"]),
    ("someone/gated-flux", "gated", ["'someone/gated-flux' is gated", "https://huggingface.co/someone/gated-flux",
                                     "hf auth login"]),
]


@pytest.mark.parametrize("model, hub, fragments", MODEL_CASES)
def test_model_messages_tell_a_typo_from_a_network_failure(tmp_path, monkeypatch, model, hub, fragments):
    import huggingface_hub

    def hub_answers(*args, **kwargs):  # the network boundary: the hub's own exception types
        raise _hub_error(hub or "unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_answers)
    result = invoke(["--model", model, "--prompt", "a dog", "--max-memory", "cpu=1GB", "--dry-run",
                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    for fragment in fragments:
        assert fragment in line
    assert "hf download" not in line  # a plain download would fetch the 23.8 GB root file too
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_says_hf_hub_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_sharded", "--model", "no-such-user/no-such-model", "--prompt", "a dog",
         "--max-memory", "cpu=1GB", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert "could not be reached (HF_HUB_OFFLINE is set and it is not in the Hugging Face cache)" in line
    assert "unset HF_HUB_OFFLINE" in line and "check the connection" not in line  # no connection was tried
    assert "hf download" not in line
    assert not (tmp_path / "out").exists()


SIZE_CASES = [
    # (height, width, message)
    ("50", "64", "--height 50 is not a positive multiple of 16 (the VAE's scale factor 8 x 2 for latent packing); "
                 "try --height 48"),
    ("64", "8", "--width 8 is not a positive multiple of 16"),
    ("50", "70", "--height 50 and --width 70 are not positive multiples of 16 (the VAE's scale factor 8 x 2 for "
                 "latent packing); try --height 48 --width 64"),
]


@pytest.mark.parametrize("height, width, message", SIZE_CASES)
def test_every_wrong_size_is_named_at_once(tiny_checkpoint, tmp_path, height, width, message):
    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=1GB",
                     "--height", height, "--width", width, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert not (tmp_path / "out").exists()


def _fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "runs, given, message",
    [
        (["out/.flux-sharded/run-aaa"], "out",
         "is an output folder, not a run folder; continue the run inside it with "
         "`flux-sharded --resume {tmp}/out/.flux-sharded/run-aaa`"),
        (["out/.flux-sharded/run-aaa"], "out/.flux-sharded",
         "continue the run inside it with `flux-sharded --resume {tmp}/out/.flux-sharded/run-aaa`"),
        (["out/.flux-sharded/run-aaa", "out/.flux-sharded/run-bbb"], "out",
         "it holds 2 runs: {tmp}/out/.flux-sharded/run-aaa, {tmp}/out/.flux-sharded/run-bbb; give one of them"),
        ([], "out", "is not a flux-sharded run folder (no run.json)"),
    ],
)
def test_resume_given_the_output_folder_names_the_run_inside(tmp_path, runs, given, message):
    (tmp_path / "out").mkdir()
    for run in runs:
        _fake_run(tmp_path / run)
    result = invoke(["--resume", str(tmp_path / given)])
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in error_line(result)


UNIT_CASES = [
    # (--max-memory for FLUX.1-dev at 1024x1024 in bf16, exit code, patterns the Error line holds)
    ("0=24GB", 2, [re.escape('Ways out: --max-memory 0=24GiB if that is your card (a card sold as "24 GB" holds '
                             '24 GiB = 25.77 GB, since GPU memory is counted in binary units); or --max-memory '
                             '0=24.4GB;')]),
    ("0=24GiB", 0, []),  # what the refusal above says: the whole card fits
    ("0=16GiB", 2, [r"Ways out: --max-memory 0=22\.8GiB; or cpu=\d+\.\dGiB in --max-memory"]),
    ("0=8GB,1=8GB", 2, [r"Ways out: --max-memory 0=13\.0GB,1=13\.0GB; or cpu=\d+\.\dGB in --max-memory",
                        re.escape('(A card sold as "8 GB" holds 8 GiB = 8.59 GB, since GPU memory is counted in binary '
                                  'units: budget it in GiB to use all of it.)')]),
]


@pytest.mark.parametrize("budget, exit_code, fragments", UNIT_CASES)
def test_refusals_answer_in_the_unit_written_and_say_cards_are_sold_in_gib(tmp_path, budget, exit_code, fragments):
    result = invoke(["--prompt", "a dog", "--max-memory", budget, "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == exit_code, result.output
    if exit_code:
        line = error_line(result)
        for fragment in fragments:  # regular expressions: the offload sizes follow the planner's estimates
            assert re.search(fragment, line), (fragment, line)


def test_a_suggestion_in_gib_fits(tmp_path):
    refused = invoke(["--prompt", "a dog", "--max-memory", "0=16GiB", "--dry-run"])
    suggested = re.search(r"Ways out: --max-memory (0=[\d.]+GiB);", refused.output)
    assert suggested, refused.output
    assert invoke(["--prompt", "a dog", "--max-memory", suggested.group(1), "--dry-run"]).exit_code == 0


def tiny_dry_run(checkpoint, *extra):
    return ["--model", str(checkpoint), "--prompt", "a dog", "--height", "32", "--width", "32", "--dtype", "float32",
            "--dry-run", *extra]


class _Memory:
    def __init__(self, available: int):
        self.available = self.total = available


def test_the_default_budget_note_of_a_machine_without_gpu_speaks_of_ram_only(tiny_checkpoint, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the hardware boundary: no GPU, on any machine
    result = invoke(tiny_dry_run(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    (note,) = [line for line in result.output.splitlines() if line.startswith("note: no --max-memory given")]
    assert re.fullmatch(r"note: no --max-memory given: using cpu=[\d.]+ [KMG]?B \(80% of the free RAM\)", note), note


def test_a_refusal_beyond_this_machines_ram_offers_disk_and_that_offer_fits(monkeypatch):
    """FLUX.1-dev on a CPU machine with 16 GB of RAM available: cpu=24.4GB is no way out there."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(16 * 10**9))
    args = ["--prompt", "a dog", "--dry-run", "--max-memory"]
    refused = invoke([*args, "cpu=15GB"])
    assert refused.exit_code == 2, refused.output
    line = error_line(refused)
    offer = re.search(r"; or --max-memory (cpu=15GB,disk=[\d.]+GB) --offload-folder DIR, as this machine has "
                      r"16\.00 GB of RAM available, of which the default budget takes 80% \(weights on disk are "
                      r"read back at every step: much slower\)", line)
    assert offer, line
    # A dry-run writes nothing, so it needs no --offload-folder (it says a run will).
    accepted = invoke([*args, offer.group(1)])
    assert accepted.exit_code == 0, accepted.output
    assert "note: a run with this disk entry will need --offload-folder DIR" in accepted.output
    assert re.search(r"^\s+disk\s", accepted.output, re.M)  # budgeted now: a disk row


def test_a_refusal_within_this_machines_ram_does_not_talk_of_disk(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(64 * 10**9))
    refused = invoke(["--prompt", "a dog", "--dry-run", "--max-memory", "cpu=15GB"])
    assert refused.exit_code == 2, refused.output
    assert "Ways out: --max-memory cpu=24.4GB" in error_line(refused)
    assert "disk" not in refused.output  # nobody budgeted it: the table's row for the shortfall says so
    assert re.search(r"^\s+no room\s+9\.95 GB\s.*\snone\s", refused.output, re.M), refused.output


def test_the_plan_header_and_refusal_name_the_batch_size(tiny_checkpoint):
    planned = invoke(tiny_dry_run(tiny_checkpoint, "--max-memory", "cpu=1GB", "--batch-size", "2"))
    assert planned.exit_code == 0, planned.output
    assert ("plan for 32x32, 28 steps, guidance 3.5, 512 prompt tokens, batch size 2, float32, --max-memory "
            "cpu=1.00 GB;") in planned.output
    refused = invoke(tiny_dry_run(tiny_checkpoint, "--max-memory", "cpu=100KB", "--batch-size", "2"))
    assert "(at 32x32, batch size 2, float32)" in error_line(refused)


@pytest.fixture(scope="module")
def schnell_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny FLUX.1 with FLUX.1-schnell's kind of transformer config: no guidance embedding
    (a dry-run reads the configs alone)."""
    import json
    import shutil

    copy = tmp_path_factory.mktemp("schnell") / "tiny-schnell"
    shutil.copytree(tiny_checkpoint, copy)
    config = copy / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    return copy


@pytest.mark.parametrize(
    "extra, header, ignored",
    [
        ([], "4 steps, guidance 0, 256 prompt tokens", None),  # the model card's, not FluxPipeline's 28 steps
        (["--steps", "8", "--max-sequence-length", "512"], "8 steps, guidance 0, 512 prompt tokens", None),
        (["--guidance", "0"], "4 steps, guidance 0, 256 prompt tokens", None),
        (["--guidance", "3.5"], "4 steps, guidance 3.5, 256 prompt tokens", "--guidance 3.5 has no effect"),
    ],
)
def test_a_checkpoint_without_guidance_embedding_gets_flux_schnells_defaults(schnell_checkpoint, extra, header,
                                                                             ignored):
    planned = invoke(tiny_dry_run(schnell_checkpoint, "--max-memory", "cpu=1GB", *extra))
    assert planned.exit_code == 0, planned.output
    assert f"plan for 32x32, {header}, batch size 1, float32," in planned.output
    notes = [line for line in planned.output.splitlines() if "has no guidance embedding" in line]
    assert notes == ([f"note: {schnell_checkpoint}'s transformer has no guidance embedding (guidance_embeds false, as "
                      f"FLUX.1-schnell): {ignored}"] if ignored else [])


def tiny_run(checkpoint, out, *extra):
    return ["--model", str(checkpoint), "--max-memory", "cpu=2GB", "--steps", "1", "--height", "32", "--width", "32",
            "--out", str(out), *extra]


def test_the_denoise_bar_names_the_images_of_the_batch_it_steps(tiny_checkpoint, tmp_path):
    result = invoke(tiny_run(tiny_checkpoint, tmp_path / "out", "--prompt", "a dog", "--prompt", "a cat", "--prompt",
                             "a fox", "--batch-size", "2", "--steps", "2"))
    assert result.exit_code == 0, result.output
    steps = {match.group(0) for match in re.finditer(r"step \d/2 of images? [\d-]+", result.output)}
    assert steps == {"step 1/2 of images 1-2", "step 2/2 of images 1-2", "step 1/2 of image 3", "step 2/2 of image 3"}


def test_bars_are_named_by_stage_and_a_long_prompt_is_noted_once_on_its_own_line(tiny_checkpoint, tmp_path):
    """Two 7 kB prompts, each cut by CLIP (77 tokens) and by T5 (16 here): diffusers warns four
    times with the whole cut text; the user reads one short note, above the bar, not on its line."""
    long_prompt = "a photo of a dog " * 400
    result = invoke(tiny_run(tiny_checkpoint, tmp_path / "out", "--prompt", long_prompt, "--prompt", "x " + long_prompt,
                             "--max-sequence-length", "16"))
    assert result.exit_code == 0, result.output
    segments = [segment for line in result.output.splitlines() for segment in line.split("\r")]
    bar_labels = {match.group(1) for segment in segments if (match := re.match(r"(.+?): +\d+%\|", segment))}
    assert bar_labels == {"encode", "denoise", "decode"}
    notes = [segment for segment in segments if "longer than a text encoder reads" in segment]
    assert len(notes) == 1, notes
    assert notes[0].startswith("note: a prompt is longer than a text encoder reads (CLIP can only handle sequences "
                               "up to 77 tokens); the text after that, starting 'a photo of a dog")
    assert len(notes[0]) < 300
    assert "truncated" not in result.output
    assert len(result.output) < 5000  # not the cut text, twice per prompt


def test_wrote_names_the_same_absolute_path_on_a_first_run_and_on_resume(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = invoke(tiny_run(tiny_checkpoint, "out", "--prompt", "a dog"))  # a relative --out
    assert first.exit_code == 0, first.output
    wrote = [line for line in first.output.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {tmp_path / 'out' / '0000-0-a-dog.png'}"]
    (tmp_path / "out" / "0000-0-a-dog.png").unlink()
    (run,) = (tmp_path / "out" / ".flux-sharded").iterdir()
    resumed = invoke(["--resume", str(run.relative_to(tmp_path))])
    assert resumed.exit_code == 0, resumed.output
    assert [line for line in resumed.output.splitlines() if line.startswith("wrote ")] == wrote


def test_accelerate_launch_that_starts_one_of_two_processes_is_refused(tiny_checkpoint, tmp_path):
    """Without --multi_gpu on a machine without GPUs, accelerate starts one process for --num_processes 2."""
    launcher = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [str(launcher), "launch", "--num_processes", "2", "-m", "flux_sharded", *tiny_run(tiny_checkpoint, tmp_path / "out"),
         "--prompt", "a dog", "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""},
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: accelerate launch was given --num_processes 2 but started one process: on a machine without GPUs (or "
        "without --multi_gpu) it uses its one-process launcher; add --multi_gpu (accelerate launch --multi_gpu "
        "--num_processes 2 -m flux_sharded ...), or torchrun --nproc_per_node 2 -m flux_sharded ..."
    ], result.stderr
    assert result.returncode != 0  # accelerate's own exit code for a failed process
    assert not (tmp_path / "out").exists()


def _ctrl_c_under(launcher: list[str], checkpoint: Path, out: Path) -> subprocess.Popen:
    """Two processes under `launcher`, sent the terminal's Ctrl-C while both are denoising; the
    finished launcher process (stdout and stderr read) is returned."""
    import signal

    import psutil

    args = [*tiny_run(checkpoint, out, "--prompt", "a dog", "--prompt", "a cat"), "--steps", "10000"]
    process = subprocess.Popen([*launcher, "--nproc_per_node", "2", "-m", "flux_sharded", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        # Both workers are denoising once both encode handoffs are saved (10000 steps: minutes).
        while len(list(out.glob(".flux-sharded/run-*/encode-process-*.safetensors"))) < 2:
            with contextlib.suppress(subprocess.TimeoutExpired):  # waits on the files, without spinning
                process.wait(timeout=0.2)
            assert process.poll() is None, process.communicate()
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        process.output = process.communicate(timeout=120)
    finally:  # whatever went wrong, no worker (each in a session of its own) outlives the test
        if process.poll() is None:
            for worker in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.send_signal(signal.SIGKILL)
            process.communicate()
    return process


def test_ctrl_c_under_torchrun_prints_one_line_and_no_traceback_of_ours(tiny_checkpoint, tmp_path):
    """The terminal's Ctrl-C reaches torchrun (its workers run in sessions of their own), which
    sends its workers SIGINT. Each worker stops quietly and the main one prints how to continue;
    torchrun's own report of the signal is torchrun's (a SignalException), nothing of flux_sharded's."""
    out = tmp_path / "out"
    process = _ctrl_c_under([str(Path(sys.executable).parent / "torchrun")], tiny_checkpoint, out)
    stderr = process.output[1]
    interrupted = [line for line in stderr.splitlines() if line.startswith("Interrupted. Continue with: ")]
    assert interrupted == [f"Interrupted. Continue with: torchrun --nproc_per_node 2 -m flux_sharded --resume "
                           f"{next(out.glob('.flux-sharded/run-*'))}"], stderr  # the launcher the run used
    tracebacks = stderr.split("Traceback (most recent call last):")[1:]
    assert all("flux_sharded" not in traceback and "SignalException" in traceback for traceback in tracebacks), stderr


def test_ctrl_c_under_our_torchrun_exits_130_with_one_line(tiny_checkpoint, tmp_path):
    """python -m flux_sharded.launch is torchrun's own main, ending as a shell expects: no traceback."""
    out = tmp_path / "out"
    process = _ctrl_c_under([sys.executable, "-m", "flux_sharded.launch"], tiny_checkpoint, out)
    stderr = process.output[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and not error_lines(stderr), stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith("Interrupted. Continue with: ")]
    assert interrupted == [f"Interrupted. Continue with: python -m flux_sharded.launch --nproc_per_node 2 -m "
                           f"flux_sharded --resume {next(out.glob('.flux-sharded/run-*'))}"], stderr


def test_a_refusal_under_our_torchrun_exits_with_its_code_and_one_error_line(tiny_checkpoint, tmp_path):
    """Both processes refuse the same setting: the first to fail says it (distributed.record_failure)."""
    result = subprocess.run([sys.executable, "-m", "flux_sharded.launch", "--nproc_per_node", "2", "-m", "flux_sharded",
                             *tiny_run(tiny_checkpoint, tmp_path / "out", "--prompt", "a dog"), "--height", "33"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert re.fullmatch(r"Error: \[process [01]\] --height 33 is not a positive multiple of 16 \(the VAE's scale factor "
                        r"8 x 2 for latent packing\); try --height 32", line), result.stderr


@pytest.mark.parametrize("exit_codes, expected", [
    ({0: -15, 1: 2}, 2),  # process 1 refused; torchrun then stopped process 0 (SIGTERM)
    ({0: 2, 1: 2}, 2),
    ({0: 3, 1: -15}, 3),
    ({0: -9}, 137),  # killed (SIGKILL)
    ({0: -15, 1: -9}, 137),  # process 1 killed (the out-of-memory killer), then torchrun stopped process 0
    ({0: 143, 1: -9}, 137),  # ... which stopped quietly
    ({0: 143, 1: 3}, 3),  # process 1 ran out of memory; process 0, stopped by torchrun's SIGTERM, stopped quietly
    ({0: 129, 1: 143}, 129),  # a closed terminal's SIGHUP, then torchrun stopped the other one
])
def test_our_torchrun_exits_with_the_code_of_the_process_that_failed_by_itself(monkeypatch, exit_codes, expected):
    """torchrun reports every failed process (ChildFailedError); the one that exited by itself says what went wrong."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from flux_sharded import launch

    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent")
                for rank, code in exit_codes.items()}

    def failing(argv):
        raise ChildFailedError("flux_sharded", failures)

    monkeypatch.setattr(torch.distributed.run, "main", failing)
    assert launch.main([]) == expected


def test_a_killed_process_under_our_torchrun_gets_one_error_line(monkeypatch, capsys):
    """A SIGKILLed worker says nothing (torch logs its exit code): the launch says which process and
    why that happens, once."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from flux_sharded import launch

    def failing(argv):
        raise ChildFailedError("flux_sharded", {
            rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent")
            for rank, code in {0: -15, 1: -9}.items()})

    monkeypatch.setattr(torch.distributed.run, "main", failing)
    assert launch.main([]) == 137
    assert error_lines(capsys.readouterr().err) == [
        "Error: process 1 was killed by SIGKILL (the kernel's out-of-memory killer sends it when the machine runs out "
        "of RAM); the run folder keeps what was finished: run the same launch with --resume and the run folder to "
        "continue"]


def test_a_gpu_budget_on_a_machine_without_gpu_suggests_a_cpu_budget_it_has(tiny_checkpoint, tmp_path, monkeypatch):
    import psutil

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(10 * 10**9))  # 10 GB free: cpu=32GB is no example
    result = invoke(tiny_run(tiny_checkpoint, tmp_path / "out", "--prompt", "a dog", "--max-memory", "0=16GB,1=16GB"))
    assert result.exit_code == 2, result.output
    assert error_line(result) == ("Error: --max-memory: GPU 0 does not exist; this machine has no GPU; budget the CPU "
                                  "instead (e.g. cpu=8.0GB, 80% of the free RAM)")
    assert not (tmp_path / "out").exists()


def test_a_refusal_of_the_default_budget_suggests_sizes_a_user_would_type(monkeypatch):
    """No --max-memory: the budget is 80% of the free RAM to the byte; a suggestion keeping it
    rounds it down to a tenth of a GB rather than printing 12898765431B."""
    import psutil
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Memory(16_123_456_789))
    refused = invoke(["--prompt", "a dog", "--dry-run"])
    assert refused.exit_code == 2, refused.output
    assert "note: no --max-memory given: using cpu=12.90 GB (80% of the free RAM)" in refused.output
    offer = re.search(r"; or --max-memory (cpu=12\.8GB,disk=[\d.]+GB) --offload-folder DIR", error_line(refused))
    assert offer, error_line(refused)
    assert invoke(["--prompt", "a dog", "--dry-run", "--max-memory", offer.group(1)]).exit_code == 0


@pytest.mark.parametrize("fixture, header", [
    ("tiny_klein", "4 steps, guidance 1, 512 prompt tokens"),  # step-distilled, as the published klein
    ("tiny_klein_base", "50 steps, guidance 4, 512 prompt tokens"),  # is_distilled false: the pipeline's own
])
def test_a_klein_gets_the_defaults_of_its_kind(request, fixture, header):
    checkpoint = request.getfixturevalue(fixture)
    planned = invoke(["--dry-run", "--model", str(checkpoint), "--prompt", "a dog", "--max-memory", "cpu=1GB",
                      "--height", "64", "--width", "64"])
    assert planned.exit_code == 0, planned.output
    assert f"plan for 64x64, {header}, batch size 1," in planned.output


def test_the_base_klein_defaults_are_the_installed_pipelines():
    import inspect

    from diffusers import Flux2KleinPipeline

    from flux_sharded.families import FLUX_2_KLEIN_BASE_DEFAULTS

    parameters = inspect.signature(Flux2KleinPipeline.__call__).parameters
    assert FLUX_2_KLEIN_BASE_DEFAULTS == {name: parameters[argument].default for name, argument in (
        ("steps", "num_inference_steps"), ("guidance", "guidance_scale"), ("max_sequence_length", "max_sequence_length"))}


def test_our_torchrun_exits_with_the_code_of_the_process_that_failed_first(monkeypatch):
    """Process 1 ran out of memory (3) first; process 0 then failed with a refusal of its own (2)."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from flux_sharded import launch
    from flux_sharded.distributed import record_failure

    said = []

    def failing(argv):
        said.append(record_failure(1, 3, "denoise ran out of memory"))
        said.append(record_failure(0, 3, "denoise ran out of memory"))  # the same: said once
        said.append(record_failure(0, 2, "another refusal"))  # something else: said too
        raise ChildFailedError("flux_sharded", {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code,
                                                                     error_file="/nonexistent")
                                                for rank, code in ((0, 2), (1, 3))})

    monkeypatch.setattr(torch.distributed.run, "main", failing)
    assert launch.main([]) == 3
    assert said == [True, False, True]
