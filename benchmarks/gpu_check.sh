#!/usr/bin/env bash
# One prepared run on a lent GPU machine (H100/H200): build the package with its
# CUDA kernels, run the CUDA tests, then the benchmarks; logs and JSON go to $OUT.
# Usage (from the repository root): OUT=/some/dir bash benchmarks/gpu_check.sh [ops|all]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} IBMD_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
what=${1:-ops}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import ibmd_fast.ops as o; print('backend', o.backend())" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest tests/test_ops.py -q -x -k "not cmake" -p no:cacheprovider 2>&1 | tee "$OUT/test_ops.log" | tail -5
machine=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.replace(' ', '-'))")
timeout 400 python3 benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16,float16 --machine "$machine" \
  --out "$OUT/ops-$machine.json" 2>&1 | grep -v Warning | tee "$OUT/bench_ops.log"
if [ "$what" = all ]; then
  timeout 300 python3 benchmarks/bench_inference.py --machine "$machine" --out-dir "$OUT" 2>&1 | tee "$OUT/bench_inference.log" | tail -20
  timeout 300 python3 benchmarks/bench_distill.py --machine "$machine" --out "$OUT/distill-$machine.json" 2>&1 \
    | tee "$OUT/bench_distill.log" | tail -20
  timeout 480 python3 benchmarks/paper_table.py --scale gpu --out-dir "$OUT" 2>&1 | tee "$OUT/paper_table.log" | tail -30
fi
