"""The C++ paged-attention kernel for XLA:CPU (`paged_attention.cc`), built on first use.

The shared library is compiled with the system C++ compiler against the XLA FFI headers that
ship with jaxlib, into `$DREX_JAX_CACHE/kernels` (default `~/.cache/drex_jax/kernels`), keyed
by a hash of the source, the jaxlib version and the compiler; later processes load it from
there. Where no compiler exists or the build fails, `available()` is False, one line says why,
and the engine keeps the XLA attention path. `build` and `load` serve the projection kernel
(`matmul.cc`) the same way.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "drex_paged_attention"
SOURCE = os.path.join(os.path.dirname(__file__), "paged_attention.cc")
# Reassociation lets the compiler vectorize the dot products. Not -ffast-math: linking with it
# pulls in crtfastmath, which switches the whole process to flush-denormals-to-zero on load.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-std=c++17", "-shared", "-fPIC")


@functools.cache
def cpu_flags() -> bytes:
    """The `flags` line of Linux's /proc/cpuinfo (b"" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def _cpu_key() -> bytes:
    """-march=native code runs only on this kind of CPU: key the cached library by it."""
    import platform

    return platform.machine().encode() + cpu_flags()


def cache_dir() -> str:
    root = os.environ.get("DREX_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "drex_jax"))
    return os.path.join(root, "kernels")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


KERNELS = os.path.dirname(os.path.abspath(__file__))  # the kernels' shared headers (parallel_for.h), on -I


def _sources(source: str) -> bytes:
    """The kernel's text and the shared headers it may include."""
    parts = [source] + sorted(os.path.join(KERNELS, n) for n in os.listdir(KERNELS) if n.endswith(".h"))
    out = b""
    for path in parts:
        with open(path, "rb") as f:
            out += f.read() + b"\0"
    return out


def library_path(cxx: str, source: str = SOURCE, defines: tuple[str, ...] = ()) -> str:
    import jaxlib

    key = hashlib.sha256(_sources(source) + jaxlib.__version__.encode() + cxx.encode() + " ".join(FLAGS).encode()
                         + _cpu_key() + "\0".join(defines).encode())
    name = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(cache_dir(), f"{name}-{key.hexdigest()[:16]}.so")


def build(verbose: bool = True, source: str = SOURCE, what: str = "CPU paged-attention kernel",
          defines: tuple[str, ...] = ()) -> str:
    """Compile the kernel in `source` (if not cached; `defines`: preprocessor macros) and return the
    library path. Raises RuntimeError."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    path = library_path(cxx, source, defines)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if verbose:
        print(f"drex_jax: building the {what} with {cxx} -> {path}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        out = os.path.join(tmp, "lib.so")  # build aside, then rename: concurrent builders never see half a file
        cmd = [cxx, *FLAGS, *(f"-D{d}" for d in defines), "-I", jax.ffi.include_dir(), "-I", KERNELS, source,
               "-o", out]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the {what} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(out, path)
    return path


_LOADED: dict[str, bool] = {}  # FFI target -> whether it was built and registered (once per process)


def load(source: str, symbol: str, target: str, what: str, fallback: str, verbose: bool = True,
         defines: tuple[str, ...] = ()) -> bool:
    """Build the kernel in `source` (if not cached), load it and register its handler `symbol` as
    the XLA:CPU FFI target `target`, once per process; False, with a one-line notice naming
    `fallback`, where that is impossible. `DREX_JAX_NO_FFI=1` disables every kernel."""
    if os.environ.get("DREX_JAX_NO_FFI"):
        return False
    if target not in _LOADED:
        try:
            lib = ctypes.cdll.LoadLibrary(build(verbose, source, what, defines))
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _LOADED[target] = True
        except (RuntimeError, OSError) as e:
            first = str(e).splitlines()[0]
            print(f"drex_jax: {what} unavailable ({first}); using {fallback}", file=sys.stderr)
            _LOADED[target] = False
    return _LOADED[target]


def available(verbose: bool = True) -> bool:
    """Build, load and register the paged-attention kernel (`load`)."""
    return load(SOURCE, "DrexPagedAttention", TARGET, "CPU paged-attention kernel", "the XLA attention path", verbose)


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, k_new: jax.Array, v_new: jax.Array,
                    block_tables: jax.Array, positions: jax.Array, layer: int) -> jax.Array:
    """q [B, T, nh, D] f32; pools [L, kv, N, ps, D] f32; k_new, v_new [B, T, kv, D]: the rows' new
    tokens, not yet written to the pool; block_tables [B, P]; positions [B, T] (-1 = padding),
    consecutive per row -> [B, T, nh, D]. A query attends to its row's cached positions (below
    positions[b, 0], read from the pool's layer `layer`) and to its row's new tokens up to its own
    position. Returns (out, k_pool, v_pool): the pools with the new tokens written into layer
    `layer` (aliased to the inputs: with a donated pool nothing is copied)."""
    if not available():
        raise RuntimeError("the CPU paged-attention kernel is not available (see the notice above)")
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    pool = jax.ShapeDtypeStruct(k_pool.shape, jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(q.shape, jnp.float32), pool, pool),
                            input_output_aliases={1: 1, 2: 2})
    return call(q.astype(jnp.float32), k_pool, v_pool, k_new.astype(jnp.float32), v_new.astype(jnp.float32),
                block_tables.astype(jnp.int32),
                positions.astype(jnp.int32), layer=np.int64(layer), scale=scale)
