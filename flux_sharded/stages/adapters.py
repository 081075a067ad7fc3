"""LoRA adapters: checked against the model before anything is written, loaded into a component
before it is placed.

Both go through diffusers' own loaders, so every format diffusers converts (diffusers/PEFT, kohya,
ai-toolkit, XLabs, ...) reads the same here as in a one-piece pipeline: the family's pipeline
class's `lora_state_dict` converts the file (stages/flux1.py, flux2.py), and its
`load_lora_into_transformer` / `load_lora_into_text_encoder` inject the layers through PEFT, given
the file's network alphas and adapter metadata (its saved LoraConfig) as `load_lora_weights` gives
them; each component's adapter weights are then set as the pipeline's
`set_adapters(names, weights)` sets them.

Why before placement: diffusers re-applies group offloading over the whole block lists when an
adapter is loaded (placement.py), and an accelerate-dispatched model would get layers that no hook
placed. A component is therefore loaded on the CPU, given its adapters, then placed by its plan.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..components import empty_component
from ..errors import SettingsError
from ..families import Family
from ..lora import Adapter
from .code import family_code

# A converted LoRA's keys: COMPONENT.MODULE.lora_A.weight (down, rank x in), lora_B.weight (up, out
# x rank), lora_B.bias (PEFT's lora_bias).
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<kind>weight|bias)$")
# A LoKr adapter's factors (diffusers converts FLUX.2 LoKr files): COMPONENT.MODULE.lokr_w1, ...
LOKR_KEY = re.compile(r"^(?P<module>.+)\.lokr_\w+$")
# Key fragments that mark a LoRA file (diffusers, PEFT, kohya, LoKr, XLabs' processors).
LORA_MARKERS = ("lora", "lokr", "alpha", "processor")


def check_lora(family: Family, config_root: Path, path: Path, source: str) -> dict[str, dict[str, tuple]]:
    """What the LoRA file at `path` changes in the checkpoint at `config_root`: {component: {module:
    the shapes of the adapter's tensors there (lora_A, lora_B, ...), as PEFT injects them}}, checked
    against the components built on the meta device.

    Raises SettingsError, naming `source` and the fix, for a file that is not a safetensors file
    (text, truncated), one with no LoRA weights (a full checkpoint), one diffusers cannot convert
    for `family`, one whose layers are not the model's (a LoRA for another family: diffusers would
    only log "No LoRA keys associated" and run without it), and one that changes a layer's shape or
    holds other weights than LoRA's (FLUX.1 Canny/Depth Control LoRAs widen x_embedder)."""
    from safetensors import safe_open

    what = f"--lora '{source}'"
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors' own error type for a bad header or a short file
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise SettingsError(f"{what}: {path} is not a whole safetensors file ({reason}); give a LoRA .safetensors "
                            "file (a truncated download: fetch it again)") from None
    if not any(marker in key.lower() for key in keys for marker in LORA_MARKERS):
        sample = f" such as '{keys[0]}'" if keys else ""
        raise SettingsError(f"{what}: {path} holds no LoRA weights ({len(keys)} tensors{sample}): a full model "
                            "checkpoint? give a LoRA file")
    code = family_code(family)
    try:
        state_dict, _ = code.lora_state_dict(family, path)
    except Exception as error:  # the converters raise ValueError, KeyError, ... for keys they cannot map
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise SettingsError(f"{what}: diffusers cannot read it as a {family.name} LoRA ({reason}); is it a LoRA "
                            f"for another model? give a {family.name} LoRA") from None
    changed: dict[str, dict[str, tuple]] = {}
    foreign = sorted({key.split(".", 1)[0] for key in state_dict} - set(family.lora_components))
    if foreign:
        raise SettingsError(f"{what}: it holds weights for {', '.join(foreign)}, which {family.pipeline} loads no "
                            f"LoRA into (it takes {', '.join(family.lora_components)}): a LoRA for another model? "
                            f"give a {family.name} LoRA")
    for name in family.lora_components:
        weights = {key.removeprefix(f"{name}."): tensor for key, tensor in state_dict.items()
                   if key.startswith(f"{name}.")}
        if weights:
            model = empty_component(config_root, name)
            try:
                peft_weights = _peft_keys(model, weights)
            except ValueError as error:  # diffusers' converters: "Could not automatically infer state dict type"
                raise SettingsError(f"{what}: diffusers cannot convert its {name} weights ({str(error)[:200]}); give "
                                    f"a LoRA file diffusers' {family.pipeline}.load_lora_weights reads") from None
            changed[name] = _check_layers(model, peft_weights, what, family, name)
    if not changed:
        raise SettingsError(f"{what}: it holds no weights for {family.name}'s {' or '.join(family.lora_components)}: "
                            f"a LoRA for another model? give a {family.name} LoRA")
    return changed


def _peft_keys(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A component's LoRA weights under the names PEFT gives them in `model`, converted as diffusers'
    loaders convert them (ModelMixin.load_lora_adapter for a diffusers model, the text encoder
    loader's conversions for a transformers one)."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)

    if hasattr(model, "load_lora_adapter"):  # a diffusers model
        first = next(iter(weights))
        return weights if "lora_A" in first or ".lokr_" in first else convert_unet_state_dict_to_peft(weights)
    converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(weights))
    if not hasattr(model, "text_model"):  # CLIPTextModel flattened by newer transformers
        converted = {key.removeprefix("text_model."): tensor for key, tensor in converted.items()}
    return converted


def _check_layers(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, family: Family,
                  name: str) -> dict[str, tuple]:
    """{module: the shapes of the adapter's tensors} for the LoRA weights of one component, each
    checked against the module it wraps (`model` on the meta device); raises SettingsError."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    for key, tensor in weights.items():
        match = LORA_KEY.match(key) or LOKR_KEY.match(key)
        if match is None and "lora" in key:
            raise SettingsError(f"{what}: diffusers would not apply its layer '{key}' to {name} (a layout it does not "
                                f"convert, or a LoRA for another model): give a {family.name} LoRA")
        if match is None:
            raise SettingsError(
                f"{what}: besides LoRA layers it replaces {name} weights ('{key}'), as FLUX.1 Canny/Depth Control "
                "LoRAs do; flux-sharded does not apply those: give a LoRA made only of lora_A/lora_B layers")
        module_name = match["module"]
        module = modules.get(module_name)
        if module is None or not isinstance(module, torch.nn.Linear):
            raise SettingsError(f"{what}: the model's {name} has no linear layer '{module_name}': a LoRA for another "
                                f"model? give a {family.name} LoRA")
        part = match.groupdict().get("part")
        if part == "A" and tensor.shape[-1] != module.in_features:
            change = "widens" if tensor.shape[-1] > module.in_features else "changes"
            raise SettingsError(
                f"{what}: it {change} {name} layer '{module_name}' from {module.in_features} to {tensor.shape[-1]} "
                "input features (as FLUX.1 Canny/Depth Control LoRAs do, or a LoRA for another model); flux-sharded "
                f"applies LoRAs that keep the model's shapes: give a {family.name} LoRA")
        if part == "B" and tensor.shape[0] != module.out_features:
            raise SettingsError(f"{what}: its {name} layer '{module_name}' has {tensor.shape[0]} outputs, the model's "
                                f"{module.out_features}: a LoRA for another model? give a {family.name} LoRA")
        shapes[module_name] = (*shapes.get(module_name, ()), tuple(tensor.shape))
    return shapes


def load_adapters(family: Family, name: str, model: torch.nn.Module, adapters: tuple[Adapter, ...],
                  fuse: bool = False) -> None:
    """Load `adapters` into component `name` (on the CPU, not yet placed) with diffusers' loaders,
    then give each its weight, as `pipeline.load_lora_weights(path, adapter_name=...)` for each and
    `pipeline.set_adapters(names, weights)` would; fuse (a diffusers model): then merge them into
    the weights and drop the adapter layers, as `pipeline.fuse_lora()` and `unload_lora_weights()`."""
    if not adapters:
        return
    code = family_code(family)
    for adapter in adapters:
        state_dict, options = code.lora_state_dict(family, adapter.path)
        with warnings.catch_warnings():
            # peft warns on every adapter after the first ("Already found a `peft_config` attribute ...
            # multiple adapters"): several adapters are what --lora asked for, so it is not the user's news.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            code.load_lora(family, name, model, state_dict, options, adapter.name)
        del state_dict  # the adapter's layers hold their own copies now
    names, weights = [adapter.name for adapter in adapters], [adapter.scale for adapter in adapters]
    if hasattr(model, "set_adapters"):  # a diffusers model (ModelMixin's PEFT support)
        model.set_adapters(names, weights)
        if fuse:
            model.fuse_lora(lora_scale=1.0, adapter_names=names)
            model.unload_lora()
    else:  # a transformers text encoder: what LoraBaseMixin.set_adapters calls for one
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder

        set_adapters_for_text_encoder(names, model, weights)
