"""The measuring tools: exact tensor bytes, and the per-stage CPU peak."""

from __future__ import annotations

import torch

from flux_sharded import memory
from flux_sharded.memory import RESET_TOLERANCE_BYTES, PeakMemory, TensorBytesTracker, flush


def test_tracker_counts_created_tensors_and_their_release():
    weight = torch.ones(100, 100)  # 40 KB that exists before: never counted
    with TensorBytesTracker(existing=[weight]) as tracker:
        first = torch.ones(1000) * 2  # 4000 bytes (the ones() and the product: 8000 at the peak)
        view = weight.t()  # a view of an existing tensor: nothing new
        del first
        second = torch.zeros(500, dtype=torch.float64) + 1  # 4000 + 4000
        del second
    assert tracker.peak_bytes == 8000
    assert tracker.current_bytes == 0
    assert view.shape == (100, 100)


def test_tracker_keeps_a_storage_alive_while_a_view_holds_it():
    with TensorBytesTracker() as tracker:
        base = torch.zeros(256)  # 1024 bytes
        view = base[:10]
        del base
        assert tracker.current_bytes == 1024
        del view
    assert tracker.current_bytes == 0


def _allocate_and_measure(size_bytes: int) -> tuple[int, int, int]:
    """Map, touch and unmap `size_bytes` of fresh anonymous memory inside a PeakMemory; the RSS
    before, while it is mapped, and the peak. A fresh mapping, not a tensor: malloc may serve a
    tensor from pages an earlier test freed but kept resident, and then the RSS hardly grows."""
    import mmap

    import psutil

    flush()
    with PeakMemory() as peak:
        before = psutil.Process().memory_info().rss
        block = mmap.mmap(-1, size_bytes)
        torch.frombuffer(block, dtype=torch.uint8).fill_(1)  # every page touched
        alive = psutil.Process().memory_info().rss
        block.close()
    assert set(peak.peak_bytes) == {"cpu"}
    return before, alive, peak.peak_bytes["cpu"]


def test_peak_memory_sees_a_large_cpu_allocation():
    before, alive, peak = _allocate_and_measure(50 * 2**20)
    assert alive >= before + 45 * 2**20, "the premise: a fresh 50 MiB mapping is resident"
    # The peak covers the moment the block was alive (the kernel's counters are approximate to
    # well under RESET_TOLERANCE_BYTES).
    assert peak >= alive - RESET_TOLERANCE_BYTES


def test_peak_memory_is_exact_for_a_new_record_when_the_reset_fails(monkeypatch):
    """Where /proc/self/clear_refs is refused, a stage that sets a new high-water mark is exact.

    The block is freed within microseconds, too fast for the 10 ms sampler to rely on.
    """
    monkeypatch.setattr(memory, "_reset_rss_high_water_mark", lambda: False)
    flush()  # what garbage collection frees, it frees now, not between these reads and the allocation
    hwm, rss = memory._read_status_kb("VmHWM"), memory._read_status_kb("VmRSS")
    assert hwm is not None and rss is not None
    size = hwm - rss + 50 * 2**20  # enough to pass the lifetime peak by about 50 MiB
    before, alive, peak = _allocate_and_measure(size)
    assert alive > hwm
    assert peak >= alive - RESET_TOLERANCE_BYTES
