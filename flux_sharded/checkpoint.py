"""Find a FLUX checkpoint (local diffusers folder or Hugging Face hub id) and read its configs.

Reads only JSON configs (checked by validate.py), tokenizers and the headers of weight files, never
weights. model_index.json's pipeline class selects the model family (families.py). The latent
geometry (VAE scale factor, packing multiple, default size) comes from the checkpoint's own VAE
config, as FluxPipeline and Flux2Pipeline compute it. Also here: the tokenizers (checked, and the
one encode passes the pipeline where it cannot load the folder itself), the shapes of the tensors
a stage checkpoint of this model holds, and the fingerprint of the weights a run used.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .digests import file_digests
from .errors import CheckpointError, SettingsError
from .families import (FLUX_1, IMAGE_STAGE, PIPELINE_FOLDERS, SCHEDULER, UPSAMPLE_STAGE, Family, family_of,
                       packed_latent_channels)
from .safe_read import MAX_CONFIG_BYTES, parse_json, read_regular_file
from .validate import check_checkpoint_configs, checkpoint_family, pipeline_option, read_config

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
# Hub ids whose configs ship inside the package (for planning without a download).
SHIPPED_CONFIGS = {
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell": "FLUX.1-schnell",
    "black-forest-labs/FLUX.1-Kontext-dev": "FLUX.1-Kontext-dev",  # FLUX.1-dev's components, FluxKontextPipeline
    "black-forest-labs/FLUX.2-dev": "FLUX.2-dev",
    "black-forest-labs/FLUX.2-klein-4B": "FLUX.2-klein-4B",
    "black-forest-labs/FLUX.2-klein-9B": "FLUX.2-klein-9B",
    "black-forest-labs/flux-3-image-klein": "FLUX.3-klein",  # reconstructed configs: configs/README.md
    "black-forest-labs/flux-3-image-klein-base": "FLUX.3-klein-base",
}


def required_files(family: Family) -> dict[str, str]:
    """The components the family's pipeline needs, with the file that proves each is there."""
    return {SCHEDULER: f"{SCHEDULER}/scheduler_config.json",
            **{component.name: f"{component.name}/config.json" for component in family.components}}

# The files of a pipeline folder that a run reads: configs (and tokenizer.json, tekken.json,
# processor_config.json, preprocessor_config.json), BPE merges, SentencePiece models, chat
# templates (transformers reads chat_template.jinja and additional_chat_templates/*.jinja; the
# FLUX.2 encoders apply them to every prompt) and safetensors weights; no pickles.
PIPELINE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".safetensors")
# Files a run needs from the hub, inside the pipeline's own folders only (every family's,
# families.PIPELINE_FOLDERS). A bare "*.safetensors" would also match the original-format files at
# the root of black-forest-labs/FLUX.1-dev (flux1-dev.safetensors, 23.8 GB, and ae.safetensors),
# which the diffusers layout does not use. ("*" matches "/" too: subfolders are fetched.)
HUB_PATTERNS = ["model_index.json"] + [
    f"{folder}/*{suffix}" for folder in PIPELINE_FOLDERS for suffix in PIPELINE_FILE_SUFFIXES
]


def shipped_config_dir(name: str) -> Path:
    return Path(__file__).parent / "configs" / name


@dataclass(frozen=True)
class Checkpoint:
    model: str  # as the user gave it: a hub id or a folder
    path: Path  # the local folder
    transformer_config: dict
    vae_config: dict
    family: Family = FLUX_1  # from model_index.json's _class_name

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor times the 2x2 latent packing."""
        return self.vae_scale_factor * 2

    @property
    def is_distilled(self) -> bool:
        """model_index.json's `is_distilled` (Flux2KleinPipeline: step-distilled, guidance ignored);
        False when absent, as the pipeline's own default. Raises CheckpointError if not a boolean."""
        return pipeline_option(self.model, self.path, "is_distilled", False)

    def second_pass_guidance(self, guidance: float) -> bool:
        """Whether the pipeline guides with a second pass on the empty prompt (families.Family.second_pass:
        Flux2KleinPipeline's do_classifier_free_guidance: guidance above 1 (families.Family.guides) and a
        checkpoint not step-distilled)."""
        return self.family.second_pass and self.family.guides(guidance) and not self.is_distilled

    def second_pass(self, settings) -> bool:
        """Whether denoise runs a second transformer pass per step on negative embeddings: klein's
        guidance (second_pass_guidance) or FLUX.1's true classifier-free guidance (--true-cfg above 1)."""
        return self.second_pass_guidance(settings.guidance) or settings.true_cfg > 1

    @property
    def default_size(self) -> int:
        """The pipeline's default height and width: its default_sample_size latent pixels."""
        return self.family.sample_size * self.vae_scale_factor


def model_reference(model: str) -> str:
    """How run.json and the PNGs name a --model: a local folder by its absolute path, so that
    --resume finds it from any working folder (as resolve_checkpoint reads it); a hub id as given."""
    path = Path(model).expanduser()
    return str(path.absolute()) if path.is_dir() else model


def resolve_checkpoint(model: str, need_weights: bool = True) -> Checkpoint:
    """A local folder as is; otherwise a hub id through the normal Hugging Face cache.

    With need_weights=False only configs are needed (planning): the cache, then the configs shipped
    in this package (SHIPPED_CONFIGS: FLUX.1-dev, -schnell, -Kontext-dev, FLUX.2-dev, -klein-4B, -klein-9B), then a
    download of the JSON files alone.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return read_checkpoint(model, path)
    if looks_like_path(model):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise CheckpointError(
            f"--model: folder '{model}' {what}; give a FLUX diffusers folder or a hub id; {_known_models(model)}"
        )
    if need_weights:
        return read_checkpoint(model, _download(model, HUB_PATTERNS))
    cached = _cached_configs(model)
    if cached is not None:
        return read_checkpoint(model, cached)
    if model in SHIPPED_CONFIGS:
        return read_checkpoint(model, shipped_config_dir(SHIPPED_CONFIGS[model]))
    return read_checkpoint(model, _download(model, ["*.json"]))


def looks_like_path(model: str) -> bool:
    """Whether a --model value is meant as a folder rather than a hub id (owner/name)."""
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep + os.sep in model


def _cached_configs(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True))
    except Exception:  # not cached (the exception types vary across huggingface_hub versions)
        return None
    try:
        family = family_of(folder)
    except (OSError, ValueError, CheckpointError):  # no or another pipeline: read_checkpoint says which
        family = FLUX_1
    return folder if all((folder / file).is_file() for file in required_files(family).values()) else None


def _download(repo_id: str, patterns: list[str], option: str = "--model") -> Path:
    """Fetch `patterns` of `repo_id`; the hub's errors become one message each: a gated repository,
    one that does not exist, and a hub that cannot be reached are three different fixes."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(
            f"{option}: '{repo_id}' is gated on the Hugging Face hub: accept its license at "
            f"https://huggingface.co/{repo_id} and log in with `hf auth login` (flux-sharded then fetches only "
            "the pipeline's folders itself)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{option}: '{repo_id}' is not a model on the Hugging Face hub (or is private and you are not logged "
            f"in); {_known_models(repo_id)}"
        ) from None
    except Exception as error:  # no connection, HF_HUB_OFFLINE, a proxy, a server error: the hub is not reachable
        from huggingface_hub import constants

        if constants.is_offline_mode():  # what huggingface_hub read from HF_HUB_OFFLINE when imported
            reason, fix = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache",
                           "unset HF_HUB_OFFLINE to let flux-sharded fetch the pipeline's folders")
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            fix = "check the connection and try again"
        raise CheckpointError(
            f"{option}: '{repo_id}' is not a local folder and the Hugging Face hub could not be reached ({reason}); "
            f"{fix}, or give a local diffusers folder; {_known_models(repo_id)}"
        ) from None


def _known_models(model: str) -> str:
    """The checkpoints whose configs ship with flux-sharded, and the one `model` looks like a
    misspelling of (difflib, on the whole id and on the name after the slash, case-insensitive)."""
    names = {known.lower(): known for known in SHIPPED_CONFIGS}
    names |= {known.split("/")[-1].lower(): known for known in SHIPPED_CONFIGS}
    typed = model.strip().rstrip("/").lower()
    near = (difflib.get_close_matches(typed, names, n=1, cutoff=0.75)
            or difflib.get_close_matches(typed.split("/")[-1], names, n=1, cutoff=0.75))
    known = f"the checkpoints flux-sharded knows are {', '.join(list(SHIPPED_CONFIGS)[:-1])} and {list(SHIPPED_CONFIGS)[-1]}"
    return f"did you mean {names[near[0]]}? ({known})" if near and names[near[0]] != model else known


def read_checkpoint(model: str, path: Path) -> Checkpoint:
    has_index = (path / "model_index.json").is_file()
    family = checkpoint_family(model, path) if has_index else FLUX_1
    missing = [name for name, file in required_files(family).items() if not (path / file).is_file()]
    if not has_index or missing:
        what = ", ".join(missing) if missing else "model_index.json"
        raise CheckpointError(
            f"--model: '{model}' is not a {family.name} diffusers checkpoint (missing {what}); "
            f"give a folder saved by {family.pipeline}.save_pretrained or a hub id such as {DEFAULT_MODEL}"
        )
    transformer_config, vae_config = check_checkpoint_configs(model, path, family)
    pipeline_option(model, path, "is_distilled", False)  # a damaged one is refused now, not in a stage
    return Checkpoint(model=model, path=path, transformer_config=transformer_config, vae_config=vae_config,
                      family=family)


def check_weight_files(checkpoint: Checkpoint) -> None:
    """Before any stage: every component has safetensors weights, and each file is whole.

    Each file is opened with safetensors' own safe_open, which reads only its header and refuses
    one whose tensors do not cover the file exactly, so a truncated download fails here in
    milliseconds rather than minutes later inside a stage. Pickle (.bin) weights are refused: they
    can run code when loaded. Then the tensors against the component's config (_check_tensors):
    weights of another shape failed inside the stage, after run.json, with diffusers' advice to
    pass ignore_mismatched_sizes, which does not apply.
    """
    for component in checkpoint.family.names:
        folder = checkpoint.path / component
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            if pickles:
                raise CheckpointError(
                    f"--model: '{checkpoint.model}': {component} has only pickle weights ({', '.join(pickles)}); "
                    "flux-sharded loads safetensors only, since pickles can run code: convert them "
                    "(e.g. load and save_pretrained(safe_serialization=True)) or use a safetensors checkpoint"
                )
            raise CheckpointError(
                f"--model: '{checkpoint.model}': {component} has no weights (no .safetensors file in {folder}); "
                "the download is incomplete: fetch the checkpoint again"
            )
        for index in folder.glob("*.safetensors.index.json"):
            _check_shards_present(index, checkpoint.model)
        for file in files:
            _check_safetensors(file, checkpoint.model)
        _check_tensors(checkpoint, component, files)


# The tensors bitsandbytes saves beside each quantized weight (transformers' and diffusers' layouts):
# 4-bit: weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__nf4; 8-bit: SCB.
QUANTIZATION_STATE_SUFFIXES = {"nf4": (".absmax", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"),
                               "int8": (".SCB",)}


def _check_tensors(checkpoint: Checkpoint, component: str, files: list[Path]) -> None:
    """Every tensor of the component's weight files that its config builds (on the meta device:
    components.empty_component) has the shape the config gives it; a component whose config.json has
    a bitsandbytes quantization_config holds bitsandbytes' quantization state, and one with a torchao
    quantization_config torchao's safetensors layout. Raises CheckpointError naming the file."""
    from safetensors import safe_open

    # Here, not at the top: components imports torch, which the command line imports only once the
    # cheap checks passed (a missing --model folder is refused before it).
    from .components import empty_component
    from .quantize import prequantized

    method = prequantized(checkpoint.path).get(component)
    config = read_config(checkpoint.path / component / "config.json", checkpoint.model)
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    names, torchao_layout = {}, False
    for file in files:
        with safe_open(file, "pt") as handle:
            names.update({name: (file, tuple(handle.get_slice(name).get_shape())) for name in handle.keys()})
            # torchao's safetensors layout (flatten_tensor_state_dict) lists its tensor subclasses here
            torchao_layout |= "tensor_names" in (handle.metadata() or {})
    where = f"--model: '{checkpoint.model}': {component}"
    if method is not None:
        if quant_method == "torchao" and not torchao_layout:
            raise CheckpointError(
                f"{where}/config.json has a torchao quantization_config, but its weight files hold no torchao "
                "tensors (no 'tensor_names' in their metadata): the weights are not the ones that config was saved "
                "with; fetch the checkpoint again")
        if quant_method == "bitsandbytes" and not any(name.endswith(QUANTIZATION_STATE_SUFFIXES[method])
                                                      for name in names):
            raise CheckpointError(
                f"{where}/config.json has a bitsandbytes quantization_config ({method}), but its weight files hold no "
                "bitsandbytes quantization state: the weights are not the ones that config was saved with; fetch "
                "the checkpoint again")
        return  # its tensors are stored packed: the config's shapes are not theirs
    model = empty_component(checkpoint.path, component)
    spec = checkpoint.family.component(component)
    as_loaded = _renaming(model) if spec.library == "transformers" else (lambda name: name)
    found = {as_loaded(name): (file, name, shape) for name, (file, shape) in names.items()}
    expected = _saved_tensors(model)
    for name, (file, saved_name, shape) in sorted(found.items()):
        if name in expected and shape != expected[name][0]:
            raise CheckpointError(
                f"{where}/{file.name} holds {saved_name} of shape {shape}, but {component}/config.json makes it "
                f"{expected[name][0]}: the weights belong to another model than the config; fetch the checkpoint again")
    _check_tensor_names(model, expected, {name: saved for name, (_, saved, _) in found.items()}, where,
                        cut=spec.truncated)


def _renaming(model):
    """name -> name: a transformers model's tensor name, as its weight file has it, renamed as its
    from_pretrained renames it. save_pretrained writes some models under their original names
    (Mistral3's `language_model.model.*`, which transformers 5 loads as `model.language_model.*`).
    transformers' own mapping and renaming functions (get_model_conversion_mapping, which peft also
    calls; rename_source_key), pinned by tests/test_faults.py's cases on the tiny FLUX.2-dev,
    whose Mistral3 is saved so."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    return lambda name: rename_source_key(name, renamings, converters, model.base_model_prefix, meta)[0]


def _saved_tensors(model) -> dict[str, tuple[tuple, tuple[str, ...]]]:
    """name -> (shape, every name of that tensor) for what a component's weight files hold: its
    state_dict with each tied tensor once (T5's `shared.weight` is also `encoder.embed_tokens.weight`:
    a file holds either name), keyed by the name it has first, as every other tensor by its own."""
    groups: dict[int, tuple[tuple, list[str]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), (tuple(tensor.shape), []))[1].append(name)
    return {names[0]: (shape, tuple(names)) for shape, names in groups.values()}


def _ignored(model, which: str):
    """The library's own patterns of tensor names its from_pretrained does not report as missing or
    unexpected (`_keys_to_ignore_on_load_missing` / `_unexpected`, class attributes of transformers'
    and diffusers' models), with the two transformers adds itself: old checkpoints' persistent
    `position_ids` (CLIP's) and `rotary_emb.inv_freq` buffers."""
    patterns = set(getattr(model, f"_keys_to_ignore_on_load_{which}", None) or ())
    if which == "unexpected":
        patterns |= {r"(^|\.)position_ids$", r"rotary_emb\.inv_freq"}
    return re.compile("|".join(f"({pattern})" for pattern in patterns)) if patterns else None


def _check_tensor_names(model, expected: dict[str, tuple[tuple, tuple[str, ...]]], found: dict[str, str], where: str,
                        cut: bool) -> None:
    """The weight files hold every tensor the config builds, and nothing more. Both ran silently
    wrong before: a missing text-encoder tensor was left at transformers' random initialization (a
    diffusers component failed inside its stage, after run.json), and a config of fewer blocks than
    the weights dropped the rest without a word. A cut text encoder (components.encode_only) builds
    less than its files hold, so its extras are expected. `found`: each file tensor's name as
    loaded -> as saved. Raises CheckpointError naming the first tensors and the count."""
    skip_missing = _ignored(model, "missing")
    missing = [name for name, (_, names) in expected.items()
               if not any(alias in found for alias in names) and not (skip_missing and skip_missing.search(name))]
    if missing:
        raise CheckpointError(
            f"{where}'s weight files lack {_some(missing)}, which its config.json builds: the download is incomplete "
            "or the weights belong to another model than the config; fetch the checkpoint again")
    if cut:
        return
    skip_extra = _ignored(model, "unexpected")
    known = {alias for _, names in expected.values() for alias in names}
    extra = [saved for name, saved in found.items()
             if name not in known and not (skip_extra and skip_extra.search(name))]
    if extra:
        raise CheckpointError(
            f"{where}'s weight files hold {_some(extra)}, which its config.json does not build: the config describes "
            "a smaller model than the weights (fewer layers or blocks); fetch the checkpoint again")


def _some(names: list[str]) -> str:
    """The first three of `names` in order, and how many more."""
    names = sorted(names)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _check_shards_present(index: Path, model: str) -> None:
    """A sharded component lists its shards in an index; a shard never downloaded has no file at all."""
    try:
        shards = set(parse_json(read_regular_file(index, MAX_CONFIG_BYTES).decode("utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"--model: '{model}': {index} cannot be read ({type(error).__name__}); download that file again"
        ) from None
    missing = sorted(shard for shard in shards if not (index.parent / shard).is_file())
    if missing:
        raise CheckpointError(
            f"--model: '{model}': {index.parent.name} lacks {', '.join(missing)} (listed in {index.name}); "
            "the download is incomplete: fetch the checkpoint again"
        )


def _check_safetensors(file: Path, model: str, option: str = "--model") -> None:
    """`file` (of `option`'s `model`) is a regular file whose safetensors header covers it exactly."""
    from safetensors import safe_open

    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise CheckpointError(f"{option}: '{model}': {file} is not a regular file; download that file again")
    except OSError as error:  # a link to nowhere (a Hugging Face cache without its blob), a link loop
        raise CheckpointError(f"{option}: '{model}': {file} cannot be opened ({error.strerror or error}: a link to a "
                              "file that is not there, or a link loop); download that file again") from None
    try:
        with safe_open(file, "pt"):
            return
    except Exception as error:  # safetensors' SafetensorError (its header), OSError
        problem = _safetensors_problem(file, error)
    raise CheckpointError(f"{option}: '{model}': {file} is truncated or corrupt ({problem}); download that file again")


def _safetensors_problem(file: Path, error: Exception) -> str:
    """What is wrong with a file safe_open refused, in bytes where its header says so (safetensors'
    own message names none): the header's claimed length, or the bytes its tensors need."""
    size = file.stat().st_size
    problem = f"safetensors: {str(error).strip().splitlines()[0][:200]}" if str(error).strip() else type(error).__name__
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
            header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if header_length < 2 or 8 + header_length > size:
                problem = f"its header claims {header_length} bytes but the file has {size}"
            else:
                header = json.loads(handle.read(header_length))
                if not isinstance(header, dict):
                    return f"its header is a JSON {type(header).__name__}, not an object"
                ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
                expected = 8 + header_length + max(ends, default=0)
                if expected != size:
                    problem = f"its tensors need {expected} bytes but the file has {size}"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as reading:
        problem = f"its header cannot be read ({type(reading).__name__})"
    return problem


def expected_tensors(stage: str, settings, checkpoint: Checkpoint) -> dict[str, tuple]:
    """Name -> shape of every tensor a stage checkpoint holds, from the settings and the checkpoint's
    configs: the embeddings its family's encode keeps (families.Family.encoded), the encoded input
    images (families.Family.inputs_encoded, from encode_image on), then the packed latents."""
    if stage == UPSAMPLE_STAGE:  # its rewritten prompts are texts (the handoff's JSON), no tensor
        return {}
    config = checkpoint.transformer_config
    shapes = checkpoint.family.encoded(config, len(settings.prompts), settings.max_sequence_length,
                                       checkpoint.second_pass(settings))
    if IMAGE_STAGE in settings.stages and stage in (IMAGE_STAGE, "denoise"):  # kept from encode_image on
        shapes.update(checkpoint.family.inputs_encoded(config, checkpoint.vae_scale_factor, settings))
    if stage == "denoise":
        factor = checkpoint.vae_scale_factor
        patches = (settings.height // (2 * factor)) * (settings.width // (2 * factor))
        shapes["latents"] = (len(settings.prompts), patches, packed_latent_channels(config))
    return shapes


# ---------------------------------------------------------------- tokenizers

# A whole tokenizer knows far more tokens than its special ones (<pad>, </s>, <unk>, ...);
# transformers builds a tokenizer of the special tokens alone when its vocabulary file is missing.
MIN_TOKENIZER_VOCAB = 16


# The user turn a chat template is tried with before any stage: it must render, and keep the prompt.
CHAT_PROBE = "a photo of a dog"


def check_tokenizers(model: str, path: Path) -> None:
    """The tokenizer of each text encoder of the checkpoint's family has its vocabulary files, loads,
    and gives ids its text encoder has."""
    from transformers import AutoTokenizer

    family = checkpoint_family(model, path)
    for component in family.components:
        if component.tokenizer is None:
            continue
        folder, encoder, alternatives = component.tokenizer, component.name, component.tokenizer_files
        where = f"--model: '{model}': {folder}"
        fix = f"the checkpoint is incomplete: fetch its {folder} folder again"
        if not any(all((path / folder / file).is_file() for file in files) for files in alternatives):
            wanted = " or ".join(" and ".join(files) for files in alternatives)
            raise CheckpointError(f"{where} lacks {wanted}; {fix}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path / folder)
        except Exception as error:  # tokenizers and transformers raise many types; each means "damaged"
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{where} cannot be loaded ({reason}); {fix}") from None
        if component.chat_template and not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(f"{where} has no chat template (chat_template.jinja), which {family.pipeline} applies "
                                  f"to every prompt; {fix}")
        if component.chat_template:  # a template that does not render failed inside encode, after run.json
            try:
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROBE}], tokenize=False,
                                                         add_generation_prompt=True)
            except Exception as error:  # jinja2's TemplateError kinds, and what a template raises itself
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                raise CheckpointError(f"{where}'s chat template does not render ({type(error).__name__}: {reason}); "
                                      f"{fix}") from None
            if CHAT_PROBE not in rendered:  # every prompt would give the same image
                raise CheckpointError(f"{where}'s chat template leaves the prompt out of the text it renders; {fix}")
        _check_processor(model, path, folder, where)
        config = read_config(path / encoder / "config.json", model)
        vocab = (config.get("text_config") or config)["vocab_size"]  # Mistral3 nests its language model's
        if not MIN_TOKENIZER_VOCAB <= len(tokenizer) <= vocab:
            raise CheckpointError(
                f"{where} has {len(tokenizer)} tokens, not {MIN_TOKENIZER_VOCAB}..{vocab} (the vocab_size of "
                f"{encoder}/config.json); {fix}"
            )


def _check_processor(model: str, path: Path, folder: str, where: str) -> None:
    """A tokenizer folder the pipeline loads as a processor (model_index.json: FLUX.2-dev's
    PixtralProcessor, which also holds an image processor) loads as one, or lacks only a library
    its image processor needs (Pixtral's: torchvision, which flux-sharded does not install): then
    the encode takes the tokenizer inside it alone (pipeline_tokenizer)."""
    try:
        pipeline_tokenizer(model, path, folder)
    except Exception as error:  # transformers raises many types; each means "damaged"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{where} cannot be loaded as a {_processor_class(model, path, folder)} ({reason}); "
                              f"the checkpoint is incomplete: fetch its {folder} folder again") from None


def _processor_class(model: str, path: Path, folder: str) -> str | None:
    import transformers

    entry = read_config(path / "model_index.json", model).get(folder)
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else ""
    return class_name if class_name.endswith("Processor") and hasattr(transformers, class_name) else None


def pipeline_tokenizer(model: str, path: Path, folder: str):
    """None when the pipeline's from_pretrained loads the tokenizer folder `folder` itself; else
    what to pass it instead: a processor that cannot be built here (FLUX.2-dev's PixtralProcessor
    and FLUX.3's Qwen3VLProcessor need torchvision for their image and video processors: an
    ImportError, or transformers 5.24's AttributeError on VIDEO_PROCESSOR_MAPPING) is replaced by a
    TextProcessor of the tokenizer inside it (AutoTokenizer on the same folder) and the processor's
    chat template. For text prompts the pipelines call nothing else (flux_sharded/configs/README.md).
    Raises what transformers raises for a damaged folder."""
    import transformers

    class_name = _processor_class(model, path, folder)
    if class_name is None:
        return None
    try:
        getattr(transformers, class_name).from_pretrained(path / folder)
    except (ImportError, AttributeError):
        return text_processor(path / folder)
    return None


def text_processor(folder: Path) -> "TextProcessor":
    """The TextProcessor of the processor folder `folder`: the tokenizer inside it and the processor's
    chat template (chat_template.jinja, or the older chat_template.json, as every processor reads it:
    the base class's, since PixtralProcessor's and Qwen3VLProcessor's own raise for want of torchvision)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    template = transformers.ProcessorMixin.get_processor_dict(str(folder))[0].get("chat_template")
    return TextProcessor(tokenizer, template or tokenizer.chat_template)


class TextProcessor:
    """The text side of a multimodal processor (PixtralProcessor, Qwen3VLProcessor) for text-only
    prompts: its `tokenizer`, and apply_chat_template rendering the processor's chat template. A
    processor renders a conversation of text messages with the same jinja renderer and special tokens
    as its tokenizer does (ProcessorMixin.apply_chat_template with tokenize=False; tests/test_flux3.py
    compares them); every other attribute is the tokenizer's."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("tokenizer", "chat_template"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


# ---------------------------------------------------------------- FLUX.3's prompt upsampler (--upsample-prompt)

# The published upsampler, and the folder of this package's configs with its config.json (reconstructed:
# configs/README.md; a dry-run plans it offline from there).
UPSAMPLER_HUB_ID = "black-forest-labs/flux-3-image-klein-pup"
UPSAMPLER_CONFIGS = "FLUX.3-upsampler"
# What a run reads of an upsampler's folder (its root: the model's config and weights, the processor's files).
UPSAMPLER_PATTERNS = [f"*{suffix}" for suffix in PIPELINE_FILE_SUFFIXES]


def resolve_upsampler(source: str, family: Family, need_weights: bool = True) -> Path:
    """The local folder of the prompt upsampler `source` (--upsample-prompt: a folder, or a hub id
    fetched through the Hugging Face cache: with need_weights=False, its JSON files alone), checked
    (check_upsampler); raises CheckpointError with one line naming the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    elif looks_like_path(source) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise CheckpointError(f"--upsample-prompt: '{source}' {what}; give the prompt upsampler's folder or hub id "
                              f"(e.g. {UPSAMPLER_HUB_ID})")
    elif need_weights:
        folder = _download(source, UPSAMPLER_PATTERNS, "--upsample-prompt")
    else:  # planning: the cache, the shipped config (the published upsampler's), else its JSON files alone
        folder = _cached_upsampler(source)
        if folder is None and source == UPSAMPLER_HUB_ID:
            folder = shipped_config_dir(UPSAMPLER_CONFIGS)
        folder = folder or _download(source, ["*.json"], "--upsample-prompt")
    check_upsampler(source, folder, family, need_weights)
    return folder


def _cached_upsampler(repo_id: str) -> Path | None:
    """The upsampler's folder in the Hugging Face cache when its config.json is there, else None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True))
    except Exception:  # not cached (the exception types vary across huggingface_hub versions)
        return None
    return folder if (folder / "config.json").is_file() else None


def check_upsampler(source: str, folder: Path, family: Family, need_weights: bool) -> None:
    """`folder` holds a prompt upsampler of `family` (families.Family.upsampler): a config.json of its
    class (model_type or architectures) and, with `need_weights` (a run; a plan reads the config
    alone), a tokenizer's vocabulary files, a chat template and its safetensors weights. Raises
    CheckpointError."""
    component = family.upsampler
    where = f"--upsample-prompt: '{source}'"
    fix = f"give the prompt upsampler's folder or hub id (e.g. {UPSAMPLER_HUB_ID})"
    try:
        config = parse_json(read_regular_file(folder / "config.json", MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no config.json, so it is not a prompt upsampler; {fix}") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{where}: config.json cannot be read ({error}); {fix}") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(config, dict) and (config.get("model_type") == UPSAMPLER_MODEL_TYPE
                                          or isinstance(architectures, list) and component.class_name in architectures)):
        found = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{where}: config.json describes a {found or 'model of no model_type'}, not a "
                              f"{component.class_name} ({UPSAMPLER_MODEL_TYPE}), so it is not FLUX.3's prompt "
                              f"upsampler; {fix}")
    if not need_weights:
        return
    if not any(all((folder / file).is_file() for file in files) for files in component.tokenizer_files):
        wanted = " or ".join(" + ".join(files) for files in component.tokenizer_files)
        raise CheckpointError(f"{where} has no tokenizer ({wanted}) beside its config.json; fetch the upsampler's "
                              f"folder again, or {fix}")
    if not ((folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
            or "chat_template" in _json_or_empty(folder / "tokenizer_config.json")):
        raise CheckpointError(f"{where} has no chat template (chat_template.jinja), which the upsampler's requests "
                              f"are written with; fetch the upsampler's folder again, or {fix}")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{where} has no weights (*.safetensors) beside its config.json; fetch the upsampler's "
                              f"folder again, or {fix}")
    # a damaged file failed only inside the upsample stage, after run.json (as check_weight_files and
    # check_tokenizers find the checkpoint's)
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors(file, source, "--upsample-prompt")
    try:
        upsampler_processor(folder)
    except Exception as error:  # tokenizers and transformers raise many types; each means "damaged"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{where}: its tokenizer cannot be loaded ({reason}); fetch the upsampler's folder "
                              f"again, or {fix}") from None


# The config's model_type of FLUX.3's upsampler class (transformers' Qwen3_5Config.model_type).
UPSAMPLER_MODEL_TYPE = "qwen3_5"


def _json_or_empty(path: Path) -> dict:
    """A small JSON object file, or {} where it is missing or not one."""
    try:
        data = parse_json(read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def upsampler_processor(folder: Path):
    """The upsampler's processor (prompt_upsampler_processor): AutoProcessor on its folder, or where it
    cannot be built here (Qwen3.5's Qwen3VLProcessor needs torchvision) its TextProcessor, which
    renders and tokenizes text-only requests as the processor does (tests/test_flux3.py)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError):
        return text_processor(folder)


# ---------------------------------------------------------------- the weights a run used

def _file_record(file: Path) -> dict:
    """A small file's entry of weights_fingerprint."""
    return {"bytes": file.stat().st_size, "sha256": file_digests([file])[file]}


def weights_fingerprint(path: Path, trust_blob_names: bool = False) -> dict:
    """What decides the pixels in a checkpoint folder, per component folder: each file's name, size
    and SHA-256 of its whole content (digests.file_digests: a hub blob by its name, any other file
    hashed once per version of it), so that a change of any byte between a run's start and its
    resume is found; plus the hub revision when the folder is a hub snapshot. `trust_blob_names`:
    only a new run's first fingerprint takes a hub blob never seen before by its name (see
    file_digests). Raises OSError for a file that cannot be read."""
    return _fingerprint(path, {folder: _pipeline_files(path / folder) for folder in PIPELINE_FOLDERS},
                        trust_blob_names)


def upsampler_fingerprint(folder: Path, name: str, trust_blob_names: bool = False) -> dict:
    """The prompt upsampler's folder (`folder`) as weights_fingerprint records a component's, under
    its component `name` (families.Family.upsampler): its files' names, sizes and SHA-256, and the hub
    revision when it is a hub snapshot. Raises OSError for a file that cannot be read."""
    return _fingerprint(folder, {name: _pipeline_files(folder)}, trust_blob_names)


def _pipeline_files(folder: Path) -> list[Path]:
    """The files of `folder` a run reads (PIPELINE_FILE_SUFFIXES), sorted; [] for a folder that is not there."""
    return ([file for file in sorted(folder.iterdir()) if file.suffix in PIPELINE_FILE_SUFFIXES and file.is_file()]
            if folder.is_dir() else [])


def _fingerprint(path: Path, files: dict[str, list[Path]], trust_blob_names: bool) -> dict:
    """{key: {file name: {"bytes", "sha256"}}} of `files`, plus "revision" when `path` is a hub snapshot."""
    digests = file_digests([file for each in files.values() for file in each], trust_blob_names)
    fingerprint = {key: {file.name: {"bytes": file.stat().st_size, "sha256": digests[file]} for file in each}
                   for key, each in files.items()}
    resolved = path.resolve()
    if resolved.parent.name == "snapshots":  # the Hugging Face cache: snapshots/<commit hash>
        fingerprint["revision"] = resolved.name
    return fingerprint


def fingerprint_digest(fingerprint: dict) -> str:
    """A short name of a fingerprint, for the PNG metadata."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _check_recorded(saved: dict | None, run_dir: Path) -> None:
    if saved is None:  # the seal says run.json is ours: a run of a version that did not record them
        raise SettingsError(f"--resume: the run in {run_dir} recorded no weights (run.json 'weights' is null), so "
                            "nothing tells whether these are the ones it used: start a new run")


def check_same_weights(saved: dict | None, current: dict, model: str, run_dir: Path) -> None:
    """A resume must use the weights that made the run's checkpoints; refuse naming the component."""
    _check_recorded(saved, run_dir)
    for component in sorted(set(saved) | set(current)):
        if saved.get(component) != current.get(component):
            what = "hub revision" if component == "revision" else f"{component} files"
            raise SettingsError(
                f"--resume: the {what} of the model '{model}' differ from those the run in {run_dir} used (run.json "
                "'weights'); mixing them would give images neither weights make: restore those weights, or start a "
                "new run with these"
            )


def check_unchanged_weights(checkpoint: Checkpoint, digest: str, stage: str, resume_command: str) -> None:
    """Before a stage loads its weights: the checkpoint's files are still those the run began with
    (`digest`: fingerprint_digest of its fingerprint; a file changed since is hashed again,
    digests.py), so that one run never mixes two sets of weights. Raises CheckpointError."""
    if fingerprint_digest(weights_fingerprint(checkpoint.path)) != digest:
        raise CheckpointError(
            f"--model: the files of '{checkpoint.model}' changed while the run was going on, before {stage} loaded "
            f"them; its images would mix two sets of weights: restore those files and continue with: "
            f"{resume_command}, or start a new run with them")


def check_resumed_model(saved: dict | None, model: str, folder: Path, run_dir: Path) -> None:
    """Before a resume plans anything: the model run.json names (`model`, read from `folder`) is the
    one whose weights the run recorded, as far as the files at hand tell. A local folder is
    fingerprinted whole (milliseconds); a hub id must have been one when the run started (its
    fingerprint has a hub revision), and its cached config files must match. The full check
    (check_same_weights) follows once a hub model's weights are fetched. Raises SettingsError."""
    _check_recorded(saved, run_dir)
    local = Path(model).expanduser().is_dir()
    from_hub = not local or Path(model).expanduser().resolve().parent.name == "snapshots"
    if from_hub != ("revision" in saved):
        was = "a hub model" if "revision" in saved else "a local folder"
        raise SettingsError(
            f"--resume: run.json 'settings.model' is '{model}', but the run in {run_dir} used {was} (run.json "
            "'weights'); the file was edited: restore it, or start a new run with --model"
        )
    if local:
        check_same_weights(saved, weights_fingerprint(folder), model, run_dir)
        return
    if shipped_config_dir("") in folder.parents:  # this package's copies of the configs, not the snapshot's
        return
    for component, files in saved.items():  # a cached hub snapshot: its config files, if there
        for name, record in files.items() if isinstance(files, dict) else ():
            path = folder / component / name
            if name.endswith(".json") and path.is_file() and record != _file_record(path):
                check_same_weights({component: record}, {component: None}, model, run_dir)
