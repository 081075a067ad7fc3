"""The Python API (flux_sharded.api): the command line's images, plan and errors, from Python."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flux_sharded
from flux_sharded import api
from flux_sharded.errors import BudgetError, CheckpointError, FluxShardedError, SettingsError
from flux_sharded.placement import hostable
from flux_sharded.progress import Progress
from flux_sharded.settings import image_options

from .conftest import assert_same_pixels, invoke

SETTINGS = {"steps": 2, "height": 32, "width": 48, "guidance": 4.0, "max_sequence_length": 16}
CLI_SETTINGS = ["--steps", "2", "--height", "32", "--width", "48", "--guidance", "4.0", "--max-sequence-length", "16",
                "--dtype", "float32", "--max-memory", "cpu=2GB"]


def cli_images(checkpoint: Path, out: Path, *args: str) -> list[Path]:
    result = invoke(["--model", str(checkpoint), *CLI_SETTINGS, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*.png"))


@pytest.fixture
def model(tiny_checkpoint):
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as opened:
        yield opened


def test_the_api_makes_the_command_lines_images_and_metadata(tiny_checkpoint, tmp_path, model):
    """Two prompts, two images each, seed 7 (image k: seed + k), batches of two: the same PNG pixels
    and text fields as the command line's, the API's images in prompt order."""
    expected = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a dog", "--prompt", "a red cat",
                          "--num-images-per-prompt", "2", "--seed", "7", "--batch-size", "2")
    result = model.generate(["a dog", "a red cat"], seed=7, num_images_per_prompt=2, batch_size=2, **SETTINGS)
    assert len(result.images) == len(expected) == 4
    for image, path in zip(result.images, expected, strict=True):
        with Image.open(path) as cli_image:
            assert_same_pixels(np.asarray(image), np.asarray(cli_image))
            assert image.text == cli_image.text
    assert [metadata["seed"] for metadata in result.metadata] == ["7", "8", "9", "10"]
    assert [stage.name for stage in result.report.stages] == ["encode", "denoise", "decode"]
    assert all(stage.peak_bytes for stage in result.report.stages)  # measured, as the CLI's report


def test_without_out_dir_nothing_stays_on_disk(tmp_path, model, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the call's temporary folder goes
    result = model.generate("a dog", **SETTINGS)
    assert result.images[0].size == (48, 32)
    assert result.paths == [] and result.report.images == []
    assert list(tmp_path.iterdir()) == []


def test_with_out_dir_the_pngs_stay_and_the_run_can_be_resumed(tmp_path, model):
    result = model.generate("a dog", out_dir=tmp_path / "out", **SETTINGS)
    assert result.paths == sorted((tmp_path / "out").glob("*.png"))
    assert len(result.paths) == 1
    again = invoke(["--resume", str(next((tmp_path / "out" / ".flux-sharded").iterdir()))])
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output


def test_the_plan_is_the_dry_run(tiny_checkpoint, model):
    plan = model.plan(**SETTINGS)
    assert plan.fits and [stage.name for stage in plan.stages] == ["encode", "denoise", "decode"]
    assert all(stage.peak_bytes is None for stage in plan.stages)  # planned, not measured
    dry_run = invoke(["--model", str(tiny_checkpoint), "--prompt", "a dog", *CLI_SETTINGS, "--dry-run"])
    assert dry_run.exit_code == 0, dry_run.output
    # the same table; the API's plan adds what stays in RAM between its calls (the CLI keeps nothing)
    once = dataclasses.replace(plan.report, stages=[dataclasses.replace(stage, kept_bytes=0) for stage in plan.stages])
    assert f"{plan.summary}\n{once.table()}\n" in dry_run.output
    assert "stay in RAM" in plan.report.table() and "stay in RAM" not in dry_run.output


def test_a_plan_over_budget_is_refused_in_the_plan_not_raised(tiny_checkpoint):
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=100KB", dtype="float32") as model:
        plan = model.plan(**SETTINGS)
    assert not plan.fits
    assert "does not fit" in str(plan.refusal) or "fit" in str(plan.refusal)
    assert str(plan).splitlines()[-1] == f"Error: {plan.refusal}"


def test_the_progress_callback_follows_every_stage(model):
    events: list[Progress] = []
    model.generate(["a dog", "a cat"], progress=events.append, **SETTINGS)
    assert [event.stage for event in events if event.images_done == 0 and event.step is None] == \
        ["encode", "denoise", "decode"]  # each stage announced as it starts
    finished = [event for event in events if event.images_done == event.images]
    assert {event.stage for event in finished} == {"encode", "denoise", "decode"}
    steps = [(event.step, event.steps) for event in events if event.stage == "denoise" and event.step]
    assert steps == [(1, 2), (2, 2)] * 2  # two images, one batch each


def test_generate_iter_yields_the_callbacks_events_then_the_generation(model):
    called: list[Progress] = []
    expected = model.generate(["a dog", "a cat"], seed=3, progress=called.append, **SETTINGS)
    *events, generation = model.generate_iter(["a dog", "a cat"], seed=3, **SETTINGS)
    assert events == called
    assert isinstance(generation, api.Generation)
    for image, other in zip(generation.images, expected.images, strict=True):
        assert_same_pixels(np.asarray(image), np.asarray(other))


def test_leaving_generate_iter_early_stops_the_run_and_resume_continues_it(model, tmp_path):
    """A break at the first denoising step: the run stops there (no thread left running, no PNG),
    its run folder keeps the encode, and the same call with resume=True finishes it without
    encoding again, to the pixels of an uninterrupted call."""
    out = tmp_path / "out"
    for event in model.generate_iter(["a dog", "a cat"], out_dir=out, **SETTINGS):
        if event.stage == "denoise" and event.step == 1:
            break
    assert "flux-sharded-generate" not in [thread.name for thread in threading.enumerate()]
    assert list(out.glob("*.png")) == []
    with pytest.raises(SettingsError, match="already holds a run"):
        model.generate(["a dog", "a cat"], out_dir=out, **SETTINGS)
    called: list[Progress] = []
    resumed = model.generate(["a dog", "a cat"], out_dir=out, resume=True, progress=called.append, **SETTINGS)
    assert "encode" not in {event.stage for event in called}
    fresh = model.generate(["a dog", "a cat"], **SETTINGS)
    for image, other in zip(resumed.images, fresh.images, strict=True):
        assert_same_pixels(np.asarray(image), np.asarray(other))


# (where, keyword arguments, error class, message fragment)
MISTAKES = [
    ("generate", {"steps": 0}, SettingsError, "generate(): field 'steps' is 0, outside 1..100000"),
    ("generate", {"steps": "many"}, SettingsError, "field 'steps' is \"many\", not a whole number"),
    ("generate", {"steps": 2.5}, SettingsError, "field 'steps' is 2.5, not a whole number"),
    ("generate", {"stepz": 3}, SettingsError, "generate(): unknown keyword argument 'stepz'; it takes steps,"),
    ("generate", {"guidance": float("nan")}, SettingsError, "field 'guidance' is NaN, not a finite number >= 0"),
    ("generate", {"height": 50}, SettingsError, "--height 50 is not a positive multiple of 16"),
    ("generate", {"prompt": []}, SettingsError, "prompt=[]: give a text, or a non-empty list of texts"),
    ("generate", {"prompt": "   "}, SettingsError, "an empty prompt cannot be generated"),
    ("generate", {"num_images_per_prompt": 0}, SettingsError, "num_images_per_prompt=0: give at least 1"),
    ("generate", {"seed": "zero"}, SettingsError, "seed='zero': give a whole number"),
    ("generate", {"dtype": "float32"}, SettingsError, "unknown keyword argument 'dtype'"),  # given when opening
    ("plan", {"batch_size": 0}, SettingsError, "plan(): field 'batch_size' is 0, outside 1..1048576"),
    ("plan", {"seed": "zero"}, SettingsError, "plan(): seed='zero': give a whole number"),
    ("plan", {"num_images_per_prompt": "2"}, SettingsError, "plan(): num_images_per_prompt='2': give a whole number"),
    ("plan", {"num_images_per_prompt": 0}, SettingsError, "plan(): num_images_per_prompt=0: give at least 1"),
    ("open", {"max_memory": "cpu=16XB"}, BudgetError, "'XB' is an unknown unit"),
    ("open", {"max_memory": 16}, SettingsError, "max_memory=16: give a text such as '0=16GB,cpu=64GB'"),
    ("open", {"dtype": "int8"}, SettingsError, "field 'dtype' is \"int8\", not one of"),
    ("open", {"quantize": "transformer=fp3"}, SettingsError, "fp3"),
    ("open", {"lora": [1]}, SettingsError, "field 'lora' is [1], not a text or a list of texts"),
    ("open", {"steps": 2}, SettingsError, "open_model(): unknown keyword argument 'steps'; it takes dtype, quantize"),
    ("open", {"model": "/nonexistent/flux"}, CheckpointError, "/nonexistent/flux"),
]


@pytest.mark.parametrize("where, arguments, error, message", MISTAKES, ids=[str(case[1]) for case in MISTAKES])
def test_a_bad_argument_raises_the_projects_error_naming_it(tiny_checkpoint, tmp_path, where, arguments, error,
                                                            message):
    out = tmp_path / "out"
    with pytest.raises(error) as raised:
        if where == "open":
            flux_sharded.open_model(**{"model": str(tiny_checkpoint), "max_memory": "cpu=2GB", **arguments})
        else:
            with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as model:
                call = model.generate if where == "generate" else model.plan
                call(**{"prompt": "a dog", **SETTINGS, **({"out_dir": out} if where == "generate" else {}),
                        **arguments})
    assert message in str(raised.value)
    assert isinstance(raised.value, FluxShardedError)  # what the command line prints as one Error line
    assert not out.exists()


def test_a_closed_model_refuses_to_generate(model):
    model.close()
    with pytest.raises(SettingsError, match="this model is closed"):
        model.generate("a dog", **SETTINGS)


def test_the_keyword_arguments_are_the_schemas_settings():
    """help() shows every per-call setting of the schema, none written out by hand."""
    generate = inspect.signature(api.Model.generate).parameters
    assert [each.name for each in image_options()] == [name for name in generate if name in
                                                       {each.name for each in image_options()}]
    assert {"dtype", "quantize", "lora"} <= set(inspect.signature(flux_sharded.open_model).parameters)


API_RUN = """
import sys
import threading
import weakref
from flux_sharded import api

with api.open_model(sys.argv[1], max_memory="cpu=2GB", dtype="float32") as model:
    model.generate("a dog", steps=1, height=32, width=32)
print("done")
"""
BAR_NAMES = ("encode:", "denoise:", "decode:")


def test_the_libraries_say_nothing_in_a_fresh_process(tiny_checkpoint, tmp_path):
    """As on the command line (progress.quiet_libraries): stderr holds the stage bars alone, none
    of the libraries' import notes or loading bars."""
    result = subprocess.run([sys.executable, "-c", API_RUN, str(tiny_checkpoint)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    said = [line for line in result.stderr.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith(BAR_NAMES)]
    assert said == [], json.dumps(said, indent=1)


# ---------------------------------------------------------------- weights kept between calls


def stage_bytes(plan: api.Plan, field: str, stage: str) -> int:
    return getattr(next(each for each in plan.stages if each.name == stage), field).get("cpu", 0)


def test_a_second_call_reads_no_weight_the_plan_kept_and_makes_the_command_lines_pixels(tiny_checkpoint, tmp_path,
                                                                                         model, loads):
    plan = model.plan(**SETTINGS)
    assert {stage.name: stage.kept_bytes for stage in plan.stages} == \
        {stage.name: stage.weight_bytes["cpu"] for stage in plan.stages}  # all of them, each its weights
    assert "its weights stay in RAM between calls" in str(plan)
    model.generate("a dog", **SETTINGS)
    assert sorted(subfolder for _, subfolder, _ in loads) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    second = model.generate("a red cat", seed=3, **SETTINGS)
    assert len(loads) == 4  # nothing read again
    assert all(stage.weights_kept for stage in second.report.stages)
    (expected,) = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a red cat", "--seed", "3")
    with Image.open(expected) as cli_image:
        assert_same_pixels(np.asarray(second.images[0]), np.asarray(cli_image))


def test_a_stage_kept_only_while_every_stage_still_fits_the_cpu_budget(tiny_checkpoint, loads):
    """A budget with room for encode's plan beside decode's weights, not beside the transformer's:
    encode and decode stay, denoise is read again on every call."""
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as roomy:
        plan = roomy.plan(**SETTINGS)
    cpu = stage_bytes(plan, "planned_bytes", "encode") + stage_bytes(plan, "weight_bytes", "decode")
    assert stage_bytes(plan, "planned_bytes", "encode") + stage_bytes(plan, "weight_bytes", "denoise") > cpu
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory=f"cpu={cpu}B", dtype="float32") as tight:
        plan = tight.plan(**SETTINGS)
        kept = {stage.name: stage.kept_bytes for stage in plan.stages if stage.kept_bytes}
        assert list(kept) == ["encode", "decode"]
        for stage in plan.stages:  # never over the budget, the kept weights of the others counted
            assert stage.planned_bytes["cpu"] + sum(size for name, size in kept.items() if name != stage.name) <= cpu
        tight.generate("a dog", **SETTINGS)
        tight.generate("a dog", seed=1, **SETTINGS)
    assert sorted(subfolder for _, subfolder, _ in loads) == ["text_encoder", "text_encoder_2", "transformer",
                                                               "transformer", "vae"]


def test_a_stage_on_gpus_is_kept_in_ram_all_its_weights_counted(tiny_checkpoint):
    """A stage placed on GPUs goes back to RAM between calls, all its weights counted there (the
    devices tier runs it: tests/test_devices.py), one with streamed blocks too (their pinned RAM
    and its resident blocks); planned for GPUs this machine need not have."""
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="0=16GB,cpu=2GB", dtype="float32") as model:
        plan = model.plan(**SETTINGS)
    assert plan.fits and all(set(stage.planned_bytes) == {"0"} for stage in plan.stages)
    assert [stage.kept_bytes for stage in plan.stages] == [stage.weight_bytes["0"] for stage in plan.stages]
    assert "moved to its GPUs at each call" in str(plan)
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="0=500KB,cpu=2GB", dtype="float32") as model:
        plan = model.plan(**SETTINGS)
    denoise = next(stage for stage in plan.stages if stage.name == "denoise")
    assert denoise.offload == "streamed" and denoise.kept_bytes == sum(denoise.weight_bytes.values())


@pytest.mark.parametrize("device_map, streamed, quantization, kept", [
    ({"": "cpu"}, False, None, True),
    ({"": 0}, False, "fp8", True),
    ({"a": 0, "b": 1}, False, "int8", True),
    ({"a": 0, "b": "cpu"}, True, None, True),  # streamed: its pinned blocks stay, its resident ones move
    ({"a": 0, "b": "cpu"}, False, None, False),  # accelerate's offload hooks
    ({"a": 0, "b": "disk"}, False, None, False),
    ({"": 0}, False, "nf4", False),  # bitsandbytes places it as it loads
])
def test_which_placements_go_back_to_ram_between_calls(device_map, streamed, quantization, kept):
    assert hostable(device_map, streamed, quantization) is kept


def test_close_frees_the_kept_weights(model, loads):
    model.generate("a dog", **SETTINGS)
    assert all(reference() is not None for _, _, reference in loads)  # kept
    model.close()
    gc.collect()
    assert [reference() for _, _, reference in loads] == [None] * 4


def test_plans_made_in_another_thread_while_a_stage_loads_leave_its_weights_alone(tiny_checkpoint, tmp_path):
    """A server plans each request as it arrives, while its worker loads a stage: the meta-device
    builds of the plan (accelerate's init_empty_weights patches torch.nn.Module for every thread)
    must not make the loaded parameters meta, nor leave the patch behind."""
    register_parameter = torch.nn.Module.register_parameter
    stop = threading.Event()
    images = []
    with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as planner:

        def plan_until_stopped():
            while not stop.is_set():
                planner.plan(**SETTINGS)

        thread = threading.Thread(target=plan_until_stopped)
        thread.start()
        try:
            for seed in range(3):  # a model of its own each time: every stage loads, beside the plans
                with flux_sharded.open_model(str(tiny_checkpoint), max_memory="cpu=2GB", dtype="float32") as model:
                    images.append(model.generate("a dog", seed=seed, **SETTINGS).images[0])
        finally:
            stop.set()
            thread.join()
    assert torch.nn.Module.register_parameter is register_parameter
    expected = cli_images(tiny_checkpoint, tmp_path / "cli", "--prompt", "a dog", "--num-images-per-prompt", "3")
    for image, path in zip(images, expected, strict=True):
        with Image.open(path) as cli_image:
            assert_same_pixels(np.asarray(image), np.asarray(cli_image))
