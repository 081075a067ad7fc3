"""Build a checkpoint's components on the meta device from their configs, and count their weight bytes.

Never reads a weight file. Which class builds each component comes from its family (families.py,
selected by model_index.json). Sizes count the dtype each parameter will really have once loaded:
the requested dtype, except modules that transformers keeps in float32 (T5's `wo` in float16),
and they count tied or shared weights once (T5's `shared` is `encoder.embed_tokens`). FLUX.2's
text encoders are counted as their encode uses them (encode_only).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from accelerate import init_empty_weights

# FLUX.2-dev's transformer has 32 billion parameters, its Mistral encoder 24 billion: a config of more
# than six times the largest is damaged or hostile, not a bigger FLUX.
MAX_PARAMETERS = 200 * 10**9
from accelerate.utils import compute_module_sizes

from .errors import CheckpointError
from .families import encode_layers, family_of
from .quantize_bytes import quantized_meta, saved_nf4_layout

# accelerate's init_empty_weights patches torch.nn.Module.register_parameter for every thread of the
# process, and from_pretrained (diffusers, transformers) does the same while it loads: a component
# built on meta here while another thread loads weights gives that thread meta parameters, and two
# such contexts left in the other order leave the patch in place for good. Held by every meta build
# here and by the runner around each stage's load (a server plans a request while it runs others).
MODULE_PATCH_LOCK = threading.RLock()


def empty_component(config_root: Path, name: str, quantization: str | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The component `name` with every parameter on the meta device, from `config_root/name/config.json`;
    with `quantization` ("fp8", "int8", "nf4"), its tensors as that method stores them for compute in
    `dtype` (quantize_bytes.quantized_meta), so that module_sizes counts the quantized bytes."""
    model = _empty_component(config_root, name)
    if quantization:
        # A pre-quantized component is counted as its own config stored it (asked-for nf4 has none).
        model = quantized_meta(model, quantization, dtype, saved_nf4_layout(config_root, name))
    return model


def _empty_component(config_root: Path, name: str) -> torch.nn.Module:
    """Built under torch.device("meta") as well as init_empty_weights: the latter moves each parameter
    to meta once its layer made it, so every layer's weight was first allocated on the CPU (a config
    of width 65536 asked for 16 GiB per layer, and 103 GB in all); the device context makes none. A
    component of more than MAX_PARAMETERS parameters is refused (CheckpointError)."""
    return _bounded(_built_on_meta(config_root, name), f"--model: '{config_root}': {name}/config.json", name,
                    "--model")


def empty_upsampler(folder: Path, component) -> torch.nn.Module:
    """The prompt upsampler (families.Family.upsampler) with every parameter on the meta device, from
    `folder/config.json` (its own folder, not the checkpoint's); refused over MAX_PARAMETERS as a
    component is."""
    return _bounded(_transformers_on_meta(Path(folder), component.class_name),
                    f"--upsample-prompt: '{folder}': config.json", "prompt upsampler", "--upsample-prompt")


def _bounded(model: torch.nn.Module, where: str, what: str, option: str) -> torch.nn.Module:
    """`model` (`what`, described by `where`), unless it has more than MAX_PARAMETERS parameters
    (CheckpointError naming `where` and `option`)."""
    count = sum(parameter.numel() for parameter in model.parameters())
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{where} describes a {what} of {count / 1e9:,.0f} billion parameters, over {MAX_PARAMETERS / 1e9:.0f} "
            f"billion (six times FLUX.2-dev's transformer): the config is damaged: fetch that file again or give "
            f"another {option}")
    return model


def _transformers_on_meta(folder: Path, class_name: str) -> torch.nn.Module:
    """transformers' `class_name` from the config in `folder`, on meta, its weights tied as from_pretrained ties them."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    with MODULE_PATCH_LOCK, torch.device("meta"), init_empty_weights():
        model = getattr(transformers, class_name)(config)
    model.tie_weights()  # as from_pretrained does: T5's encoder.embed_tokens is `shared`
    return model


def _built_on_meta(config_root: Path, name: str) -> torch.nn.Module:
    family = family_of(Path(config_root))
    component = family.component(name)
    folder = config_root / name
    if component.library == "transformers":
        model = _transformers_on_meta(folder, component.class_name)
        if component.truncated:
            model = encode_only(model, encode_layers(family.pipeline))
        return model
    import diffusers

    model_class = getattr(diffusers, component.class_name)
    # FLUX.2's published vae/config.json keeps `force_upcast`, which AutoencoderKLFlux2 no longer
    # takes; diffusers warns about it on every build, and a plan builds the VAE several times.
    config_logger = logging.getLogger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        with MODULE_PATCH_LOCK, torch.device("meta"), init_empty_weights():
            return model_class.from_config(model_class.load_config(folder))
    finally:
        config_logger.setLevel(level)


def special_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Parameters that loading keeps in float32 whatever the requested dtype: a diffusers model's
    `_keep_in_fp32_modules` at any dtype (ModelMixin.from_pretrained, unquantized or through the
    torchao and bitsandbytes quantizers, whose use_keep_in_fp32_modules is set; layerwise casting
    skips them too: FLUX.3's norm_q and norm_k), a transformers model's at float16 only, and its
    `_keep_in_fp32_modules_strict` at float16 and bfloat16 (transformers' rules)."""
    keep = set()
    if hasattr(model, "enable_layerwise_casting") or dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    special = {
        name: torch.float32
        for name, _ in model.named_parameters()
        if any(module in name.split(".") for module in keep)
    }
    if not hasattr(model, "enable_layerwise_casting"):  # a transformers model
        # Buffers it computes rather than loads (Qwen3's and Mistral's rotary inverse frequencies,
        # made with an explicit .float()) stay float32 whatever dtype loads the weights.
        special.update({f"{module_name}.{name}".lstrip("."): torch.float32
                        for module_name, module in model.named_modules()
                        for name in module._non_persistent_buffers_set
                        if getattr(module, name, None) is not None and getattr(module, name).dtype == torch.float32})
    # Quantization statistics stored in float32 whatever the compute dtype (quantize_bytes.quantized_meta).
    special.update(getattr(model, "quantized_special_dtypes", None) or {})
    return special


def module_sizes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per module name ("" is the whole model), shared parameters counted once."""
    return dict(compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes(model, dtype)))


def no_split_modules(model: torch.nn.Module) -> list[str]:
    """Classes that must stay whole on one device (transformer blocks, T5 blocks, ...)."""
    return list(getattr(model, "_no_split_modules", None) or ())


def encode_only(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A decoder-only text encoder (Mistral3ForConditionalGeneration, Qwen3ForCausalLM) cut, in
    place, to what FLUX.2's encode reads: the token embeddings and the first `layers` decoder layers.

    Left out, and why none of it can change the prompt embeddings:
    - decoder layers after `layers`: the encode stacks hidden_states[k] for k up to `layers`
      (families.encode_layers), and a causal decoder's layer k sees only the layers before it;
    - the final norm, made an identity: transformers 5 replaces the last hidden state by the
      final-normed one, which after the cut would be hidden_states[layers] itself;
    - `lm_head` (made an identity): the logits are thrown away (FLUX.2-dev's 0.67 B parameters;
      Qwen3-4B ties it to the embeddings, so only compute is saved there);
    - Mistral3's Pixtral vision tower and multimodal projector (0.44 B), Qwen3-VL's vision tower
      (`visual`, 0.415 B): text-only prompts pass no pixel_values; they serve only the pipelines'
      optional caption upsampling, which flux-sharded does not offer.
    The cut keeps the module names of the full model (model.language_model.layers.0, ...) and lists
    the modules it replaced in `model.encode_cut`, which plans leave out of their device maps: a
    loader must build this cut model, not load the full one with the plan's map.
    Shapes: input_ids (B, S) -> hidden_states, a tuple of layers + 1 tensors (B, S, hidden_size).
    """
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[:layers]
    cut = [(decoder, "norm"), (model, "lm_head")]
    inner = getattr(model, "model", None)
    cut += [(inner, part) for part in ("vision_tower", "multi_modal_projector", "visual") if hasattr(inner, part)]
    owners = {id(module): name for name, module in model.named_modules()}
    model.encode_cut = tuple(f"{owners[id(owner)]}.{part}".lstrip(".") for owner, part in cut)
    for owner, part in cut:
        setattr(owner, part, torch.nn.Identity())
    text_config = getattr(model.config, "text_config", None) or model.config
    text_config.num_hidden_layers = layers  # per-layer settings (layer_types) are read by index
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = text_config.layer_types[:layers]
    return model
