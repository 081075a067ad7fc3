"""Per-device memory budget: `"0=16GB,1=16GB,cpu=64GB"` <-> `{0: bytes, 1: bytes, "cpu": bytes}`.

The dict is exactly what diffusers/accelerate take as `max_memory`: GPU indices as ints, "cpu" and
"disk" as strings, sizes as ints (bytes). Sizes are parsed here rather than by accelerate because
accelerate reads a lowercase "gb" as gigabits; we accept units case-insensitively.
"""

from __future__ import annotations

import math
import os
import re

from .errors import BudgetError

UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
UNITS_HELP = "B, KB, MB, GB, TB or KiB, MiB, GiB, TiB"
EXAMPLE = "e.g. 0=16GB,1=16GB"

# Memory we leave untouched on each GPU when no budget is given: the CUDA context, cuBLAS
# workspaces and allocator fragmentation take a few hundred MB that no weight map accounts for.
DEFAULT_GPU_RESERVE_BYTES = 1 * 2**30
# Fraction of the currently available RAM given to the CPU when no budget is given: the rest is
# left to the OS, the page cache that backs safetensors' mmap, and the handoff tensors.
DEFAULT_CPU_FRACTION = 0.8

# The most one device's budget may be: 1 PB, far more than any GPU (a few hundred GB), any
# machine's RAM (tens of TB at most) or any disk a run offloads its weights to (FLUX.2-dev's are
# about 100 GB); a larger size is a typo, and sizes past 2**63 bytes overflow the int64 counters
# that torch and accelerate compare them with.
MAX_DEVICE_BYTES = 10**15

# What a card's maker calls "24 GB" is 24 GiB (25.77 GB): GPU memory is counted in powers of two.
BINARY_TWIN = {"KB": "KIB", "MB": "MIB", "GB": "GIB", "TB": "TIB"}


def is_gpu(key) -> bool:
    """Whether a budget (or device-map) key is a GPU: GPU indices are ints, "cpu" and "disk" strings,
    as accelerate's max_memory has them. The one place that says so."""
    return isinstance(key, int) and not isinstance(key, bool)


def gpu_indices(per_device) -> list[int]:
    """The GPU keys of a budget or any {device: ...} mapping, in index order."""
    return sorted(key for key in per_device if is_gpu(key))


class Budget(dict):
    """{int | "cpu" | "disk": bytes}, exactly what accelerate and diffusers take as `max_memory`,
    plus `units`: the unit each entry was written in ("GB", "GIB", ...; empty for a budget nobody
    wrote), so that a suggestion answers in the same unit.

    Built by parse_budget (--max-memory), default_budget (the machine's free memory) or from_json
    (run.json's "max_memory", validated by validate.saved_run_fields first)."""

    def __init__(self, *args, units: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.units = dict(units or {})

    def copy(self) -> "Budget":
        return Budget(self, units=self.units)

    @property
    def gpus(self) -> list[int]:
        """The budgeted GPU indices, in order."""
        return gpu_indices(self)

    def only_gpus(self) -> "Budget":
        """The GPU entries alone (a stage whose weights cannot be offloaded: an nf4 transformer)."""
        return Budget({key: value for key, value in self.items() if is_gpu(key)},
                      units={key: unit for key, unit in self.units.items() if is_gpu(key)})

    def to_json(self) -> dict[str, int]:
        """{"0": bytes, "cpu": bytes}: run.json's and the report's "max_memory"."""
        return {str(key): int(value) for key, value in self.items()}

    @classmethod
    def from_json(cls, entries: dict[str, int]) -> "Budget":
        """The inverse of to_json, for entries already checked (validate.saved_run_fields)."""
        return cls({int(key) if is_gpu_key(key) else key: size for key, size in entries.items()})

    def __str__(self) -> str:
        """"0=16.00 GB, cpu=64.00 GB", for headers and messages."""
        return ", ".join(f"{key}={format_bytes(value)}" for key, value in self.items())

    def binary(self, key) -> bool:
        """Whether `key` was written in KiB/MiB/GiB/TiB; a key not written follows an entry of its
        kind (GPU or not), then any entry."""
        same_kind = [unit for other, unit in self.units.items() if is_gpu(other) == is_gpu(key)]
        unit = self.units.get(key) or next(iter(same_kind + list(self.units.values())), "")
        return unit.endswith("IB")


def as_typed(budget: dict) -> dict:
    """The budget with each entry nobody wrote (the default budget's exact free bytes) rounded down
    to a tenth of its unit, as a user would type it, so that a suggestion keeping it reads
    "cpu=19.4GB" rather than "cpu=19416442470B"; other entries, and a plain dict, as they are."""
    if not isinstance(budget, Budget):
        return budget
    typed = budget.copy()
    for key, value in budget.items():
        if key not in budget.units:
            typed[key], typed.units[key] = _parse_size(spec_size(value, round_up=False, binary=budget.binary(key)))
    return typed


def written_size(budget: dict, key) -> str:
    """An entry of the budget as a --max-memory size, exactly, in the unit it was written in."""
    unit = getattr(budget, "units", {}).get(key)
    if unit is None:
        return exact_spec_size(budget[key])
    return f"{budget[key] / UNITS[unit]:.10g}{unit.replace('I', 'i')}"


def written_binary(budget: dict, key) -> bool:
    """Whether a suggestion for `key` should be in KiB/MiB/GiB/TiB: the unit the user wrote it in
    (a plain dict, or a budget read from run.json, has none: GB)."""
    return budget.binary(key) if isinstance(budget, Budget) else False

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, key: str = "") -> int:
    """'16GB' -> 16_000_000_000; '1.5GiB' -> 1610612736. Raises BudgetError naming `text`."""
    return _parse_size(text, key)[0]


def _parse_size(text: str, key: str = "") -> tuple[int, str]:
    """The size in bytes and its unit, upper-case ("GB", "GIB")."""
    where = f"--max-memory: {key}={text}" if key else f"--max-memory: '{text}'"
    match = _SIZE.match(text)
    if not match:
        raise BudgetError(f"{where} is not a size; use a positive number with a unit ({UNITS_HELP}), {EXAMPLE}")
    number, unit = match.groups()
    if not unit:
        raise BudgetError(f"{where} has no unit; use {UNITS_HELP} ({EXAMPLE})")
    if unit.upper() not in UNITS:
        raise BudgetError(f"{where}: '{unit}' is an unknown unit; use {UNITS_HELP} ({EXAMPLE})")
    exact = float(number) * UNITS[unit.upper()]  # inf for 1e400GB
    if exact > MAX_DEVICE_BYTES:
        raise BudgetError(f"{where} is more than {MAX_DEVICE_BYTES / 10**15:g} PB, more than any GPU, machine or "
                          f"disk holds (the largest machines have tens of TB of RAM); give the device's real size "
                          f"({EXAMPLE})")
    size = int(exact)
    if size <= 0:
        problem = "is less than one byte" if float(number) > 0 else "must be positive"
        raise BudgetError(f"{where}: the size {problem} ({EXAMPLE})")
    return size, unit.upper()


def parse_budget(spec: str, gpu_count: int | None) -> Budget:
    """Parse a `--max-memory` spec against a machine with `gpu_count` visible GPUs (None: any
    GPU index is accepted, for planning a machine other than this one; see check_gpus)."""
    if not spec or not spec.strip():
        raise BudgetError(f"--max-memory is empty; give KEY=SIZE entries separated by commas ({EXAMPLE})")
    budget = Budget()
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            raise BudgetError(f"--max-memory '{spec}' has an empty entry; remove the extra comma ({EXAMPLE})")
        if entry.count("=") != 1:
            raise BudgetError(f"--max-memory: '{entry}' is not KEY=SIZE ({EXAMPLE})")
        raw_key, size_text = (part.strip() for part in entry.split("="))
        key = _parse_key(raw_key, gpu_count)
        if key in budget:
            raise BudgetError(f"--max-memory: '{raw_key}' is given twice; give each device once ({EXAMPLE})")
        budget[key], budget.units[key] = _parse_size(size_text, raw_key)
    if not any(key != "disk" for key in budget):
        raise BudgetError(f"--max-memory '{spec}' budgets no device to compute on; add a GPU or cpu entry ({EXAMPLE})")
    return budget


def is_gpu_key(text: str) -> bool:
    """A budget key that names a GPU: ASCII digits only ('²' and '٣' pass str.isdigit, not int())."""
    return text.isascii() and text.isdigit()


def _parse_key(raw_key: str, gpu_count: int | None) -> int | str:
    if raw_key.lower() in ("cpu", "disk"):
        return raw_key.lower()
    if is_gpu_key(raw_key):
        index = int(raw_key)
        if gpu_count is not None:
            check_gpus({index: 1}, gpu_count)
        return index
    raise BudgetError(
        f"--max-memory: '{raw_key}' is an unknown device; use a GPU index (0, 1, ...), cpu or disk ({EXAMPLE})"
    )


def check_gpus(budget: Budget, gpu_count: int) -> None:
    """Refuse GPU indices this machine does not have."""
    for index in gpu_indices(budget):
        if index >= gpu_count:
            have = f"GPUs 0..{gpu_count - 1}" if gpu_count else "no GPU"
            fix = "use one of those indices" if gpu_count else f"budget the CPU instead ({_cpu_example()})"
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # set by the user, a launcher or --gpus-per-process
            where = (f"this machine has {have}" if visible is None
                     else f"this process sees {have} (CUDA_VISIBLE_DEVICES={visible})")
            raise BudgetError(f"--max-memory: GPU {index} does not exist; {where}; {fix}")


def _cpu_example() -> str:
    """A cpu= entry this machine can give: what the default budget would take of its free RAM."""
    import psutil

    share = int(psutil.virtual_memory().available * DEFAULT_CPU_FRACTION)
    return f"e.g. cpu={spec_size(share, round_up=False)}, {DEFAULT_CPU_FRACTION:.0%} of the free RAM"


def default_budget(local_processes: int = 1) -> Budget:
    """Every visible GPU's free memory less DEFAULT_GPU_RESERVE_BYTES, plus DEFAULT_CPU_FRACTION of the
    free RAM split evenly between the `local_processes` processes of this machine (they share it)."""
    import psutil
    import torch

    budget = Budget()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(index)
            budget[index] = max(free - DEFAULT_GPU_RESERVE_BYTES, 0)
    budget["cpu"] = int(psutil.virtual_memory().available * DEFAULT_CPU_FRACTION) // max(local_processes, 1)
    return budget


def format_bytes(size: int) -> str:
    """Bytes in the unit a user reads a GPU's size in (GB = 10**9, like the budget's GB)."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(size) >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def spec_size(size: int, round_up: bool, binary: bool = False) -> str:
    """A size as a --max-memory value ("12.3GB", "760KB", or with binary "11.5GiB": no space, so it
    can be pasted), to a tenth of its unit, rounded up (a need) or down (what is available)."""
    rounding = math.ceil if round_up else math.floor
    for unit in ("GB", "MB", "KB"):
        unit = BINARY_TWIN[unit] if binary else unit
        if size >= UNITS[unit]:
            number = rounding(size * 10 / UNITS[unit]) / 10
            text = f"{number:.1f}" if unit in ("GB", "GIB") else f"{number:g}"
            return text + unit.replace("I", "i")
    return f"{size}B"


def exact_spec_size(size: int) -> str:
    """A size as a --max-memory value in the largest unit that divides it exactly ("2GiB", "1500MB")."""
    for unit in ("TB", "TIB", "GB", "GIB", "MB", "MIB", "KB", "KIB"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit.replace('I', 'i')}"
    return f"{size}B"


def device_key(device) -> str:
    """A device as the budget names it: 0, "cuda:0", torch.device("cuda", 0) -> "0"; "cpu", "disk" as is."""
    if isinstance(device, int):
        return str(device)
    text = str(device)
    return text.split(":", 1)[1] if text.startswith("cuda:") else text


def budget_to_json(budget: dict) -> dict[str, int]:
    """Budget.to_json for a budget or a plain {device: bytes} dict."""
    return Budget(budget).to_json()


def format_budget(budget: dict) -> str:
    """str(Budget) for a budget or a plain {device: bytes} dict."""
    return str(Budget(budget))
