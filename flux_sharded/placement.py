"""Placing a loaded component on the devices of its plan's map, and checking that it is placed so.

The plan's device map (module name -> GPU index, "cpu" or "disk"; "" = the whole component) is the one
truth: the planner counted its bytes per device, and this module places exactly those modules there.

- Whole on one device: `Module.to`.
- Over GPUs, nothing offloaded: accelerate's `dispatch_model`, which gives every module the map names
  an `AlignDevicesHook` that keeps its weights on its GPU and moves its inputs there, so a module
  placed on GPU 0 (embedders) or GPU 1 (`norm_out` after the last block) gets its inputs wherever the
  previous one ran. The model's outputs come back to its main device (the lowest GPU index of the map).
- Over GPUs with "cpu" blocks *streamed* (`ComponentPlan.streamed`; the only placement code of our
  own): diffusers' group offloading (`apply_group_offloading`, block level, one block per group)
  keeps the "cpu" blocks in RAM and brings each to the main GPU when it runs, moving its inputs
  there. A transformer's blocks are prefetched on a side CUDA stream where there is one, and its
  streamed top-level modules form diffusers' own group, brought to the main GPU for each forward; a
  text encoder's block list sits deeper (blocks.py: group offloading recurses into the containers by
  `block_modules`), its top-level modules stay on the main GPU and nothing is prefetched. While
  group offloading is applied the lists hold only their "cpu" blocks and the resident modules are
  detached; then each resident module gets accelerate's `AlignDevicesHook` (weights on its GPU,
  inputs moved there), and each streamed top-level module a hook that moves its inputs to the main
  GPU (`InputsTo`), so any order of devices works: a last block on GPU 1 after streamed blocks hands
  `norm_out` hidden states that its hook brings back.
- A map with "disk", or "cpu" not streamed: accelerate's offload hooks, set by `from_pretrained`
  with the map (stages/denoise.py, encode.py), not here.

diffusers re-applies group offloading over the *full* block lists when adapters are loaded, unloaded
or deleted (`_maybe_remove_and_reapply_group_offloading`), which would offload the resident blocks
too: adapters must be loaded before `place` (tests/test_devices.py pins both halves). `check_placement`
compares the model as placed with the map and raises PlacementError on any difference.

Memory (the plan's STREAMED_BLOCKS_IN_FLIGHT): on the main GPU two streamed blocks and the top-level
modules at a time; the streamed weights once, pinned, in RAM, packed into the chunks the plan
counted (host_memory.pack_into_host_memory, before group offloading is applied).
"""

from __future__ import annotations

import torch

from .blocks import BlockStructure, block_structure
from .budget import device_key
from .errors import PlacementError
from .host_memory import pack_into_host_memory

Device = int | str


def cuda_device(index: int) -> torch.device:
    return torch.device("cuda", index)


def placement(name: str, device_map: dict[str, Device]) -> Device:
    """The device of module `name` under a device map whose entries may be any of its ancestors."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(f"{name} has no entry in the device map")


def offloaded_blocks(model: torch.nn.Module, device_map: dict[str, Device]) -> list[str]:
    """Names of the blocks the device map puts on "cpu", in execution order."""
    return [name for name in block_structure(model).blocks(model) if placement(name, device_map) == "cpu"]


def main_device(device_map: dict[str, Device]) -> Device:
    """The GPU that runs the model's own forward and its streamed blocks: the lowest GPU index the map
    names (where plan._placed counts the streamed blocks' room), "cpu" when it names none."""
    return min((device for device in device_map.values() if device not in ("cpu", "disk")), default="cpu")


def placeable(device_map: dict[str, Device], streamed: bool) -> bool:
    """Whether `place` can put a model loaded on the CPU on this map: whole, over GPUs, or with
    streamed "cpu" blocks; not "disk", nor "cpu" blocks under accelerate's offload hooks (which
    from_pretrained sets while it loads)."""
    devices = set(device_map.values())
    return not ("disk" in devices or ("cpu" in devices and len(devices) > 1 and not streamed))


def hostable(device_map: dict[str, Device], streamed: bool, quantization: str | None) -> bool:
    """Whether a placed component can go back to RAM between the Python API's calls (to_host) and
    onto its devices again (place_again): on the CPU, whole on a GPU, split over GPUs, or with
    streamed blocks (which stay in their pinned RAM throughout), in --dtype, fp8 or int8; not
    offloaded by accelerate's hooks ("disk", "cpu" not streamed), not nf4 (bitsandbytes places
    it as it loads)."""
    devices = set(device_map.values())
    hooked = "disk" in devices or ("cpu" in devices and len(devices) > 1 and not streamed)
    return not hooked and quantization in (None, "fp8", "int8")


def to_host(model: torch.nn.Module, streamed: bool) -> None:
    """Every weight of a component placed as `hostable` allows in RAM: a split over GPUs loses
    accelerate's hooks and the model moves whole (pageable memory); a streamed placement keeps
    group offloading's pinned blocks where they are and its hooks, and moves only its resident
    modules, each kept with its hook. place_again undoes this."""
    if streamed:
        for module, _ in _resident(model):
            module.to("cpu")
        return
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    for name in ("hf_device_map", "placed_device_map"):  # the maps of a placement that is gone
        if name in model.__dict__:
            delattr(model, name)
    model.to("cpu")


def place_again(model: torch.nn.Module, device_map: dict[str, Device], streamed: bool) -> None:
    """A component `to_host` moved to RAM back where `device_map` puts it; then check_placement."""
    if not streamed:
        place(model, device_map)
        return
    for module, device in _resident(model):
        module.to(device)
    check_placement(model, device_map, streamed=True)


def _resident(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.device]]:
    """The modules a streamed placement keeps on a GPU (_place_streamed gives each an accelerate
    hook with its weights on that GPU), with that GPU."""
    from accelerate.hooks import AlignDevicesHook

    found = []
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if isinstance(hook, AlignDevicesHook) and not hook.offload and hook.place_submodules:
            found.append((module, torch.device(hook.execution_device)))
    return found


def place(model: torch.nn.Module, device_map: dict[str, Device], streamed: bool = False) -> None:
    """Place `model`, loaded whole on the CPU (fp8, int8, or any component the caller loaded so), as
    `device_map` says (see the module docstring); `streamed`: the plan's ComponentPlan.streamed.
    Then check_placement. Raises PlacementError for a map this placement cannot honour (a "disk"
    entry, "cpu" blocks not streamed: from_pretrained's hooks place those)."""
    devices = set(device_map.values())
    if not placeable(device_map, streamed):
        raise PlacementError(f"a component loaded on the CPU is placed by its map only whole, over GPUs, or with "
                             f"streamed cpu blocks; this map is none of those: {device_map}")
    if device_map.keys() == {""}:
        if device_map[""] != "cpu":
            model.to(cuda_device(device_map[""]))
    elif "cpu" in devices:
        _place_streamed(model, device_map)
    else:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=dict(device_map), main_device=cuda_device(main_device(device_map)))
    check_placement(model, device_map, streamed="cpu" in devices and len(devices) > 1)
    model.placed_device_map = dict(device_map)


class InputsTo:
    """An accelerate hook (accelerate.hooks.ModelHook's protocol) that moves a module's inputs to
    `execution_device` and leaves its weights alone: for the top-level modules that diffusers' group
    offloading brings to the main GPU, whose inputs may come from a block on another GPU."""

    def __init__(self, execution_device: torch.device):
        self.execution_device = execution_device
        self.no_grad = False

    def init_hook(self, module):
        return module

    def pre_forward(self, module, *args, **kwargs):
        from accelerate.utils import send_to_device

        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module, output):
        return output

    def detach_hook(self, module):
        return module


def _place_streamed(model: torch.nn.Module, device_map: dict[str, Device]) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from diffusers.hooks import apply_group_offloading

    main = cuda_device(main_device(device_map))
    structure = block_structure(model)
    units = _units(model, device_map, structure)
    resident = {name: device for name, device in units.items() if device != "cpu"}
    # 0) Where blocks are prefetched (blocks.BlockStructure.streams), the streamed tensors into pinned
    #    chunks laid out as the plan counted them (host_memory.py): group offloading then finds each
    #    pinned already and keeps it, instead of pinning a copy of its own per tensor (each rounded up
    #    to a power of two) next to the original.
    if structure.streams:
        pack_into_host_memory([model.get_submodule(name) for name, device in units.items() if device == "cpu"],
                              pin=torch.cuda.is_available())
    # 1) While diffusers builds its groups, the lists hold only their "cpu" blocks and the resident
    #    top-level modules are detached, so that it groups exactly the streamed modules.
    parents = {}  # parent module -> its children as they were
    for name in (*structure.lists, *(name for name in resident if name in structure.top_level)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parents.setdefault(parent, dict(parent._modules))
        if name in structure.lists:
            blocks = parent._modules[child]
            kept = [block for index, block in enumerate(blocks) if f"{name}.{index}" not in resident]
            parent._modules[child] = type(blocks)(*kept) if isinstance(blocks, torch.nn.Sequential) else type(blocks)(kept)
        else:
            del parent._modules[child]
    try:
        apply_group_offloading(
            model,
            onload_device=main,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,  # what use_stream requires; also the least GPU memory
            use_stream=structure.streams and torch.cuda.is_available(),  # a side stream to copy on, if any
            block_modules=structure.block_modules,
        )
    finally:
        # 2) The full model back, in its order (named_children's order is the state dict's).
        for parent, children in parents.items():
            parent._modules.clear()
            parent._modules.update(children)
    # 3) Resident modules: weights to their GPU, inputs moved there; streamed top-level modules: inputs
    #    moved to the main GPU, where diffusers brings their weights.
    for name, device in units.items():
        module = model.get_submodule(name)
        if device != "cpu":
            add_hook_to_module(module, AlignDevicesHook(execution_device=cuda_device(device), io_same_device=False,
                                                        place_submodules=True))
        elif name in structure.top_level:
            add_hook_to_module(module, InputsTo(main))


def _units(model: torch.nn.Module, device_map: dict[str, Device], structure: BlockStructure) -> dict[str, Device]:
    """The streamed placement's units: each block of each block list and each top-level module
    (blocks.py) that holds weights, with its device; a map that splits a unit (names a module inside
    it), or leaves one that holds weights out, is refused."""
    names = [*structure.blocks(model), *structure.top_level]
    for key in device_map:
        if key and not any(key == name or name.startswith(key + ".") for name in names):
            raise PlacementError(f"the map splits {key!r}, inside a block or top-level module; streamed placement "
                                 f"places whole blocks and top-level modules: {device_map}")
    units = {}
    for name in names:
        try:
            units[name] = placement(name, device_map)
        except KeyError:
            module = model.get_submodule(name)
            if any(True for _ in (*module.parameters(), *module.buffers())):
                raise PlacementError(f"{name} holds weights and has no entry in the map {device_map}") from None
            # a module without weights (FLUX's rotary pos_embed, a cut lm_head) runs where its inputs are
    return units


def check_placement(model: torch.nn.Module, device_map: dict[str, Device], streamed: bool) -> None:
    """Raise PlacementError unless `model` is placed as `device_map` says, module by module:

    - a module on a GPU holds every weight there, and where the map has more than one device it
      (or, a block list, each of its blocks) carries an accelerate hook that moves its inputs there;
    - a streamed "cpu" block holds its weights on the CPU and carries one group-offloading hook and
      no accelerate hook; a streamed top-level module holds its weights on the CPU and a hook moving
      its inputs to the main GPU;
    - a module offloaded by accelerate ("cpu" or "disk", not streamed) holds no parameter on a GPU
      (its buffers go to the GPU that runs it, accelerate's offload_buffers=False).
    """
    several = len(set(device_map.values())) > 1
    main = device_key(main_device(device_map))
    lists = block_structure(model).lists if streamed else ()
    problems = []
    for name, planned in device_map.items():
        module = model.get_submodule(name)
        planned = device_key(planned)
        held = {device_key(tensor.device) for tensor in (*module.parameters(), *module.buffers())}
        if planned not in ("cpu", "disk"):
            if held - {planned}:
                problems.append(f"{name or 'the model'} holds weights on {sorted(held)}, planned on {planned}")
            if several and any(_hook_device(part) != planned for part in _hooked_parts(module)):
                problems.append(f"{name} has no hook moving its inputs to {planned}")
            if any(_streamed(part) for part in _hooked_parts(module)):
                problems.append(f"{name} is planned resident on {planned} but streamed by group offloading")
        elif streamed:
            if held - {"cpu"}:
                problems.append(f"{name} holds weights on {sorted(held)}, planned streamed from cpu")
            blocks = name in lists or name.rsplit(".", 1)[0] in lists
            for part in _hooked_parts(module):
                if blocks and (not _streamed(part) or _hook_device(part) is not None):
                    problems.append(f"{name} is not streamed by a group-offloading hook alone")
                elif not blocks and _hook_device(part) != main:
                    problems.append(f"{name} has no hook moving its inputs to {main}")
        else:
            # accelerate's offload hooks keep buffers on the execution device (offload_buffers=False)
            parameters = {device_key(parameter.device) for parameter in module.parameters()}
            if parameters - {"cpu", "meta"}:
                problems.append(f"{name} holds parameters on {sorted(parameters)}, planned offloaded to {planned}")
    if problems:
        raise PlacementError("placement differs from the plan (a bug: please report it): " + "; ".join(problems))


def _hooked_parts(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Where a module's input hook sits: on the module, or on each block of a block list (which has no forward)."""
    if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
        return list(module)
    return [module]


def _hook_device(module: torch.nn.Module) -> str | None:
    """The device key an accelerate hook on `module` moves its inputs to, or None."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", (hook,)):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return device_key(device)
    return None


def _streamed(module: torch.nn.Module) -> bool:
    """Whether `module` carries diffusers' group-offloading hook."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None
