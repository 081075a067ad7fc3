"""Freeing memory between stages and measuring each stage's peak on every device.

CUDA: the caching allocator's peaks per device, reset when a stage starts: allocated
(`torch.cuda.max_memory_allocated`, what the tensors held) and reserved
(`torch.cuda.max_memory_reserved`, what the allocator took from the driver: an out-of-memory is
decided by it, and fragmentation, such as a side stream's blocks, makes it larger).
CPU: the process's peak resident set size during the stage. Linux lets us reset the kernel's own
high-water mark (VmHWM, via /proc/self/clear_refs) so the peak is exact. Where the
reset is refused or does not take (seen now and then right after a large free), the peak is still
exact whenever the stage sets a new lifetime high-water mark, which is the usual case for a stage
that loads weights; otherwise a sampling thread reads the RSS every SAMPLE_SECONDS and its maximum
is reported. A side effect: after a run, the process's own ru_maxrss (what `time -v` shows) covers
only the last stage; the report holds every stage's peak.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil
import torch

# How often the fallback sampler reads the RSS. 10 ms catches any peak that lasts as long as one
# layer of a tiny model; a real FLUX stage's peaks last seconds.
SAMPLE_SECONDS = 0.01


def flush(gpu_indices: Iterable[int] = ()) -> None:
    """Collect garbage, return cached GPU blocks to the driver, and reset the peak stats of the
    budget's GPUs (`gpu_indices`), touching no other GPU: accelerate's clear_device_cache
    (torch.cuda.empty_cache) empties the caches this process filled without entering any device,
    where a `with torch.cuda.device(i)` over every visible index opened a CUDA context (0.3-0.5 GB)
    on each card the budget never named. Then return the pinned host memory a streamed stage held:
    PyTorch's host allocator caches freed pinned blocks until told otherwise (page-locked RAM that
    cannot swap, through decode and beyond)."""
    from accelerate.utils.memory import clear_device_cache

    gc.collect()
    gpu_indices = list(gpu_indices)
    if gpu_indices and torch.cuda.is_available():
        clear_device_cache()
        for index in gpu_indices:
            torch.cuda.reset_peak_memory_stats(index)
        torch.accelerator.empty_host_cache()  # a no-op where nothing was ever pinned


def _read_status_kb(name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# The kernel's RSS counters are per-CPU and only approximately summed when read, so VmHWM and VmRSS
# can disagree by a little even right after a reset; 1 MiB is far above that and far below any
# stage's peak.
RESET_TOLERANCE_BYTES = 2**20


def _reset_rss_high_water_mark() -> bool:
    """Ask Linux to reset VmHWM to the current RSS; False where the kernel or sandbox refuses."""
    for _attempt in range(3):
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            return False
        hwm, rss = _read_status_kb("VmHWM"), _read_status_kb("VmRSS")
        if hwm is None or rss is None:
            return False
        if hwm <= rss + RESET_TOLERANCE_BYTES:
            return True
    return False


@dataclass
class PeakMemory:
    """Context manager: `peak_bytes` maps "cpu" and each GPU index (as str) to the stage's peak
    (allocated, on a GPU); `reserved_bytes` each GPU index to its reserved peak."""

    gpu_indices: list[int] = field(default_factory=list)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    # The most pinned host memory PyTorch's host allocator held during the stage (its rounded blocks,
    # cached ones included: torch.cuda.host_memory_stats "allocated_bytes.peak"); None without CUDA.
    peak_pinned_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self._exact = _reset_rss_high_water_mark()
        # Without a reset, VmHWM is the lifetime peak so far: if it grows during the stage, the
        # stage set the new peak and VmHWM at the end is exactly the stage's peak.
        self._hwm_at_start = _read_status_kb("VmHWM")
        self._sampled = self._process.memory_info().rss
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        for index in self.gpu_indices:
            torch.cuda.synchronize(index)
            torch.cuda.reset_peak_memory_stats(index)
        if self.gpu_indices:
            torch.cuda.reset_peak_host_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._sampler.join()
        cpu_peak = max(self._sampled, self._process.memory_info().rss)
        hwm = _read_status_kb("VmHWM")
        new_record = hwm is not None and self._hwm_at_start is not None and hwm > self._hwm_at_start
        if hwm is not None and (self._exact or new_record):
            cpu_peak = max(cpu_peak, hwm)
        self.peak_bytes = {"cpu": cpu_peak}
        for index in self.gpu_indices:
            torch.cuda.synchronize(index)
            self.peak_bytes[str(index)] = torch.cuda.max_memory_allocated(index)
            self.reserved_bytes[str(index)] = torch.cuda.max_memory_reserved(index)
        if self.gpu_indices:
            self.peak_pinned_bytes = int(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0))



class TensorBytesTracker:
    """Exact bytes of the tensors created inside the `with` block and still alive; keeps the peak.

    A device-independent stand-in for `torch.cuda.max_memory_allocated` without the allocator's
    rounding, used to check the activation formulas on the CPU. Tensors that exist before the
    block (weights, inputs: pass them as `existing`) are not counted, nor are views of them.
    """

    def __init__(self, existing=()):
        self._existing = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self._references: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "TensorBytesTracker":
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                output = func(*args, **(kwargs or {}))
                tracker._record(output)
                return output

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._mode.__exit__(*exc_info)

    def _record(self, output) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for tensor in tree_flatten(output)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._existing or storage.nbytes() == 0:
                continue
            if key not in self._references:
                self._references[key] = 0
                self._sizes[key] = storage.nbytes()
                self.current_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self._references[key] += 1
            weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._references[key] -= 1
        if self._references[key] == 0:
            del self._references[key]
            self.current_bytes -= self._sizes.pop(key)
