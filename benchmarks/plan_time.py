"""Wall time of `flux-sharded --dry-run` for FLUX.1-dev and -schnell, imports included.

    python benchmarks/plan_time.py [--repeat 3]

Each run is a fresh process (so imports count) with HF_HUB_OFFLINE=1 and an empty Hugging Face
home, planning from the configs shipped in the package. Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    model: str
    max_memory: str


SCENARIOS = [
    Scenario("black-forest-labs/FLUX.1-dev", "0=16GB,1=16GB"),
    Scenario("black-forest-labs/FLUX.1-dev", "0=8GB,1=8GB"),  # refused: includes the smallest-budget search
    Scenario("black-forest-labs/FLUX.1-schnell", "0=24GB,cpu=32GB"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    print("| model | --max-memory | exit | seconds (best of {}) | worst |".format(args.repeat))
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": home}
        for scenario in SCENARIOS:
            times, code = [], None
            for _ in range(args.repeat):
                started = time.perf_counter()
                code = subprocess.run(
                    [sys.executable, "-m", "flux_sharded", "--model", scenario.model, "--prompt", "a dog",
                     "--max-memory", scenario.max_memory, "--dry-run"],
                    capture_output=True, env=env,
                ).returncode
                times.append(time.perf_counter() - started)
            rows.append({**asdict(scenario), "exit_code": code, "best_seconds": round(min(times), 2),
                         "worst_seconds": round(max(times), 2)})
            print(f"| {scenario.model} | {scenario.max_memory} | {code} | {min(times):.2f} | {max(times):.2f} |",
                  flush=True)
    print(json.dumps({"benchmark": "plan_time", "environment": environment(), "results": rows}))


if __name__ == "__main__":
    main()
