"""A warm server vs one command line run per image, on the CPU mini checkpoint.

    python benchmarks/serve.py [--preset mini] [--images 8] [--work .cache/bench]

1) --images command line runs, one image each (prompt k, seed k; 256x256, 4 steps, float32,
   --max-memory cpu=4GB), each a new process that loads every weight: wall seconds of each.
2) `flux-sharded serve` with the same options, started once; the same images asked one after
   another with OpenAI's client: the server's start (until it listens), each request's seconds
   (the first loads the weights, the later ones take those the plan keeps), and the server's
   resident memory (psutil RSS) after each answer, against the plan's kept weights
   (plan.kept_between_calls) and its largest stage's CPU bytes beside them.
3) Every served image equals its command line run's, pixel for pixel.
float32: this machine's CPU has no bfloat16 kernels for the VAE's convolutions (minutes per decode).
Prints Markdown tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from _env import environment

STEPS, SIZE, BUDGET = 4, 256, "cpu=4GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    args = parser.parse_args()
    import openai

    import flux_sharded
    from flux_sharded.budget import format_bytes
    from flux_sharded.tiny import build_tiny_checkpoint

    checkpoint = args.work / f"serve-{args.preset}"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset)
    print(json.dumps(environment()))
    options = ["--model", str(checkpoint), "--max-memory", BUDGET, "--dtype", "float32"]
    prompts = [f"a photo of a dog, number {k}" for k in range(args.images)]

    # 1) one process per image
    cli_seconds, cli_pixels = [], []
    for k, prompt in enumerate(prompts):
        out = args.work / f"serve-cli-{k}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flux_sharded", *options, "--prompt", prompt, "--seed", str(k),
                        "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--out", str(out),
                        "--overwrite"], check=True, capture_output=True)
        cli_seconds.append(time.perf_counter() - started)
        (path,) = out.glob("*.png")
        cli_pixels.append(np.asarray(Image.open(path)))

    # 2) one warm server
    with flux_sharded.open_model(str(checkpoint), max_memory=BUDGET, dtype="float32") as model:
        plan = model.plan(steps=STEPS, height=SIZE, width=SIZE)
    kept = sum(stage.kept_bytes for stage in plan.stages)
    bound = max(stage.planned_bytes.get("cpu", 0) + kept - stage.kept_bytes for stage in plan.stages)
    log = args.work / "serve-server.log"
    started = time.perf_counter()
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "flux_sharded", "serve", *options, "--port", "0",
                                   "--out", str(args.work / "serve-served")], stderr=stderr)
    while "\n" not in log.read_text():
        if server.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.05)
    ready = time.perf_counter() - started
    url = log.read_text().splitlines()[0].split(" on ")[1].split()[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
    served_seconds, rss, equal = [], [], []
    try:
        for k, prompt in enumerate(prompts):
            asked = time.perf_counter()
            answer = client.images.generate(prompt=prompt, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                            extra_body={"seed": k, "steps": STEPS})
            served_seconds.append(time.perf_counter() - asked)
            rss.append(psutil.Process(server.pid).memory_info().rss)
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))))
            equal.append(bool((served == cli_pixels[k]).all()))
    finally:
        server.terminate()
        server.wait(timeout=60)
    served_wall = ready + sum(served_seconds)

    print(f"\n| {args.images} images, {SIZE}x{SIZE}, {STEPS} steps | wall s | per image s |")
    print("|---|---|---|")
    print(f"| command line, one process per image | {sum(cli_seconds):.1f} | {np.mean(cli_seconds):.2f} |")
    print(f"| warm server (start {ready:.1f} s included) | {served_wall:.1f} | {np.mean(served_seconds):.2f} |")
    print(f"\nserver / command line wall time: {served_wall / sum(cli_seconds):.2f}; first request "
          f"{served_seconds[0]:.2f} s, later ones {np.mean(served_seconds[1:]):.2f} s on average")
    print(f"server RSS between requests: {format_bytes(min(rss))} .. {format_bytes(max(rss))}; the plan keeps "
          f"{format_bytes(kept)} of weights, and its largest stage with them is {format_bytes(bound)} "
          f"(under --max-memory {BUDGET})")
    print(f"served images equal to the command line's: {sum(equal)}/{len(equal)}")
    print(json.dumps({"images": args.images, "cli_seconds": cli_seconds, "server_start_seconds": ready,
                      "served_seconds": served_seconds, "wall_ratio": served_wall / sum(cli_seconds),
                      "rss_bytes": rss, "kept_bytes": kept, "planned_bound_bytes": bound,
                      "pixel_equal": all(equal)}))


if __name__ == "__main__":
    main()
