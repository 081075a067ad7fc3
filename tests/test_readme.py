"""The README's two set-up commands, as written, and the demo recipe they run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip().split("#")[0].strip() for line in section.splitlines() if line.startswith("    make")]


def test_readme_setup_is_exactly_make_demo_and_make_test():
    assert setup_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command():
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_make_demo_runs_flux_sharded_on_a_fresh_tiny_checkpoint(tmp_path):
    """`make demo` with the installed environment standing in for .venv (the install step is what
    .ci/run exercises): it builds the tiny checkpoint, then runs the console script on the CPU."""
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        ["make", "-C", str(ROOT), "demo", f"BIN={bin_dir}", "STAMP=", f"TINY={tmp_path / 'tiny'}",
         f"DEMO_OUT={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["encode", "denoise", "decode"]
    assert [Path(path).name for path in report["images"]] == ["0000-0-a-photo-of-a-dog.png"]
    assert re.search(r"^decode\s+cpu\s", result.stdout, re.M), result.stdout
