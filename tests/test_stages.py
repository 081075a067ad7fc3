"""Each stage reads only its own component's files, and frees it before the next stage loads."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from flux_sharded import plan as plan_module
from flux_sharded import runner
from flux_sharded.checkpoint import resolve_checkpoint
from flux_sharded.handoff import GenerationSettings, Handoff
from flux_sharded.plan import plan_run
from flux_sharded.stages import decode, denoise, encode

BUDGET = {"cpu": 4 * 10**9}
# The folders each stage may read; every other component's folder is deleted before it runs.
STAGE_FOLDERS = {
    "encode": {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
    "denoise": {"transformer", "scheduler"},
    "decode": {"vae"},
}


def settings_for(checkpoint: Path) -> GenerationSettings:
    return GenerationSettings(str(checkpoint), ("a photo of a dog", "a cat"), (5, 6), 2, 3.5, 32, 48, 64, "float32")


def only(checkpoint: Path, stage_name: str, tmp_path: Path):
    """The checkpoint, its configs read as the runner reads them, but pointing at a copy of the folder
    that holds only model_index.json and the stage's own component folders."""
    copy = tmp_path / f"only-{stage_name}"
    shutil.copytree(checkpoint, copy)
    for folder in copy.iterdir():
        if folder.is_dir() and folder.name not in STAGE_FOLDERS[stage_name]:
            shutil.rmtree(folder)
    return dataclasses.replace(resolve_checkpoint(str(checkpoint)), path=copy)


def run_stage(stage, checkpoint, handoff: Handoff):
    """Plan from the whole checkpoint's configs (as the runner does before loading), then load the
    stage from `checkpoint`, which may hold only the stage's own folders."""
    whole = resolve_checkpoint(handoff.settings.model)
    request = runner.RunRequest(whole, handoff.settings, BUDGET, Path("unused"))
    stage_plan = plan_run(runner.plan_inputs(request), BUDGET).stage(stage.NAME)
    loaded = stage.load(checkpoint, stage_plan, torch.float32)
    return stage.run(loaded, handoff)


def test_each_stage_reads_only_its_own_components(tiny_checkpoint, tmp_path):
    settings = settings_for(tiny_checkpoint)
    whole = resolve_checkpoint(str(tiny_checkpoint))

    # The control: a stage whose own folder is missing cannot run.
    with pytest.raises(OSError):
        run_stage(denoise, only(tiny_checkpoint, "decode", tmp_path / "control"), Handoff(settings))

    encoded = run_stage(encode, only(tiny_checkpoint, "encode", tmp_path), Handoff(settings))
    for name, tensor in run_stage(encode, whole, Handoff(settings)).tensors().items():
        assert torch.equal(encoded.tensors()[name], tensor), name
    assert encoded.prompt_embeds.shape == (2, 64, 32)
    assert encoded.pooled_prompt_embeds.shape == (2, 32)
    assert encoded.text_ids.shape == (64, 3)

    denoised = run_stage(denoise, only(tiny_checkpoint, "denoise", tmp_path), encoded)
    # 32x48 pixels / VAE factor 8 / 2x2 packing = 2x3 tokens of 4 latent channels x 4
    assert denoised.latents.shape == (2, 6, 16)
    assert torch.equal(denoised.latents, run_stage(denoise, whole, encoded).latents)

    images = run_stage(decode, only(tiny_checkpoint, "decode", tmp_path), denoised).images
    assert [image.size for image in images] == [(48, 32), (48, 32)]


def test_components_are_freed_before_the_next_stage_loads(tiny_checkpoint, tmp_path, monkeypatch):
    """Wrap each stage's load: record a weak reference to what it loaded, and when the next stage
    starts loading, check that the previous stage's component is already gone."""
    alive_at_next_load = {}
    previous: list[tuple[str, weakref.ref]] = []

    def watch(stage, component_of):
        real_load = stage.load

        def load(*args, **kwargs):
            gc.collect()
            for name, ref in previous:
                alive_at_next_load[name] = ref() is not None
            loaded = real_load(*args, **kwargs)
            previous.append((stage.NAME, weakref.ref(component_of(loaded))))
            return loaded

        monkeypatch.setattr(stage, "load", load)

    watch(encode, lambda pipeline: pipeline.text_encoder_2)
    watch(denoise, lambda pipeline: pipeline.transformer)
    watch(decode, lambda vae: vae)

    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    request = runner.RunRequest(checkpoint, settings_for(tiny_checkpoint), BUDGET, tmp_path / "out")
    report = runner.execute(request)
    gc.collect()
    assert alive_at_next_load == {"encode": False, "denoise": False}
    assert all(ref() is None for _, ref in previous), "a component outlived the run"
    assert [stage.name for stage in report.stages] == ["encode", "denoise", "decode"]
    assert len(report.images) == 2


def test_denoise_with_blocks_offloaded_to_disk_equals_the_in_memory_run(tiny_checkpoint, tmp_path):
    """A budget whose CPU share holds two thirds of the transformer: the plan sends the rest to
    disk, the stage loads with that device map and an offload folder, and the latents do not change.

    The in-memory reference has its weights copied into fresh (64-byte aligned) memory: weights
    mapped straight from a safetensors file can sit at any byte offset, and the CPU's matrix
    kernels then round differently in the last bit, while accelerate's disk offload reads them
    back into aligned memory.
    """
    whole = resolve_checkpoint(str(tiny_checkpoint))
    settings = settings_for(tiny_checkpoint)
    encoded = run_stage(encode, whole, Handoff(settings))
    request = runner.RunRequest(whole, settings, BUDGET, Path("unused"))
    in_memory = denoise.load(whole, plan_run(runner.plan_inputs(request), BUDGET).stage("denoise"), torch.float32)
    for parameter in in_memory.transformer.parameters():
        parameter.data = parameter.data.clone()
    expected = denoise.run(in_memory, encoded).latents
    del in_memory

    components = plan_module._Components(runner.plan_inputs(request))
    transformer_bytes = components.sizes("transformer")[""]
    budget = {"cpu": components.activation_bytes("transformer", "denoise") + transformer_bytes * 2 // 3, "disk": 10**9}
    stage_plan = plan_module.plan_denoise(components, budget)
    assert stage_plan.fits
    assert 0 < stage_plan.weight_bytes["disk"] < transformer_bytes

    pipeline = denoise.load(whole, stage_plan, torch.float32, offload_folder=tmp_path / "offload")
    assert "disk" in set(denoise.device_map(pipeline)["transformer"].values())
    assert any((tmp_path / "offload").iterdir())
    offloaded = denoise.run(pipeline, encoded).latents
    difference = (offloaded - expected).abs()
    assert torch.equal(offloaded, expected), f"max {difference.max()}, mean {difference.mean()}"


@pytest.mark.parametrize("existing", [True, False], ids=["existing-folder", "new-folder"])
def test_a_run_offloading_to_disk_uses_a_fresh_folder_per_stage_and_removes_it(tiny_checkpoint, tmp_path,
                                                                               monkeypatch, existing):
    """The runner gives accelerate a new folder inside --offload-folder for a stage with weights on
    disk, and removes it when the stage ends; the user's folder and its files are left as found.
    (The tiny checkpoint's encode needs more room than its transformer, so no single budget sends
    only denoise to disk: the denoise plan is swapped for one computed with a tighter budget.)"""
    whole = resolve_checkpoint(str(tiny_checkpoint))
    budget = {**BUDGET, "disk": 10**9}
    offload = tmp_path / "offload" / "weights"
    if existing:
        offload.mkdir(parents=True)
        (offload / "mine.txt").write_text("the user's own file")
    request = runner.RunRequest(whole, settings_for(tiny_checkpoint), budget, tmp_path / "out", offload_folder=offload)
    components = plan_module._Components(runner.plan_inputs(request))
    tight = {"cpu": components.activation_bytes("transformer", "denoise") + components.sizes("transformer")[""] * 2 // 3,
             "disk": 10**9}
    real_plan_run = runner.plan_run

    def plan_with_denoise_on_disk(inputs, budget, *to_run):
        plan = real_plan_run(inputs, budget, *to_run)
        on_disk = plan_module.plan_denoise(plan_module._Components(inputs), tight)
        return dataclasses.replace(plan, stages=tuple(on_disk if s.name == "denoise" else s for s in plan.stages))

    folders_at_load = {}
    real_load = denoise.load

    def load(checkpoint, stage_plan, dtype, offload_folder=None):
        folders_at_load["denoise"] = (offload_folder, offload_folder.is_dir())
        return real_load(checkpoint, stage_plan, dtype, offload_folder)

    monkeypatch.setattr(runner, "plan_run", plan_with_denoise_on_disk)
    monkeypatch.setattr(denoise, "load", load)
    report = runner.execute(request)

    folder, existed = folders_at_load["denoise"]
    assert folder.parent == offload and existed
    denoise_report = next(stage for stage in report.stages if stage.name == "denoise")
    assert "disk" in denoise_report.device_map["transformer"].values()
    assert sorted(path.name for path in offload.iterdir()) == (["mine.txt"] if existing else [])
    assert len(report.images) == 2 and all(Path(image).is_file() for image in report.images)


def test_every_stage_provides_the_one_interface_the_runner_calls():
    """Each stage module has every member of stages.Stage, with the protocol's parameters in its
    order (a stage's own extra options only after them, with defaults)."""
    import inspect

    from flux_sharded import families
    from flux_sharded.stages import STAGES, Stage

    members = [name for name, value in vars(Stage).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert set(members) == {"todo", "load", "device_map", "run", "finish"}
    assert tuple(stage.NAME for stage in STAGES) == families.STAGES  # the plan's stages, in order
    for stage in STAGES:
        for name in members:
            wanted = list(inspect.signature(getattr(Stage, name)).parameters.values())[1:]  # without self
            wanted = [parameter for parameter in wanted if parameter.kind is not parameter.VAR_KEYWORD]
            given = list(inspect.signature(getattr(stage, name)).parameters.values())
            assert len(given) >= len(wanted), (stage.NAME, name)
            assert [p.default is p.empty for p in given[:len(wanted)]] == [p.default is p.empty for p in wanted], \
                (stage.NAME, name)
            assert all(p.default is not p.empty for p in given[len(wanted):]), (stage.NAME, name)


def test_every_family_has_code_that_provides_the_whole_family_protocol():
    """Each family's side of the stages (stages.code.CODE[family.code]) has every member of
    stages.code.FamilyCode, with its parameters, and is what family_code finds."""
    import inspect
    import typing

    from flux_sharded.families import FAMILIES
    from flux_sharded.stages.code import CODE, FamilyCode, family_code

    members = [name for name, value in vars(FamilyCode).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert set(members) == {"encode_pipeline", "denoise_pipeline", "vae_pipeline", "denoise_batch", "encode_batch",
                            "vae_latents", "guidance_ignored", "guidance_note", "lora_state_dict", "load_lora",
                            "input_sizes", "encode_images", "image_pipeline", "call_arguments", "check_prompt_lengths"}
    for family in FAMILIES.values():
        if not family.runs:  # planned only (FLUX.3): no stage calls its code, and a run is refused before
            assert family.code not in CODE
            continue
        code = family_code(family)
        assert code is CODE[family.code]
        for name in members:
            wanted = list(inspect.signature(getattr(FamilyCode, name)).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(code, name)).parameters) == wanted, (family.name, name)
        for name, kind in typing.get_type_hints(FamilyCode).items():  # its constants (SEEDED_ENCODE)
            assert isinstance(getattr(code, name), kind), (family.name, name)


def test_the_runner_calls_each_stage_through_the_interface_in_order(tiny_checkpoint, tmp_path, monkeypatch):
    """todo -> load -> device_map -> run -> finish for every stage, and a resumed run whose images
    all exist stops at decode's todo (nothing to do) without loading the VAE."""
    from flux_sharded.stages import STAGES

    calls = []
    for stage in STAGES:
        for name in ("todo", "load", "device_map", "run", "finish"):
            monkeypatch.setattr(stage, name, lambda *a, _real=getattr(stage, name), _call=(stage.NAME, name), **k:
                                calls.append(_call) or _real(*a, **k))
    checkpoint = resolve_checkpoint(str(tiny_checkpoint))
    request = runner.RunRequest(checkpoint, settings_for(tiny_checkpoint), BUDGET, tmp_path / "out")
    report = runner.execute(request)
    steps = ["todo", "load", "device_map", "run", "finish"]
    assert calls == [(stage, step) for stage in ("encode", "denoise", "decode") for step in steps]
    assert [stage.images for stage in report.stages] == [2, 2, 2]
    assert [stage.handoff_bytes is None for stage in report.stages] == [False, False, True]

    calls.clear()
    again = runner.execute(dataclasses.replace(request, resume=True))
    assert calls == [("decode", "todo")]  # encode and denoise finished earlier; every image exists
    assert again.stages == [] and again.written == []
