"""--gpus-per-process: which GPUs each local process sees (set before CUDA starts)."""

from __future__ import annotations

import pytest

from flux_sharded.distributed import Process, encode_positions, launched_processes, restrict_gpus, share
from flux_sharded.handoff import GenerationSettings


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


def test_gpus_per_process_without_a_launcher_means_the_first_k_gpus(monkeypatch, tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from flux_sharded.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5")
    args = ["--model", str(tiny_checkpoint), "--prompt", "a dog", "--max-memory", "cpu=1GB", "--height", "32",
            "--width", "32", "--dry-run", "--out", str(tmp_path / "out")]
    assert CliRunner().invoke(main, args).exit_code == 0
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,4,5"  # not asked for: left alone
    assert CliRunner().invoke(main, [*args, "--gpus-per-process", "2"]).exit_code == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,4"


@pytest.mark.parametrize(
    "images, processes, batch_size, expected",
    [
        (5, 2, 1, [[0, 1, 2], [3, 4]]),
        (4, 2, 1, [[0, 1], [2, 3]]),
        (7, 3, 1, [[0, 1, 2], [3, 4], [5, 6]]),
        (1, 2, 1, [[0], []]),  # never a copy of the last image for the process with nothing to do
        (2, 4, 1, [[0], [1], [], []]),
        # whole batches of the whole run: [0, 1], [2, 3], [4] whatever the number of processes
        (5, 2, 2, [[0, 1, 2, 3], [4]]),
        (5, 3, 2, [[0, 1], [2, 3], [4]]),
        (5, 4, 2, [[0, 1], [2, 3], [4], []]),
        (7, 2, 3, [[0, 1, 2, 3, 4, 5], [6]]),
        (3, 2, 4, [[0, 1, 2], []]),
    ],
)
def test_shares_are_whole_batches_contiguous_in_order_and_never_overlap(images, processes, batch_size, expected):
    assert [share(Process(index, processes), images, batch_size) for index in range(processes)] == expected


@pytest.mark.parametrize(
    "prompts, batch_size, processes, expected",
    [
        # distinct prompts a, b, c, d grouped [a, b], [c, d] over the whole run, whatever the shares
        ("abacd", 2, 1, [[0, 1, 3, 4]]),
        ("abacd", 2, 2, [[0, 1, 3, 4], [3, 4]]),  # share [0..3] needs a, b, c; share [4] needs d
        ("abacd", 2, 3, [[0, 1], [0, 1, 3, 4], [3, 4]]),  # share [2, 3] (a, c) encodes both groups
        ("aaaa", 1, 2, [[0], [0]]),  # one prompt: encoded once by each process that has images of it
        ("abcde", 1, 2, [[0, 1, 2], [3, 4]]),
    ],
)
def test_each_share_encodes_whole_groups_of_the_runs_distinct_prompts(prompts, batch_size, processes, expected):
    settings = GenerationSettings("m", tuple(prompts), tuple(range(len(prompts))), 1, 3.5, 32, 32, 512, "float32",
                                  batch_size=batch_size)
    shares = [share(Process(index, processes), len(prompts), batch_size) for index in range(processes)]
    assert [encode_positions(settings, positions) for positions in shares] == expected
