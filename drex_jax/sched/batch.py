"""Host-side decode batch: the arrays one decode step (plain or early-exit) runs on."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from drex_jax.kv.pages import batch_bucket, block_table_array, bucket, pages_needed
from drex_jax.generation import SamplingParams


class DecodeBatch(NamedTuple):
    slot_ids: np.ndarray  # [B] int32; padding rows = num_slots (out of range: gathers clamp, scatters drop)
    tokens: np.ndarray  # [B] int32, each row's last token
    positions: np.ndarray  # [B] int32, where that token's K/V goes; -1 = padding
    block_tables: np.ndarray  # [B, width] int32 page ids
    sampling: SamplingParams


def table_width(reqs: list, page_size: int, width: int | None = None) -> int:
    """Block-table columns for these requests' next token: the power-of-two bucket of the most
    pages any row needs, or the fixed `width` (checked to be enough)."""
    needed = max(pages_needed(r.cache_len + 1, page_size) for r in reqs)
    if width is not None and width < needed:
        raise ValueError(f"block-table width {width} < {needed} pages needed")
    return bucket(needed) if width is None else width


def decode_batch(reqs: list, page_size: int, num_slots: int, width: int | None = None) -> DecodeBatch:
    """One row per running request (`slot`, `last_token`, `cache_len`, `pages`, `sampling_row()`),
    padded to a row bucket (`batch_bucket`); the block-table width is bucketed the same way, or
    fixed at `width` (attention kernels whose cost follows each row's length, not the width)."""
    B = batch_bucket(len(reqs))
    width = table_width(reqs, page_size, width)
    slot_ids = np.full(B, num_slots, np.int32)
    tokens = np.zeros(B, np.int32)
    positions = np.full(B, -1, np.int32)
    for i, r in enumerate(reqs):
        slot_ids[i], tokens[i], positions[i] = r.slot, r.last_token, r.cache_len
    bt = block_table_array([r.pages for r in reqs] + [[]] * (B - len(reqs)), width)
    return DecodeBatch(slot_ids, tokens, positions, bt, SamplingParams.build([r.sampling_row() for r in reqs], B))


class ChunkBatch(NamedTuple):
    """A decode batch whose rows carry their pending positions (`missing_kv="recompute"`)."""
    slot_ids: np.ndarray  # [B] int32
    tokens: np.ndarray  # [B, T] int32 input token at each chunk position (used at depth 0 only)
    positions: np.ndarray  # [B, T] int32 consecutive per row, -1 = padding (at the end)
    block_tables: np.ndarray  # [B, width] int32
    sampling: SamplingParams
    depths: np.ndarray  # [B, T] int32 layers each position has run (it joins the step there)


def chunk_batch(reqs: list, start: int, end: int, page_size: int, num_slots: int, width: int | None = None
                ) -> ChunkBatch:
    """Rows for layers [start, end): each request's current token (at depth `start`) preceded by its
    pending positions (`ee.pending`: position -> depth) from the oldest one that joins within
    [start, end) on; positions between that join later keep their depth (they only supply K/V).
    T is the power-of-two bucket of the longest chunk."""
    plain = decode_batch(reqs, page_size, num_slots, width)
    B = len(plain.slot_ids)
    firsts = [min([q for q, d in r.ee.pending.items() if d < end], default=r.cache_len) for r in reqs]
    T = bucket(max([r.cache_len - f + 1 for r, f in zip(reqs, firsts)], default=1))
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    depths = np.full((B, T), end, np.int32)  # padding: never joins
    for i, (r, first) in enumerate(zip(reqs, firsts)):
        n = r.cache_len - first + 1
        positions[i, :n] = np.arange(first, r.cache_len + 1)
        depths[i, :n - 1] = [r.ee.pending[q] for q in range(first, r.cache_len)]
        depths[i, n - 1] = start
        tokens[i, n - 1] = r.last_token
    return ChunkBatch(plain.slot_ids, tokens, positions, plain.block_tables, plain.sampling, depths)


class PrefillChunk(NamedTuple):
    """Chunked prefill: the next piece of contexts whose earlier positions are already in the pool
    (a context longer than one step's prefill budget is prefilled over several steps)."""
    requests: tuple  # one per row
    ends_context: tuple  # per row: this piece is its context's last (the row's next token is emitted)
    tokens: np.ndarray  # [R, C] int32
    positions: np.ndarray  # [R, C] int32 consecutive from the first position not in the pool, -1 = padding
    block_tables: np.ndarray  # [R, width] int32
    sampling: SamplingParams  # [R]
    do_sample: bool
    logprobs: bool


def chunk_min_width(while_decoding_budget: int) -> int:
    """Narrowest chunk program: 64 positions, or the power-of-two bucket of a smaller budget
    while decoding (chunks that small are what keeps running requests streaming)."""
    return min(64, bucket(while_decoding_budget))


def prefill_chunk(pieces: list, page_size: int, width: int | None = None, min_width: int = 64) -> PrefillChunk:
    """Rows for pieces (request, start, end) of contexts (`context_ids`) whose positions < start are
    in the pool. C is the power-of-two bucket (>= min_width) of the longest piece; the block-table width
    covers each row's pages up to `end` (bucketed, or the fixed `width`)."""
    R, C = len(pieces), bucket(max(e - s for _, s, e in pieces), min_width)
    need = max(pages_needed(e, page_size) for _, _, e in pieces)
    if width is not None and width < need:
        raise ValueError(f"block-table width {width} < {need} pages needed")
    tokens, positions = np.zeros((R, C), np.int32), np.full((R, C), -1, np.int32)
    for i, (r, s, e) in enumerate(pieces):
        tokens[i, :e - s], positions[i, :e - s] = r.context_ids[s:e], np.arange(s, e)
    reqs = tuple(r for r, _, _ in pieces)
    return PrefillChunk(reqs, tuple(e == len(r.context_ids) for r, _, e in pieces), tokens, positions,
                        block_table_array([r.pages for r in reqs], bucket(need) if width is None else width),
                        SamplingParams.build([r.sampling_row() for r in reqs], R),
                        any(r.config.temperature > 0 for r in reqs), any(r.config.logprobs is not None for r in reqs))


class BatchLayout(NamedTuple):
    """How an engine lays out decode batches: tokens per page, KV slots (= the padding rows' slot
    id) and the block-table width (fixed by the attention backend, or None: bucketed per batch)."""
    page_size: int
    num_slots: int
    table_width: int | None

    def decode(self, reqs: list) -> DecodeBatch:
        return decode_batch(reqs, self.page_size, self.num_slots, self.table_width)

    def chunk(self, reqs: list, start: int, end: int) -> ChunkBatch:
        return chunk_batch(reqs, start, end, self.page_size, self.num_slots, self.table_width)

    def width(self, reqs: list) -> int:
        return table_width(reqs, self.page_size, self.table_width)

    def padding(self, B: int, width: int, T: int | None = None) -> DecodeBatch | ChunkBatch:
        """B padding rows at page width `width` (T: chunks of T positions): runs a program's shape,
        writes no KV or hidden row."""
        pad = np.full(B, -1, np.int32)
        slots, bt, sp = np.full(B, self.num_slots, np.int32), block_table_array([[]] * B, width), SamplingParams.build([], B)
        if T is not None:
            chunk = np.full((B, T), -1, np.int32)
            return ChunkBatch(slots, np.zeros((B, T), np.int32), chunk, bt, sp, np.zeros((B, T), np.int32))
        return DecodeBatch(slots, pad, pad, bt, sp)
