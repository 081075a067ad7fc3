"""The measuring tools: exact tensor bytes, and the per-stage CPU peak."""

from __future__ import annotations

import torch

from flux_sharded.memory import PeakMemory, TensorBytesTracker, flush


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


def test_peak_memory_sees_a_large_cpu_allocation():
    import psutil

    flush()
    with PeakMemory() as peak:
        before = psutil.Process().memory_info().rss
        block = torch.ones(50 * 2**20 // 4)  # 50 MiB, every page touched
        del block
    assert set(peak.peak_bytes) == {"cpu"}
    assert peak.peak_bytes["cpu"] >= before + 45 * 2**20
