"""SIGTERM and SIGHUP stop a run as Ctrl-C does, and a signal at any moment, imports included, gives one line.

Each test runs the command line in a process of its own (a signal that is not handled would end
pytest's), and sends the signal from inside it at a chosen moment: after the first batch's latents
are kept, or as a module is imported, so that nothing depends on timing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import error_lines

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-memory", "cpu=2GB", "--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32"]

# The command line as `python -m flux_sharded` starts it, the signal sent by the process itself at the moment named.
AFTER_FIRST_BATCH = """
import os, runpy, signal, sys
from flux_sharded import runner
real = runner.save_batch_latents
def save_then_signal(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
runner.save_batch_latents = save_then_signal
sys.argv = ["flux_sharded", *sys.argv[1:]]
runpy.run_module("flux_sharded", run_name="__main__")
"""
WHILE_IMPORTING = """
import os, runpy, signal, sys
class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            {send}
        return None
sys.meta_path.insert(0, SignalOnImport())
sys.argv = ["flux_sharded", *sys.argv[1:]]
runpy.run_module("flux_sharded", run_name="__main__")
"""
SEND = "os.kill(os.getpid(), signal.{signal})"
# What a library that catches too much does with a Ctrl-C that lands in its import.
SEND_AND_WRAP = ("try:\n                os.kill(os.getpid(), signal.{signal})\n"
                 "            except BaseException as error:\n"
                 "                raise RecursionError('maximum recursion depth exceeded') from error")


def _as_a_shell_starts_it() -> None:
    # An ignored signal stays ignored across exec (nohup relies on it), and interrupt.py keeps it so;
    # an in-process run that was interrupted earlier in this session leaves pytest ignoring them.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                          preexec_fn=_as_a_shell_starts_it)


@pytest.mark.parametrize("name, exit_code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_stop_signal_keeps_the_finished_batch_and_prints_the_resume_command(tiny_checkpoint, tmp_path, name,
                                                                             exit_code):
    """Batch schedulers and `docker stop` send SIGTERM, a closed terminal SIGHUP: the run stops as on Ctrl-C."""
    out = tmp_path / "out"
    result = _run(AFTER_FIRST_BATCH.format(signal=name),
                  ["--model", str(tiny_checkpoint), *COMMON, "--out", "out", "--prompt", "a dog", "--prompt", "a cat"],
                  tmp_path)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr and not error_lines(result.stderr), result.stderr
    run_dir = next((out / ".flux-sharded").iterdir())
    lines = [line for line in result.stderr.splitlines() if line.startswith("Interrupted")]
    assert lines == [f"Interrupted. Continue with: flux-sharded --resume {run_dir}"], result.stderr
    assert run_dir.is_absolute()  # --out was relative: the command works from any folder
    assert (run_dir / "denoise-batch-from-image-0.safetensors").exists()  # the finished batch, kept
    assert not (run_dir / "denoise-batch-from-image-1.safetensors").exists()


@pytest.mark.parametrize("module", ["click", "torch"])  # imported by `python -m flux_sharded`, then by the run
@pytest.mark.parametrize("name, exit_code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_while_importing_gives_one_line(tiny_checkpoint, tmp_path, module, name, exit_code):
    result = _run(WHILE_IMPORTING.format(module=module, send=SEND.format(signal=name)),
                  ["--model", str(tiny_checkpoint), *COMMON, "--out", "out", "--prompt", "a dog"], tmp_path)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("Interrupted")] != [], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_ctrl_c_that_an_import_turned_into_another_error_gives_one_line(tiny_checkpoint, tmp_path):
    """numpy, interrupted in its import, was seen raising a RecursionError instead of the KeyboardInterrupt."""
    result = _run(WHILE_IMPORTING.format(module="torch", send=SEND_AND_WRAP.format(signal="SIGINT")),
                  ["--model", str(tiny_checkpoint), *COMMON, "--out", "out", "--prompt", "a dog"], tmp_path)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == ["Interrupted; nothing was written."]
