"""The settings schema: every setting of a run said once, with its type, range, default and
whether it decides the pixels.

Derived from it, and nowhere written again:
- `handoff.GenerationSettings`, the frozen dataclass of the settings that travel with the run
  (`saved`): its fields, in this order, and so run.json's "settings" and the run folder's default
  name (rundir.default_run_dir hashes them);
- validate.settings_fields, which checks those fields of run.json and the handoffs' JSON;
- cli: the options whose value on --resume must agree with the saved run (`option`), and the
  defaults shown in --help;
- the PNG text fields (`png`: runner._png_metadata writes them, validate.check_run_image compares
  those that decide the pixels);
- the Python API's keyword arguments (api.py): `open_model` takes the option settings that decide
  which weights load (`opens`), `Model.generate` and `Model.plan` the others.

Adding a setting is one entry in SETTINGS plus its command-line option. This module imports no
torch (the command line reads it before torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .families import FAMILIES
from .input_images import canonical_saved as canonical_image
from .lora import canonical_saved
from .quantize import format_quantize, parse_quantize

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # --dtype; handoff.DTYPES maps them to torch's
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range (int64 or uint64)
# Ranges of the settings, checked on the command line (runner.check_settings) and in run.json alike,
# so that a run the tool starts can always be resumed: far beyond any real use, they bound what a
# damaged file can make the tool allocate.
MAX_STEPS = 100_000
MAX_SIDE = 2**20  # pixels
MAX_BATCH_SIZE = 2**20
# A run's images (prompts x --num-images-per-prompt): run.json lists each one's prompt and seed and
# every resume checks each one's PNG, so a job bigger than this is several runs.
MAX_IMAGES = 100_000
MAX_LORAS = 64  # --lora given more often than this is a mistake; it bounds what run.json may list
# The most input images any family's pipeline takes (families.Family.max_images); a run of a family
# is held to its own.
MAX_INPUT_IMAGES = max(family.max_images for family in FAMILIES.values())
# FluxImg2ImgPipeline.__call__'s default strength (tests/test_images.py reads it from the installed diffusers).
DEFAULT_STRENGTH = 0.6
# The most text tokens any family's pipeline takes (families.Family.text_token_limit); a run of a
# family is held to its own.
MAX_TEXT_TOKENS = max(family.text_token_limit for family in FAMILIES.values())
# --upsample-max-tokens' default: the prompt upsampler blocks' own (diffusers' flux3
# prompt_upsampler.MAX_NEW_TOKENS; tests/test_upsample.py pins it), and its bound: far beyond a caption
# (BFL's system prompt asks for 100 to 350 words), it bounds the cache a damaged run.json can make the tool plan.
UPSAMPLE_MAX_TOKENS = 3584
MAX_UPSAMPLE_TOKENS = 32768


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")  # no default
FAMILY = _Marker("FAMILY")  # the checkpoint's (families.generation_defaults, Checkpoint.default_size)


@dataclass(frozen=True)
class Setting:
    name: str  # the GenerationSettings field, run.json key and command-line option (--max-sequence-length)
    type: type  # int, float, str, or tuple (one entry per image, of `item`)
    help: str  # what it is, in the user's words
    default: Any = REQUIRED  # the option's: REQUIRED (none), FAMILY (the checkpoint's), or the value
    low: float | None = None  # range, inclusive (a tuple's entries)
    high: float | None = None
    choices: tuple[str, ...] = ()  # the texts accepted
    item: type | None = None  # a tuple's entries: int or str (non-empty)
    min_items: int = 0
    max_items: int | None = None
    per_image: bool = False  # a tuple with one entry per image, as many as `prompts` has
    # The saved text of any text it accepts ('none' for 'NONE'), of each entry of a tuple of texts;
    # raises the project's SettingsError for one it refuses.
    canonical: Callable[[str], str] | None = None
    saved: bool = True  # a field of GenerationSettings (run.json "settings")
    # run.json may lack it (an earlier version did not write it): then `default` is the value.
    may_be_missing: bool = False
    # At its default, left out of run.json, the settings' hash and the PNGs: a setting added later
    # (LoRAs) keeps the folder names and images of runs without it as the versions before it made them.
    omitted_at_default: bool = False
    # Recorded only for runs it applies to (strength: runs with an input image), and left out of
    # run.json, the settings' hash and the PNGs of the others, at its default.
    applies: Callable[[Any], bool] | None = None
    # Set by its own command-line option, which on --resume must repeat the saved value or be left out.
    option: bool = False
    # Decides which weights load (the model, their dtype, quantization, LoRAs): the Python API takes
    # it when a model is opened (api.open_model), an option setting without it on each generate call.
    opens: bool = False
    decides_pixels: bool = True  # false: a resume may change it (the budget)
    # The PNG text field that records it, and how, from (settings, image position); None: not recorded.
    png: str | None = None
    png_text: Callable[[Any, int], str] | None = None

    @property
    def optional(self) -> bool:
        """run.json may leave it out, and GenerationSettings has a default for it."""
        return self.may_be_missing

    def png_value(self, settings, position: int) -> str:
        if self.png_text is not None:
            return self.png_text(settings, position)
        value = getattr(settings, self.name)
        return str(value[position] if self.per_image else value)


SETTINGS: tuple[Setting, ...] = (
    Setting("model", str, "Hub id or local diffusers folder (a folder kept absolute)", option=True, opens=True,
            png="model"),
    Setting("prompts", tuple, "one per image, in order", item=str, min_items=1, max_items=MAX_IMAGES, per_image=True,
            png="prompt"),
    Setting("seeds", tuple, "one per image", item=int, low=SEED_MIN, high=SEED_MAX, per_image=True, png="seed"),
    Setting("steps", int, "denoising steps", FAMILY, low=1, high=MAX_STEPS, option=True, png="steps"),
    Setting("guidance", float, "guidance scale", FAMILY, low=0, option=True, png="guidance"),
    Setting("height", int, "image height in pixels", FAMILY, low=1, high=MAX_SIDE, option=True),
    Setting("width", int, "image width in pixels", FAMILY, low=1, high=MAX_SIDE, option=True, png="size",
            png_text=lambda settings, position: f"{settings.width}x{settings.height}"),
    Setting("max_sequence_length", int, "text tokens", FAMILY, low=1, high=MAX_TEXT_TOKENS, option=True,
            png="max_sequence_length"),
    Setting("dtype", str, "weights and compute dtype", "bfloat16", choices=DTYPE_NAMES, option=True, opens=True,
            png="dtype"),
    # A share's (several processes), or a run's of a prompts file's lines (jobs.py: over the whole file,
    # which names its PNGs); () = 0, 1, ...
    Setting("indices", tuple, "each image's index over the whole run or job; () = 0, 1, ...", (),
            item=int, low=0, per_image=True, may_be_missing=True),
    Setting("batch_size", int, "images per forward pass", 1, low=1, high=MAX_BATCH_SIZE, option=True,
            png="batch_size", may_be_missing=True),
    # as quantize.format_quantize writes it ("transformer=fp8,text_encoder_2=fp8")
    Setting("quantize", str, "quantization spec", "none", canonical=lambda spec: format_quantize(parse_quantize(spec)),
            option=True, opens=True, png="quantize", may_be_missing=True),
    # --lora, each as lora.Lora.saved_text writes it: "SOURCE:SCALE sha256:DIGEST" (of the file's content)
    Setting("lora", tuple, "LoRAs applied, in order", (), item=str, max_items=MAX_LORAS, canonical=canonical_saved,
            option=True, opens=True,
            png="lora", png_text=lambda settings, position: " ; ".join(settings.lora), may_be_missing=True,
            omitted_at_default=True),
    # --image, each as input_images.InputImage.saved_text writes it: "PATH sha256:DIGEST" (of the file's content)
    Setting("images", tuple, "input images, in order", (), item=str, max_items=MAX_INPUT_IMAGES,
            canonical=canonical_image, option=True, png="image",
            png_text=lambda settings, position: " ; ".join(settings.images), may_be_missing=True,
            omitted_at_default=True),
    # --mask, as --image is recorded ("PATH WxH sha256:DIGEST"); "" for none. Inpainting: white is redrawn.
    Setting("mask", str, "inpainting mask", "", canonical=lambda text: canonical_image(text) if text else "",
            option=True, png="mask", may_be_missing=True, omitted_at_default=True),
    # image-to-image and inpainting: the share of the schedule run from the noised input image
    # (FluxImg2ImgPipeline's and the inpainting pipelines' strength); checked in (0, 1] by runner.check_settings
    Setting("strength", float, "how much of the input image is redrawn", DEFAULT_STRENGTH, low=0, high=1,
            option=True, png="strength", may_be_missing=True, applies=lambda settings: bool(settings.images)),
    # true classifier-free guidance (FluxPipeline's true_cfg_scale): above 1, a second transformer pass per
    # step on --negative-prompt, checked by runner.check_settings
    Setting("true_cfg", float, "true classifier-free guidance scale (1: off)", 1.0, low=1, option=True,
            png="true_cfg", may_be_missing=True, omitted_at_default=True),
    Setting("negative_prompt", str, "what true CFG guides away from", "", option=True, png="negative_prompt",
            may_be_missing=True, applies=lambda settings: settings.true_cfg > 1),
    # FLUX.3's prompt upsampler (--upsample-prompt: a hub id, or a local folder kept absolute), which rewrites
    # each prompt in a stage before encode; "" for none (given empty, refused: api.Model.request): each prompt
    # is encoded as typed. What it wrote is the run's output, not a setting (handoff.Handoff.upsampled;
    # run.json's "upsampled_prompts", the PNGs').
    Setting("upsample_prompt", str, "prompt upsampler (FLUX.3) rewriting each prompt before encode; none by default",
            "", option=True, png="upsample_prompt", may_be_missing=True, omitted_at_default=True),
    Setting("upsample_max_tokens", int, "the most tokens the prompt upsampler writes per prompt", UPSAMPLE_MAX_TOKENS,
            low=1, high=MAX_UPSAMPLE_TOKENS, option=True, png="upsample_max_tokens", may_be_missing=True,
            applies=lambda settings: bool(settings.upsample_prompt)),
    # Not GenerationSettings': the run's, recorded in the PNGs (runner._png_metadata) but free to change.
    Setting("max_memory", str, "the budget, budget.format_budget", saved=False, decides_pixels=False,
            png="max_memory"),
)


def setting(name: str) -> Setting:
    return next(each for each in SETTINGS if each.name == name)


def saved_settings() -> tuple[Setting, ...]:
    """The fields of GenerationSettings, in order."""
    return tuple(each for each in SETTINGS if each.saved)


def resume_options() -> tuple[str, ...]:
    """The settings set by an option of their own, which --resume checks against the saved run."""
    return tuple(each.name for each in SETTINGS if each.option)


def open_options() -> tuple[Setting, ...]:
    """The option settings given when a model is opened (`opens`), in the schema's order."""
    return tuple(each for each in SETTINGS if each.option and each.opens)


def image_options() -> tuple[Setting, ...]:
    """The option settings given per generate call (the Python API) or run (the CLI): every option
    setting that does not decide which weights load, in the schema's order."""
    return tuple(each for each in SETTINGS if each.option and not each.opens)


def png_fields(settings, position: int, run: dict[str, str]) -> dict[str, str]:
    """The PNG text fields of the image at `position`: every setting with a `png` field, from
    `settings` (GenerationSettings) or, for a run's setting that is not one of its fields, `run`;
    one `omitted_at_default` at its default is left out."""
    return {each.png: each.png_value(settings, position) if each.saved else run[each.name]
            for each in SETTINGS if each.png and not (each.saved and at_omitted_default(each, settings))}


def at_omitted_default(each: Setting, settings) -> bool:
    """Whether `settings` (GenerationSettings) leaves `each` out of what it records: at its default,
    when it is omitted_at_default or does not apply to the run (Setting.applies)."""
    omitted = each.omitted_at_default or (each.applies is not None and not each.applies(settings))
    return omitted and getattr(settings, each.name) == each.default


def png_field_names() -> tuple[str, ...]:
    """Every PNG text field a setting may record."""
    return tuple(each.png for each in SETTINGS if each.png)


def fields_not_deciding() -> tuple[str, ...]:
    """PNG text fields that do not decide the pixels (a resume may run under another budget)."""
    return tuple(each.png for each in SETTINGS if each.png and not each.decides_pixels)

