#!/usr/bin/env bash
# GPU check for the staged runner and the planner, one command, a few minutes on one H100/H200:
#   1. the tiny checkpoint on cuda:0 under --max-memory 0=2GB (the report is printed);
#   2. the "mini" checkpoint (FLUX.1-dev's proportions, 1.2 GB) at 512 and 1024 pixels under
#      0=16GB: planned vs CUDA-allocator peaks per stage (benchmarks/report_table.py);
#   3. the mini checkpoint under 0=350MB,cpu=16GB: the streamed-offload path on a real GPU (the
#      dry-run plans 85 MB of blocks resident and streams 313 MB per step; at 700MB it streamed none):
#      its PNG equals the resident run's, and its pinned host bytes are compared with the plan's;
#   4. FLUX.2-klein-4B's real shape (random weights built on the GPU, 16 GB in bf16) at 1024x1024
#      under 0=12GB, klein's 4 steps: planned vs measured peak per stage (issue 12).
# Run from the repository root on the GPU machine:  bash benchmarks/gpu_smoke.sh
# Packages the machine lacks (diffusers; transformers 5) travel as wheels in .whl/ (see the
# device tool's README); they are installed into /tmp/site when present.
set -uo pipefail
source "$(dirname "$0")/gpu_steps.sh"
OUT=${OUT:-/tmp/flux-sharded-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1

step "tiny checkpoint" python3 -m flux_sharded.tiny /tmp/tiny
step "tiny on cuda:0 under 0=2GB" python3 -m flux_sharded --model /tmp/tiny --prompt "a photo of a dog" \
  --max-memory 0=2GB --steps 4 --height 256 --width 256 --out "$OUT/tiny" --report "$OUT/tiny-0-2GB.json"

step "mini checkpoint" python3 -m flux_sharded.tiny /tmp/mini --preset mini
for size in 512 1024; do
  step "mini at $size under 0=16GB" python3 -m flux_sharded --model /tmp/mini --prompt "a photo of a dog" \
    --max-memory 0=16GB --steps 4 --height $size --width $size --out "$OUT/mini-$size" --report "$OUT/mini-$size.json"
done
# A small card emulated by the budget: blocks the plan puts on "cpu" stream through diffusers'
# group offloading (a CUDA side stream); the report shows planned vs measured peak on GPU 0.
step "mini at 1024 under 0=350MB,cpu=16GB (streamed offload)" python3 -m flux_sharded --model /tmp/mini \
  --prompt "a photo of a dog" --max-memory 0=350MB,cpu=16GB --steps 4 --height 1024 --width 1024 \
  --out "$OUT/mini-streamed" --report "$OUT/mini-streamed.json"
# Streamed and resident blocks compute the same image (same seed, prompt, steps and size as mini-1024).
step "streamed latents equal resident latents (mini at 1024, PNG pixels)" python3 -c "
import sys, numpy as np
from pathlib import Path
from PIL import Image
(resident,), (streamed,) = sorted(Path('$OUT/mini-1024').glob('*.png')), sorted(Path('$OUT/mini-streamed').glob('*.png'))
difference = np.abs(np.asarray(Image.open(resident)).astype(int) - np.asarray(Image.open(streamed)).astype(int))
print('max difference', difference.max(), 'in', resident.name)
sys.exit(int(difference.max() != 0))"
# Every GPU the machine has: with two, the mini transformer split block-wise over both (accelerate's
# dispatch), to the same pixels.
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step "mini at 1024 split over GPUs 0 and 1" python3 -m flux_sharded --model /tmp/mini --prompt "a photo of a dog" \
    --max-memory 0=700MB,1=700MB --steps 4 --height 1024 --width 1024 --out "$OUT/mini-split" \
    --report "$OUT/mini-split.json"
  step "split equals resident (PNG pixels)" cmp <(python3 -c "import numpy, PIL.Image, glob; print(numpy.asarray(PIL.Image.open(glob.glob('$OUT/mini-1024/*.png')[0])).tobytes().hex()[:10**7])") \
    <(python3 -c "import numpy, PIL.Image, glob; print(numpy.asarray(PIL.Image.open(glob.glob('$OUT/mini-split/*.png')[0])).tobytes().hex()[:10**7])")
fi
step "real-shape FLUX.2-klein-4B" python3 -m flux_sharded.tiny /tmp/klein-4b --preset klein-4b --device cuda \
  --dtype bfloat16
step "klein-4B at 1024 under 0=12GB" python3 -m flux_sharded --model /tmp/klein-4b --prompt "a photo of a dog" \
  --max-memory 0=12GB --out "$OUT/klein-4b" --report "$OUT/klein-4b-0-12GB.json"
step "real-shape FLUX.3-klein" python3 -m flux_sharded.tiny /tmp/flux3-klein --preset flux3-klein --device cuda \
  --dtype bfloat16
step "FLUX.3-klein at 1024 under 0=12GB (1.8 GB of blocks streamed)" python3 -m flux_sharded --model /tmp/flux3-klein \
  --prompt "a photo of a dog" --max-memory 0=12GB,cpu=32GB --out "$OUT/flux3-klein" \
  --report "$OUT/flux3-klein-0-12GB.json"
step "table" bash -c "python3 benchmarks/report_table.py $OUT/*.json | tee $OUT/table.md"
finish
