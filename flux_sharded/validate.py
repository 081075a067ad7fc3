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

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from . import settings as schema
from .budget import MAX_DEVICE_BYTES, Budget, is_gpu_key
from .errors import CheckpointError, SettingsError
from .families import encode_layers, encode_out_layers, family_for

if TYPE_CHECKING:
    import torch

# Generous ceilings, far above every FLUX.1 variant (19 double and 38 single blocks, width 3072,
# T5 with 24 layers of width 4096 and 32128 tokens), yet small enough that building the component
# on the meta device stays cheap: a config past them is damaged or hostile, not a bigger FLUX.
MAX_LAYERS = 256
MAX_WIDTH = 65536
MAX_VOCAB = 1_000_000
MAX_VAE_BLOCKS = 6  # a scale factor of 2**5 = 32; FLUX.1's VAE has 4 blocks (factor 8)


# As the settings' ranges (settings.py), far beyond any real use, bounding what a damaged run.json
# can make the tool allocate.
MAX_PROCESSES = 100_000
MAX_PROCESS_COUNTS = 1000  # run.json's resumed_processes: one entry per resume with a new count


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


class JsonFields:
    """Checks fields of one JSON object; every failure names the file, the field and the fix."""

    def __init__(self, data, where: str, fix: str, error=SettingsError, prefix: str = ""):
        self.where, self.fix, self.error, self.prefix = where, fix, error, prefix
        if not isinstance(data, dict):
            self.fail(f"holds a {type(data).__name__}, not a JSON object")
        self.data = data

    def fail(self, problem: str, field: str | None = None):
        named = f" field '{self.prefix}{field}'" if field is not None else ""
        raise self.error(f"{self.where}{named} {problem}; {self.fix}")

    def _value(self, field: str, optional: bool):
        if field not in self.data:
            if optional:
                return None
            self.fail("is missing", field)
        return self.data[field]

    def integer(self, field: str, low: int | None = None, high: int | None = None, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not _is_int(value):
            self.fail(f"is {json.dumps(value)}, not a whole number", field)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(f"is {value}, outside {low if low is not None else '...'}..{high if high is not None else '...'}",
                      field)
        return value

    def number(self, field: str, low: float | None = None, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not _is_number(value) or (low is not None and value < low):
            self.fail(f"is {json.dumps(value)}, not a finite number" + (f" >= {low}" if low is not None else ""), field)
        return value

    def string(self, field: str, optional=False, choices=None):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = f" (one of {', '.join(choices)})" if choices else ""
            self.fail(f"is {json.dumps(value)}, not a text{allowed}", field)
        return value

    def boolean(self, field: str, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self.fail(f"is {json.dumps(value)}, not true or false", field)
        return value

    def list_of(self, field: str, check, what: str, low_length: int = 0, high_length: int | None = None,
                optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(check(item) for item in value):
            self.fail(f"is {json.dumps(value)[:80]}, not a list of {what}", field)
        if len(value) < low_length or (high_length is not None and len(value) > high_length):
            wanted = (f"{low_length}" if low_length == high_length else f"at least {low_length}" if high_length is None
                      else f"{low_length} to {high_length}")
            self.fail(f"has {_entries(len(value))}, not {wanted}", field)
        return value

    def object(self, field: str, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(f"is {json.dumps(value)[:80]}, not a JSON object", field)
        return value


# ---------------------------------------------------------------- checkpoint configs


def read_config(path: Path, model: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
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
    bounds and consistent with each other, by the checks of its family's architecture (CONFIG_CHECKS,
    by families.Family.code). Returns (transformer config, VAE config). Raises CheckpointError."""
    family = family or checkpoint_family(model, path)
    stages = family.stage_components()
    (transformer,), (vae,), encoders = stages["denoise"], stages["decode"], stages["encode"]
    configs = {name: read_config(path / name / "config.json", model) for name in (transformer, vae, *encoders)}
    fix = f"the checkpoint is damaged or not {family.name}: fetch that file again or give another --model"

    def fields(name: str) -> JsonFields:
        return JsonFields(configs[name], f"--model: '{model}': {name}/config.json", fix, CheckpointError)

    CONFIG_CHECKS[family.code](fields, family, transformer, vae, encoders)
    return configs[transformer], configs[vae]


def _check_flux1_configs(fields, family, transformer_name: str, vae_name: str, encoders: tuple[str, ...]) -> None:
    """FLUX.1's configs: FluxTransformer2DModel, AutoencoderKL, CLIP and T5, bounded, and the widths
    they share (CLIP's = pooled_projection_dim, T5's = joint_attention_dim)."""
    clip_name, t5_name = encoders
    transformer = fields(transformer_name)
    for name in ("num_layers", "num_single_layers"):
        transformer.integer(name, 0, MAX_LAYERS)
    heads = transformer.integer("num_attention_heads", 1, MAX_WIDTH)
    head_dim = transformer.integer("attention_head_dim", 1, MAX_WIDTH)
    if heads * head_dim > MAX_WIDTH:
        transformer.fail(f"times num_attention_heads is {heads * head_dim}, over {MAX_WIDTH}", "attention_head_dim")
    in_channels = transformer.integer("in_channels", 4, MAX_WIDTH)
    if in_channels % 4:
        transformer.fail(f"is {in_channels}, not a multiple of 4 (2x2 latent packing)", "in_channels")
    transformer.integer("patch_size", 1, 1, optional=True)
    joint = transformer.integer("joint_attention_dim", 1, MAX_WIDTH)
    pooled = transformer.integer("pooled_projection_dim", 1, MAX_WIDTH)
    transformer.boolean("guidance_embeds", optional=True)
    rope = transformer.list_of("axes_dims_rope", _is_int, "whole numbers", 3, 3, optional=True)
    if rope is not None and sum(rope) != head_dim:
        transformer.fail(f"sums to {sum(rope)}, not attention_head_dim {head_dim}", "axes_dims_rope")

    vae = fields(vae_name)
    _check_vae(vae, in_channels)
    vae.number("scaling_factor")
    if vae.data.get("shift_factor") is not None:
        vae.number("shift_factor")

    clip = fields(clip_name)
    clip_width = clip.integer("hidden_size", 1, MAX_WIDTH)
    clip.integer("num_hidden_layers", 1, MAX_LAYERS)
    clip.integer("intermediate_size", 1, 4 * MAX_WIDTH)
    clip.integer("vocab_size", 1, MAX_VOCAB)
    clip.integer("max_position_embeddings", 1, MAX_WIDTH)
    if clip_width != pooled:
        clip.fail(f"is {clip_width}, but the transformer's pooled_projection_dim is {pooled}", "hidden_size")
    t5 = fields(t5_name)
    t5_width = t5.integer("d_model", 1, MAX_WIDTH)
    t5.integer("num_layers", 1, MAX_LAYERS)
    t5.integer("d_ff", 1, 4 * MAX_WIDTH)
    t5.integer("vocab_size", 1, MAX_VOCAB)
    t5.integer("num_heads", 1, MAX_WIDTH)
    t5.integer("d_kv", 1, MAX_WIDTH)
    if t5_width != joint:
        t5.fail(f"is {t5_width}, but the transformer's joint_attention_dim is {joint}", "d_model")


def _check_vae(vae: "JsonFields", in_channels: int) -> None:
    """Both families' VAE: bounded widths, and latent_channels matching the transformer, which takes
    2x2 patches of the latents (in_channels = 4 x latent_channels)."""
    vae.list_of("block_out_channels", lambda c: _is_int(c) and 1 <= c <= MAX_WIDTH, "whole numbers 1..65536",
                1, MAX_VAE_BLOCKS)
    latent_channels = vae.integer("latent_channels", 1, MAX_WIDTH)
    vae.integer("layers_per_block", 1, MAX_LAYERS, optional=True)
    if 4 * latent_channels != in_channels:
        vae.fail(f"is {latent_channels}, but the transformer takes in_channels {in_channels} = 4 x latent_channels "
                 "(2x2 patches)", "latent_channels")


def _check_flux2_configs(fields, family, transformer_name: str, vae_name: str, encoders: tuple[str, ...]) -> None:
    """FLUX.2's configs: Flux2Transformer2DModel, AutoencoderKLFlux2 and the decoder-only text encoder
    (Mistral3's text_config, or Qwen3's), bounded, and the widths they share: the transformer takes
    the stacked hidden states of len(text_encoder_out_layers) layers (joint_attention_dim = 3 x the
    text encoder's hidden_size) and 2x2-patchified latents (in_channels = 4 x latent_channels)."""
    (encoder_name,) = encoders
    transformer = fields(transformer_name)
    for name in ("num_layers", "num_single_layers"):
        transformer.integer(name, 0, MAX_LAYERS)
    heads = transformer.integer("num_attention_heads", 1, MAX_WIDTH)
    head_dim = transformer.integer("attention_head_dim", 1, MAX_WIDTH)
    if heads * head_dim > MAX_WIDTH:
        transformer.fail(f"times num_attention_heads is {heads * head_dim}, over {MAX_WIDTH}", "attention_head_dim")
    in_channels = transformer.integer("in_channels", 4, MAX_WIDTH)
    joint = transformer.integer("joint_attention_dim", 1, MAX_WIDTH)
    transformer.number("mlp_ratio", 0, optional=True)
    transformer.boolean("guidance_embeds", optional=True)
    rope = transformer.list_of("axes_dims_rope", _is_int, "whole numbers", 4, 4, optional=True)
    if rope is not None and sum(rope) != head_dim:
        transformer.fail(f"sums to {sum(rope)}, not attention_head_dim {head_dim}", "axes_dims_rope")

    _check_vae(fields(vae_name), in_channels)

    encoder = fields(encoder_name)
    if "text_config" in encoder.data:  # Mistral3ForConditionalGeneration: the language model's config
        encoder = JsonFields(encoder.object("text_config"), encoder.where, encoder.fix, CheckpointError,
                             prefix="text_config.")
    width = encoder.integer("hidden_size", 1, MAX_WIDTH)
    layers = encoder.integer("num_hidden_layers", 1, MAX_LAYERS)
    encoder.integer("intermediate_size", 1, 4 * MAX_WIDTH)
    encoder.integer("vocab_size", 1, MAX_VOCAB)
    encoder.integer("num_attention_heads", 1, MAX_WIDTH)
    used = encode_layers(family.pipeline)
    if layers < used:
        encoder.fail(f"is {layers}, but {family.pipeline} reads the hidden states of layer {used}", "num_hidden_layers")
    stacked = len(encode_out_layers(family.pipeline))
    if joint != stacked * width:
        encoder.fail(f"is {width}, but the transformer's joint_attention_dim {joint} is {stacked} x the text encoder's "
                     f"width ({stacked} stacked hidden states)", "hidden_size")


# The config checks of each family's architecture, by families.Family.code (as stages.code.CODE).
CONFIG_CHECKS = {"flux1": _check_flux1_configs, "flux2": _check_flux2_configs}


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

def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


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
            settings.fail(f"has {_entries(len(found))} for {count} prompts (one per image)", each.name)
    unknown = sorted(set(settings.data) - {each.name for each in saved})
    if unknown:
        settings.fail("is not a setting this version knows", unknown[0])
    for each in saved:
        if each.type is not tuple:
            values[each.name] = _field(settings, each)
    return {each.name: values[each.name] for each in saved}


def _list_field(settings: JsonFields, each) -> tuple:
    if each.item is str:
        check, what = (lambda item: isinstance(item, str) and item.strip() != ""), "non-empty texts"
    else:
        low, high = each.low, each.high
        check = lambda item: _is_int(item) and (low is None or item >= low) and (high is None or item <= high)
        what = f"whole numbers {low}..{high}" if high is not None else f"whole numbers >= {low}"
    found = settings.list_of(each.name, check, what, each.min_items, each.max_items, optional=each.optional)
    return each.default if found is None else tuple(found)


def _field(settings: JsonFields, each):
    if each.type is int:
        found = settings.integer(each.name, each.low, each.high, optional=each.optional)
    elif each.type is float:
        found = settings.number(each.name, each.low, optional=each.optional)
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
    entries = {}
    for key, size in run.object("max_memory").items():
        if not (is_gpu_key(key) or key in ("cpu", "disk")) or not _is_int(size) or not 0 < size <= MAX_DEVICE_BYTES:
            run.fail(f"has {key!r}: {json.dumps(size)}; keys are GPU indices, cpu or disk, sizes 1..{MAX_DEVICE_BYTES} "
                     "bytes", "max_memory")
        entries[key] = size
    budget = Budget.from_json(entries)
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
    resumed = run.list_of("resumed_processes", lambda count: _is_int(count) and 1 <= count <= MAX_PROCESSES,
                          f"process counts 1..{MAX_PROCESSES}", 0, MAX_PROCESS_COUNTS, optional=True) or []
    launched = sum({processes, *resumed})
    if launched > MAX_PROCESSES:  # a resume looks for the handoffs of every process of every launch, by name
        run.fail(f"and 'resumed_processes' name {launched} processes in all, more than {MAX_PROCESSES} (a resume "
                 "looks for the handoffs of each)", "processes")
    decode_tiled = run.boolean("decode_tiled", optional=True) if run.data.get("decode_tiled") is not None else None
    return dict(
        settings=settings,
        budget=budget,
        out_dir=Path(out_dir),
        offload_folder=Path(offload_folder) if offload_folder else None,
        processes=processes,
        weights=weights,
        resumed_processes=tuple(resumed),
        decode_tiled=decode_tiled,
    )


def check_share_settings(saved, run_settings, meta_file: Path, fix: str):
    """A stage checkpoint's settings (a share's: the images it names by their indices over the
    whole run) against the run's; returns them with the indices spelt out."""
    import dataclasses

    indices = saved.image_indices
    count = len(run_settings.prompts)
    if len(set(indices)) != len(indices) or any(index >= count for index in indices):
        raise SettingsError(f"--resume: {meta_file} field 'settings.indices' names images outside 0..{count - 1} or "
                            f"one twice; {fix}")
    saved = dataclasses.replace(saved, indices=tuple(indices))
    if saved != run_settings.subset(list(indices)):
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
        if tensor.dtype != dtype:
            raise SettingsError(f"{where}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not the run's "
                                f"{str(dtype).removeprefix('torch.')}; {fix}")


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
    for field, value in expected.items():
        # a field that does not decide the pixels (settings.fields_not_deciding: the budget) may differ
        if field not in schema.fields_not_deciding() and found.get(field) != value:
            raise SettingsError(f"--resume: {path} exists but is not this run's image: its {field} is "
                                f"{found.get(field)!r}, the run's {value!r}; {fix}")
