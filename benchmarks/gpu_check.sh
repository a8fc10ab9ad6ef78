#!/usr/bin/env bash
# Prepared runs for a lent GPU machine (H100/H200): build the package with its CUDA kernels, then
# one part of the checks; logs and JSON go to $OUT. Each part is sized for one 10-minute device
# call (the build is incremental on a warm machine: about 35 s the first time with 16 jobs).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh ops     # CUDA tests (ops and trainers) + bench_ops       ~4 min
#   OUT=/some/dir bash benchmarks/gpu_check.sh speed   # bench_inference + bench_distill (CUDA ladder)    ~5 min
#   OUT=/some/dir bash benchmarks/gpu_check.sh paper   # paper_table.py --scale gpu (aimed at 8 min)
#   OUT=/some/dir bash benchmarks/gpu_check.sh all     # the three in a row (a longer allowance only)
#
# The paper part (and the ops part's CUDA smoke of it) needs Fashion-MNIST's idx files (about
# 30 MB), which the device machine lacks:
#   here:  mkdir -p .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* .carry/fashion-mnist/
#   run:   carry [".carry"], command: OUT=$OUT bash benchmarks/gpu_check.sh paper
# (.carry/fashion-mnist is used when present; IBMD_FAST_FASHION_MNIST names another folder.) Copy
# $OUT's JSON/MD/PNG files into benchmarks/results/ and commit them with the card's name.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} IBMD_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${IBMD_FAST_FASHION_MNIST:-}" ] && [ -d .carry/fashion-mnist ]; then
  export IBMD_FAST_FASHION_MNIST=$PWD/.carry/fashion-mnist
fi
what=${1:-ops}
case "$what" in ops|speed|paper|all) ;; *) echo "usage: OUT=dir bash $0 ops|speed|paper|all" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import ibmd_fast.ops as o; print('backend', o.backend())" | tee -a "$OUT/gpu.txt"
machine=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.replace(' ', '-'))")
status=0

if [ "$what" = ops ] || [ "$what" = all ]; then
  # every CUDA case of the suite: the ops (numerics, gradients, opcheck, compile, noise, layouts, bad
  # inputs, graph capture), the trainers in bf16/fp16 with channels_last, the paper table's stages
  timeout 270 python3 -m pytest tests/test_ops.py tests/test_train.py tests/test_benchmarks.py -q -rs \
    -p no:cacheprovider -k "not cmake and (cuda or test_ops)" 2>&1 | tee "$OUT/tests_cuda.log" | tail -8
  status=$(( status | ${PIPESTATUS[0]} ))
  timeout 220 python3 benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16,float16 --machine "$machine" \
    --out "$OUT/ops-$machine.json" 2>&1 | grep -v Warning | tee "$OUT/bench_ops.log"
fi
if [ "$what" = speed ] || [ "$what" = all ]; then
  timeout 200 python3 benchmarks/bench_inference.py --device cuda --machine "$machine" --out-dir "$OUT" 2>&1 \
    | tee "$OUT/bench_inference.log" | tail -20
  timeout 300 python3 benchmarks/bench_distill.py --device cuda --machine "$machine" --timeout 120 \
    --out "$OUT/distill-$machine.json" 2>&1 | tee "$OUT/bench_distill.log" | tail -20
fi
if [ "$what" = paper ] || [ "$what" = all ]; then
  timeout 540 python3 benchmarks/paper_table.py --scale gpu --device cuda --machine "$machine" \
    --out-dir "$OUT" 2>&1 \
    | tee "$OUT/paper_table.log" | tail -40
  status=$(( status | ${PIPESTATUS[0]} ))
  # the run folders stay in runs/paper_table/gpu (git-ignored, kept on a warm machine): a call cut
  # short by its time limit resumes there, stage by stage, when this part runs again
fi
exit $status
