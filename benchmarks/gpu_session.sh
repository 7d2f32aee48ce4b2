#!/usr/bin/env bash
# The GPU check of issues 10 and 11 as one call on a lent GPU machine (the
# machine has torch, JAX, pytest and Triton, no TensorFlow, no network):
#
#   bash benchmarks/gpu_session.sh
#
# Wheels of what the machine lacks (keras, namex, optree, keras-hub,
# liger-kernel; not kagglehub, which keras-hub imports only when present
# and which fails there without kagglesdk) are installed from .whl/ when
# that folder exists. Logs and markdown fragments go to $OUT (default /tmp/gpu_out).
# QUICK=1 makes every step a smoke run and NO_WHEELS=1 skips the wheels
# (for rehearsing on a CPU with PY=.venv/bin/python).
# Order: the benchmarks first, on a quiet machine; then the torch and JAX
# suites side by side; then the CausalLMDistiller step.
set -u
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT/results"
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quick=${QUICK:+--quick}
log="$OUT/bench.log"

step() {  # step SECONDS COMMAND...: run with a limit, log its status
  local limit=$1
  shift
  echo "=== $* (limit ${limit}s) $(date +%T)" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "=== rc=$? $(date +%T)" >>"$log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv || true
  $PY -c "import torch, jax, keras; print('torch', torch.__version__,
'jax', jax.__version__, 'keras', keras.__version__, jax.devices())"
} >>"$log" 2>&1

step "${BENCH_TORCH_S:-120}" env KERAS_BACKEND=torch \
  $PY -m benchmarks.bench_gpu $quick --results-dir "$OUT/results"
step "${BENCH_JAX_S:-150}" env KERAS_BACKEND=jax \
  $PY -m benchmarks.bench_gpu $quick --results-dir "$OUT/results"

# The suites: every test's outcome on its own line (-v), so a run cut at
# its limit still says what passed; JAX must not take 75% of the GPU in
# each worker.
suite() {  # suite BACKEND WORKERS
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  env KERAS_BACKEND="$1" XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "${SUITE_S:-160}" $PY -m pytest -v -n "$2" -p no:cacheprovider \
    "${extra[@]}" ${SUITE_ARGS:-} >"$OUT/test_$1.log" 2>&1
  echo "=== rc=$?" >>"$OUT/test_$1.log"
}
suite torch "${WORKERS:-6}" &
suite jax "${WORKERS:-8}" &
wait

lm_args=(--vocab 32000 --length 512 --batch 8 --teacher 6x768
  --student 2x384 --dtype-policy mixed_bfloat16 --repeats 10)
[ -n "$quick" ] && lm_args=(--quick)
step "${LM_TORCH_S:-50}" env KERAS_BACKEND=torch \
  $PY -m benchmarks.bench_causal_lm "${lm_args[@]}" --results-dir "$OUT/results"
step "${LM_JAX_S:-70}" env KERAS_BACKEND=jax \
  $PY -m benchmarks.bench_causal_lm "${lm_args[@]}" --results-dir "$OUT/results"
grep -h -E "passed|failed|=== rc" "$OUT"/test_*.log | tail -6
tail -5 "$log"
