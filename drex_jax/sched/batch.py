"""Host-side decode batch: the arrays one decode step (plain or early-exit) runs on."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from drex_jax.kv.pool import block_table_array, bucket, pages_needed
from drex_jax.sampling import SamplingParams


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
    """One row per running request (`slot`, `generated`, `cache_len`, `pages`, `sampling_row()`),
    padded to a power-of-two row bucket; the block-table width is bucketed the same way, or
    fixed at `width` (attention kernels whose cost follows each row's length, not the width)."""
    B = bucket(len(reqs))
    width = table_width(reqs, page_size, width)
    slot_ids = np.full(B, num_slots, np.int32)
    tokens = np.zeros(B, np.int32)
    positions = np.full(B, -1, np.int32)
    for i, r in enumerate(reqs):
        slot_ids[i], tokens[i], positions[i] = r.slot, r.generated[-1], r.cache_len
    bt = block_table_array([r.pages for r in reqs] + [[]] * (B - len(reqs)), width)
    return DecodeBatch(slot_ids, tokens, positions, bt, SamplingParams.build([r.sampling_row() for r in reqs], B))
