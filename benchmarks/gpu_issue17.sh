#!/bin/bash
# Issue 17's accelerator checks, one run (< 8 min on an H100/H200), output under $OUT:
#   bash benchmarks/gpu_issue17.sh
# Flax ResNet50 bf16 step vs PyTorch eager / torch.compile, K=4 lax.map vs a loop of
# solo steps, input pipeline vs step (benchmarks/bench_gpu.py --against-torch).
set -u
OUT=${OUT:-/tmp/issue17}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{ nvidia-smi -L; python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; \
  python3 -c "import torch; print('torch', torch.__version__)" 2>&1 | tail -1; } \
  > "$OUT/env.txt" 2>&1
timeout 470 python3 benchmarks/bench_gpu.py --against-torch --iters 10 \
  > "$OUT/bench_gpu_against_torch.md" 2> "$OUT/bench_gpu_against_torch.log"
echo "rc=$?" >> "$OUT/env.txt"
cat "$OUT/env.txt" "$OUT/bench_gpu_against_torch.md"; tail -n 20 "$OUT/bench_gpu_against_torch.log"
