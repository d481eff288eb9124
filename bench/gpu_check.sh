#!/usr/bin/env bash
# The GPU check: one script for one H100/H200, under 8 minutes, nothing downloaded (random weights in the
# real architectures). It prints each model stage's items/s vs its model-only forward and the GPU's
# utilisation, the engine end to end with prepare tasks feeding a GPU actor, bf16 vs fp32 numerics, a
# 20-step FSDP stage-2 run, and the vllm backend's GPU test where vLLM is installed.
# Run from the repository root: `bash bench/gpu_check.sh` (optional: `--only 1 3` for some sections).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
[ -x .venv/bin/python ] || make .venv/.installed
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
timeout 420 .venv/bin/python bench/gpu_check.py "$@"
echo "gpu_check.py exited with $? after $((SECONDS - START)) s"
if .venv/bin/python -c "import vllm" 2>/dev/null; then
  echo "== 5. the vllm backend on the GPU (tests marked gpu)"
  timeout 150 .venv/bin/python -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_llava_synthesis_vllm.py
else
  echo "== 5. vllm is not installed in .venv: the vllm backend's GPU test was not run"
fi
echo "gpu_check: $((SECONDS - START)) s in all"
