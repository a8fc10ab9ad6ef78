#!/usr/bin/env bash
# Prepared runs for a lent GPU machine (H100/H200): build the package with its CUDA kernels, then
# one part of the checks; logs and JSON go to $OUT. Each part is sized for one 10-minute device
# call, start-up and the build included (the build: about 35 s with 16 jobs). Run them in this
# order, one call each, as far as the session's device time goes; what is left is owed:
#
#   OUT=$OUT bash benchmarks/gpu_check.sh tests     # build + every CUDA test of the suite           ~5 min
#   OUT=$OUT bash benchmarks/gpu_check.sh default   # the README's main command on CUDA, then sample, eval, export
#   OUT=$OUT bash benchmarks/gpu_check.sh ladder    # bench_distill, small U-Net 64 px batch 64, rungs 1-7   ~6 min
#   OUT=$OUT bash benchmarks/gpu_check.sh adm256    # bench_distill, ADM-256 (552M) 256 px, 80 GB cap    ~8 min
#   OUT=$OUT bash benchmarks/gpu_check.sh ops       # bench_ops (bridge_step / losses, fp32 bf16 fp16)   ~4 min
#   OUT=$OUT bash benchmarks/gpu_check.sh inference # bench_inference: eager, compile, CUDA graph        ~5 min
#   OUT=$OUT bash benchmarks/gpu_check.sh paper     # paper_table.py --scale gpu (aimed at 8 min)
#
# Back here: copy $OUT/tests-cuda-<gpu>.log to benchmarks/results/logs/ (it replaces the old
# test_ops-<gpu>.log, which ends in a segfault fixed since), and the JSON/MD/PNG files to
# benchmarks/results/; commit them with the card's name. distill-<gpu>.json merges sizes: the
# ladder parts start from the committed benchmarks/results/distill-<gpu>.json when there is one.
#
# The paper part needs Fashion-MNIST's idx files (about 30 MB), which the device machine lacks:
#   here:  mkdir -p .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* .carry/fashion-mnist/
#   run:   carry [".carry"], command: OUT=$OUT bash benchmarks/gpu_check.sh paper
# (.carry/fashion-mnist is used when present; IBMD_FAST_FASHION_MNIST names another folder.)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
PARTS="tests|default|ladder|adm256|ops|inference|paper"
parts=${1:-tests}
for what in ${parts//,/ }; do
  case "$what" in tests|default|ladder|adm256|ops|inference|paper) ;;
  *) echo "usage: OUT=dir bash $0 PART[,PART...]; PART: $PARTS" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} IBMD_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${IBMD_FAST_FASHION_MNIST:-}" ] && [ -d .carry/fashion-mnist ]; then
  export IBMD_FAST_FASHION_MNIST=$PWD/.carry/fashion-mnist
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import ibmd_fast.ops as o; print('backend', o.backend())" | tee -a "$OUT/gpu.txt"
machine=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.replace(' ', '-'))")
status=0

# the ladder parts start from the committed distill-<gpu>.json (bench_distill merges sizes into it)
if [ -f "benchmarks/results/distill-$machine.json" ] && [ ! -f "$OUT/distill-$machine.json" ]; then
  cp "benchmarks/results/distill-$machine.json" "$OUT/"
fi
distill=(python3 benchmarks/bench_distill.py --device cuda --machine "$machine" --out "$OUT/distill-$machine.json")
# Several parts in one call (tests,default,ladder): each part's time limit can be set from outside,
# T_<part>=seconds, so that the whole fits one call
for what in ${parts//,/ }; do
t0=$(date +%s)
echo "== part $what"
case "$what" in
default)
  # the README's main command as a user runs it, on CUDA (the embedded default, 200 generator steps),
  # then sample, eval and export on its output; the whole transcript is the log
  log="$OUT/default-cuda-$machine.log"
  rm -rf runs/distill runs/sample runs/eval
  ( set -e
    run() { echo "\$ ibmd-fast $*"; timeout "${T_default:-400}" python3 -m ibmd_fast "$@"; }
    run distill --device cuda --steps 200
    run sample --device cuda
    run eval --device cuda
    run export --onnx
  ) > "$log" 2>&1
  rc=$?
  tail -40 "$log"
  [ -f runs/distill/comparison.png ] && cp runs/distill/comparison.png "$OUT/default-comparison-cuda-$machine.png"
  [ -f runs/eval/eval.json ] && cp runs/eval/eval.json "$OUT/default-eval-cuda-$machine.json"
  [ $rc = 0 ] || status=$rc
  ;;
tests)
  # every CUDA case of the suite: the ops (numerics, gradients, opcheck, compile, noise, layouts, bad
  # inputs, graph capture), the trainers in bf16/fp16 with channels_last, the device-side optimizer
  # guard, bf16+compile training to the fp32 loss curve, the paper table's stages
  timeout "${T_tests:-480}" python3 -m pytest tests/test_ops.py tests/test_fast_step.py tests/test_restore.py \
    tests/test_faults.py tests/test_train.py tests/test_benchmarks.py -q -rs -p no:cacheprovider --durations=15 \
    -k "not cmake and (cuda or test_ops)" 2>&1 | tee "$OUT/tests-cuda-$machine.log" | tail -30
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  ;;
ladder)
  # small U-Net, 64 px, batch 64: rungs 1-7, one process each
  timeout "${T_ladder:-520}" "${distill[@]}" --size small --timeout 150 ${LADDER_ARGS:-} 2>&1 | grep -v Warning \
    | tee "$OUT/bench_distill-small.log"
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  ;;
adm256)
  # ADM-256 at 256 px, batch 8, GPU memory capped at an 80 GB card's: rung 1 alone first; if it does not
  # fit, the ladder runs with activation checkpointing. Rung 7 (CUDA graphs) is left out here: graph
  # pools of three 552M-parameter networks do not fit beside them in 80 GB.
  timeout 120 python3 benchmarks/bench_distill.py --device cuda --machine "$machine" --size adm256 --rungs 1 \
    --steps 1 --warmup 1 --memory-cap-gb 80 --timeout 110 --out "$OUT/adm256-probe.json" 2>&1 | tail -4
  flag=""
  python3 -c "import json,sys; r=json.load(open('$OUT/adm256-probe.json'))['sizes']['adm256']['rows'][0]; \
sys.exit(0 if 'it_per_s' in r else 1)" 2>/dev/null || flag="--checkpoint-activations"
  echo "adm256: batch 8 ${flag:-without activation checkpointing}"
  timeout "${T_adm256:-380}" "${distill[@]}" --size adm256 --rungs ${ADM_RUNGS:-1,2,3,4,5,6} --steps 3 --warmup 2 \
    --memory-cap-gb 80 --timeout 120 $flag 2>&1 | grep -v Warning | tee "$OUT/bench_distill-adm256.log"
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  ;;
ops)
  timeout 420 python3 benchmarks/bench_ops.py --device cuda --dtypes float32,bfloat16,float16 --machine "$machine" \
    --out "$OUT/ops-$machine.json" 2>&1 | grep -v Warning | tee "$OUT/bench_ops.log"
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  ;;
inference)
  # teacher NFE 100 and 10, 1-NFE student; eager, torch.compile, CUDA-graph replay; batch 1 and 16
  timeout 480 python3 benchmarks/bench_inference.py --device cuda --machine "$machine" --synthetic --size 64 \
    --modes eager,compile,graph --out-dir "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench_inference.log" | tail -30
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  ;;
paper)
  timeout 520 python3 benchmarks/paper_table.py --scale gpu --device cuda --machine "$machine" \
    --out-dir "$OUT" 2>&1 | tee "$OUT/paper_table.log" | tail -40
  rc=${PIPESTATUS[0]}; [ $rc = 0 ] || status=$rc
  # the run folders stay in runs/paper_table/gpu (git-ignored, kept on a warm machine): a call cut
  # short by its time limit resumes there, stage by stage, when this part runs again
  ;;
esac
echo "== part $what: $(( $(date +%s) - t0 )) s, status so far $status"
done
exit $status
