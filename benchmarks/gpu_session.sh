#!/usr/bin/env bash
# The GPU check as one call on a lent GPU machine (torch, JAX, pytest and
# Triton there; no TensorFlow, no network):
#
#   bash benchmarks/gpu_session.sh
#
# 1. `benchmarks.bench_gpu` on torch, then on JAX, on a quiet machine;
# 2. the test folders of SUITE_PATHS (default: tests/ops tests/lm
#    tests/distillers; SUITE_PATHS=tests for everything) on torch and JAX
#    side by side;
# 3. `benchmarks.bench_causal_lm` at a GPU size on torch, then on JAX;
# 4. with ON_POLICY=1 only, `benchmarks.bench_on_policy` at a GPU size on
#    torch, then on JAX.
#
# Every step has a time limit, and the limits add up to 7 minutes (setup
# aside), so that the whole call fits the 8 minutes it is given. On torch
# the benchmarks run compiled (torch.compile is on by default on CUDA):
# the first call of each configuration compiles, inside its warm-up.
#
# Wheels of what the machine lacks (keras, namex, optree, keras-hub,
# liger-kernel; not kagglehub, which keras-hub imports only when present
# and which fails there without kagglesdk) are installed from .whl/ when
# that folder exists. Logs and markdown fragments go to $OUT (default
# /tmp/gpu_out); the fragments are bench_gpu's, bench_causal_lm's and
# bench_on_policy's `<name>_<backend>.md`.
#
# Rehearsal on a CPU: QUICK=1 makes every benchmark a smoke run and only
# collects the tests; NO_WHEELS=1 skips the wheels:
#
#   QUICK=1 NO_WHEELS=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh
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
# A smoke run on a CPU is slower than the real run on a GPU.
[ -n "$quick" ] && slack=600 || slack=
log="$OUT/bench.log"
: >"$log"

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

for backend in torch jax; do
  limit_var=BENCH_${backend^^}_S
  default=$([ "$backend" = torch ] && echo 130 || echo 100)
  step "${!limit_var:-${slack:-$default}}" env KERAS_BACKEND=$backend \
    $PY -m benchmarks.bench_gpu $quick ${quick:---chunks 0,512 --repeats 10} \
    --results-dir "$OUT/results"
done

# Every test's outcome on its own line (-v), so that a run cut at its
# limit still says what passed; JAX must not take 75% of the GPU in each
# worker. QUICK=1 only collects (on a CPU the suites would take long).
suite() {  # suite BACKEND WORKERS
  local extra=() paths=()
  for path in ${SUITE_PATHS:-tests/ops tests/lm tests/distillers}; do
    [ -e "$path" ] && paths+=("$path")
  done
  if [ -n "$quick" ]; then
    extra+=(--collect-only -q)
  else
    extra+=(-v -n "$2")
    $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  fi
  env KERAS_BACKEND="$1" XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout "${SUITE_S:-${slack:-100}}" $PY -m pytest -p no:cacheprovider \
    "${extra[@]}" ${SUITE_ARGS:-} "${paths[@]}" >"$OUT/test_$1.log" 2>&1
  echo "=== rc=$?" >>"$OUT/test_$1.log"
}
suite torch "${WORKERS:-6}" &
suite jax "${WORKERS:-8}" &
wait

lm_args=(--vocab 32000 --length 512 --batch 8 --teacher 6x768
  --student 2x384 --dtype-policy mixed_bfloat16 --repeats 10)
[ -n "$quick" ] && lm_args=(--quick)
step "${LM_TORCH_S:-${slack:-50}}" env KERAS_BACKEND=torch \
  $PY -m benchmarks.bench_causal_lm "${lm_args[@]}" --results-dir "$OUT/results"
step "${LM_JAX_S:-${slack:-40}}" env KERAS_BACKEND=jax \
  $PY -m benchmarks.bench_causal_lm "${lm_args[@]}" --results-dir "$OUT/results"
if [ -n "${ON_POLICY:-}" ]; then
  op_args=(--vocab 32000 --prompt 128 --new-tokens 128 --batch 16
    --teacher 6x768 --student 2x384 --repeats 5)
  [ -n "$quick" ] && op_args=(--quick)
  step "${OP_TORCH_S:-${slack:-45}}" env KERAS_BACKEND=torch \
    $PY -m benchmarks.bench_on_policy "${op_args[@]}" --results-dir "$OUT/results"
  step "${OP_JAX_S:-${slack:-45}}" env KERAS_BACKEND=jax \
    $PY -m benchmarks.bench_on_policy "${op_args[@]}" --results-dir "$OUT/results"
fi
grep -h -E "^=+ .*(passed|failed|error)|collected in|^=== rc" "$OUT"/test_*.log | tail -6
grep -E "^=== " "$log" | tail -8
