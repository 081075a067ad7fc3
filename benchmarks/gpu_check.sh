#!/usr/bin/env bash
# One command on one H100/H200 (under 10 minutes): the real FLUX.1-dev architecture with random
# weights, built on the device (never downloaded), run staged by flux-sharded under a 12 GB and an
# 8 GB card emulated by the budget (0=12GB,cpu=100GB, 0=8GB,cpu=100GB: the offloaded blocks stream
# through diffusers' group offloading) and unconstrained (0=40GB), next to diffusers' own ways at
# 1024x1024 on the same GPU: one piece on the GPU, block-level group offloading with streams, and
# sequential CPU offload. Prints one table of peak per stage vs budget and seconds per image.
# Goals (issue 9): at 12 GB, seconds per image <= diffusers group offloading's and <= 1.5x 0=40GB.
# Then fp8 and nf4 (--quantize) under an 8 GB card: planned vs measured peak per stage (issue 11).
#
# Run from the repository root on the GPU machine:  bash benchmarks/gpu_check.sh
# diffusers (and transformers 5.24, tokenizers, regex) travel as wheels in .whl/:
# on the CPU machine, `bash benchmarks/gpu_wheels.sh` fetches them.
set -uo pipefail
source "$(dirname "$0")/gpu_steps.sh"
OUT=${OUT:-/tmp/flux-sharded-gpu}
STEPS=${STEPS:-4}
SIZE=${SIZE:-1024}
CKPT=${CKPT:-/tmp/flux-dev-shape}
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 1

start=$(date +%s)
[ -f "$CKPT/model_index.json" ] || step "real-shape checkpoint" \
  python3 -m flux_sharded.tiny "$CKPT" --preset flux-dev --device cuda --dtype bfloat16
echo "checkpoint ready after $(( $(date +%s) - start )) s"
[ -f "$CKPT/model_index.json" ] || { finish; exit 1; }

for budget in 0=12GB,cpu=100GB 0=8GB,cpu=100GB 0=40GB; do
  name="staged-${budget//[=,]/_}"
  step "flux-sharded under $budget" python3 -m flux_sharded --model "$CKPT" --prompt "a photo of a dog" \
    --max-memory "$budget" --steps "$STEPS" --height "$SIZE" --width "$SIZE" --out "$OUT/$name" --overwrite \
    --report "$OUT/$name.json"
done
# Low-bit weights on an 8 GB card (issue 11): fp8 (15.2 GB transformer) streams what misses the card,
# nf4 (6.7 GB) fits it whole.
for quantize in fp8:0=8GB,cpu=100GB nf4:0=8GB; do
  method=${quantize%%:*}; budget=${quantize#*:}
  name="staged-${method}-${budget//[=,]/_}"
  step "flux-sharded --quantize $method under $budget" python3 -m flux_sharded --model "$CKPT" \
    --prompt "a photo of a dog" --quantize "$method" --max-memory "$budget" --steps "$STEPS" --height "$SIZE" \
    --width "$SIZE" --out "$OUT/$name" --overwrite --report "$OUT/$name.json"
done
for mode in whole group-offload sequential-offload; do
  step "diffusers $mode" python3 benchmarks/one_piece.py "$CKPT" --mode "$mode" --device cuda --size "$SIZE" \
    --steps "$STEPS" --out-json "$OUT/one-piece-$mode.json"
done
step "table" bash -c "python3 benchmarks/gpu_table.py $OUT | tee $OUT/table.md"
echo "total $(( $(date +%s) - start )) s"
finish
