"""Who goes where, and how many bytes each device will hold, decided before any weight is read.

Each stage's components (which ones: the checkpoint's model family, families.py) are built on the
meta device from their configs (components.py), their weights counted exactly and their
activations estimated (the family's formulas, activations.py) for the images that really share a
forward pass (min(--batch-size, images or distinct prompts)). Then, promises:

- A GPU whose budget cannot hold even one component's activations plus its largest no-split
  block (or is budgeted 0 bytes) computes nothing: it is left out, with a note.
- encode: each text encoder whole on one GPU, largest first on the GPU with the most room left
  (diffusers' "balanced" pipeline strategy, written here: diffusers' private
  `_assign_components_to_devices` loses components when several miss every GPU). An encoder that
  fits no GPU whole is split block-wise GPU + CPU with accelerate's offload hooks when a GPU can
  hold its activations and one block, else it runs whole on the CPU. Why split: an encode is one
  forward per prompt batch, and copying the offloaded T5 blocks to the GPU once (9.5 GB at PCIe
  speed, under a second) is far faster than running T5-XXL's several TFLOP per prompt on a CPU.
- denoise: the transformer is split block-wise with accelerate, as diffusers' `device_map="auto"`
  does (`get_balanced_memory` + `infer_auto_device_map`, no transformer block ever split), under
  each GPU's budget less the activation estimate, so that on every device weights + activations
  <= budget. Blocks that fit no GPU are offloaded to "cpu" (then "disk") only if the budget names
  them. Offloaded blocks on "cpu" are *streamed* (placement.py: diffusers' group offloading,
  a side CUDA stream prefetching the next block while one runs), so the GPU that runs them keeps
  room for STREAMED_BLOCKS_IN_FLIGHT of the largest block plus the top-level modules; weights on
  "disk" go through accelerate's synchronous hooks (one block in flight).
- encode_image (a run with input images only): the whole VAE as decode places it, its activations
  those of one encode at the largest size the image pipeline encodes an input at
  (activations.vae_encode_activation_bytes), tiled (diffusers' tiled encoding) when that does not fit.
- decode: the whole VAE on the GPU with the largest budget that holds it, trying in turn the
  whole batch, one image at a time, then diffusers' tiled decoding (`vae.enable_tiling()`), and
  only then the CPU (same order).
- Every stage reports the weight bytes copied host-to-GPU per forward pass (offload_bytes).

The runner loads with exactly these device maps; nothing is computed a second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from . import host_memory
from .blocks import BlockStructure, block_structure
from .budget import (BINARY_TWIN, DEFAULT_CPU_FRACTION, DEFAULT_GPU_RESERVE_BYTES, UNITS, Budget, as_typed,
                     format_budget, format_bytes, gpu_indices, is_gpu, spec_size, written_binary, written_size)
from .activations import adapter_activation_bytes
from .components import empty_component, empty_upsampler, module_sizes, no_split_modules, special_dtypes
from .errors import PlanError
from .families import IMAGE_STAGE, STAGES, UPSAMPLE_STAGE, Family, family_of
from .lora import Adapter
from .placement import hostable
from .quantize import LORA_MERGE
from .quantize_bytes import quantized_linears

Device = int | str  # GPU index, "cpu" or "disk"
# diffusers' group offloading with use_stream=True (num_blocks_per_group=1): while block i runs, block
# i+1 is copied on a side stream, and block i is released only after it ran, so two blocks are on
# the GPU at once (group_offloading.py, GroupOffloadingHook.pre_forward / ModuleGroup.offload_).
STREAMED_BLOCKS_IN_FLIGHT = 2
# accelerate's AlignDevicesHook(offload=True) puts one block's weights on the GPU for its forward.
HOOKED_BLOCKS_IN_FLIGHT = 1
# The "smallest budget that fits" in a refusal message is searched to about three significant
# figures of the run's total size (100 MB steps for FLUX.1-dev's 34 GB, 10 KB for a tiny test
# checkpoint): finer would promise a precision the activation estimates do not have.
SUGGESTION_SIGNIFICANT_DIGITS = 3


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on besides the budget: the configs and the generation geometry."""

    config_root: Path
    dtype: torch.dtype
    height: int
    width: int
    max_sequence_length: int
    vae_scale_factor: int
    batch_size: int = 1  # --batch-size
    images: int | None = None  # images a process makes (the largest share); None: batch_size
    distinct_prompts: int | None = None  # prompts a process encodes; None: batch_size
    quantize: tuple[tuple[str, str], ...] = ()  # (component, "fp8" | "int8" | "nf4"), see quantize.py
    prequantized: tuple[str, ...] = ()  # components of `quantize` stored quantized in the checkpoint
    adapters: tuple[Adapter, ...] = ()  # --lora, checked (stages/adapters.check_lora), in order
    # (height, width) of each input image as the VAE encodes it (stages/flux1.py: the run's size);
    # () for a run without input images, which has no encode_image stage
    input_sizes: tuple[tuple[int, int], ...] = ()
    # The prompt upsampler's folder (its config at least: checkpoint.resolve_upsampler), None without
    # --upsample-prompt; the most tokens of its request (families.upsample_prompt_tokens) and of its answer.
    upsampler: Path | None = None
    upsample_prompt_tokens: int = 0
    upsample_max_tokens: int = 0

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages planned (families.STAGES): upsample only with an upsampler, encode_image only
        with input images."""
        return tuple(stage for stage in STAGES if (stage != IMAGE_STAGE or self.input_sizes)
                     and (stage != UPSAMPLE_STAGE or self.upsampler is not None))

    @property
    def family(self) -> Family:
        """The checkpoint's model family, from config_root/model_index.json."""
        return family_of(Path(self.config_root))

    def method(self, name: str) -> str | None:
        """The quantization of component `name` (asked for or pre-quantized), None for --dtype storage."""
        return dict(self.quantize).get(name)

    def load_method(self, name: str) -> str | None:
        """The quantization to apply while loading `name`: none for a pre-quantized component."""
        return None if name in self.prequantized else self.method(name)

    def batch_images(self) -> int:
        """Images that really share a denoise or decode forward pass."""
        return min(self.batch_size, self.images or self.batch_size)

    def batch_prompts(self) -> int:
        """Prompts that really share an encode forward pass (each distinct prompt is encoded once)."""
        return min(self.batch_size, self.distinct_prompts or self.batch_size)


@dataclass(frozen=True)
class ComponentPlan:
    name: str  # "text_encoder", "text_encoder_2", "transformer" or "vae"
    device_map: dict[str, Device]  # module -> device, given to from_pretrained ("" = the whole component)
    weight_bytes: dict[Device, int]
    activation_bytes: dict[Device, int]  # the estimated activation peak, on each device that computes
    # (plus, on the GPU that runs offloaded blocks, the room for those blocks while they run)
    offload_bytes: int = 0  # weights copied host-to-GPU per forward pass (offloaded blocks)
    streamed: bool = False  # offloaded blocks streamed with diffusers' group offloading (else accelerate hooks)
    tiled: bool = False  # VAE: diffusers' tiled decoding
    batch_size: int = 1  # images (or prompts) per forward pass
    quantization: str | None = None  # applied while loading (quantize_load.from_pretrained): fp8, int8, nf4
    pinned_bytes: int = 0  # streamed: host bytes pinned for the streamed modules, as allocated (in weight_bytes["cpu"])
    adapters: tuple[Adapter, ...] = ()  # the LoRAs loaded into it before it is placed, in --lora order
    adapter_bytes: int = 0  # their unfused tensors' bytes, counted in weight_bytes on the devices of their layers
    folder: Path | None = None  # where its weights are when not in the checkpoint (the prompt upsampler's own folder)

    @property
    def loaded_as(self) -> tuple:
        """What a stage's load reads of this plan (stages/*.load: the map, streaming, quantization,
        LoRAs, tiled and one-image decoding): two plans equal here load the same component placed
        the same way, whatever their byte counts (another image size)."""
        return (self.name, tuple(self.device_map.items()), self.streamed, self.quantization, self.adapters,
                self.tiled, self.batch_size == 1, self.folder)


@dataclass(frozen=True)
class StagePlan:
    name: str  # "encode" | "denoise" | "decode"
    components: tuple[ComponentPlan, ...]
    budget: Budget
    notes: tuple[str, ...] = ()  # what the planner left out or chose, and why

    def component(self, name: str) -> ComponentPlan:
        return next(component for component in self.components if component.name == name)

    @property
    def weight_bytes(self) -> dict[Device, int]:
        total: dict[Device, int] = {}
        for component in self.components:
            for device, size in component.weight_bytes.items():
                total[device] = total.get(device, 0) + size
        return _ordered(total)

    @property
    def activation_bytes(self) -> dict[Device, int]:
        """Per device, the largest activation peak: a stage's components run one after another."""
        peak: dict[Device, int] = {}
        for component in self.components:
            for device, size in component.activation_bytes.items():
                peak[device] = max(peak.get(device, 0), size)
        return _ordered(peak)

    @property
    def offload_bytes_per_step(self) -> int:
        """Weights copied host-to-GPU per forward pass of this stage (a denoising step: one
        transformer forward; an encode: one text-encoder forward)."""
        return sum(component.offload_bytes for component in self.components)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes pinned while the stage runs (its streamed components'), as PyTorch allocates them."""
        return sum(component.pinned_bytes for component in self.components)

    @property
    def planned_bytes(self) -> dict[Device, int]:
        devices = set(self.weight_bytes) | set(self.activation_bytes)
        return _ordered({d: self.weight_bytes.get(d, 0) + self.activation_bytes.get(d, 0) for d in devices})

    @property
    def overflow(self) -> dict[Device, int]:
        """Devices whose planned bytes exceed the budget (or are not in it at all), by how much."""
        return {
            device: planned - self.budget.get(device, 0)
            for device, planned in self.planned_bytes.items()
            if planned > self.budget.get(device, 0)
        }

    @property
    def fits(self) -> bool:
        return not self.overflow


@dataclass(frozen=True)
class RunPlan:
    budget: Budget
    stages: tuple[StagePlan, ...]

    @property
    def notes(self) -> list[str]:
        """Each stage's notes, each said once."""
        return list(dict.fromkeys(note for stage in self.stages for note in stage.notes))

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)


def kept_between_calls(plan: RunPlan) -> dict[str, int]:
    """The stages whose loaded components stay in host memory between the Python API's calls
    (api.Model), with the RAM each keeps (all its weights, whichever device the stage runs them on):

    - only a stage whose every component goes back to RAM whole and is placed again each call
      (placement.hostable: on the CPU, whole on a GPU, split over GPUs, or with blocks streamed
      from RAM; nothing under accelerate's offload hooks or nf4), so that keeping it holds no GPU
      memory between calls and the next call moves its weights to the GPUs at the bus's speed
      instead of reading them from disk;
    - taken in stage order while the budget still holds: for every stage, its planned CPU bytes
      plus the weights the other kept stages hold never exceed the budget's cpu entry (a stage that
      is kept counts its own weights once, in its plan: while it runs, they are on its devices).

    Empty for a plan that does not fit. The weights of a stage not kept are read again each call."""
    if not all(stage.fits for stage in plan.stages):
        return {}
    cpu = plan.budget.get("cpu", 0)
    kept: dict[str, int] = {}
    for stage in plan.stages:
        if not all(hostable(dict(component.device_map), component.streamed, component.quantization)
                   for component in stage.components):
            continue
        trial = {**kept, stage.name: sum(stage.weight_bytes.values())}
        if all(other.planned_bytes.get("cpu", 0) + sum(size for name, size in trial.items() if name != other.name)
               <= cpu for other in plan.stages):
            kept = trial
    return kept


def _ordered(per_device: dict[Device, int]) -> dict[Device, int]:
    """GPUs by index, then cpu, then disk."""
    return {key: per_device[key] for key in [*gpu_indices(per_device), *(k for k in ("cpu", "disk") if k in per_device)]}


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate warns about every GPU index this machine lacks (a dry-run may plan for such GPUs),
    and advises offload_buffers=True when offloaded buffers fit no GPU: the plan counts buffers as
    weights, and its streamed offload moves them with their blocks, so that advice does not apply."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Current model requires .* bytes of buffer for offloaded layers")
            yield
    finally:
        logger.setLevel(level)


class _Components:
    """Meta models and their sizes, built once per plan (and reused by the refusal search)."""

    def __init__(self, inputs: PlanInputs, to_run: tuple[str, ...] = STAGES):
        self.inputs = inputs
        self.to_run = to_run  # the stages a refusal's ways out must fit (a resume's: those left)
        self.family = inputs.family
        upsampler = self.family.upsampler if UPSAMPLE_STAGE in inputs.stages else None
        self.names = (*self.family.names, *([upsampler.name] if upsampler else []))
        self._models: dict[str, torch.nn.Module] = {}
        self._sizes: dict[str, dict[str, int]] = {}
        self._load_transients: dict[str, int] = {}
        self._structures: dict[str, BlockStructure] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            if self.family.upsampler is not None and name == self.family.upsampler.name:  # a folder of its own
                self._models[name] = empty_upsampler(self.inputs.upsampler, self.family.upsampler)
                return self._models[name]
            model = empty_component(self.inputs.config_root, name, self.inputs.method(name), self.inputs.dtype)
            for module, shapes in self.adapter_shapes(name):
                for index, shape in enumerate(shapes):  # counted where the layer it wraps is placed
                    model.get_submodule(module).register_parameter(
                        f"planned_adapter_{index}", torch.nn.Parameter(torch.empty(shape, device="meta")))
            self._models[name] = model
        return self._models[name]

    def adapter_shapes(self, name: str) -> list[tuple[str, list[tuple[int, ...]]]]:
        """[(module, shapes of the adapter tensors PEFT adds to it)] for the LoRAs of component `name`
        that stay unfused (quantize.LORA_MERGE: fp8 fuses them into the weights, adding nothing). PEFT
        keeps them in the component's dtype."""
        if LORA_MERGE.get(self.inputs.method(name)) == "fused":
            return []
        shapes: dict[str, list[tuple[int, ...]]] = {}
        for adapter in self.inputs.adapters:
            for component, modules in adapter.changes:
                for module, tensors in modules if component == name else ():
                    shapes.setdefault(module, []).extend(tensors)
        return list(shapes.items())

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the unfused adapters of component `name`, as the plan counts them (in its weights)."""
        size = torch.finfo(self.inputs.dtype).bits // 8
        return sum(math.prod(shape) * size for _, shapes in self.adapter_shapes(name) for shape in shapes)

    def sizes(self, name: str) -> dict[str, int]:
        if name not in self._sizes:
            self._sizes[name] = module_sizes(self.model(name), self.inputs.dtype)
        return self._sizes[name]

    def activation_bytes(self, name: str, stage: str, images: int | None = None, tiled: bool = False) -> int:
        """The activation peak of one forward pass of `name` in `stage` over `images` images (default:
        the images that really share a pass: min(--batch-size, images) or, for text encoders, distinct
        prompts), its unfused LoRAs' included."""
        one = self.family.component(name).activation(stage, self.config(name), self.inputs, tiled)
        return (one + self.adapter_activation_bytes(name)) * (images or self.batch_size(name))

    def adapter_activation_bytes(self, name: str) -> int:
        """What its unfused LoRAs add to one image's (prompt's) activation peak (activations.py)."""
        shapes = self.adapter_shapes(name)
        if not shapes:
            return 0
        tokens = self.family.component(name).lora_tokens(self.config(name), self.inputs)
        return adapter_activation_bytes(shapes, tokens, torch.finfo(self.inputs.dtype).bits // 8)

    def most_activation_bytes(self, name: str) -> int:
        """The largest activation peak of `name` over the stages that load it."""
        return max(self.activation_bytes(name, stage) for stage in self.family.component(name).stages)

    def batch_size(self, name: str) -> int:
        """How many rows share one forward pass of `name`: distinct prompts for a text encoder (a
        component with a tokenizer), images otherwise; one for the prompt upsampler."""
        if self.family.upsampler is not None and name == self.family.upsampler.name:
            return 1  # the upsampler block takes one prompt per call (prompt_upsampler.upsample_prompt)
        encodes_text = self.family.component(name).tokenizer is not None
        return self.inputs.batch_prompts() if encodes_text else self.inputs.batch_images()

    def config(self, name: str) -> dict:
        config = self.model(name).config
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def largest_block(self, name: str) -> int:
        """Bytes of the component's largest no-split block (a transformer or T5 block), never a merged
        container; a component without no-split blocks: its largest module with weights of its own."""
        model, sizes = self.model(name), self.sizes(name)
        no_split = set(no_split_modules(model))
        blocks = [sizes.get(module_name, 0) for module_name, module in model.named_modules()
                  if type(module).__name__ in no_split]
        if not blocks:
            blocks = [sizes.get(module_name, 0) for module_name, module in model.named_modules()
                      if any(True for _ in module.parameters(recurse=False))]
        return max(blocks, default=0)

    def load_transient(self, name: str) -> int:
        """Bytes a GPU holds for a moment while `name` loads, beyond its weights: bitsandbytes' 4-bit
        loading (diffusers' and transformers' Params4bit.to) moves each weight to the GPU in the
        compute dtype and packs it there, so the largest converted layer's unpacked weight is
        briefly there as well. 0 for any other storage, which loads tensor by tensor as stored."""
        if self.inputs.load_method(name) != "nf4":
            return 0
        if name not in self._load_transients:  # one meta build, not one per placement tried
            unquantized = empty_component(self.inputs.config_root, name)
            size = torch.finfo(self.inputs.dtype).bits // 8
            self._load_transients[name] = max(
                (linear.weight.numel() * size for _, linear in quantized_linears(unquantized, "nf4")), default=0)
        return self._load_transients[name]

    def top_level_bytes(self, name: str) -> int:
        """Bytes outside the block lists (embedders, final norm and projection; blocks.py): diffusers'
        group offloading moves them to the GPU for every forward pass."""
        sizes = self.sizes(name)
        return sum(sizes.get(module, 0) for module in self.structure(name).top_level)

    def structure(self, name: str) -> BlockStructure:
        """The component's block structure (blocks.py), read once per plan: every placement round asks."""
        if name not in self._structures:
            self._structures[name] = block_structure(self.model(name))
        return self._structures[name]


def plan_run(inputs: PlanInputs, budget: Budget, to_run: tuple[str, ...] = STAGES) -> RunPlan:
    """Plan every stage; raises PlanError (naming each stage that does not fit, and the ways out)
    when one of `to_run` does not fit: a resume under a smaller budget runs only the stages left."""
    components = _Components(inputs, to_run)
    stages = _plan_all(components, budget)
    if not all(stage.fits for stage in _left(components, stages)):
        raise PlanError(_refusal(_left(components, stages), components, budget), stages)
    return RunPlan(budget=budget.copy(), stages=stages)  # a Budget's copy keeps the units it was written in


def _plan_all(components: "_Components", budget: Budget) -> tuple[StagePlan, ...]:
    with _quiet_accelerate():
        stages = tuple(PLANNERS[name](components, budget) for name in components.inputs.stages)
    adapters = components.inputs.adapters
    return tuple(dataclasses.replace(stage, components=tuple(
        dataclasses.replace(plan, adapters=tuple(each for each in adapters if plan.name in each.components),
                            adapter_bytes=components.adapter_bytes(plan.name))
        for plan in stage.components)) for stage in stages)


def _left_out(budget: Budget, needs: dict[str, int], stage: str) -> tuple[Budget, list[str]]:
    """The budget without the GPUs that can run none of `needs` (component -> the least a GPU must
    hold to run it: its activations plus one block), and a note for each GPU left out."""
    smallest = min(needs.values())
    kept, notes = {}, []
    for key, size in budget.items():
        if is_gpu(key) and size < smallest:
            notes.append(
                f"note: {stage} leaves GPU {key} out: its budget {format_bytes(size)} is below the "
                f"{format_bytes(smallest)} that the smallest part of the stage needs to run there"
            )
            continue
        kept[key] = size
    return kept, notes


def plan_encode(components: _Components, budget: Budget) -> StagePlan:
    """The text encoders (the module docstring's promises)."""
    return _plan_text_models(components, budget, "encode")


def plan_upsample(components: _Components, budget: Budget) -> StagePlan:
    """The prompt upsampler (--upsample-prompt), placed as encode places a text encoder: whole on the
    roomiest GPU, else split GPU + CPU, else on the CPU; its activations those of one generation
    (families._upsampler); loaded from its own folder (ComponentPlan.folder)."""
    stage = _plan_text_models(components, budget, UPSAMPLE_STAGE)
    return dataclasses.replace(stage, components=tuple(dataclasses.replace(plan, folder=components.inputs.upsampler)
                                                       for plan in stage.components))


def _plan_text_models(components: _Components, budget: Budget, stage: str) -> StagePlan:
    names = components.family.stage_components()[stage]
    whole = {name: components.sizes(name)[""] + components.activation_bytes(name, stage) for name in names}
    least = {name: components.activation_bytes(name, stage) + components.largest_block(name) for name in names}
    usable, notes = _left_out(budget, least, stage)
    room = {index: usable[index] for index in gpu_indices(usable)}
    planned = {}
    # diffusers' "balanced" pipeline strategy: largest component first, on the GPU with the most
    # room left (ties: the lowest index).
    for name in sorted(names, key=lambda n: (-whole[n], names.index(n))):
        best = max(room, key=lambda index: (room[index], -index), default=None)
        if best is not None and whole[name] <= room[best]:
            room[best] -= whole[name]
            planned[name] = _whole(components, name, stage, best)
            continue
        # Fits no GPU whole: split it over the GPUs' remaining room and the CPU (see the module
        # docstring for why this beats running it on the CPU), else run it whole on the CPU.
        split_budget = {**{index: size for index, size in room.items() if size >= least[name]},
                        **{key: usable[key] for key in ("cpu", "disk") if key in usable}}
        method = components.inputs.method(name)
        if method == "nf4" and best is not None:
            # bitsandbytes' 4-bit layers run on a GPU only: the roomiest one, or a refusal.
            room[best] -= whole[name]
            planned[name] = _whole(components, name, stage, best)
        elif gpu_indices(split_budget) and "cpu" in split_budget:
            # Blocks in the GPUs' room, the rest run on the first GPU from RAM. fp8 / int8 weights, and
            # an encoder with LoRAs (whose adapters go in before it is placed: stages/adapters.py),
            # load on the CPU and stream by group offloading (placement.py), as the transformer's do;
            # the others are offloaded by the hooks from_pretrained sets with the map (accelerate's).
            streamed = bool(method) or any(name in adapter.components for adapter in components.inputs.adapters)
            if streamed:
                split_budget = {key: value for key, value in split_budget.items() if key != "disk"}
            plan = _split(components, name, stage, split_budget, streamed=streamed)
            used = {device: plan.weight_bytes.get(device, 0) + plan.activation_bytes.get(device, 0)
                    for device in gpu_indices(split_budget)}
            if streamed and any(used[device] > room[device] for device in used):
                # streaming holds two blocks in flight and the top-level modules on the GPU, more than
                # the room a split by accelerate's hooks needed: the CPU computes it instead
                planned[name] = _whole(components, name, stage, "cpu")
                notes.append(f"note: {stage} runs {name} whole on the CPU: streaming its blocks (its LoRAs or "
                             f"quantization need them streamed) takes more GPU room than is left")
                continue
            for device in used:
                room[device] -= used[device]
            planned[name] = plan
        else:
            planned[name] = _whole(components, name, stage, "cpu")
            if room:  # GPUs are budgeted, yet the CPU computes it: say why
                why = (f"no GPU has the {format_bytes(least[name])} left that running any of it there takes (its "
                       "activations and its largest block); a larger GPU budget moves it there"
                       if not gpu_indices(split_budget) else
                       "the blocks that miss the GPUs stream from RAM, and no cpu budget is given; add one")
                notes.append(f"note: {stage} runs {name} ({format_bytes(components.sizes(name)[''])}) whole on the "
                             f"CPU, the slowest place: {why}")
    return StagePlan(stage, tuple(planned[name] for name in names), dict(budget), tuple(notes))


def _whole(components: _Components, name: str, stage: str, device: Device) -> ComponentPlan:
    loading = components.load_transient(name) if device != "cpu" else 0
    return ComponentPlan(
        name=name,
        device_map={"": device},
        weight_bytes={device: components.sizes(name)[""]},
        # loading comes before the forward pass: the more of the two
        activation_bytes={device: max(components.activation_bytes(name, stage), loading)},
        batch_size=components.batch_size(name),
        quantization=components.inputs.load_method(name),
    )


def auto_device_map(model: torch.nn.Module, max_memory: Budget, dtype: torch.dtype,
                    clean_result: bool = True) -> dict[str, Device]:
    """diffusers' `device_map="auto"` (models/model_loading_utils.py `_determine_device_map`):
    balance the memory over the GPUs, then let accelerate place whole no-split blocks. "disk" is
    left out of the balancing step, which cannot parse it (accelerate 1.15), and added back.
    clean_result=False keeps one entry per block (accelerate otherwise merges a whole list that
    lands on one device into one entry)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = no_split_modules(model)
    special = special_dtypes(model, dtype)
    balanced = get_balanced_memory(
        model,
        max_memory={key: value for key, value in max_memory.items() if key != "disk"},
        no_split_module_classes=no_split,
        dtype=dtype,
        special_dtypes=special,
    )
    if "disk" in max_memory:
        balanced["disk"] = max_memory["disk"]
    return infer_auto_device_map(
        model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special,
        clean_result=clean_result,
    )


def _split(components: _Components, name: str, stage: str, budget: Budget, streamed: bool) -> ComponentPlan:
    """`name` split block-wise over the budget's GPUs (then cpu, then disk), as diffusers'
    device_map="auto" does, with room on the first GPU for the offloaded blocks while they run
    there: streamed (group offloading: STREAMED_BLOCKS_IN_FLIGHT blocks and the top-level modules)
    when nothing goes to disk and `streamed`, else accelerate's hooks (HOOKED_BLOCKS_IN_FLIGHT)."""
    model, sizes = components.model(name), components.sizes(name)
    activation = components.activation_bytes(name, stage)
    gpus = gpu_indices(budget)
    computing = gpus or ["cpu"]
    limit = {key: value - activation if key in computing else value for key, value in budget.items()}
    limit = {key: value for key, value in limit.items() if value > 0}
    plan = None
    # When blocks are offloaded, the first GPU also needs room for them while they run. accelerate
    # already keeps its largest remaining block free there, so each round asks it to place `over`
    # bytes fewer weights there than the last, counting that room back in; a few rounds do.
    for _ in range(8):
        if not limit:
            device_map: dict[str, Device] = {"": computing[0]}
        else:
            device_map = dict(auto_device_map(model, limit, components.inputs.dtype, clean_result=False))
        plan = _placed(components, name, stage, device_map, computing, streamed)
        main = computing[0]
        over = plan.weight_bytes.get(main, 0) + plan.activation_bytes.get(main, 0) - budget.get(main, 0)
        if over <= 0 or main == "cpu" or plan.offload_bytes == 0 or limit.get(main, 0) <= over:
            break
        placed = plan.weight_bytes.get(main, 0)
        limit[main] = min(limit[main] - over, placed - over + components.largest_block(name))
    return plan


def _placed(components: _Components, name: str, stage: str, device_map: dict[str, Device], computing: list[Device],
            streamed: bool) -> ComponentPlan:
    """The ComponentPlan of a device map: weights per device, activations on the devices that compute,
    and the offloaded blocks' room on the first GPU while they run there."""
    sizes = components.sizes(name)
    activation = components.activation_bytes(name, stage)
    cut = getattr(components.model(name), "encode_cut", ())  # not loaded at all (components.encode_only)
    device_map = {module: device for module, device in device_map.items() if module not in cut}
    offloaded = {module for module, device in device_map.items() if device in ("cpu", "disk")}
    on_gpu = computing[0] != "cpu"
    streamed = streamed and on_gpu and bool(offloaded) and "disk" not in device_map.values()
    if streamed:
        structure = components.structure(name)
        # The top-level modules (blocks.py): a transformer's (embedders, final norm) stay in RAM too,
        # group offloading brings them to the first GPU for every forward pass; a text encoder's
        # (embeddings, norms) stay on the first GPU (BlockStructure.streams says why).
        top = "cpu" if structure.streams else computing[0]
        device_map = {module: (top if structure.unit_of(module) in structure.top_level else device)
                      for module, device in _by_unit(components.model(name), device_map, structure).items()}
        offloaded = {module for module, device in device_map.items() if device == "cpu"}
    weight_bytes: dict[Device, int] = {}
    for module, device in device_map.items():
        weight_bytes[device] = weight_bytes.get(device, 0) + sizes.get(module, 0)
    used = [device for device in computing if device in weight_bytes] or computing[:1]
    # loading comes before the forward pass: the more of the two on each GPU it loads onto
    loading = components.load_transient(name)
    activation_bytes = {device: max(activation, loading) if device != "cpu" else activation for device in used}
    pinned = 0
    if streamed:
        # RAM as PyTorch allocates it: the streamed tensors pinned (host_memory.py), and the most that
        # loading and pinning hold on top for a while (set-up, counted with the activations).
        weight_bytes["cpu"], pinned, activation_bytes["cpu"] = _streamed_host_bytes(components, name, sorted(offloaded))
    offload_bytes = sum(sizes.get(module, 0) for module in offloaded) if on_gpu else 0
    if offload_bytes:
        in_flight = STREAMED_BLOCKS_IN_FLIGHT if streamed else HOOKED_BLOCKS_IN_FLIGHT
        blocks_offloaded = [sizes.get(module, 0) for module in offloaded]
        room = in_flight * min(components.largest_block(name), max(blocks_offloaded))
        if streamed and structure.streams:  # the top-level modules stream too
            room += components.top_level_bytes(name)
        activation_bytes[used[0]] = activation_bytes.get(used[0], 0) + room
    return ComponentPlan(
        name=name,
        device_map=device_map,
        weight_bytes=_ordered(weight_bytes),
        activation_bytes=activation_bytes,
        offload_bytes=offload_bytes,
        streamed=streamed,
        batch_size=components.batch_size(name),
        quantization=components.inputs.load_method(name),
        pinned_bytes=pinned,
    )


def _by_unit(model: torch.nn.Module, device_map: dict[str, Device], structure: BlockStructure) -> dict[str, Device]:
    """The map with an entry for the whole model or for a container (blocks.py) replaced by one for
    each block and top-level module inside it that holds weights: the units streamed placement places."""
    units = [*structure.blocks(model), *structure.top_level]
    expanded: dict[str, Device] = {}
    for key, device in device_map.items():
        if key != "" and key not in structure.containers:
            expanded[key] = device
            continue
        for unit in units:
            module = model.get_submodule(unit)
            if (key == "" or unit.startswith(key + ".")) and any(True for _ in (*module.parameters(),
                                                                                  *module.buffers())):
                expanded[unit] = device
    return expanded


def _streamed_host_bytes(components: _Components, name: str, offloaded: list[str]) -> tuple[int, int, int]:
    """(host, pinned, set-up): the host bytes the streamed modules `offloaded` of component `name`
    hold while the stage runs, how many of those are pinned, and the most held on top of them while
    it loads.

    - Without a side stream (a text encoder's nested block lists: blocks.BlockStructure.streams),
      group offloading moves the modules with `.to`: the tensors as loaded, nothing pinned.
    - Plain tensors are packed into pinned chunks (host_memory.pack_into_host_memory): the layout's
      allocated bytes; packing holds at most one of its chunks more than that.
    - A tensor subclass (torchao's int8 weights: on meta, the weight, weight_scale and
      weight_zero_point of a layer quantize.quantized_meta converted) is pinned by group
      offloading itself, each inner tensor on its own (rounded up to a power of two), while its
      unpinned original is still held: both count.
    - Loading: the component is read whole into RAM before its resident blocks move to their GPUs
      (placement.place), so the set-up is at least the whole component less what stays pinned.
    """
    model, sizes = components.model(name), components.sizes(name)  # sizes: per tensor too, as loaded
    plain: dict[int, int] = {}
    inner: dict[int, int] = {}
    for module_name in offloaded:
        for path, module in model.get_submodule(module_name).named_modules(prefix=module_name):
            converted = hasattr(module, "weight_zero_point")  # an int8 layer (quantize.quantized_meta)
            for tensor_name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                kind = inner if converted and tensor_name.startswith("weight") else plain
                kind.setdefault(id(tensor), sizes.get(f"{path}.{tensor_name}".lstrip("."), 0))
    whole = components.sizes(name)[""]
    if not components.structure(name).streams:
        host = sum(plain.values()) + sum(inner.values())
        return host, 0, whole - host
    layout = host_memory.host_layout(plain.values())
    pinned = layout.allocated_bytes + host_memory.per_tensor_pinned_bytes(inner.values())
    set_up = max(layout.chunk_bytes + sum(inner.values()), whole - pinned)
    return pinned, pinned, set_up


def plan_denoise(components: _Components, budget: Budget) -> StagePlan:
    (transformer,) = components.family.stage_components()["denoise"]  # every family denoises with one model
    # The least a GPU must hold to run any of the transformer: its activations and, since whatever
    # misses it streams through it, the streamed blocks in flight and the top-level modules.
    least = {transformer: components.activation_bytes(transformer, "denoise")
             + STREAMED_BLOCKS_IN_FLIGHT * components.largest_block(transformer)
             + components.top_level_bytes(transformer)}
    usable, notes = _left_out(budget, least, "denoise")
    if not any(key != "disk" for key in usable):  # nothing can compute: plan on the first GPU to refuse it
        usable = dict(budget)
    method = components.inputs.method(transformer)
    stage_budget = dict(budget)
    if method == "nf4" and not gpu_indices(budget):
        # A run refuses it on a machine without CUDA; a dry-run must not call it a fit on the CPU.
        raise PlanError(
            "denoise: the nf4 transformer runs on a GPU only (diffusers runs bitsandbytes' 4-bit layers on CUDA, "
            f"and they cannot be offloaded), and --max-memory {format_budget(budget)} budgets no GPU; add one "
            "(e.g. --max-memory 0=8GB), or use --quantize fp8 or int8, which run on the CPU too"
        )
    if method == "nf4":
        # bitsandbytes' 4-bit layers cannot be offloaded: only the GPUs count, for placing and fitting
        # (GPUs all too small to run it: planned on them anyway, refused with the budget that fits).
        usable = Budget(usable).only_gpus() or Budget(budget).only_gpus()
        stage_budget = Budget(budget).only_gpus()
        if any(key in budget for key in ("cpu", "disk")):
            notes.append("note: denoise keeps the nf4 transformer on the GPUs: bitsandbytes' 4-bit layers cannot be "
                         "offloaded, so the cpu and disk budgets are not used for it")
    elif method:  # fp8 / int8 weights stream from RAM; accelerate's disk offload cannot hold them
        usable = {key: value for key, value in usable.items() if key != "disk"}
    plan = _split(components, transformer, "denoise", usable, streamed=True)
    plan = _compact(plan)
    return StagePlan("denoise", (plan,), stage_budget, tuple(notes))


def _compact(plan: ComponentPlan) -> ComponentPlan:
    """One entry for a component placed whole on one device, as accelerate's clean result has."""
    devices = set(plan.device_map.values())
    if len(devices) == 1 and len(plan.device_map) > 1:
        return dataclasses.replace(plan, device_map={"": devices.pop()})
    return plan


def plan_decode(components: _Components, budget: Budget) -> StagePlan:
    """The VAE whole on one device (_plan_vae), decoding a batch of images."""
    return _plan_vae(components, budget, "decode", components.inputs.batch_images())


def plan_encode_image(components: _Components, budget: Budget) -> StagePlan:
    """The VAE whole on one device (_plan_vae), encoding one input image at a time (the pipelines
    encode an image once per call, whatever the batch)."""
    return _plan_vae(components, budget, IMAGE_STAGE, 1)


def _plan_vae(components: _Components, budget: Budget, stage: str, batch: int) -> StagePlan:
    """The VAE whole on one device: the first of GPUs (largest budget first) then cpu, and on it the
    first of batch, one image, tiled batch, tiled one image whose weights + activations fit."""
    (vae,) = components.family.stage_components()[stage]  # every family encodes and decodes with one VAE
    need_weights = components.sizes(vae)[""]
    options = [(False, batch), (False, 1), (True, batch), (True, 1)]
    options = list(dict.fromkeys(options))  # batch 1: two options fewer
    candidates = sorted(gpu_indices(budget), key=lambda index: (-budget[index], index))
    if "cpu" in budget:
        candidates.append("cpu")
    chosen = None
    for device in candidates:
        for tiled, images in options:
            if need_weights + components.activation_bytes(vae, stage, images, tiled) <= budget[device]:
                chosen = (device, tiled, images)
                break
        if chosen:
            break
    if chosen is None:  # nothing fits: the smallest need on the first candidate, for the refusal
        chosen = ((candidates or ["cpu"])[0], True, 1)
    device, tiled, images = chosen
    plan = ComponentPlan(
        name=vae,
        device_map={"": device},
        weight_bytes={device: need_weights},
        activation_bytes={device: components.activation_bytes(vae, stage, images, tiled)},
        tiled=tiled,
        batch_size=images,
        quantization=components.inputs.load_method(vae),
    )
    notes = []
    what = "decoding" if stage == "decode" else "encoding"
    if tiled:
        notes.append(f"note: {stage} uses tiled VAE {what} on {device} (diffusers' vae.enable_tiling()): the whole "
                     "image's activations do not fit there")
    elif images < batch:
        notes.append(f"note: {stage} runs one image at a time on {device}: a batch of {batch} does not fit")
    return StagePlan(stage, (plan,), dict(budget), tuple(notes))


PLANNERS = {UPSAMPLE_STAGE: plan_upsample, "encode": plan_encode, IMAGE_STAGE: plan_encode_image,
            "denoise": plan_denoise, "decode": plan_decode}


def _refusal(stages: tuple[StagePlan, ...], components: _Components, budget: Budget) -> str:
    inputs = components.inputs
    problems = []
    for stage in stages:
        if stage.fits:
            continue
        lacking = ", ".join(
            f"{device} needs {format_bytes(stage.planned_bytes[device])} but has {format_bytes(budget[device])}"
            if device in stage.budget  # an nf4 transformer's stage budget holds its GPUs only
            else f"{format_bytes(stage.planned_bytes[device])} finds no room on {', '.join(map(str, stage.budget))}"
            for device in stage.overflow
        )
        problems.append(
            f"{stage.name} ({', '.join(c.name for c in stage.components)}: "
            f"{format_bytes(sum(stage.weight_bytes.values()))} of weights + "
            f"{format_bytes(max(stage.activation_bytes.values()))} of activations) does not fit: {lacking}"
        )
    ways = []
    written, budget = budget, as_typed(budget)  # suggestions keep entries nobody wrote as a user would type them
    binary_budget, card_sizes = _as_card_sizes(written, budget)
    if binary_budget is not None and _fits_with(components, binary_budget):
        ways.append(f"--max-memory {_format_spec(binary_budget, binary_budget)} if that is your card ({card_sizes})")
        card_sizes = None  # said
    smallest = _smallest_fitting(components, budget)
    if smallest is not None:
        ways.append(f"--max-memory {_format_spec(smallest, budget)}")
    cpu = _cpu_needed(components, budget) if gpu_indices(budget) else None
    if cpu is not None and cpu > budget.get("cpu", 0):
        ways.append(f"cpu={spec_size(cpu, round_up=True, binary=written_binary(budget, 'cpu'))} in --max-memory, "
                    "to offload what misses the GPUs to RAM (slower)")
    # The RAM those ways ask for (to offload to, or, with no GPU budgeted, to compute in): when it is
    # more than the default budget would take of this machine's RAM, or no cpu= would do, the rest
    # can go to disk.
    ram, ram_asked = _available_ram_bytes(), cpu if gpu_indices(budget) else (smallest or {}).get("cpu")
    if "disk" not in budget and (ram_asked is None or ram_asked > ram * DEFAULT_CPU_FRACTION):
        on_disk = _with_disk(components, budget, ram)
        if on_disk is not None:
            ways.append(f"--max-memory {_format_spec(on_disk, budget)} --offload-folder DIR, as this machine has "
                        f"{format_bytes(ram)} of RAM available, of which the default budget takes "
                        f"{DEFAULT_CPU_FRACTION:.0%} (weights on disk are read back at every step: much slower)")
    if inputs.dtype == torch.float32:
        ways.append("--dtype bfloat16 (half the bytes)")
    quantized = _quantization_that_fits(inputs, budget)
    if quantized:
        ways.append(f"--quantize {quantized} would fit " + ("without offload" if gpu_indices(budget) else
                                                            "this budget"))
    if not ways:
        ways.append("a smaller --height/--width or --max-sequence-length")
    note = f". ({card_sizes[0].upper()}{card_sizes[1:]}: budget it in GiB to use all of it.)" if card_sizes else ""
    return (f"{'; '.join(problems)} (at {inputs.width}x{inputs.height}, batch size {inputs.batch_size}, "
            f"{_dtype_name(inputs.dtype)}). Ways out: {'; or '.join(ways)}{note}")


def _as_card_sizes(budget: Budget, typed: Budget) -> tuple[Budget | None, str | None]:
    """`typed` (as_typed(budget)) with each GPU entry the user wrote in decimal units (0=24GB) read
    as the card maker means it (0=24GiB: a card sold as "24 GB" holds 24 GiB = 25.77 GB), and that
    sentence; (None, None) when no GPU entry was written in KB/MB/GB/TB."""
    units = getattr(budget, "units", {})
    decimal = [key for key in gpu_indices(budget) if units.get(key) in BINARY_TWIN]
    if not decimal:
        return None, None
    card = Budget(typed, units=getattr(typed, "units", {}))
    for key in decimal:
        card[key] = round(budget[key] / UNITS[units[key]] * UNITS[BINARY_TWIN[units[key]]])
        card.units[key] = BINARY_TWIN[units[key]]
    first = decimal[0]
    number, unit = f"{budget[first] / UNITS[units[first]]:g}", units[first]
    return card, (f"a card sold as \"{number} {unit}\" holds {number} {BINARY_TWIN[unit].replace('I', 'i')} = "
                  f"{format_bytes(card[first])}, since GPU memory is counted in binary units")


def _quantization_that_fits(inputs: PlanInputs, budget: Budget) -> str | None:
    """The first of fp8, int8, nf4 (least to most lossy) whose plan of the large components fits the
    budget's GPUs with nothing offloaded, or, with no GPU budgeted, fits the budget (fp8 and int8
    only: an nf4 transformer needs a GPU); None if none does, or if the run is quantized already."""
    gpus = Budget(budget).only_gpus()
    if inputs.quantize:
        return None
    if not gpus:
        gpus, methods = budget, ("fp8", "int8")
    else:
        methods = ("fp8", "int8", "nf4")
    for method in methods:
        trial = dataclasses.replace(inputs, quantize=tuple((name, method)
                                                           for name in inputs.family.large_components))
        if _fits_with(_Components(trial), gpus):
            return method
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _left(components: _Components, stages: tuple[StagePlan, ...]) -> tuple[StagePlan, ...]:
    """The stages of `stages` the run still has to run (components.to_run)."""
    return tuple(stage for stage in stages if stage.name in components.to_run)


def _fits_with(components: _Components, budget: Budget) -> bool:
    return all(stage.fits for stage in _left(components, _plan_all(components, budget)))


def _smallest_fitting(components: _Components, budget: Budget) -> Budget | None:
    """The same devices with one equal size for every GPU (or for the CPU, when no GPU is budgeted),
    the smallest that lets every stage fit, in steps of _suggestion_step; None if none does."""
    scaled = gpu_indices(budget) or ["cpu"]
    everything = sum(components.sizes(name)[""] + components.most_activation_bytes(name) for name in components.names)
    step = _suggestion_step(everything)

    def with_size(size: int) -> Budget:
        return {key: (size if key in scaled else value) for key, value in budget.items()}

    if not _fits_with(components, with_size(2 * everything)):
        return None
    low, high = 0, math.ceil(2 * everything / step)
    while high - low > 1:
        middle = (low + high) // 2
        if _fits_with(components, with_size(middle * step)):
            high = middle
        else:
            low = middle
    return with_size(high * step)


def _suggestion_step(everything: int) -> int:
    """A power of ten, SUGGESTION_SIGNIFICANT_DIGITS below the run's total size, at least 1 KB."""
    return 10 ** max(3, len(str(max(everything, 1))) - SUGGESTION_SIGNIFICANT_DIGITS)


def _cpu_needed(components: _Components, budget: Budget) -> int | None:
    """RAM the run would use if the CPU had room for everything that misses the GPUs."""
    stages = _left(components, _plan_all(components, dict(budget, cpu=10**15)))
    if not all(stage.fits for stage in stages):
        return None
    return max(stage.planned_bytes.get("cpu", 0) for stage in stages)


def _available_ram_bytes() -> int:
    """RAM this machine has available now (what the default budget takes its cpu share of)."""
    import psutil

    return psutil.virtual_memory().available


def _with_disk(components: _Components, budget: Budget, ram: int) -> Budget | None:
    """The budget with the rest on disk: the user's cpu entry (or, as the default budget takes,
    DEFAULT_CPU_FRACTION of the available RAM) and the smallest disk= that lets every stage fit;
    None if none does."""
    cpu = budget.get("cpu") or int(ram * DEFAULT_CPU_FRACTION)
    stages = _left(components, _plan_all(components, dict(budget, cpu=cpu, disk=10**15)))
    if not all(stage.fits for stage in stages):
        return None
    disk = max(stage.planned_bytes.get("disk", 0) for stage in stages)
    return dict(budget, cpu=cpu, disk=disk) if disk else None


def _format_spec(suggested: Budget, given: Budget) -> str:
    """The suggested budget; the entries it keeps from the user's are written exactly, in the unit
    they were written in, the others rounded up in that unit's family (GiB stays GiB)."""
    return ",".join(
        f"{key}={written_size(given, key)}" if value == given.get(key)
        else f"{key}={spec_size(value, round_up=True, binary=written_binary(given, key))}"
        for key, value in suggested.items()
    )


def check_free_gpu_memory(plan: RunPlan, free_bytes: dict[int, int], stages: Collection[str] | None = None
                          ) -> list[str]:
    """The plan of `stages` (default: all; a resumed run skips the finished ones) against what each
    GPU has free right now (another process may hold part of it).

    A budget is the user's word, but the card decides: a GPU whose free memory is below the most
    any stage plans there is refused before any weight loads, with the budget that would do; one
    that keeps less than DEFAULT_GPU_RESERVE_BYTES beyond the plan (cuBLAS workspaces, allocator
    fragmentation: the plan counts allocated bytes only) gets a note. Returns the notes.
    """
    notes = []
    for index, free in sorted(free_bytes.items()):
        stage, planned = _most_planned(plan, index, stages)
        safe = max(free - DEFAULT_GPU_RESERVE_BYTES, 0)
        safe_spec = f"{index}={spec_size(safe, round_up=False, binary=written_binary(plan.budget, index))}"
        if planned > free:
            raise PlanError(
                f"GPU {index} has {format_bytes(free)} free now, but {stage} plans {format_bytes(planned)} there "
                f"under --max-memory {index}={format_bytes(plan.budget[index])}; free the GPU (is another process "
                f"using it?) or lower the budget to {safe_spec} (its free memory less "
                f"{DEFAULT_GPU_RESERVE_BYTES / 2**30:.0f} GiB)"
            )
        if planned > safe:
            notes.append(
                f"note: {stage} plans {format_bytes(planned)} on GPU {index}, which has {format_bytes(free)} free: less "
                f"than {DEFAULT_GPU_RESERVE_BYTES / 2**30:.0f} GiB is left for cuBLAS workspaces and allocator "
                f"fragmentation; if it runs out of memory, budget {safe_spec} or less"
            )
    return notes


def check_free_cpu_memory(plan: RunPlan, available_bytes: int, stages: Collection[str] | None = None,
                          local_processes: int = 1) -> list[str]:
    """A note when some stage plans more RAM than is available now, counting each of this machine's
    `local_processes` processes (they run the same plan at once): unlike a GPU, RAM can page to
    swap or hand file-backed weight pages back to the disk, so this warns rather than refuses."""
    stage, planned = _most_planned(plan, "cpu", stages)
    processes = max(local_processes, 1)
    if planned * processes <= available_bytes:
        return []
    available = spec_size(available_bytes // processes, round_up=False, binary=written_binary(plan.budget, "cpu"))
    every = f" in each of this machine's {processes} processes" if processes > 1 else ""
    return [
        f"note: {stage} plans {format_bytes(planned)} in RAM{every}, but {format_bytes(available_bytes)} is available "
        f"now; the run may swap, or be killed by the system: budget cpu={available} or less, or free some memory"
    ]


def _most_planned(plan: RunPlan, device: Device, stages: Collection[str] | None) -> tuple[str, int]:
    """The stage (of `stages`, default all) that plans the most on `device`, and how much."""
    running = [stage for stage in plan.stages if stages is None or stage.name in stages]
    return max(((stage.name, stage.planned_bytes.get(device, 0)) for stage in running), key=lambda named: named[1],
               default=("no stage", 0))
