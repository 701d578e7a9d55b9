#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command, for a machine that has one (CI never does):
#   bash scripts/gpu.sh [RESULTS_DIR [ARCHIVE]]     RESULTS_DIR: default benchmarks/out/gpu
# builds the package with its CUDA extension, runs the test files that have GPU tests (they skip without a GPU and
# run for real here), and runs the three benchmarks on the GPU, the DGR one first and in full, the others with
# --quick (QUICK lists the benchmarks that run so; default "adatask step"), then the paper's non-linear dummy heads
# (bench_dgr --module-heads mlp,deeplab: DeepLab heads at the DGR authors' NYUv2 shape). Each phase writes a log to
# RESULTS_DIR and prints its tail; the benchmarks write their CSV files and plots to RESULTS_DIR; ARCHIVE (a .tar.gz
# path), when given, receives the whole folder as one file.
#
# It uses the Python that already has torch with CUDA (PYTHON, default python3) and installs nothing but the package
# itself (no network needed). Each phase has a time limit in seconds (PHASE_LIMITS, in the order of the phases env,
# build, tests, dgr, adatask, step, heads; default "30 160 150 100 50 50 50", 9 minutes 50 s in all), so that a hang
# or a slow benchmark still leaves the others' results (a benchmark stopped at its limit loses its own table: it
# prints it at the end); the exit status is the first failing phase's. PHASES chooses phases (default: all seven,
# in order).
# DGR_FAST_CHECK_DEVICE=cpu runs the same steps on a machine without a GPU (the GPU tests skip, every benchmark runs
# --quick on the CPU): a check of this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/out/gpu}
ARCHIVE=${2:-}
PY=${PYTHON:-python3}
DEVICE=${DGR_FAST_CHECK_DEVICE:-cuda}
read -r LIMIT_ENV LIMIT_BUILD LIMIT_TESTS LIMIT_DGR LIMIT_ADATASK LIMIT_STEP LIMIT_HEADS \
  <<<"${PHASE_LIMITS:-30 160 150 100 50 50 50}"
PHASES=${PHASES:-env build tests dgr adatask step heads}
QUICK=${QUICK:-adatask step}
[ "$DEVICE" = cuda ] || QUICK="dgr adatask step"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}

status=0
phase() {  # phase NAME LIMIT COMMAND: run COMMAND (a function and its arguments) under the limit, log, print the tail
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  # timeout runs programs, not shell functions: the phase runs in a child bash that has them exported
  timeout "$limit" bash -c "$*" >"$RESULTS/$name.log" 2>&1
  rc=$?
  tail -n 30 "$RESULTS/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

env_report() {
  if [ "$DEVICE" = cuda ]; then nvidia-smi || return; fi
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
EOF
}

build() {
  # --no-build-isolation: against this machine's torch; the CUDA extension is built where torch has CUDA.
  "$PY" -m pip install --no-deps --no-build-isolation -e . || return
  "$PY" -c "import dgr_fast; s = dgr_fast.available_backends(); [print(k, v) for k, v in s.items()]"
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import dgr_fast; s = dgr_fast.available_backends(); bad = [k for k in ('cuda', 'triton') if not s[k].available]; raise SystemExit(f'unavailable here: {bad}' if bad else 0)"
  fi
}

tests() {
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_dgr_cuda.py tests/test_dgr_triton.py tests/test_dgr_penalty.py \
    tests/test_adatask.py tests/test_aggregators.py || return
  # torch.compile and torch.func on the GPU backends (CUDA tensors there); the CPU cases ran in CI already
  "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_compile_func.py -k "cuda or triton"
}

bench() {  # bench NAME: benchmarks/bench_NAME.py on DEVICE, --quick where QUICK names it
  local quick=()
  case " $QUICK " in *" $1 "*) quick=(--quick) ;; esac
  "$PY" "benchmarks/bench_$1.py" --device "$DEVICE" --out "$RESULTS" "${quick[@]}"
}

bench_heads() {  # the paper's dummy heads: MLP heads, DeepLab heads at the authors' shape and a small stand-in
  local quick=()
  [ "$DEVICE" = cuda ] || quick=(--quick)
  "$PY" benchmarks/bench_dgr.py --device "$DEVICE" --out "$RESULTS" --module-heads mlp,deeplab --min-time 1 \
    "${quick[@]}"
}

export RESULTS PY DEVICE QUICK
export -f env_report build tests bench bench_heads
for name in $PHASES; do
  case $name in
    env) phase env "$LIMIT_ENV" env_report ;;
    build) phase build "$LIMIT_BUILD" build ;;
    tests) phase tests "$LIMIT_TESTS" tests ;;
    dgr) phase bench-dgr "$LIMIT_DGR" bench dgr ;;
    adatask) phase bench-adatask "$LIMIT_ADATASK" bench adatask ;;
    step) phase bench-step "$LIMIT_STEP" bench step ;;
    heads) phase bench-heads "${LIMIT_HEADS:-50}" bench_heads ;;
    *) echo "unknown phase '$name' (PHASES takes env build tests dgr adatask step heads)" >&2; exit 2 ;;
  esac
done
if [ -n "$ARCHIVE" ]; then
  tar -czf "$ARCHIVE" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "== wrote $ARCHIVE"
fi
exit "$status"
