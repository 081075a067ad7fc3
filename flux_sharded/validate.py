"""The one place that checks state read from disk before anything uses it.

Everything here reads JSON, never builds a model: a damaged or hostile file is refused with one
message naming the file, the field and the way out, before the run writes anything (run.json
included). The checks that load something (tokenizers) or read weight files (their headers, the
fingerprint of the weights) are checkpoint.py's, which reads its configs through this module.

    checkpoint configs   model_index.json, each component's config.json: types, sane ranges, and
                         the dimensions the components share (T5 width = the transformer's
                         joint_attention_dim, ...); a config with 100000 layers is refused before
                         anything is built from it on the meta device
    prompts              encodable as UTF-8 (a shell may pass undecodable bytes through)
    run.json             every field's type and range (`saved_run_fields`)
    stage checkpoints    the settings and finished stages they belong to, the tensor names, shapes
                         and dtypes the settings and the model's configs imply (checkpoint.expected_tensors)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from . import settings as schema
from .budget import MAX_DEVICE_BYTES, Budget, is_gpu_key
from .errors import CheckpointError, SettingsError
from .families import INPUT_DTYPES, SCHEDULER, family_for
from .json_fields import JsonFields, entries, is_int
from .safe_read import MAX_CONFIG_BYTES, parse_json, read_regular_file

if TYPE_CHECKING:
    import torch



# As the settings' ranges (settings.py), far beyond any real use, bounding what a damaged run.json
# can make the tool allocate.
MAX_PROCESSES = 100_000
MAX_PROCESS_COUNTS = 1000  # run.json's resumed_processes: one entry per resume with a new count


# ---------------------------------------------------------------- checkpoint configs


def read_config(path: Path, model: str):
    """A checkpoint's JSON file, read as safe_read reads (a regular file of at most MAX_CONFIG_BYTES,
    each key once, nested at most 32 deep); raises CheckpointError naming it."""
    try:
        return parse_json(read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"--model: '{model}': cannot read {path.parent.name}/{path.name} ({error}); the checkpoint is damaged: "
            "fetch that file again"
        ) from None


def checkpoint_family(model: str, path: Path):
    """The model family named by model_index.json's _class_name (families.py); raises CheckpointError
    for a damaged file or a pipeline flux-sharded does not support, listing the supported ones."""
    index = JsonFields(read_config(path / "model_index.json", model), f"--model: '{model}': model_index.json",
                       "the checkpoint is damaged: fetch that file again or give another --model", CheckpointError)
    return family_for(index.data.get("_class_name"), model)


def pipeline_option(model: str, path: Path, name: str, default: bool) -> bool:
    """A boolean option of the pipeline in model_index.json (`is_distilled`), `default` when absent."""
    index = JsonFields(read_config(path / "model_index.json", model), f"--model: '{model}': model_index.json",
                       "the checkpoint is damaged: fetch that file again or give another --model", CheckpointError)
    value = index.boolean(name, optional=True)
    return default if value is None else value


def check_checkpoint_configs(model: str, path: Path, family=None) -> tuple[dict, dict]:
    """Every component's config.json of `family` (default: read from model_index.json), within sane
    bounds and consistent with each other, by the checks of its family's architecture
    (families.Family.check_configs). Returns (transformer config, VAE config). Raises CheckpointError."""
    family = family or checkpoint_family(model, path)
    stages = family.stage_components()
    (transformer,), (vae,) = stages["denoise"], stages["decode"]
    configs = {name: read_config(path / name / "config.json", model) for name in family.names}
    fix = f"the checkpoint is damaged or not {family.name}: fetch that file again or give another --model"

    def fields(name: str) -> JsonFields:
        return JsonFields(configs[name], f"--model: '{model}': {name}/config.json", fix, CheckpointError)

    _check_component_classes(model, path, family, fields)
    family.check_configs(fields)
    _check_scheduler(JsonFields(read_config(path / SCHEDULER / "scheduler_config.json", model),
                                f"--model: '{model}': {SCHEDULER}/scheduler_config.json", fix, CheckpointError))
    return configs[transformer], configs[vae]


def _check_component_classes(model: str, path: Path, family, fields) -> None:
    """Each component is of the class its family's pipeline loads (families.Component.class_name), as
    model_index.json names it and as its own config.json does (diffusers' `_class_name`, transformers'
    `architectures`): a klein folder holding FLUX.2-dev's Mistral encoder built a Qwen3 from a Mistral3
    config, and failed inside encode."""
    index = JsonFields(read_config(path / "model_index.json", model), f"--model: '{model}': model_index.json",
                       "the checkpoint is damaged: fetch that file again or give another --model", CheckpointError)
    for component in family.components:
        entry = index.data.get(component.name)
        if entry != [component.library, component.class_name]:
            index.fail(f"is {json.dumps(entry)}, but {family.name}'s pipeline ({family.pipeline}) loads a "
                       f"{component.class_name} there", component.name)
        config = fields(component.name)
        named = config.data.get("_class_name") if component.library == "diffusers" else \
            (config.data.get("architectures") or [None])[0]
        if named != component.class_name:
            config.fail(f"is {json.dumps(named)}: the folder holds another model's {component.name}, not the "
                        f"{component.class_name} {family.name} needs",
                        "_class_name" if component.library == "diffusers" else "architectures")


def _check_scheduler(scheduler: "JsonFields") -> None:
    """The scheduler every family uses (FlowMatchEulerDiscreteScheduler), with the fields its
    set_timesteps reads of the types and ranges it takes: a broken one failed inside denoise."""
    # diffusers writes _class_name; a config without it (the reconstructed ones) takes the pipeline's
    scheduler.string("_class_name", optional=True, choices=("FlowMatchEulerDiscreteScheduler",))
    scheduler.integer("num_train_timesteps", 1, 10**6)
    for name in ("shift", "base_shift", "max_shift"):
        scheduler.number(name, 0, optional=True)
    for name in ("base_image_seq_len", "max_image_seq_len"):
        scheduler.integer(name, 1, 2**31, optional=True)
    for name in ("use_dynamic_shifting", "invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas"):
        scheduler.boolean(name, optional=True)
    scheduler.string("time_shift_type", optional=True, choices=("exponential", "linear"))
    scheduler.number("shift_terminal", 0, optional=True)
    if scheduler.data.get("shift") == 0:  # every sigma 0: NaN latents, a black image
        scheduler.fail("is 0, not a positive number (the sigmas are scaled by it)", "shift")
    # The pipelines interpolate the shift between these (calculate_shift, diffusers' defaults 256 and
    # 4096 when absent): equal ones divided by zero inside denoise.
    base, most = scheduler.data.get("base_image_seq_len", 256), scheduler.data.get("max_image_seq_len", 4096)
    if most <= base:
        scheduler.fail(f"is {most}, not above base_image_seq_len {base} (the pipelines interpolate the shift between "
                       "them)", "max_image_seq_len")
    # What the scheduler's __init__ refuses (diffusers 0.42.1), which failed inside denoise.
    sigmas = [name for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
              if scheduler.data.get(name)]
    if len(sigmas) > 1:
        scheduler.fail(f"is true, and so is {sigmas[0]}: the scheduler takes one kind of sigmas at most", sigmas[1])
    if sigmas == ["use_beta_sigmas"] and importlib.util.find_spec("scipy") is None:
        raise scheduler.error(f"{scheduler.where} field 'use_beta_sigmas' is true: the scheduler's beta sigmas need "
                              "scipy, which flux-sharded does not install: pip install scipy")


# ---------------------------------------------------------------- prompts


def check_prompts(prompts) -> None:
    """Every prompt is text UTF-8 can encode (a shell passes undecodable bytes as lone surrogates)."""
    for index, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise SettingsError(
                f"--prompt: prompt {index} ({prompt.encode('utf-8', 'replace')[:40]!r}...) holds bytes that are not "
                f"UTF-8 at character {error.start}; give the prompt as UTF-8 text"
            ) from None


# ---------------------------------------------------------------- run.json and stage checkpoints

def settings_fields(data, where: str, fix: str, prefix: str = "settings.") -> dict:
    """A GenerationSettings' JSON, checked: the keyword arguments to build it. Every field and its
    check come from the settings schema (settings.py): first the per-image lists (each as long as
    `prompts`), then that no field is unknown, then the others in the schema's order."""
    settings = JsonFields(data, where, fix, prefix=prefix)
    saved = schema.saved_settings()
    values = {each.name: _list_field(settings, each) for each in saved if each.type is tuple}
    count = len(values["prompts"])
    for each in saved:
        found = values.get(each.name)
        if each.per_image and each.name != "prompts" and (found or not each.optional) and len(found) != count:
            settings.fail(f"has {entries(len(found))} for {count} prompts (one per image)", each.name)
    unknown = sorted(set(settings.data) - {each.name for each in saved})
    if unknown:
        settings.fail("is not a setting this version knows", unknown[0])
    for each in saved:
        if each.type is not tuple:
            values[each.name] = setting_field(settings, each)
    return {each.name: values[each.name] for each in saved}


def _list_field(settings: JsonFields, each) -> tuple:
    if each.item is str and each.canonical is not None:  # each entry in its saved grammar (lora.parse_saved)
        check, what = (lambda item: isinstance(item, str) and _canonical_or_none(each, item) is not None), \
            f"texts of {each.name} as this version writes them"
    elif each.item is str:
        check, what = (lambda item: isinstance(item, str) and item.strip() != ""), "non-empty texts"
    else:
        low, high = each.low, each.high
        check = lambda item: is_int(item) and (low is None or item >= low) and (high is None or item <= high)
        what = f"whole numbers {low}..{high}" if high is not None else f"whole numbers >= {low}"
    found = settings.list_of(each.name, check, what, each.min_items, each.max_items, optional=each.optional)
    if found is None:
        return each.default
    return tuple(found if each.canonical is None else (each.canonical(item) for item in found))


def _canonical_or_none(each, item: str) -> str | None:
    try:
        return each.canonical(item)
    except SettingsError:
        return None


def setting_field(settings: JsonFields, each):
    """The value of the schema's setting `each` (not a tuple) in `settings`, of its type and range,
    in its canonical text; its default when optional and left out. Raises the JsonFields' error."""
    if each.type is int:
        found = settings.integer(each.name, each.low, each.high, optional=each.optional)
    elif each.type is float:
        found = settings.number(each.name, each.low, optional=each.optional, high=each.high)
        found = None if found is None else float(found)
    else:
        found = settings.string(each.name, optional=each.optional, choices=each.choices or None)
    if found is None or (each.type is str and each.optional and not found):  # an empty text: the default
        found = each.default
    if each.canonical is not None:
        try:
            found = each.canonical(found)
        except SettingsError as error:
            problem = str(error).removeprefix(f"--{each.name.replace('_', '-')}: ")
            settings.fail(f"is not a {each.help} ({problem})", each.name)
    return found


def saved_run_fields(data, where: str, fix: str, format_version: int) -> dict:
    """run.json, checked: settings, budget, folders and process count (see rundir.write_run)."""
    run = JsonFields(data, where, fix)
    run.integer("format", format_version, format_version)
    settings = settings_fields(run.object("settings"), where, fix)
    sizes = {}
    for key, size in run.object("max_memory").items():
        if not (is_gpu_key(key) or key in ("cpu", "disk")) or not is_int(size) or not 0 < size <= MAX_DEVICE_BYTES:
            run.fail(f"has {key!r}: {json.dumps(size)}; keys are GPU indices, cpu or disk, sizes 1..{MAX_DEVICE_BYTES} "
                     "bytes", "max_memory")
        sizes[key] = size
    budget = Budget.from_json(sizes)
    if not budget:
        run.fail("is empty; it needs at least one device", "max_memory")
    out_dir = run.string("out_dir")
    if not Path(out_dir).is_absolute():
        run.fail(f"is {out_dir!r}, not an absolute path (a run folder records where its images go)", "out_dir")
    offload_folder = run._value("offload_folder", optional=True)
    if offload_folder is not None:
        run.string("offload_folder")
        if not Path(offload_folder).is_absolute():
            run.fail(f"is {offload_folder!r}, not an absolute path", "offload_folder")
    weights = run.object("weights", optional=True)
    processes = run.integer("processes", 1, MAX_PROCESSES)
    resumed = run.list_of("resumed_processes", lambda count: is_int(count) and 1 <= count <= MAX_PROCESSES,
                          f"process counts 1..{MAX_PROCESSES}", 0, MAX_PROCESS_COUNTS, optional=True) or []
    launched = sum({processes, *resumed})
    if launched > MAX_PROCESSES:  # a resume looks for the handoffs of every process of every launch, by name
        run.fail(f"and 'resumed_processes' name {launched} processes in all, more than {MAX_PROCESSES} (a resume "
                 "looks for the handoffs of each)", "processes")
    decode_tiled = run.boolean("decode_tiled", optional=True) if run.data.get("decode_tiled") is not None else None
    images = len(settings["prompts"])  # the prompt upsampler's text of each image (rundir.SavedRun.upsampled_prompts)
    upsampled = run.list_of("upsampled_prompts", lambda text: isinstance(text, str), "texts", images, images,
                            optional=True) or []
    return dict(
        settings=settings,
        budget=budget,
        out_dir=Path(out_dir),
        offload_folder=Path(offload_folder) if offload_folder else None,
        processes=processes,
        weights=weights,
        resumed_processes=tuple(resumed),
        decode_tiled=decode_tiled,
        upsampled_prompts=tuple(upsampled),
        upsampler_weights=run.object("upsampler_weights", optional=True),
    )


def check_share_settings(saved, run_settings, meta_file: Path, fix: str):
    """A stage checkpoint's settings (a share's: the images it names by their indices over the
    whole run) against the run's; returns them with the indices spelt out."""
    import dataclasses

    indices = saved.image_indices
    positions = {index: position for position, index in enumerate(run_settings.image_indices)}
    if len(set(indices)) != len(indices) or any(index not in positions for index in indices):
        run = (f"0..{len(positions) - 1}" if not run_settings.indices
               else ", ".join(map(str, run_settings.indices)))  # a prompts file's run: its images' (jobs.py)
        raise SettingsError(f"--resume: {meta_file} field 'settings.indices' names images outside {run} or one "
                            f"twice; {fix}")
    saved = dataclasses.replace(saved, indices=tuple(indices))
    if saved != run_settings.subset([positions[index] for index in indices]):
        raise SettingsError(f"--resume: {meta_file} belongs to other settings than the run's (run.json); {fix}")
    return saved


def check_handoff_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], dtype: torch.dtype,
                          where: str, fix: str) -> None:
    """The tensors a stage checkpoint must hold, no more, each of the expected shape and dtype."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = (f"lacks {', '.join(missing)}" if missing else "") + (" and " if missing and extra else "") + (
            f"holds unexpected {', '.join(extra)}" if extra else "")
        raise SettingsError(f"{where} {what}; {fix}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SettingsError(f"{where}: {name} has shape {tuple(tensor.shape)}, not {shape} (from the run's "
                                f"settings and the model's configs); {fix}")
        import torch  # here: the command line reads this module before torch; tensors mean torch is loaded

        wanted, whose = (getattr(torch, INPUT_DTYPES[name]), "") if name in INPUT_DTYPES else (dtype, "the run's ")
        if tensor.dtype != wanted:
            raise SettingsError(f"{where}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not {whose}"
                                f"{str(wanted).removeprefix('torch.')}; {fix}")


# ---------------------------------------------------------------- images found on --resume

def check_run_image(path: Path, expected: dict[str, str]) -> None:
    """An image that exists on --resume counts as written earlier by the run only if it is a PNG
    whose text fields (images.save_png) record the run's settings for it and its weights; anything
    else (another run's image, other weights, a file the user put there) is refused, untouched."""
    from PIL import Image, UnidentifiedImageError

    fix = "move it away (or pass --overwrite to make it again), then resume again"
    try:
        with Image.open(path) as image:
            found = dict(image.text) if image.format == "PNG" else None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # not an image PIL can read
        found = None
    if found is None or found.get("software") != expected["software"]:
        raise SettingsError(f"--resume: {path} exists but is not an image flux-sharded wrote (not a PNG with its "
                            f"settings); {fix}")
    for field in dict.fromkeys([*expected, *schema.png_field_names()]):
        value = expected.get(field)  # None: a field the run leaves out (a setting at its omitted default)
        # a field that does not decide the pixels (settings.fields_not_deciding: the budget) may differ
        if field not in schema.fields_not_deciding() and found.get(field) != value:
            raise SettingsError(f"--resume: {path} exists but is not this run's image: its {field} is "
                                f"{found.get(field)!r}, the run's {value!r}; {fix}")
