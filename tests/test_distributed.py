"""--gpus-per-process: which GPUs each local process sees (set before CUDA starts)."""

from __future__ import annotations

import pytest

from flux_sharded.distributed import launched_processes, restrict_gpus


@pytest.mark.parametrize(
    "local_rank, per_process, visible, expected",
    [
        ("0", 1, None, "0"),
        ("1", 1, None, "1"),
        ("1", 2, None, "2,3"),
        ("3", 2, None, "6,7"),
        ("1", 2, "4,5,6,7", "6,7"),  # the launcher's own CUDA_VISIBLE_DEVICES is respected
        ("0", 3, "GPU-a,GPU-b,GPU-c,GPU-d", "GPU-a,GPU-b,GPU-c"),
    ],
)
def test_local_process_r_sees_gpus_rk_to_rk_plus_k(monkeypatch, local_rank, per_process, visible, expected):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert ",".join(restrict_gpus(per_process)) == expected
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_without_a_launcher_there_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
