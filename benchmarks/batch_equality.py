"""How far images made with --batch-size B are from the same images made with batch size 1.

    python benchmarks/batch_equality.py [--preset tiny] [--images 8] [--size 256] [--steps 4] [--work DIR]

For each dtype and batch size, one fresh `flux-sharded` process makes the same images (same
prompts, seeds, steps and size) as a batch-size-1 run; the PNGs are compared value by value (8-bit
levels, 3 channels). Prints a Markdown table (the README's claim comes from it), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

PROMPTS = ["a photo of a dog", "a red car under the sky", "watercolor portrait of a cat", "night city street"]


@dataclass(frozen=True)
class Scenario:
    preset: str
    images: int  # over len(PROMPTS) prompts, --num-images-per-prompt images each
    size: int
    steps: int
    dtype: str
    batch_size: int


def make_images(checkpoint: Path, out: Path, scenario: Scenario, batch_size: int) -> list[np.ndarray]:
    per_prompt = scenario.images // len(PROMPTS)
    args = [sys.executable, "-m", "flux_sharded", "--model", str(checkpoint), "--max-memory", "cpu=8GB",
            "--steps", str(scenario.steps), "--height", str(scenario.size), "--width", str(scenario.size),
            "--dtype", scenario.dtype, "--batch-size", str(batch_size), "--num-images-per-prompt", str(per_prompt),
            "--out", str(out)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    subprocess.run(args, check=True, capture_output=True)
    return [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in sorted(out.glob("*.png"))]


def compare(reference: list[np.ndarray], batched: list[np.ndarray]) -> dict:
    difference = np.abs(np.stack(batched) - np.stack(reference))
    return {
        "max_level_difference": int(difference.max()),
        "differing_values": int((difference > 0).sum()),
        "values": int(difference.size),
        "images_differing": int(sum(bool(d.any()) for d in difference)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=8, help="a multiple of 4 (the prompts)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from flux_sharded.tiny import build_tiny_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="flux-sharded-batch-"))
    checkpoint = work / args.preset
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset, seed=0)
    results = []
    for dtype in args.dtypes:
        base = Scenario(args.preset, args.images, args.size, args.steps, dtype, 1)
        reference = make_images(checkpoint, work / f"{dtype}-b1", base, 1)
        for batch_size in args.batch_sizes:
            scenario = Scenario(args.preset, args.images, args.size, args.steps, dtype, batch_size)
            batched = make_images(checkpoint, work / f"{dtype}-b{batch_size}", scenario, batch_size)
            results.append({**asdict(scenario), **compare(reference, batched)})
    print("| dtype | batch size | images | max level difference | differing values | of values |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['dtype']} | {row['batch_size']} | {row['images']} ({row['images_differing']} differ) | "
              f"{row['max_level_difference']} | {row['differing_values']} | {row['values']} |")
    print(json.dumps({"environment": environment(), "results": results}))


if __name__ == "__main__":
    main()
