"""--max-memory parsing: exact bytes for good specs, one clear message for each kind of bad one."""

from __future__ import annotations

import pytest

from flux_sharded.budget import Budget, exact_spec_size, format_bytes, gpu_indices, is_gpu, parse_budget, parse_size, spec_size
from flux_sharded.errors import BudgetError


@pytest.mark.parametrize(
    "spec, gpus, expected",
    [
        ("0=16GB,1=16GB", 2, {0: 16 * 10**9, 1: 16 * 10**9}),
        ("0=16gb, 1 = 24GiB", 2, {0: 16 * 10**9, 1: 24 * 2**30}),
        ("cpu=64GB", 0, {"cpu": 64 * 10**9}),
        ("CPU=1.5GiB", 0, {"cpu": int(1.5 * 2**30)}),
        ("0=500MB,cpu=2TB,disk=1TiB", 1, {0: 500 * 10**6, "cpu": 2 * 10**12, "disk": 2**40}),
        ("0=1024B", 1, {0: 1024}),
        ("0=2KB,1=2KiB", 2, {0: 2000, 1: 2048}),
        ("1=8MiB,0=4mib", 2, {1: 8 * 2**20, 0: 4 * 2**20}),
        ("cpu=1000TB,disk=1000TB", 0, {"cpu": 10**15, "disk": 10**15}),  # the largest a device may be
    ],
)
def test_good_specs(spec, gpus, expected):
    budget = parse_budget(spec, gpus)
    assert budget == expected
    assert list(budget) == list(expected)  # the user's order is kept


@pytest.mark.parametrize(
    "spec, gpus, message",
    [
        ("", 2, "--max-memory is empty"),
        ("0=16GB,,1=16GB", 2, "has an empty entry"),
        ("0=16GB,", 2, "has an empty entry"),
        ("0", 2, "'0' is not KEY=SIZE"),
        ("0=1=2GB", 2, "is not KEY=SIZE"),
        ("gpu0=16GB", 2, "'gpu0' is an unknown device"),
        ("-1=16GB", 2, "'-1' is an unknown device"),
        ("²=4GB", 2, "'²' is an unknown device"),  # str.isdigit says yes, int() says no: a traceback before
        ("٣=4GB", 4, "'٣' is an unknown device"),  # an Arabic-Indic 3: int() reads it, the hub would not
        ("0=16GB,0=8GB", 2, "'0' is given twice"),
        ("cpu=1GB,CPU=2GB", 0, "'CPU' is given twice"),
        ("0=16XB", 2, "'XB' is an unknown unit"),
        ("0=16", 2, "0=16 has no unit"),
        ("0=0GB", 2, "the size must be positive"),
        ("0=-4GB", 2, "0=-4GB is not a size"),
        ("0=GB", 2, "0=GB is not a size"),
        ("0=0.0000001B", 2, "the size is less than one byte"),
        ("0=99999999TB", 2, "--max-memory: 0=99999999TB is more than 1 PB, more than any GPU, machine or disk holds"),
        ("cpu=1e400GB", 0, "cpu=1e400GB is more than 1 PB"),  # inf bytes, once a traceback
        ("disk=1000.001TB", 0, "disk=1000.001TB is more than 1 PB"),
        ("2=16GB", 2, "GPU 2 does not exist; this machine has GPUs 0..1"),
        ("0=16GB", 0, "GPU 0 does not exist; this machine has no GPU"),
        ("disk=100GB", 0, "budgets no device to compute on"),
    ],
)
def test_bad_specs(spec, gpus, message, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(BudgetError) as raised:
        parse_budget(spec, gpus)
    assert message in str(raised.value)
    assert "e.g." in str(raised.value) or "use" in str(raised.value) or "add" in str(raised.value)


def test_units_are_case_insensitive_and_decimal_vs_binary():
    assert parse_size("1gb") == parse_size("1GB") == 10**9
    assert parse_size("1gib") == parse_size("1GiB") == 2**30
    assert parse_size("1e3MB") == 10**9


@pytest.mark.parametrize("size, text", [(16 * 10**9, "16.00 GB"), (246 * 10**6, "246.00 MB"), (512, "512 B")])
def test_format_bytes(size, text):
    assert format_bytes(size) == text


@pytest.mark.parametrize(
    "size, round_up, binary, text",
    [
        (12_749_000_000, True, False, "12.8GB"),
        (12_749_000_000, False, False, "12.7GB"),
        (13 * 10**9, True, False, "13.0GB"),
        (758_120, True, False, "758.2KB"),
        (760_000, False, False, "760KB"),
        (24_590_000, True, False, "24.6MB"),
        (999, True, False, "999B"),
        (12_749_000_000, True, True, "11.9GiB"),
        (12_749_000_000, False, True, "11.8GiB"),
        (24 * 2**30, True, True, "24.0GiB"),
        (3 * 2**20 + 1, True, True, "3.1MiB"),
        (2000, False, True, "1.9KiB"),
    ],
)
def test_spec_size_is_pasteable_and_rounds_the_safe_way(size, round_up, binary, text):
    assert spec_size(size, round_up, binary) == text
    parsed = parse_budget(f"cpu={text}", 0)["cpu"]
    assert parsed >= size if round_up else parsed <= size


def test_a_missing_gpu_names_the_visible_devices_when_they_are_restricted(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(BudgetError, match=r"GPU 2 does not exist; this process sees GPUs 0\.\.1 \(CUDA_VISIBLE_DEVICES=6,7\)"):
        parse_budget("2=16GB", 2)


@pytest.mark.parametrize("size, text", [(2 * 10**9, "2GB"), (2**31, "2GiB"), (1500 * 10**6, "1500MB"),
                                        (3 * 2**20, "3MiB"), (123, "123B")])
def test_exact_spec_size_round_trips(size, text):
    assert exact_spec_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize("spec, key, binary", [("0=24GiB", 0, True), ("0=24GB", 0, False), ("0=24GiB,cpu=8GB", "cpu", False),
                                               ("0=24GiB", 1, True), ("0=24GiB", "cpu", True), ("cpu=1500MiB", "cpu", True)])
def test_a_budget_remembers_the_unit_each_entry_was_written_in(spec, key, binary):
    """So that a suggestion answers in that unit; a key not written follows one of its kind, then any."""
    assert parse_budget(spec, None).binary(key) is binary


def test_the_budget_type_says_which_entries_are_gpus_and_round_trips_through_json():
    budget = parse_budget("1=8GiB,cpu=32GB,0=16GB,disk=100GB", gpu_count=None)
    assert budget.gpus == [0, 1] == gpu_indices({"cpu": 1, 1: 1, 0: 1})
    assert not is_gpu("cpu") and not is_gpu(True) and is_gpu(0)
    assert budget.only_gpus() == {0: 16 * 10**9, 1: 8 * 2**30} and budget.only_gpus().binary(1)
    assert budget.to_json() == {"1": 8 * 2**30, "cpu": 32 * 10**9, "0": 16 * 10**9, "disk": 100 * 10**9}
    assert Budget.from_json(budget.to_json()) == budget
    assert str(budget) == "1=8.59 GB, cpu=32.00 GB, 0=16.00 GB, disk=100.00 GB"
