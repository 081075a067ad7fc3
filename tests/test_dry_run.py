"""--dry-run: the plan without loading, its refusal, and a run that executes exactly that plan."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from flux_sharded import plan as plan_module
from flux_sharded import runner
from flux_sharded.budget import parse_size
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.errors import PlanError
from flux_sharded.handoff import GenerationSettings
from flux_sharded.stages import STAGES

from .conftest import invoke

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_of_flux_dev_works_offline_from_the_shipped_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_sharded", "--prompt", "a dog", "--max-memory", "0=16GB,1=16GB", "--dry-run",
         "--report", str(tmp_path / "plan.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")},
    )
    assert result.returncode == 0, result.stderr
    assert "note: planning for GPU(s) 0, 1, which this machine does not have" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan for 1024x1024, 28 steps, guidance 3.5, 512 prompt tokens, batch size 1, "
                               "bfloat16, --max-memory 0=16.00 GB, 1=16.00 GB; activations are")
    assert lines[1].split() == ["stage", "device", "weights", "activations", "planned", "budget", "headroom"]
    assert lines[2].split()[:4] == ["encode", "0", "9.52", "GB"]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["images"] == []
    assert [stage["name"] for stage in report["stages"]] == ["encode", "denoise", "decode"]
    denoise = report["stages"][1]
    assert set(denoise["weight_bytes"]) == {"0", "1"}
    assert 23.3e9 < sum(denoise["weight_bytes"].values()) < 24.3e9
    assert all(denoise["planned_bytes"][d] > denoise["weight_bytes"][d] for d in ("0", "1"))
    assert denoise["load_seconds"] is None and denoise["peak_bytes"] is None
    assert {p.name for p in tmp_path.iterdir()} <= {"empty-hf-home", "plan.json"}  # nothing downloaded or written


def test_refused_dry_run_shows_the_plan_and_one_error(tmp_path):
    result = invoke(["--prompt", "a dog", "--max-memory", "0=8GB,1=8GB", "--dry-run", "--model",
                     "black-forest-labs/FLUX.1-schnell", "--max-sequence-length", "256",
                     "--report", str(tmp_path / "plan.json")])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1
    assert "does not fit" in error_lines[0] and "Ways out: --max-memory 0=" in error_lines[0]
    # the table shows what found no room, under that name: the budget has no disk
    assert re.search(r"^\s+no room\s", result.output, re.M) and "disk" not in result.output
    assert not (tmp_path / "plan.json").exists()


def test_refusal_comes_before_any_weight_file_is_read(tiny_checkpoint, tmp_path):
    """The same checkpoint with every weight file removed: planning still refuses the budget."""
    configs_only = tmp_path / "configs-only"
    shutil.copytree(tiny_checkpoint, configs_only)
    for weights in configs_only.rglob("*.safetensors"):
        weights.unlink()
    result = invoke(["--model", str(configs_only), "--prompt", "a dog", "--max-memory", "cpu=100KB",
                     "--height", "64", "--width", "64", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Error: encode (text_encoder, text_encoder_2:" in result.output
    assert "Ways out: --max-memory cpu=" in result.output
    assert not (tmp_path / "out").exists()


def test_the_suggested_budget_is_the_smallest_that_fits_at_the_checkpoints_scale(tiny_checkpoint, tmp_path):
    """A tiny checkpoint needs a few MB: the suggestion is in steps fitting that scale (not a
    100 MB floor), it fits, and one step less (one unit of its last printed digit) does not."""
    args = ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--height", "32", "--width", "32",
            "--dtype", "float32", "--dry-run", "--out", str(tmp_path / "out")]
    refused = invoke([*args, "--max-memory", "cpu=100KB"])
    assert refused.exit_code == 2, refused.output
    suggested = re.search(r"Ways out: --max-memory cpu=([\d.]+)(KB|MB);", refused.output)
    assert suggested, refused.output
    number, unit = Decimal(suggested.group(1)), suggested.group(2)
    assert parse_size(f"{number}{unit}") < 100 * 10**6
    one_step_less = number - Decimal(1).scaleb(number.as_tuple().exponent)
    assert invoke([*args, "--max-memory", f"cpu={number}{unit}"]).exit_code == 0
    assert invoke([*args, "--max-memory", f"cpu={one_step_less}{unit}"]).exit_code == 2


def test_a_run_executes_the_plan_it_made_once(tiny_checkpoint, tmp_path, monkeypatch):
    plans, loaded_with = [], {}
    real_plan_run = runner.plan_run

    def counting_plan_run(*args, **kwargs):
        plans.append(real_plan_run(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(runner, "plan_run", counting_plan_run)
    monkeypatch.setattr(plan_module, "plan_run", counting_plan_run)
    for stage in STAGES:
        def load(checkpoint, stage_plan, dtype, offload_folder=None, _real=stage.load, _name=stage.NAME):
            loaded_with[_name] = stage_plan
            return _real(checkpoint, stage_plan, dtype, offload_folder)

        monkeypatch.setattr(stage, "load", load)

    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=4GB", "--steps", "1",
                     "--height", "32", "--width", "32", "--out", str(tmp_path), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert len(plans) == 1
    assert all(loaded_with[stage.name] is stage for stage in plans[0].stages)
    report = json.loads((tmp_path / "r.json").read_text())
    for stage in report["stages"]:
        planned = plans[0].stage(stage["name"])
        assert stage["device_map"] == {
            c.name: {m: str(d) for m, d in c.device_map.items()} for c in planned.components
        }
        assert stage["planned_bytes"]["cpu"] == planned.planned_bytes["cpu"]
        assert stage["weight_bytes"]["cpu"] == planned.weight_bytes["cpu"]
        assert stage["peak_bytes"]["cpu"] > stage["weight_bytes"]["cpu"]  # measured: the whole process
    header = next(line for line in result.stdout.splitlines() if line.startswith("stage"))
    assert header.split() == ["stage", "device", "weights", "activations", "planned", "budget", "headroom", "peak",
                              "load", "s", "run", "s"]


def test_disk_budget_needs_an_offload_folder(tiny_checkpoint, tmp_path):
    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=4GB,disk=10GB",
                     "--height", "32", "--width", "32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "Error: --max-memory has a disk entry but no --offload-folder" in result.output
    assert not (tmp_path / "out").exists()


def test_a_gpu_without_the_planned_free_memory_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path,
                                                                                       monkeypatch):
    """The run checks the plan against each budgeted GPU's free memory (faked here: this machine
    has no GPU) right after planning, before the run folder or any image is written."""
    monkeypatch.setattr(runner, "free_gpu_bytes", lambda budget: {0: 1000})
    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    settings = GenerationSettings(str(tiny_checkpoint), ("a dog",), (0,), 1, 3.5, 32, 32, 16, "float32")
    request = runner.RunRequest(checkpoint, settings, {0: 10**9, "cpu": 10**9}, tmp_path / "out")
    with pytest.raises(PlanError, match=r"^GPU 0 has 1.00 KB free now, but \w+ plans .* there under --max-memory 0="):
        runner.execute(request)
    assert not (tmp_path / "out").exists()


def test_a_run_notes_a_plan_above_the_available_ram(tiny_checkpoint, tmp_path, monkeypatch):
    class Scarce:
        available = 1000

    monkeypatch.setattr(runner.psutil, "virtual_memory", lambda: Scarce())
    result = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=1GB", "--steps", "1",
                     "--height", "32", "--width", "32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "in RAM, but 1.00 KB is available now; the run may swap" in result.output
