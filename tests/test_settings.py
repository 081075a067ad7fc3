"""One settings schema (flux_sharded/settings.py): a setting added there alone reaches the run's
hash, run.json (written and checked), --resume's agreement check and the PNG metadata."""

from __future__ import annotations

import json
import subprocess
import sys

from flux_sharded import cli, settings as schema
from flux_sharded.handoff import GenerationSettings

# Run in a fresh interpreter: the fake setting joins the schema before anything derives from it
# (handoff.GenerationSettings is built from the schema when handoff is imported).
FAKE_SETTING = """
import json, sys
from pathlib import Path

import flux_sharded.settings as schema

schema.SETTINGS = (*schema.SETTINGS, schema.Setting(
    "sharpness", int, "sharpness", 2, low=0, high=9, option=True, png="sharpness", may_be_missing=True))

from flux_sharded import cli, runner
from flux_sharded.budget import parse_budget
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.errors import SettingsError
from flux_sharded.handoff import GenerationSettings
from flux_sharded.images import save_png
from flux_sharded.rundir import SavedRun, default_run_dir, read_run, write_run
from flux_sharded.seal import PLACEHOLDER, seal_file
from flux_sharded.validate import check_run_image

checkpoint_folder, out = Path(sys.argv[1]), Path(sys.argv[2])
checkpoint = resolve_checkpoint(str(checkpoint_folder), need_weights=False)
budget = parse_budget("cpu=2GB", 0)


def made(sharpness):
    return GenerationSettings(model=str(checkpoint_folder), prompts=("a dog",), seeds=(0,), steps=2, guidance=3.5,
                              height=32, width=32, max_sequence_length=16, dtype="float32", sharpness=sharpness)


def refusal(call):
    try:
        call()
    except SettingsError as error:
        return str(error)
    return None


found = {"hashes": len({default_run_dir(out, made(sharpness)) for sharpness in (3, 4)})}
run_dir = out / "run"
run_dir.mkdir(parents=True)
write_run(run_dir, SavedRun(made(3), budget, out, None, 1))
saved = json.loads((run_dir / "run.json").read_text())
found["run.json"] = saved["settings"]["sharpness"]
found["read back"] = read_run(run_dir).settings.sharpness


def write_sealed(data):  # as the tool's own writer would (seal.py): what is checked is the value
    data["seal"] = PLACEHOLDER
    (run_dir / "run.json").write_text(json.dumps(data))
    seal_file(run_dir / "run.json", "run.json")


saved["settings"]["sharpness"] = 42
write_sealed(saved)
found["run.json refuses"] = refusal(lambda: read_run(run_dir))
del saved["settings"]["sharpness"]  # a run.json of the version before it: the default
write_sealed(saved)
found["default"] = read_run(run_dir).settings.sharpness

found["resume options"] = "sharpness" in cli.SAVED_OPTIONS
import inspect

from flux_sharded import api

found["api"] = "sharpness" in inspect.signature(api.Model.generate).parameters
with api.open_model(str(checkpoint_folder), max_memory="cpu=2GB", dtype="float32") as model:
    found["api refuses"] = refusal(lambda: model.plan(sharpness=10))
    found["api plans"] = model.plan(sharpness=4).fits
run = SavedRun(made(3), budget, out, None, 1)
found["resume refuses"] = refusal(lambda: cli._check_agrees(["sharpness"], {"sharpness": 4}, run, checkpoint))
found["resume agrees"] = refusal(lambda: cli._check_agrees(["sharpness"], {"sharpness": 3}, run, checkpoint))

metadata = runner._png_metadata(made(3), 0, budget, "weights", checkpoint)
found["png"] = metadata["sharpness"]
from PIL import Image

image = out / "image.png"
save_png(Image.new("RGB", (32, 32)), image, metadata)
found["image refused"] = refusal(lambda: check_run_image(image, runner._png_metadata(made(4), 0, budget, "weights",
                                                                                      checkpoint)))
print(json.dumps(found))
"""


def test_a_setting_added_to_the_schema_alone_reaches_hash_run_json_resume_and_metadata(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-c", FAKE_SETTING, str(tiny_checkpoint), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["hashes"] == 2  # two values, two run folders
    assert (found["run.json"], found["read back"], found["default"]) == (3, 3, 2)
    assert "field 'settings.sharpness' is 42, outside 0..9" in found["run.json refuses"]
    assert found["resume options"] is True
    assert found["api"] is True  # a keyword argument of generate() and plan()
    assert "plan(): field 'sharpness' is 10, outside 0..9" in found["api refuses"]
    assert found["api plans"] is True
    assert found["resume refuses"] == ("--resume: --sharpness 4 conflicts with the saved run's 3; drop it to continue "
                                       "the run, or start a new run")
    assert found["resume agrees"] is None
    assert found["png"] == "3"
    assert "its sharpness is '3', the run's '4'" in found["image refused"]


def test_the_schema_derives_todays_lists():
    """What the schema derives is what the modules listed by hand before it."""
    assert [field for field in GenerationSettings.__dataclass_fields__] == [
        "model", "prompts", "seeds", "steps", "guidance", "height", "width", "max_sequence_length", "dtype",
        "indices", "batch_size", "quantize", "lora", "images", "mask", "strength", "true_cfg", "negative_prompt",
        "upsample_prompt", "upsample_max_tokens"]
    assert set(cli.SAVED_OPTIONS) == {"prompts", "prompts_file", "num_images_per_prompt", "seed", "model", "steps",
                                      "guidance", "height", "width", "max_sequence_length", "dtype", "batch_size",
                                      "out_dir", "run_dir", "quantize", "lora", "images", "mask", "strength", "true_cfg",
                                      "negative_prompt", "upsample_prompt", "upsample_max_tokens"}
    assert schema.fields_not_deciding() == ("max_memory",)
    settings = GenerationSettings(model="m", prompts=("a", "b"), seeds=(5, 6), steps=2, guidance=3.5, height=32,
                                  width=48, max_sequence_length=16, dtype="float32")
    assert schema.png_fields(settings, 1, {"max_memory": "cpu=2.00 GB"}) == {
        "model": "m", "prompt": "b", "seed": "6", "steps": "2", "guidance": "3.5", "size": "48x32",
        "max_sequence_length": "16", "dtype": "float32", "batch_size": "1", "quantize": "none",
        "max_memory": "cpu=2.00 GB"}
