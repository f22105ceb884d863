"""The device side of serving: the weights, the paged KV pool and the early-exit hidden-state
buffer, and every jitted call on them.

The engine and the early-exit scheduler decide *what* runs (host side, `sched/`); they hand
this runner host arrays (`sched.batch.DecodeBatch` / `ChunkBatch`, prefill packs) and get host
arrays back (tokens, confidences). Only the runner holds device state, and every call donates
the pool (and hidden buffer) so XLA updates them in place.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax import compile_counter
from drex_jax.draft_attention import block_weights, has_draft_attention
from drex_jax.early_exit import EEConfig
from drex_jax.generation import Sampled, SamplingParams
from drex_jax.kv.pages import bucket
from drex_jax.kv.missing import get_method
from drex_jax.kv.pool import init_pool
from drex_jax.logprobs import score_prompt
from drex_jax.model.config import ModelConfig
from drex_jax.model.modules import split_model
from drex_jax.model.paged import decode_step, head_step, prefill_chunk_step, prefill_step
from drex_jax.model.ramps import check_ramp_tokens
from drex_jax.rebatch import steps
from drex_jax.rebatch.steps import chunk_step, segment_step
from drex_jax.sched.batch import ChunkBatch, DecodeBatch, PrefillChunk


@dataclasses.dataclass(frozen=True)
class CallTiming:
    """One synchronous device call: when it was issued and when its results were ready
    (`time.perf_counter()`), and whether it compiled a program (then its time is no timing)."""

    start: float
    end: float
    compiled: bool

    @property
    def seconds(self) -> float | None:
        return None if self.compiled else self.end - self.start


class DeviceRunner:
    """Owns the model (`graph`, `state`: the split `EETransformer` over `params`, decode layout,
    sharded over `mesh` if given; `ee_graph`, `ee_state`: the same with its trained exit ramps,
    what the early-exit segments run), `pool` ([layers, kv_heads, pages, page_size, head_dim] K and
    V) and, with early exit, `hidden` ([slots, H], or the recompute ring [slots, R, H]) and the
    ramps' candidate ids."""

    def __init__(self, cfg: ModelConfig, params: dict, num_pages: int, page_size: int, dtype, attention: str,
                 mesh=None):
        self.cfg, self.params, self.attention, self.mesh, self.dtype = cfg, params, attention, mesh, dtype
        self.graph, self.state = split_model(cfg, params)  # the state holds `params`' arrays, not copies
        self.ee_graph, self.ee_state = self.graph, self.state
        self.pool = init_pool(cfg, num_pages, page_size, dtype)
        if mesh is not None:
            from drex_jax.sharding import pool_sharding

            self.pool = jax.device_put(self.pool, pool_sharding(mesh))
        self.hidden = self.ramp_tokens = None
        self.measure = "top1_minus_top2"

    def _replicated(self, tree):
        if self.mesh is None or tree is None:
            return tree
        from drex_jax.sharding import replicated

        return jax.device_put(tree, replicated(self.mesh))

    # ------------------------------------------------------------------ plain decoding
    def prefill(self, tokens, positions, segment_ids, write_page, write_off, last_index, sampling: SamplingParams,
                kv_depth=None, *, do_sample: bool, missing_kv: str = "copy", logprobs: bool = False) -> Sampled:
        """Contexts packed into rows [R, W] (see `model.paged.prefill_step`) -> their next tokens
        [Q = the sampling rows] (with their log-probabilities when `logprobs`)."""
        hidden, self.pool = prefill_step(self.state, self.pool, tokens, positions, segment_ids, write_page, write_off,
                                         last_index, kv_depth, graph=self.graph,
                                         replay_copies=get_method(missing_kv).replay_copies)
        return self.head(hidden, sampling, do_sample, logprobs)

    def prefill_chunk(self, batch: PrefillChunk, *, do_sample: bool, logprobs: bool = False) -> Sampled:
        """The next chunk of contexts already partly in the pool (`model.paged.prefill_chunk_step`)
        -> the token after each row's chunk [R] (used where the chunk ends its context)."""
        hidden, self.pool = prefill_chunk_step(self.state, self.pool, batch.tokens, batch.positions,
                                               batch.block_tables, graph=self.graph, attention=self.attention)
        return self.head(hidden, batch.sampling, do_sample, logprobs)

    def head(self, hidden, sampling: SamplingParams, do_sample: bool, logprobs: bool = False) -> Sampled:
        return Sampled.from_device(head_step(self.state, hidden, sampling, graph=self.graph, do_sample=do_sample,
                                             logprobs=logprobs))

    def decode(self, batch: DecodeBatch, do_sample: bool, logprobs: bool = False) -> Sampled:
        """One full-depth decode step -> next tokens [B] (with log-probabilities when `logprobs`)."""
        return self.fetch(self.decode_async(batch, do_sample, logprobs))

    def decode_async(self, batch: DecodeBatch, do_sample: bool, logprobs: bool = False):
        """Dispatch a full-depth decode step and return its output on the device, unfetched (`fetch`
        brings it to the host; `batch.tokens` may be the previous step's device output: device-side
        token feeding)."""
        nxt, self.pool = decode_step(self.state, self.pool, batch.tokens, batch.positions, batch.block_tables,
                                     batch.sampling, graph=self.graph, do_sample=do_sample, attention=self.attention,
                                     logprobs=logprobs)
        return nxt

    @staticmethod
    def fetch(out) -> Sampled:
        """A dispatched step's output on the host (waits for the device)."""
        return Sampled.from_device(out)

    def score(self, token_ids: list[int]) -> list:
        """Full-depth `TokenLogprob` of every token of a prompt (`logprobs.score_prompt`), compiled
        per power-of-two length."""
        return score_prompt(self.graph, self.state, token_ids, bucket(len(token_ids), 16))

    def timed_decode(self, batch: DecodeBatch, do_sample: bool, logprobs: bool = False) -> tuple[Sampled, CallTiming]:
        return self._timed(lambda: self.decode(batch, do_sample, logprobs))

    def sync(self) -> None:
        jax.block_until_ready(self.pool)

    @staticmethod
    def compile_count() -> int:
        """XLA compilations so far in this process (a window that compiled is no timing)."""
        return compile_counter.count()

    # ------------------------------------------------------------------ early exit
    def enable_early_exit(self, ee: EEConfig, heads: dict | None, ramp_tokens, max_slots: int) -> None:
        """Allocate the hidden-state buffer (recompute: a ring of bucket(max_draft + 1) positions per
        slot), give the model its trained ramps (`heads`, stacked per ramp; None = the shared LM
        head) and place the ramp candidate ids ([K] int32, checked)."""
        ring = (bucket(ee.max_draft + 1),) if get_method(ee.missing_kv).deferred else ()
        self.ramp_tokens = self._replicated(check_ramp_tokens(ee, self.cfg, ramp_tokens))
        self.hidden = self._replicated(jnp.zeros((max_slots,) + ring + (self.cfg.hidden_size,), self.dtype))
        if heads is not None:
            # in the engine's dtype: a bf16 engine streams bf16 ramp weights (the ramp computes in fp32)
            heads = self._replicated(jax.tree.map(lambda a: jnp.asarray(a, self.dtype), heads))
            if has_draft_attention(heads):
                if self.mesh is not None:
                    raise ValueError("context-aware draft heads (draft_wq/draft_wo) do not run under tensor "
                                     "parallelism yet; use heads without them or tp=1")
                ramps = [e for e in ee.exit_layers if e < self.cfg.num_layers]
                heads = {**heads, "attention": block_weights(self.params, self.cfg, ramps, heads)}
            self.ee_graph, self.ee_state = split_model(self.cfg, self.params, heads)
        self.measure = ee.confidence

    def run_layers(self, batch: DecodeBatch | ChunkBatch, start: int, end: int, ramp: int, do_sample: bool,
                   every_position: bool = False, logprobs: bool = False, speculative: bool = False,
                   drafts: tuple | None = None) -> tuple[Sampled, np.ndarray, CallTiming]:
        """Layers [start, end) for the batch's rows, then ramp `ramp` (-1: the LM head). Returns
        (tokens [B] (every_position: [B, T]; with log-probabilities when `logprobs`), confidences
        [B], timing).

        `speculative` (verify mode sampling, chunk batches only): speculative sampling. At a ramp the
        tokens come with `probs`, each row's draft distribution over the ramp's candidates [B, K].
        With every_position, `drafts` = (draft_tokens [B, T], draft_probs [B, T, K]) are the drafts
        the chunk's positions verify (`rebatch.steps.chunk_step`)."""
        static = dict(graph=self.ee_graph, start=start, end=end, ramp=ramp, measure=self.measure,
                      do_sample=do_sample, attention=self.attention, logprobs=logprobs)

        def call():
            if isinstance(batch, ChunkBatch):
                draft_tokens, draft_probs = drafts if drafts is not None else (None, None)
                tok, conf, self.pool, self.hidden, *probs = chunk_step(
                    self.ee_state, self.pool, self.hidden, batch.slot_ids, batch.tokens, batch.positions,
                    batch.depths, batch.block_tables, batch.sampling, self.ramp_tokens, draft_tokens, draft_probs,
                    every_position=every_position, speculative=speculative, **static)
                if probs:
                    return Sampled(np.asarray(tok), probs=np.asarray(probs[0])), np.asarray(conf)
            else:
                tok, conf, self.pool, self.hidden = segment_step(
                    self.ee_state, self.pool, self.hidden, batch.slot_ids, batch.tokens, batch.positions,
                    batch.block_tables, batch.sampling, self.ramp_tokens, **static)
            return Sampled.from_device(tok), np.asarray(conf)

        (tok, conf), timing = self._timed(call)
        return tok, conf, timing

    def fill(self, missing_kv: str, exit_layer: int, batch: DecodeBatch, positions: np.ndarray) -> None:
        """Missing K/V of layers >= exit_layer at `positions` [B] (-1: row untouched) of the batch's
        rows, by the method's fill (`kv.missing`: copy, propagate)."""
        method = get_method(missing_kv)
        if method.fill is None:
            raise ValueError(f"missing_kv={missing_kv!r} fills nothing at exit (its K/V come with the next deep pass)")
        fill = getattr(steps, method.fill)
        self.pool = fill(self.state, self.pool, self.hidden, batch.slot_ids, batch.block_tables, positions,
                         graph=self.graph, exit_layer=exit_layer)

    @staticmethod
    def _timed(call):
        """Run `call` synchronously (its results decide what runs next) and time it."""
        compiles, t0 = compile_counter.count(), time.perf_counter()
        out = call()  # np.asarray of the outputs waits for the device
        return out, CallTiming(t0, time.perf_counter(), compile_counter.count() != compiles)
