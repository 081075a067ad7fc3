"""Who goes where, and how many bytes each device will hold, decided before any weight is read.

Each stage's components are built on the meta device from their configs (components.py), their
weights counted exactly and their activations estimated (activations.py). Then:

- encode: whole text encoders are placed with diffusers' own "balanced" pipeline strategy
  (`_assign_components_to_devices`: largest component on the GPU with the most memory, and so
  on), fed with weights + activations; a component that fits no GPU runs on the CPU, as
  diffusers does, if the budget has room there.
- denoise: the transformer is split block-wise with accelerate, exactly as diffusers'
  `device_map="auto"` does (`get_balanced_memory` + `infer_auto_device_map`, no transformer block
  ever split), under each GPU's budget less the activation estimate, so that on every device
  weights + activations <= budget. Blocks that fit no GPU are offloaded to "cpu" (then "disk")
  only if the budget names them.
- decode: the whole VAE goes to the GPU with the largest budget that holds weights + decode
  activations, else to the CPU.

The runner loads with exactly these device maps; nothing is computed a second time.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from . import activations
from .budget import (BINARY_TWIN, DEFAULT_CPU_FRACTION, DEFAULT_GPU_RESERVE_BYTES, UNITS, Budget, exact_spec_size, format_bytes,
                     spec_size, written_binary)
from .components import empty_component, module_sizes, no_split_modules, special_dtypes
from .errors import PlanError

Device = int | str  # GPU index, "cpu" or "disk"
STAGE_COMPONENTS = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("transformer",), "decode": ("vae",)}
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
    batch_size: int = 1


@dataclass(frozen=True)
class ComponentPlan:
    name: str  # "text_encoder", "text_encoder_2", "transformer" or "vae"
    device_map: dict[str, Device]  # module -> device, given to from_pretrained ("" = the whole component)
    weight_bytes: dict[Device, int]
    activation_bytes: dict[Device, int]  # the estimated activation peak, on each device that computes


@dataclass(frozen=True)
class StagePlan:
    name: str  # "encode" | "denoise" | "decode"
    components: tuple[ComponentPlan, ...]
    budget: Budget

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

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)


def _ordered(per_device: dict[Device, int]) -> dict[Device, int]:
    """GPUs by index, then cpu, then disk."""
    gpus = sorted(key for key in per_device if isinstance(key, int))
    return {key: per_device[key] for key in [*gpus, *(k for k in ("cpu", "disk") if k in per_device)]}


def _gpus(budget: Budget) -> list[int]:
    return sorted(key for key in budget if isinstance(key, int))


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate warns about every GPU index this machine lacks; a dry-run may plan for such GPUs."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Components:
    """Meta models and their sizes, built once per plan (and reused by the refusal search)."""

    names = tuple(name for stage in STAGE_COMPONENTS.values() for name in stage)

    def __init__(self, inputs: PlanInputs):
        self.inputs = inputs
        self._models: dict[str, torch.nn.Module] = {}
        self._sizes: dict[str, dict[str, int]] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            self._models[name] = empty_component(self.inputs.config_root, name)
        return self._models[name]

    def sizes(self, name: str) -> dict[str, int]:
        if name not in self._sizes:
            self._sizes[name] = module_sizes(self.model(name), self.inputs.dtype)
        return self._sizes[name]

    def activation_bytes(self, name: str) -> int:
        inputs, config = self.inputs, self.model(name).config
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        dtype_bytes = torch.finfo(inputs.dtype).bits // 8
        if name == "transformer":
            one = activations.transformer_activation_bytes(
                config, inputs.height, inputs.width, inputs.vae_scale_factor, inputs.max_sequence_length, dtype_bytes
            )
        elif name == "vae":
            one = activations.vae_decode_activation_bytes(config, inputs.height, inputs.width, dtype_bytes)
        else:
            length = inputs.max_sequence_length if name == "text_encoder_2" else config["max_position_embeddings"]
            one = activations.text_encoder_activation_bytes(config, length, dtype_bytes)
        return one * inputs.batch_size


def plan_run(inputs: PlanInputs, budget: Budget) -> RunPlan:
    """Plan every stage; raises PlanError (naming each stage that does not fit, and the ways out)."""
    components = _Components(inputs)
    stages = _plan_all(components, budget)
    if not all(stage.fits for stage in stages):
        raise PlanError(_refusal(stages, components, budget), stages)
    return RunPlan(budget=budget.copy(), stages=stages)  # a Budget's copy keeps the units it was written in


def _plan_all(components: "_Components", budget: Budget) -> tuple[StagePlan, ...]:
    with _quiet_accelerate():
        return tuple(PLANNERS[name](components, budget) for name in STAGE_COMPONENTS)


def plan_encode(components: _Components, budget: Budget) -> StagePlan:
    from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

    names = STAGE_COMPONENTS["encode"]
    needs = {name: components.sizes(name)[""] + components.activation_bytes(name) for name in names}
    gpus = {index: budget[index] for index in sorted(_gpus(budget), key=lambda i: (-budget[i], i))}
    if gpus:
        # diffusers' "balanced" strategy, largest component first; its fallback device is "cpu".
        ordered = dict(sorted(needs.items(), key=lambda item: item[1], reverse=True))
        assignment = {
            name: device
            for device, placed in _assign_components_to_devices(ordered, gpus).items()
            for name in placed
        }
    else:
        assignment = dict.fromkeys(names, "cpu")
    planned = tuple(
        ComponentPlan(
            name=name,
            device_map={"": assignment[name]},
            weight_bytes={assignment[name]: components.sizes(name)[""]},
            activation_bytes={assignment[name]: components.activation_bytes(name)},
        )
        for name in names
    )
    return StagePlan("encode", planned, dict(budget))


def auto_device_map(model: torch.nn.Module, max_memory: Budget, dtype: torch.dtype) -> dict[str, Device]:
    """diffusers' `device_map="auto"` (models/model_loading_utils.py `_determine_device_map`):
    balance the memory over the GPUs, then let accelerate place whole no-split blocks. "disk" is
    left out of the balancing step, which cannot parse it (accelerate 1.15), and added back."""
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
        model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special
    )


def plan_denoise(components: _Components, budget: Budget) -> StagePlan:
    model, sizes = components.model("transformer"), components.sizes("transformer")
    activation = components.activation_bytes("transformer")
    gpus = _gpus(budget)
    # Activations are computed on the GPUs when there are any (offloaded blocks run there too).
    computing = gpus or ["cpu"]
    for_weights = {key: value - activation if key in computing else value for key, value in budget.items()}
    for_weights = {key: value for key, value in for_weights.items() if value > 0}
    if not for_weights:
        device_map: dict[str, Device] = {"": computing[0]}
    else:
        device_map = auto_device_map(model, for_weights, components.inputs.dtype)
    weight_bytes: dict[Device, int] = {}
    for module, device in device_map.items():
        weight_bytes[device] = weight_bytes.get(device, 0) + sizes.get(module, 0)
    used = [device for device in computing if device in weight_bytes] or computing[:1]
    activation_bytes = {device: activation for device in used}
    offloaded = [sizes.get(module, 0) for module, device in device_map.items() if device in ("cpu", "disk")]
    if gpus and offloaded:
        # accelerate copies each offloaded block onto the main GPU while it runs: one block's room
        # (which infer_auto_device_map kept free) is in use there on top of the activations.
        activation_bytes[used[0]] += max(offloaded)
    plan = ComponentPlan(
        name="transformer",
        device_map=device_map,
        weight_bytes=_ordered(weight_bytes),
        activation_bytes=activation_bytes,
    )
    return StagePlan("denoise", (plan,), dict(budget))


def plan_decode(components: _Components, budget: Budget) -> StagePlan:
    need_weights = components.sizes("vae")[""]
    activation = components.activation_bytes("vae")
    candidates = sorted(_gpus(budget), key=lambda index: (-budget[index], index))
    if "cpu" in budget:
        candidates.append("cpu")
    fitting = [device for device in candidates if need_weights + activation <= budget[device]]
    device = (fitting or candidates or ["cpu"])[0]
    plan = ComponentPlan(
        name="vae",
        device_map={"": device},
        weight_bytes={device: need_weights},
        activation_bytes={device: activation},
    )
    return StagePlan("decode", (plan,), dict(budget))


PLANNERS = {"encode": plan_encode, "denoise": plan_denoise, "decode": plan_decode}


def _refusal(stages: tuple[StagePlan, ...], components: _Components, budget: Budget) -> str:
    inputs = components.inputs
    problems = []
    for stage in stages:
        if stage.fits:
            continue
        lacking = ", ".join(
            f"{device} needs {format_bytes(stage.planned_bytes[device])} but has {format_bytes(budget[device])}"
            if device in budget
            else f"{format_bytes(stage.planned_bytes[device])} finds no room on {', '.join(map(str, budget))}"
            for device in stage.overflow
        )
        problems.append(
            f"{stage.name} ({', '.join(c.name for c in stage.components)}: "
            f"{format_bytes(sum(stage.weight_bytes.values()))} of weights + "
            f"{format_bytes(max(stage.activation_bytes.values()))} of activations) does not fit: {lacking}"
        )
    ways = []
    binary_budget, card_sizes = _as_card_sizes(budget)
    if binary_budget is not None and _fits_with(components, binary_budget):
        ways.append(f"--max-memory {_format_spec(binary_budget, binary_budget)} if that is your card ({card_sizes})")
        card_sizes = None  # said
    smallest = _smallest_fitting(components, budget)
    if smallest is not None:
        ways.append(f"--max-memory {_format_spec(smallest, budget)}")
    cpu = _cpu_needed(components, budget) if _gpus(budget) else None
    if cpu is not None and cpu > budget.get("cpu", 0):
        ways.append(f"cpu={spec_size(cpu, round_up=True, binary=written_binary(budget, 'cpu'))} in --max-memory, "
                    "to offload what misses the GPUs to RAM (slower)")
    ram = _available_ram_bytes()
    cpu_suggested = cpu if cpu is not None else (smallest or {}).get("cpu") if not _gpus(budget) else None
    if "disk" not in budget and (cpu_suggested is None or cpu_suggested > ram):
        on_disk = _with_disk(components, budget, ram)
        if on_disk is not None:
            ways.append(f"--max-memory {_format_spec(on_disk, budget)} --offload-folder DIR, as this machine has "
                        f"{format_bytes(ram)} of RAM available (weights on disk are read back at every step: much slower)")
    if inputs.dtype == torch.float32:
        ways.append("--dtype bfloat16 (half the bytes)")
    if not ways:
        ways.append("a smaller --height/--width or --max-sequence-length")
    note = f" ({card_sizes[0].upper()}{card_sizes[1:]}: budget it in GiB to use all of it.)" if card_sizes else ""
    return (f"{'; '.join(problems)} (at {inputs.width}x{inputs.height}, batch size {inputs.batch_size}, "
            f"{_dtype_name(inputs.dtype)}). "
            f"Ways out: {'; or '.join(ways)}{note}")


def _as_card_sizes(budget: Budget) -> tuple[Budget | None, str | None]:
    """The budget with each GPU entry written in decimal units (0=24GB) read as the card maker
    means it (0=24GiB: a card sold as "24 GB" holds 24 GiB = 25.77 GB), and that sentence;
    (None, None) when no GPU entry was written in KB/MB/GB/TB."""
    units = getattr(budget, "units", {})
    decimal = [key for key in _gpus(budget) if units.get(key) in BINARY_TWIN]
    if not decimal:
        return None, None
    card = Budget(budget, units=units)
    for key in decimal:
        card[key] = round(budget[key] / UNITS[units[key]] * UNITS[BINARY_TWIN[units[key]]])
        card.units[key] = BINARY_TWIN[units[key]]
    first = decimal[0]
    number, unit = f"{budget[first] / UNITS[units[first]]:g}", units[first]
    return card, (f"a card sold as \"{number} {unit}\" holds {number} {BINARY_TWIN[unit].replace('I', 'i')} = "
                  f"{format_bytes(card[first])}, since GPU memory is counted in binary units")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fits_with(components: _Components, budget: Budget) -> bool:
    return all(stage.fits for stage in _plan_all(components, budget))


def _smallest_fitting(components: _Components, budget: Budget) -> Budget | None:
    """The same devices with one equal size for every GPU (or for the CPU, when no GPU is budgeted),
    the smallest that lets every stage fit, in steps of _suggestion_step; None if none does."""
    scaled = _gpus(budget) or ["cpu"]
    everything = sum(components.sizes(name)[""] + components.activation_bytes(name) for name in components.names)
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
    stages = _plan_all(components, dict(budget, cpu=10**15))
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
    stages = _plan_all(components, dict(budget, cpu=cpu, disk=10**15))
    if not all(stage.fits for stage in stages):
        return None
    disk = max(stage.planned_bytes.get("disk", 0) for stage in stages)
    return dict(budget, cpu=cpu, disk=disk) if disk else None


def _format_spec(suggested: Budget, given: Budget) -> str:
    """The suggested budget; the entries it keeps from the user's are written exactly as sizes, the
    others rounded up in the unit the user wrote (GiB stays GiB)."""
    return ",".join(
        f"{key}={exact_spec_size(value)}" if value == given.get(key)
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


def check_free_cpu_memory(plan: RunPlan, available_bytes: int, stages: Collection[str] | None = None) -> list[str]:
    """A note when some stage plans more RAM than is available now: unlike a GPU, RAM can page to
    swap or hand file-backed weight pages back to the disk, so this warns rather than refuses."""
    stage, planned = _most_planned(plan, "cpu", stages)
    if planned <= available_bytes:
        return []
    available = spec_size(available_bytes, round_up=False, binary=written_binary(plan.budget, "cpu"))
    return [
        f"note: {stage} plans {format_bytes(planned)} in RAM, but {format_bytes(available_bytes)} is available now; "
        f"the run may swap, or be killed by the system: budget cpu={available} or "
        "less, or free some memory"
    ]


def _most_planned(plan: RunPlan, device: Device, stages: Collection[str] | None) -> tuple[str, int]:
    """The stage (of `stages`, default all) that plans the most on `device`, and how much."""
    running = [stage for stage in plan.stages if stages is None or stage.name in stages]
    return max(((stage.name, stage.planned_bytes.get(device, 0)) for stage in running), key=lambda named: named[1],
               default=("no stage", 0))
