#!/usr/bin/env bash
# One GPU session, everything under $OUT: the CUDA tests, then bench/throughput.py at seq 2048 in bf16
# (eager, then compiled), smollm_ref against transformers. Each step has its own time limit, so a slow
# compile costs only its own figures; the JSON is written after every task.
#   OUT=/tmp/gpu bash bench/gpu_run.sh          (from the repository root)
set -u
OUT=${OUT:-bench/results/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.
export TOKENIZERS_PARALLELISM=false
BATCH=${BATCH:-8}
SEQ=${SEQ:-2048}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-smollm2-135m}
EXTRA=${EXTRA:-}
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/log.txt"; }

log "start"
{ nvidia-smi; python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"; python -c "import pytest, tqdm; print('pytest', pytest.__version__)"; } > "$OUT/env.txt" 2>&1
log "env: $(tail -1 "$OUT/env.txt")"

timeout "${T_TESTS:-45}" python -m pytest -q -p no:cacheprovider -ra tests/test_fast.py -m "cuda" > "$OUT/pytest_cuda.txt" 2>&1
log "cuda tests rc=$? $(tail -1 "$OUT/pytest_cuda.txt")"

bench() {  # name, time limit, then throughput.py options
  local name=$1 limit=$2; shift 2
  timeout "$limit" python bench/throughput.py --device "$DEVICE" --config "$CONFIG" --batch-size "$BATCH" --seq-len "$SEQ" \
    --json "$OUT/$name.json" $EXTRA "$@" > "$OUT/$name.txt" 2>&1
  log "$name rc=$?"
}
# Most important first: training throughput and MFU, eager then compiled; then decoding.
bench train_bf16 "${T_EAGER:-80}" --modes bf16 --tasks train,forward,memory --repeats 5
bench train_bf16_compiled "${T_COMPILED:-150}" --modes bf16-compiled --tasks train,forward --repeats 5
bench decode_bf16 "${T_DECODE:-65}" --modes bf16 --tasks decode --repeats 3
bench decode_bf16_compiled "${T_DECODE_C:-60}" --modes bf16-compiled --tasks decode --decode-batch-sizes 1 --repeats 3
log "done"
