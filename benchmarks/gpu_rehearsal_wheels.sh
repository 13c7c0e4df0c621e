#!/usr/bin/env bash
# Wheels for benchmarks/gpu_rehearsal.py on a lent GPU machine (the device tool's README, "nvidia-h100-x1,
# nvidia-h200"): its image has torch, transformers, accelerate, peft and pillow but no diffusers. Writes .whl/ (ignored
# through .git/info/exclude): diffusers at the version installed here (the one the test suite ran), the
# importlib_metadata it needs, and fewstep itself. Then, through the device tool, with carry [".whl"]:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 \
#     benchmarks/gpu_rehearsal.py --out $OUT/gpu_rehearsal.json 2>&1 | tee $OUT/log
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
diffusers=$(python3 -c "import diffusers; print(diffusers.__version__)")
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "diffusers==${diffusers}" "importlib_metadata==8.7.0" "zipp==3.23.0"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
ls -1 .whl && du -sh .whl
