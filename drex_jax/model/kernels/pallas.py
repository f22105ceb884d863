"""Decode attention on a GPU: a Pallas (Triton) kernel that reads the paged KV pool in place.

The kernel is handed the whole pool [layers, kv, pages, page_size, D] and the layer as a static
index its block spec points at, so the compiled program passes the pool's own buffer to the
kernel. (Slicing `pool[layer]` outside the kernel, as the call into jax's bundled kernel did, made
XLA copy that layer before every call: one layer-sized copy per layer per decode step.)

Grid (rows, kv heads, splits of the block table): each program runs an online softmax over its
split's pages up to the row's length, so the cost follows each row's length, not the table width;
the splits are merged outside. One query token per row; the query heads of one KV head are padded
to a power of two >= 16 rows (Triton's blocks are powers of two, its smallest dot 16). `interpret=True` runs the same kernel on a CPU (correctness
only, ~10x slower than the XLA path); it is a required argument, never inferred from the process's
default backend, so a program lowered for CUDA from a CPU process holds the kernel itself.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

HEAD_ROWS = 16  # query heads per program (padded): Triton's dots take at least 16 rows
PAGES_PER_BLOCK = 8  # pages loaded per inner step
MAX_SPLITS = 16  # parallel partitions of one row's block table


def unsupported(head_dim: int, page_size: int) -> str | None:
    """Why the compiled (Triton) kernel cannot take these sizes, or None. Triton's block shapes are
    powers of two and its dots at least 16 wide."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two"
    return None


def _split(P: int, page_size: int) -> tuple[int, int]:
    """(pages per inner step, splits) for a block table of P pages: both divide P; a step spans at
    least 16 keys when P allows it."""
    per_block = math.gcd(P, max(PAGES_PER_BLOCK, -(-16 // page_size)))
    return per_block, math.gcd(P // per_block, MAX_SPLITS)


def _kernel(q_ref, k_ref, v_ref, table_ref, length_ref, o_ref, m_ref, l_ref, *, per_block: int):
    """One (row, kv head, split): q [HEAD_ROWS, D] (pre-scaled); k, v [pages, ps, D] (this layer and
    KV head of the pool); table [pages in split]; length [1] -> o [HEAD_ROWS, D] (unnormalized),
    m, l [HEAD_ROWS] (running max and sum of the split's softmax)."""
    split = pl.program_id(2)
    split_pages = table_ref.shape[0]
    page_size, head_dim = k_ref.shape[-2:]
    block_k = per_block * page_size
    length = length_ref[0]
    first = split * split_pages  # this split's first page, counted along the row
    end = jnp.minimum(pl.cdiv(length, page_size), first + split_pages)
    steps = jnp.maximum(pl.cdiv(end - first, per_block), 0)
    q = q_ref[...]

    def body(j, carry):
        o, m, l = carry
        ids = table_ref[pl.ds(j * per_block, per_block)]
        k = k_ref[ids].reshape(block_k, head_dim)
        v = v_ref[ids].reshape(block_k, head_dim)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [HEAD_ROWS, block_k]
        key_pos = (first + j * per_block) * page_size + jnp.arange(block_k)
        s = jnp.where((key_pos < length)[None, :], s, -jnp.inf)  # each step holds >= 1 live key
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        o = o * rescale[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * rescale + p.sum(axis=-1)

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = lax.fori_loop(0, steps, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def paged_attention_pallas(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, block_tables: jax.Array,
                           positions: jax.Array, *, layer: int, interpret: bool) -> jax.Array:
    """q [B, 1, nh, D]; k_pool, v_pool [L, kv, N, ps, D] (the whole pool; `layer` picks the layer
    inside the kernel); block_tables [B, P]; positions [B, 1] (-1 = padding row: output zeros)
    -> [B, 1, nh*D]. Keys at positions <= the row's position are attended (this step's own K/V
    must already be in the pool)."""
    B, T, nh, D = q.shape
    if T != 1:
        raise ValueError(f"the Pallas paged-attention kernel takes one query token per row, got {T}")
    _, kv, N, ps, _ = k_pool.shape
    P = block_tables.shape[1]
    group = nh // kv
    rows = max(HEAD_ROWS, 1 << (group - 1).bit_length())  # Triton's blocks are powers of two
    per_block, splits = _split(P, ps)
    split_pages = P // splits
    if not interpret and per_block * ps < 16:
        raise ValueError(f"the Triton kernel's dots take >= 16 keys per step; a block table of {P} pages of {ps} "
                         "tokens gives fewer: raise max_seq_len or page_size, or use attention='xla'")

    qg = (q[:, 0] * (1.0 / math.sqrt(D))).astype(k_pool.dtype).reshape(B, kv, group, D)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    lengths = (jnp.maximum(positions[:, :1], -1) + 1).astype(jnp.int32)  # [B, 1]; padding rows: 0 keys
    tables = block_tables.astype(jnp.int32).reshape(B, splits, split_pages)
    pool_spec = pl.BlockSpec((None, None, N, ps, D), lambda b, h, s: (layer, h, 0, 0, 0))
    stat_shape = jax.ShapeDtypeStruct((B, splits, kv, rows), jnp.float32)
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, s, h, 0))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, per_block=per_block),
        grid=(B, kv, splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
            pool_spec,
            pool_spec,
            pl.BlockSpec((None, None, split_pages), lambda b, h, s: (b, s, 0)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, s, h, 0, 0)), stat_spec,
                   stat_spec],
        out_shape=[jax.ShapeDtypeStruct((B, splits, kv, rows, D), jnp.float32), stat_shape, stat_shape],
        interpret=interpret,
        name="drex_paged_attention",
        **kwargs,
    )(qg, k_pool, v_pool, tables, lengths)
    # merge the splits' partial softmaxes; splits past a row's length have m = -inf and weigh 0
    m_all = m.max(axis=1, keepdims=True)
    weight = jnp.where(jnp.isfinite(m), jnp.exp(m - jnp.where(jnp.isfinite(m_all), m_all, 0)), 0.0)
    total = (l * weight).sum(axis=1)  # [B, kv, rows]
    out = (o * weight[..., None]).sum(axis=1) / jnp.maximum(total, 1e-30)[..., None]
    out = out[:, :, :group].reshape(B, 1, nh * D)
    return jnp.where((positions[:, :1] >= 0)[:, :, None], out, 0).astype(q.dtype)
