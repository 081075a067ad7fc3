"""The `devices` test tier's mechanism: distinct logical GPUs on a CPU-only machine.

`logical_gpus()` runs a block under `LogicalDevices`, a `TorchFunctionMode` (torch's hook that sees
every torch call made from Python, `Tensor.device` and `Tensor.to` included). Every tensor stays a
real CPU tensor, so the values are the CPU's; the mode keeps beside each tensor's storage the device
it *would* be on:

- `.to(cuda:i)`, `.to(i)`, `.cuda(i)`, and a factory given `device=cuda:i` (`torch.zeros`,
  `empty_like`, ...) give a CPU copy marked `cuda:i`; `torch.device(i)` is `cuda:i`, as on a machine
  with GPUs. So the placement code runs unchanged: accelerate's `dispatch_model` and hooks, diffusers'
  group offloading (with `use_stream` off: `torch.cuda.is_available()` stays False), from_pretrained
  with a device map.
- `tensor.device` answers the logical device, so code that follows its input's device
  (`torch.arange(..., device=x.device)`) follows the logical one.
- Any other call raises `DeviceMismatch` when its tensors are on two logical devices (two GPUs, or a
  GPU and the CPU), as CUDA does ("Expected all tensors to be on the same device"); a 0-dim CPU tensor
  mixes with anything, as on a GPU. Its outputs are marked with its inputs' device.
- Copies between devices (`copy_`, `param.data = moved`) are allowed, as on a GPU.

Torch function modes are per thread: transformers' threaded loading is turned off inside the block
(HF_DEACTIVATE_ASYNC_LOAD), and `torch.cuda.mem_get_info` (what transformers' loading asks a GPU
before allocating) answers a large free size. Nothing else of CUDA is imitated.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CPU = torch.device("cpu")
# What the logical GPUs report free to transformers' loading (1 TiB: more than any test allocates).
FREE_BYTES = 2**40


class DeviceMismatch(RuntimeError):
    """A torch call mixed tensors on two logical devices: on GPUs, a crash."""


# Calls that take tensors on different devices on GPUs too: a copy across devices, and what
# nn.Module._apply uses to swap a parameter's data for its moved copy.
ACROSS = (torch.Tensor.copy_, torch.Tensor.data.__set__, torch._has_compatible_shallow_copy_type, torch.Tensor.set_)


def _plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A tensor subclass (torchao's int8 weights) by the plain tensors it holds; a plain tensor as itself."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [part for name in names for part in _plain_parts(getattr(tensor, name))]
    return [tensor]


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _indices_as_gpus(arguments):
    """Positional arguments or keyword arguments of a `.to`, with a device given as an index made cuda:index."""
    if isinstance(arguments, dict):
        return {name: logical(value) if name == "device" and _is_index(value) else value
                for name, value in arguments.items()}
    return (logical(arguments[0]), *arguments[1:]) if arguments and _is_index(arguments[0]) else arguments


def logical(device) -> torch.device:
    """0, "cuda", "cuda:1", torch.device(...) -> the torch.device it names on a machine with GPUs."""
    if _is_index(device):
        return torch.device("cuda", device)
    device = torch.device(device)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


class LogicalDevices(TorchFunctionMode):
    """See the module docstring. `device_of(tensor)` is a tensor's logical device."""

    def __init__(self):
        super().__init__()
        self._marks = WeakIdKeyDictionary()  # storage -> logical GPU; absent: the CPU

    def device_of(self, tensor: torch.Tensor) -> torch.device:
        devices = {self._mark(part) for part in _plain_parts(tensor)}
        if len(devices) != 1:
            raise DeviceMismatch(f"one tensor holds parts on {sorted(map(str, devices))}")
        return devices.pop()

    def _mark(self, tensor: torch.Tensor) -> torch.device:
        if tensor.device.type != "cpu":  # meta
            return tensor.device
        return self._marks.get(tensor.untyped_storage(), CPU)

    def _set_mark(self, result, device: torch.device) -> None:
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor):
                for part in _plain_parts(tensor):
                    if part.device.type == "cpu":
                        if device == CPU:
                            self._marks.pop(part.untyped_storage(), None)
                        else:
                            self._marks[part.untyped_storage()] = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return self.device_of(args[0])
        if func == torch.Tensor.is_cuda.__get__:
            return self.device_of(args[0]).type == "cuda"
        if func == torch.Tensor.is_cpu.__get__:
            return self.device_of(args[0]) == CPU
        if func == torch.Tensor.get_device:
            device = self.device_of(args[0])
            return -1 if device == CPU else device.index
        if func is torch.device and len(args) == 1 and _is_index(args[0]):
            return torch.device("cuda", args[0])  # an index names a GPU, as on a machine with GPUs
        if func is torch._C._nn._parse_to:  # Module.to(0) parses its device here
            return func(*_indices_as_gpus(args), **_indices_as_gpus(kwargs))
        if func == torch.Tensor.to:
            return self._to(args[0], *args[1:], **kwargs)
        if func == torch.Tensor.cuda:
            device = args[1] if len(args) > 1 else kwargs.get("device")
            return self._move(args[0], logical("cuda" if device is None else device), args[0])
        if func == torch.Tensor.cpu:
            return self._move(args[0], CPU, args[0])
        if func in ACROSS:
            return func(*args, **kwargs)
        if kwargs.get("device") is not None:  # a factory: on the device asked for, whatever its inputs
            device = logical(kwargs["device"])
            result = func(*args, **{**kwargs, "device": CPU if device.type == "cuda" else kwargs["device"]})
            self._set_mark(result, device)
            return result
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        devices = {self.device_of(tensor) for tensor in tensors}
        devices -= {CPU for tensor in tensors if tensor.dim() == 0 and self.device_of(tensor) == CPU}
        if len(devices) > 1:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"{' and '.join(sorted(map(str, devices)))} ({getattr(func, '__name__', func)})")
        result = func(*args, **kwargs)
        if devices:
            self._set_mark(result, devices.pop())
        return result

    def _to(self, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        copy = kwargs.pop("copy", False)
        if args and isinstance(args[0], torch.Tensor):  # .to(other): other's device and dtype
            args = (self.device_of(args[0]), args[0].dtype, *args[1:])
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*_indices_as_gpus(args),
                                                                            **_indices_as_gpus(kwargs))
        converted = tensor
        if dtype is not None or copy:
            converted = tensor.to(dtype=dtype, copy=copy, memory_format=memory_format or torch.preserve_format)
        return self._move(tensor, self.device_of(tensor) if device is None else logical(device), converted)

    def _move(self, tensor: torch.Tensor, target: torch.device, converted: torch.Tensor) -> torch.Tensor:
        """`converted` (tensor in its new dtype, or tensor itself) on `target`: a copy of its own when
        the device changes, as a move between devices copies."""
        if target != self.device_of(tensor) and any(
                new.untyped_storage() is old.untyped_storage()
                for new, old in zip(_plain_parts(converted), _plain_parts(tensor))):
            converted = converted.clone()
        if converted is not tensor or target != self.device_of(tensor):
            self._set_mark(converted, target)
        return converted


@contextlib.contextmanager
def logical_gpus():
    """A block in which `cuda:i` is a distinct logical device for every i (see the module docstring)."""
    with mock.patch.dict(os.environ, {"HF_DEACTIVATE_ASYNC_LOAD": "1"}), \
            mock.patch("torch.cuda.mem_get_info", lambda device=None: (FREE_BYTES, FREE_BYTES)), \
            LogicalDevices() as mode:
        yield mode


def assert_close_to_the_cpu(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """`actual`, computed in the tier, equals the all-CPU `expected` but for the last bits: the tier's
    copies sit at other addresses, where the CPU's kernels may split a sum otherwise (cloning a
    model's weights alone changed a FLUX forward by 3.6e-7 here). A misplaced module raises or
    differs by far more; the PNGs (8-bit) stay equal."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
