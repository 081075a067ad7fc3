#!/usr/bin/env bash
# On the CPU machine: fetch the wheels gpu_check.sh / gpu_smoke.sh need on the GPU machine (whose
# Python is 3.12 and which has torch, accelerate, safetensors, sentencepiece, click and psutil, but
# not diffusers, nor our transformers) into .whl/, which the device tool carries (`carry: [".whl"]`).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
# huggingface_hub stays the machine's own (1.3x satisfies both); regex: transformers 5.24 wants >= 2025.10.22.
# torchao and bitsandbytes: gpu_check.sh's --quantize runs (int8 / nf4).
for spec in diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 "regex>=2025.10.22" torchao==0.18.0 \
    bitsandbytes==0.50.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
