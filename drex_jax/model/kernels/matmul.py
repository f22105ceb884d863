"""The weight-left projection `w [M, K] @ x [K, N]` through the C++ kernel in `matmul.cc` (XLA:CPU, f32).

The kernel streams each weight row from memory once per call whatever the number of columns N
(the step's tokens), so its cost stays flat in N while reading the weights bounds it, where
XLA:CPU's dot costs ~1.5x a matrix-vector product from N = 2 (`benchmarks/gemm_shapes.py` measures
both per shape). Built on first use like the attention kernel (`kernels.ffi`); where that fails,
`available()` is False with a one-line notice and XLA's dot is used.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "drex_matmul"
SOURCE = os.path.join(os.path.dirname(__file__), "matmul.cc")
PANEL = 32  # rows per packed panel (matmul.cc: kPanel)
# panels per thread-pool task: 2 (64 rows) lets several threads share even SmolLM2's 576-row
# projections while a task's dispatch stays noise next to its 74+ KB weight read
PANELS_PER_TASK = 2


def available(verbose: bool = True) -> bool:
    """Build, load and register the projection kernel (`kernels.ffi.load`: once per process; False
    with a one-line notice where that is impossible, `DREX_JAX_NO_FFI=1` included)."""
    from drex_jax.model.kernels import ffi

    return ffi.load(SOURCE, "DrexMatmul", TARGET, "CPU projection kernel", "XLA's dot", verbose)


MATMULS = ("auto", "kernel", "xla")


# Without AVX-512 the kernel holds 32 rows x 3 columns in AVX2's 16 registers: on an AVX2-only AMD
# EPYC (2026-12-07, `benchmarks/matmul_engine.py`) decode ran 1.13x / 1.16x / 1.31x XLA's dot at
# batch 1 / 4 / 8 and 0.84x at batch 32, so "auto" takes it there only for engines of at most
# this many slots
AVX2_MAX_SLOTS = 8


def _cpu_has(*flags: bytes) -> bool:
    """Whether Linux's /proc/cpuinfo lists every one of `flags` (`ffi.cpu_flags`; False where it cannot be read)."""
    from drex_jax.model.kernels import ffi

    return set(flags) <= set(ffi.cpu_flags().split())


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (the `avx512f` flag)."""
    return _cpu_has(b"avx512f")


def has_avx2() -> bool:
    """Whether this CPU has AVX2 and FMA: what the kernel's 8-lane path was measured on."""
    return _cpu_has(b"avx2", b"fma")


def unsupported(cfg) -> str | None:
    """Why `cfg`'s projections cannot take the packed layout (None when they can): every
    projection's output rows must fill whole 32-row panels."""
    rows = {"q": cfg.num_heads * cfg.head_dim, "k/v": cfg.num_kv_heads * cfg.head_dim,
            "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size}
    bad = {k: v for k, v in rows.items() if v % PANEL}
    return None if not bad else f"projection rows {bad} are not multiples of {PANEL}"


def resolve_matmul(matmul: str, dtype, mesh, cfg, platform: str | None = None, max_slots: int | None = None) -> str:
    """The projection path an engine runs: "kernel" (this module, packed weights) or "xla" (XLA's
    dot). "auto" takes the kernel where it can run and pays: f32 on one CPU, a config whose
    projections fill 32-row panels, the kernel built, and either AVX-512 (`has_avx512`) or AVX2
    (`has_avx2`) with at most AVX2_MAX_SLOTS slots (`max_slots`; None = unknown, taken as more). Naming
    "kernel" where it cannot run raises ValueError saying why."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "xla":
        return "xla"
    platform = platform or jax.default_backend()
    why = ("it runs on the CPU only" if platform != "cpu" else
           f"it computes in float32, the engine's dtype is {jnp.dtype(dtype).name}" if jnp.dtype(dtype) != jnp.float32
           else "it runs on one device, not a mesh" if mesh is not None else unsupported(cfg))
    if why is None and not available(verbose=matmul == "kernel"):
        why = "it could not be built (see the notice above)"
    if why is None and matmul == "auto" and not has_avx512():
        if not has_avx2():  # never measured without AVX2 + FMA
            _notice_once("drex_jax: this CPU has neither AVX-512 nor AVX2 + FMA; the projections take XLA's dot")
            return "xla"
        if max_slots is None or max_slots > AVX2_MAX_SLOTS:
            # it runs (and gives XLA's tokens), but XLA's GEMM is faster from ~16 columns on AVX2
            _notice_once(f"drex_jax: this CPU has no AVX-512, where the CPU projection kernel pays only up to "
                         f"{AVX2_MAX_SLOTS} slots (this engine has {max_slots or 'more'}); the projections take "
                         "XLA's dot")
            return "xla"
    if why is None:
        return "kernel"
    if matmul == "kernel":
        raise ValueError(f"matmul='kernel' is not possible here: {why}; use matmul='xla' or 'auto'")
    return "xla"


_NOTICES: set[str] = set()


def _notice_once(msg: str) -> None:
    import sys

    if msg not in _NOTICES:
        _NOTICES.add(msg)
        print(msg, file=sys.stderr)


def pack(w) -> np.ndarray:
    """w [M, K] -> packed [ceil(M / 32), K, 32] f32, packed[p, k, i] = w[32 p + i, k] (zero rows
    past M): each 32-row panel one contiguous stream for the kernel. Done once, at load time."""
    w = np.asarray(w, dtype=np.float32)
    M, K = w.shape
    P = -(-M // PANEL)
    padded = np.zeros((P * PANEL, K), np.float32)
    padded[:M] = w
    return np.ascontiguousarray(padded.reshape(P, PANEL, K).transpose(0, 2, 1))


def unpack(packed, rows: int) -> np.ndarray:
    """Inverse of `pack`: packed [P, K, 32] -> w [rows, K]."""
    packed = np.asarray(packed)
    P, K, _ = packed.shape
    return np.ascontiguousarray(packed.transpose(0, 2, 1).reshape(P * PANEL, K)[:rows])


def matmul(packed: jax.Array, x: jax.Array, rows: int, panels_per_task: int = PANELS_PER_TASK) -> jax.Array:
    """packed (`pack(w)`, w [rows, K]) and x [K, N] -> w @ x [rows, N] f32 by the kernel
    (`available()` must be True)."""
    if packed.ndim != 3 or packed.shape[2] != PANEL or x.ndim != 2 or packed.shape[1] != x.shape[0]:
        raise ValueError(f"matmul: expected packed [P, K, {PANEL}] and x [K, N], got {packed.shape} and {x.shape}")
    if not (packed.shape[0] - 1) * PANEL < rows <= packed.shape[0] * PANEL:
        raise ValueError(f"matmul: rows={rows} does not fit {packed.shape[0]} panels of {PANEL}")
    if not available():  # registers the target the first time a program traces it
        raise RuntimeError("the CPU projection kernel is not available (see the notice above); unpack the weights "
                           "(params.decode_layout) to run XLA's dot")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, x.shape[1]), jnp.float32))
    return call(packed.astype(jnp.float32), x.astype(jnp.float32), panels_per_task=np.int64(panels_per_task))
