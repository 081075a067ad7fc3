"""The measuring tools: exact tensor bytes, and the per-stage CPU peak."""

from __future__ import annotations

import os

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


def test_each_gpu_reports_its_allocated_and_reserved_peaks(monkeypatch):
    """Item 7 of issue 18: an out-of-memory is decided by what the caching allocator reserved, which
    group offloading's side stream fragments, so the report shows it beside the allocated peak.
    CUDA's runtime is the boundary faked here: two GPUs whose allocator reports these peaks."""
    from flux_sharded.report import RunReport, StageReport

    allocated, reserved = {0: 3 * 10**9, 1: 2 * 10**9}, {0: 4 * 10**9, 1: 2 * 10**9 + 5 * 10**8}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: allocated[index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda index: reserved[index])
    # and the host allocator's pinned blocks (host_memory.py's chunks), measured beside them
    monkeypatch.setattr(torch.cuda, "reset_peak_host_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: {"allocated_bytes.peak": 7 * 10**9})
    with PeakMemory(gpu_indices=[0, 1]) as peak:
        pass
    assert {key: value for key, value in peak.peak_bytes.items() if key != "cpu"} == {"0": 3 * 10**9, "1": 2 * 10**9}
    assert peak.reserved_bytes == {"0": 4 * 10**9, "1": 25 * 10**8}
    assert peak.peak_pinned_bytes == 7 * 10**9
    stage = StageReport("denoise", {}, {"0": 10**9, "1": 10**9}, {"0": 5 * 10**9, "1": 3 * 10**9}, 1.0, 2.0,
                        peak.peak_bytes, peak_reserved_bytes=peak.reserved_bytes)
    table = RunReport({"0": 6 * 10**9, "1": 6 * 10**9}, [stage]).table().splitlines()
    columns = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in table]
    assert columns[0][-5:] == ["headroom", "peak", "reserved", "load s", "run s"]
    assert columns[1][-4:] == ["3.00 GB", "4.00 GB", "1.00", "2.00"]  # GPU 0: allocated, reserved
    assert columns[2][-2:] == ["2.00 GB", "2.50 GB"]


def test_a_cpu_run_has_no_reserved_column():
    from flux_sharded.report import RunReport, StageReport

    stage = StageReport("decode", {}, {"cpu": 10**9}, {"cpu": 2 * 10**9}, 1.0, 2.0, {"cpu": 10**9})
    assert "reserved" not in RunReport({"cpu": 4 * 10**9}, [stage]).table()


def test_expandable_segments_are_on_unless_the_user_configured_the_allocator(monkeypatch, tiny_checkpoint, tmp_path):
    """The command line sets PYTORCH_CUDA_ALLOC_CONF (cli.CUDA_ALLOC_CONF) before anything initialises
    CUDA; a value the user set is kept as it is."""
    from click.testing import CliRunner

    from flux_sharded.cli import main

    args = ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--height", "32", "--width", "32",
            "--max-memory", "cpu=4GB", "--out", str(tmp_path / "out"), "--dry-run"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert CliRunner().invoke(main, args).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
