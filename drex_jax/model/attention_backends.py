"""Decode-attention backends over the paged KV pool: a small registry.

Each backend builds the `attend(q, k, v, k_pool, v_pool, layer)` function the layer loop calls
for rows attending through their block tables, and says how it behaves: how this step's K/V reach
the pool, whether it takes several query positions per row, whether its cost follows each row's
length (then one block-table width serves every batch) and where it can run. A new backend is one
builder plus one entry in `BACKENDS`. All give the same tokens (tests compare them).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from drex_jax.model.ops import attention as attention_fn


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """name: what `Engine(attention=...)` takes.
    build(cfg, block_tables [B, P], positions [B, T], page_size) -> attend.
    writes: how the layer loop hands this step's K/V to the pool ("per_layer": a scatter before
      `attend` reads them; "attend": `attend` writes them and returns (out, k_pool, v_pool)).
    multi_query: takes T > 1 query positions per row (else such calls use the "xla" backend).
    fixed_table_width: cost follows each row's length, not the block-table width, so the engine
      compiles one width (the longest sequence's) instead of a power-of-two bucket per batch.
    unavailable(platform, dtype, mesh, cfg, page_size) -> why it cannot run there, or None (cfg and
      page_size may be None: then only the platform, dtype and mesh are judged)."""

    name: str
    build: Callable
    writes: str = "per_layer"
    multi_query: bool = True
    fixed_table_width: bool = False
    unavailable: Callable = lambda platform, dtype, mesh, cfg, page_size: None


def _xla(cfg, block_tables, positions, page_size):
    """Gather every row's pages into a dense [B, S, kv, D] copy (any backend, any dtype)."""
    B, P = block_tables.shape
    S = P * page_size
    valid = positions >= 0
    mask = (jnp.arange(S)[None, None, :] <= jnp.maximum(positions, 0)[:, :, None]) & valid[:, :, None]  # [B, T, S]

    def gather(pool_kv, layer):  # [L, kv, N, ps, D] -> [B, S, kv, D]
        g = pool_kv[layer][:, block_tables]  # [kv, B, P, ps, D]
        return g.reshape(cfg.num_kv_heads, B, S, cfg.head_dim).transpose(1, 2, 0, 3)

    def attend(q, k, v, k_pool, v_pool, layer):
        return attention_fn(cfg, q, gather(k_pool, layer), gather(v_pool, layer), mask)
    return attend


def _ffi(cfg, block_tables, positions, page_size):
    """Stream each live page once through the C++ kernel (CPU, fp32; `kernels.ffi`); the kernel also
    writes this step's K/V."""
    from drex_jax.model.kernels.ffi import paged_attention

    B, T = positions.shape

    def attend(q, k, v, k_pool, v_pool, layer):
        out, k_pool, v_pool = paged_attention(q, k_pool, v_pool, k, v, block_tables, positions, layer)
        return out.reshape(B, T, -1).astype(q.dtype), k_pool, v_pool
    return attend


def _pallas(cfg, block_tables, positions, page_size, *, interpret: bool = False):
    """A Pallas kernel that reads the pool in place (`kernels.pallas`; one query token per row):
    compiled through Triton on a GPU, or run by Pallas' interpreter (`pallas_interpret`, any platform)."""
    from drex_jax.model.kernels.pallas import paged_attention_pallas

    def attend(q, k, v, k_pool, v_pool, layer):
        return paged_attention_pallas(q, k_pool, v_pool, block_tables, positions, layer=layer, interpret=interpret)
    return attend


def _one_device(mesh):
    return "it runs on one device; with a mesh use 'xla' or 'auto'" if mesh is not None else None


def _pallas_unavailable(platform, dtype, mesh, cfg, page_size):
    from drex_jax.model.kernels.pallas import unsupported

    if platform != "gpu":
        return f"it is compiled for a GPU and this process runs on {platform}: use 'pallas_interpret'"
    if cfg is not None and page_size is not None and unsupported(cfg.head_dim, page_size):
        return unsupported(cfg.head_dim, page_size)
    return _one_device(mesh)


def _ffi_unavailable(platform, dtype, mesh, cfg, page_size):
    if mesh is not None:
        return "it runs on one device; with a mesh use 'xla' or 'auto'"
    if platform != "cpu" or dtype != jnp.float32:
        return f"it is the CPU kernel for float32; this engine runs {platform} {jnp.dtype(dtype).name}: use 'auto'"
    from drex_jax.model.kernels import ffi

    return None if ffi.available() else "the CPU kernel could not be built (see the notice above)"


BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("xla", _xla),
    AttentionBackend("ffi", _ffi, writes="attend", fixed_table_width=True, unavailable=_ffi_unavailable),
    AttentionBackend("pallas", _pallas, multi_query=False, fixed_table_width=True, unavailable=_pallas_unavailable),
    AttentionBackend("pallas_interpret", functools.partial(_pallas, interpret=True), multi_query=False,
                     fixed_table_width=True,
                     unavailable=lambda platform, dtype, mesh, cfg, page_size: _one_device(mesh)),
)}
ATTENTION = tuple(BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    return BACKENDS[name]


def resolve_attention(attention: str, dtype, mesh=None, cfg=None, page_size: int | None = None,
                      platform: str | None = None) -> str:
    """The backend for `Engine(attention=...)`: "auto" takes the Pallas kernel on a GPU, the C++ FFI
    kernel on a CPU (fp32, one device) where it builds, else "xla" (the kernels have no
    partitioning rule, so a mesh runs the XLA path, which GSPMD partitions). A preferred kernel
    that cannot take this model (say a head_dim Triton cannot tile) falls back with a one-line
    notice. "pallas" off a GPU runs the same kernel in Pallas' interpreter ("pallas_interpret")."""
    if attention not in ATTENTION + ("auto",):
        raise ValueError(f"attention must be one of {('auto',) + ATTENTION}, got {attention!r}")
    platform = platform or jax.default_backend()
    if attention == "auto":
        preferred = {"gpu": ("pallas", "xla"), "cpu": ("ffi", "xla")}.get(platform, ("xla",))
        if mesh is not None:
            preferred = ("xla",)
        for name in preferred:
            why = BACKENDS[name].unavailable(platform, dtype, mesh, cfg, page_size)
            if why is None:
                return name
            if name == "pallas":  # the GPU's kernel refusing this model is news; ffi's notice is its own
                print(f"drex_jax: attention 'auto' takes 'xla': the Pallas kernel cannot run here ({why})",
                      file=sys.stderr)
    if attention == "pallas" and platform != "gpu":
        attention = "pallas_interpret"
    why = BACKENDS[attention].unavailable(platform, dtype, mesh, cfg, page_size)
    if why is not None:
        raise ValueError(f"attention={attention!r} cannot run here: {why}")
    return attention
