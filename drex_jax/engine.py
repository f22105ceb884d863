"""Continuous-batching engine over the paged KV pool (BATON-style insertion).

Host side: a FIFO of waiting requests, one KV slot and a page list per running request.
Each `step()` first gives every running request the page its next token needs, preempting
the most recently admitted requests when the pool runs out (their pages and slot return; they
go back to the front of the queue and are recomputed by prefill when pages free up). It then
prefills newly admitted requests straight into their own pages and runs one decode step over
the running slots as a bucket-padded int32 index batch; prefilled requests join the very next
decode step. Finished and cancelled requests return slot and pages at once.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax import compile_counter
from drex_jax.generation import GenerationConfig, GenerationResult, RequestStats, SamplingParams, StreamEvent
from drex_jax.kv.pages import (
    PageAllocator, block_table_array, bucket, pages_needed, pow2_upto, row_bucket, row_buckets_upto,
)
from drex_jax.kv.pool import pages_for_budget
from drex_jax.model.config import ModelConfig
from drex_jax.model.params import check_params, decode_layout
from drex_jax.runner import DeviceRunner
from drex_jax.sched.batch import DecodeBatch, decode_batch


@dataclasses.dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    config: GenerationConfig
    stop_ids: frozenset[int]
    submit_time: float
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    emitted_chars: int = 0
    finish_reason: str | None = None
    text: str = ""
    # early exit: segment the request waits to run (0 = layer 0), when it entered its buffer,
    # when its current token started, and the depth each generated token ran to
    stage: int = 0
    buffered_iter: int = -1
    token_start: float = 0.0
    exit_layers: list[int] = dataclasses.field(default_factory=list)
    # depth of the K/V written at each decode position (prompt positions are full depth): what a
    # recompute after preemption must replay
    kv_depths: list[int] = dataclasses.field(default_factory=list)
    admit_seq: int = -1  # order of first admission: preemption takes the highest first
    first_want: int = -1  # early exit: first ramp the current token's confidence passed
    preemptions: int = 0
    # missing_kv="recompute": decode positions whose deep K/V is still missing -> layers run so far
    # (their hidden states wait in the decoder's ring); verify mode: the drafted tokens not yet
    # verified (inputs at the positions after the last verified token), never emitted
    pending: dict[int, int] = dataclasses.field(default_factory=dict)
    drafts: list[int] = dataclasses.field(default_factory=list)
    draft_depths: list[int] = dataclasses.field(default_factory=list)  # the ramp depth each draft exited at

    @property
    def context_ids(self) -> list[int]:
        """Tokens whose K/V the request needs in the pool before its next decode step."""
        return self.prompt_ids + self.generated[:-1]

    @property
    def cache_len(self) -> int:
        """Positions with K/V in the pool (the newest token is not yet written): the position of
        the next decode step's input, `last_token`."""
        return len(self.prompt_ids) + len(self.generated) + len(self.drafts) - 1

    @property
    def last_token(self) -> int:
        """The next decode step's input: the newest draft (verify mode) or generated token."""
        return self.drafts[-1] if self.drafts else self.generated[-1]

    def sampling_row(self) -> tuple:
        c = self.config
        return (float(c.temperature), c.top_k, float(c.top_p), c.seed, len(self.generated))


class Engine:
    """Serve many generation requests at once.

    Args:
      model: path of a converted checkpoint (`drex-jax convert`); None = bundled SmolLM2.
      dtype: "float32" or "bfloat16" for params and KV.
      max_slots: most requests decoding at once (the largest decode batch).
      page_size: tokens per KV page.
      num_pages / kv_memory_bytes: pool size (pages, or a byte budget); default fits
        `max_slots` sequences of `max_seq_len` tokens.
      max_seq_len: context limit per request (prompt + new tokens).
      max_prefill_tokens_per_step: prompt tokens prefilled between two decode steps (at
        least one prompt is always admitted), bounding how long the running batch waits.
      mesh: a ("dp"=1, "tp") `jax.sharding.Mesh` (drex_jax.sharding.make_mesh): params and the
        KV pool are split over tp; None = one device.
      attention: decode attention over the paged pool: "auto" (default: Pallas kernel on a GPU,
        the C++ FFI kernel on a CPU in fp32, else "xla"), "xla" (dense gather, any backend),
        "ffi", "pallas". All give the same tokens (tests compare them).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "float32", verbose: bool = False, **kwargs):
        import os

        from convert.checkpoint import load_checkpoint
        from drex_jax.default_model import default_model_path

        path = model if model is not None else default_model_path(verbose=True)
        cfg, params, tok = load_checkpoint(path, dtype=_dtype(dtype))
        ee = kwargs.get("ee")
        wants_heads_dir = ee is not None and (ee.head == "trained" or ee.ramp_vocab is not None)
        if wants_heads_dir and kwargs.get("exit_heads") is None:
            from drex_jax.exit_heads import find_heads

            kwargs["exit_heads"] = find_heads(path, cfg, params)
            if kwargs["exit_heads"] is None:
                raise FileNotFoundError(
                    f"no trained exit heads for the model at {path!r} (none in {os.path.join(path, 'exit_heads')!r}, "
                    "and the bundled heads fit SmolLM2-135M-Instruct only): run `drex-jax train-exits --model "
                    f"{path}` or use EEConfig(head='shared')")
        self._setup(cfg, params, tok, dtype=dtype, verbose=verbose, **kwargs)

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict, tokenizer=None, *, dtype: str = "float32", **kwargs):
        check_params(cfg, params)
        eng = cls.__new__(cls)
        params = jax.tree.map(lambda a: jnp.asarray(a, _dtype(dtype)), params)
        eng._setup(cfg, params, tokenizer, dtype=dtype, **kwargs)
        return eng

    def _setup(self, cfg, params, tokenizer, *, dtype, verbose=False, max_slots=32, page_size=16,
               num_pages=None, kv_memory_bytes=None, max_seq_len=None, max_prefill_tokens_per_step=1024,
               ee=None, policy=None, exit_heads=None, flush=None, art=True, mesh=None, exit_trace=None,
               ramp_tokens=None, attention="auto", gate=None):
        for name, v, lo in (("max_slots", max_slots, 1), ("page_size", page_size, 1),
                            ("max_prefill_tokens_per_step", max_prefill_tokens_per_step, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.mesh = mesh
        if mesh is not None:
            from drex_jax.sharding import check_mesh, shard_params

            check_mesh(mesh, cfg)
            if mesh.shape["dp"] != 1:
                raise ValueError(f"an Engine serves one replica but the mesh has dp={mesh.shape['dp']}; build one "
                                 "Engine per drex_jax.sharding.replica_meshes(mesh)")
        # the compiled steps read the decode layout (per-layer weights, [out, in]); one copy only
        params = decode_layout(params)
        if mesh is not None:
            params = shard_params(cfg, params, mesh)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.dtype = _dtype(dtype)
        self.attention = resolve_attention(attention, self.dtype, mesh)
        self.verbose = verbose
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 2048))
        if not 1 < self.max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_seq_len must be in [2, {cfg.max_position_embeddings}] for this model, got {max_seq_len}"
            )
        self.page_size, self.max_slots = page_size, max_slots
        # block-table widths the decode programs take: the FFI kernel reads only each row's live
        # pages, so one width (the longest sequence's) serves every batch and one program per
        # batch bucket is compiled; the dense-gather XLA path and Pallas cost grow with the width
        max_width = bucket(pages_needed(self.max_seq_len, page_size))
        self.table_width = max_width if self.attention == "ffi" else None  # None: bucketed per batch
        self.page_widths = [max_width] if self.table_width else pow2_upto(max_width)
        if num_pages is not None and kv_memory_bytes is not None:
            raise ValueError("give num_pages or kv_memory_bytes, not both")
        if kv_memory_bytes is not None:
            num_pages = pages_for_budget(cfg, kv_memory_bytes, page_size, self.dtype)
        if num_pages is None:
            num_pages = 1 + max_slots * pages_needed(self.max_seq_len, page_size)
        self.allocator = PageAllocator(int(num_pages))
        self.runner = DeviceRunner(cfg, params, int(num_pages), page_size, self.dtype, self.attention, mesh)
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # slot -> request
        self._next_id = 0
        self._admitted = 0
        self.num_preemptions = 0
        self.peak_pages_used = 0
        self._eos = frozenset(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self._eos |= {int(tokenizer.eos_token_id)}
        compile_counter.install()
        self.ee_decoder = self._make_ee_decoder(ee, policy, exit_heads, flush, art, exit_trace, ramp_tokens, gate)

    def _make_ee_decoder(self, ee, policy, exit_heads, flush, art, exit_trace=None, ramp_tokens=None, gate=None):
        from drex_jax.rebatch.policies import POLICIES
        from drex_jax.sched.ee_decoder import EEDecoder
        from drex_jax.sched.flush import FlushConfig

        if policy is not None and policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        if ee is None:
            if policy not in (None, "off"):
                raise ValueError(f"policy {policy!r} needs an early-exit config (ee=EEConfig(...))")
            return None
        heads = exit_heads if ee.head == "trained" else None  # a path: loaded below
        ramps = [e for e in ee.exit_layers if e < self.cfg.num_layers]
        if isinstance(exit_heads, str):
            from drex_jax.exit_heads import check_fit, read_meta

            check_fit(exit_heads, read_meta(exit_heads), self.cfg, self.params)
        if ee.ramp_vocab is not None and ramp_tokens is None and isinstance(exit_heads, str):
            from drex_jax.exit_heads import load_token_ranking

            ramp_tokens = load_token_ranking(exit_heads)
        if isinstance(heads, str):
            from drex_jax.exit_heads import load_heads

            heads, meta = load_heads(exit_heads)
            trained = list(meta["exit_layers"])
            if not set(ramps) <= set(trained):
                raise ValueError(f"exit heads at {exit_heads!r} were trained for layers {trained}, "
                                 f"but exit_layers is {ramps}")
            rows = np.asarray([trained.index(e) for e in ramps])  # a subset of the trained ramps
            heads = jax.tree.map(lambda a: a[rows], heads)
        if exit_trace is not None:
            from drex_jax.sched.exit_trace import ExitTrace

            if not isinstance(exit_trace, ExitTrace) or len(exit_trace.fractions) != len(ramps) + 1:
                raise ValueError(f"exit_trace must be an ExitTrace with {len(ramps) + 1} fractions (ramps + full depth)")
        decoder = EEDecoder(self.cfg, self.runner, ee, policy or "rebatching", heads is not None,
                            flush or FlushConfig(), art, exit_trace, gate, page_size=self.page_size,
                            max_slots=self.max_slots, table_width=self.table_width, running=self._running,
                            emit=self._emit, trim_pages=self._trim_pages)
        self.runner.enable_early_exit(ee, heads, ramp_tokens, self.max_slots)
        return decoder

    @property
    def params(self) -> dict:
        """The weights the compiled steps read (decode layout; sharded under a mesh)."""
        return self.runner.params

    @property
    def pool(self) -> dict:
        """The paged KV pool, K and V [layers, kv_heads, pages, page_size, head_dim]."""
        return self.runner.pool

    @property
    def early_exit(self) -> dict | None:
        """The early-exit setup (EEConfig fields, policy, ART) or None at full depth."""
        if self.ee_decoder is None:
            return None
        dec = self.ee_decoder
        return {**dataclasses.asdict(dec.ee), "policy": dec.policy, "art": dec.use_art}

    @property
    def ee_stats(self):
        """Early-exit counters (EEStats) or None without early exit."""
        return None if self.ee_decoder is None else self.ee_decoder.stats
    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass prompts as lists of token ids")
            if chat:
                return self.encode_chat([{"role": "user", "content": prompt}])
            return list(self.tokenizer(prompt).input_ids)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.cfg.vocab_size}), got {bad[:5]}")
        return [int(t) for t in ids]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (`[{"role": ..., "content": ...}, ...]`) through the model's chat
        template, ending with the assistant's turn."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        if not messages:
            raise ValueError("messages is empty; give at least one message")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def submit(self, prompt: str | list[int], config: GenerationConfig | None = None, chat: bool = False) -> int:
        """Queue one request; returns its id. Raises ValueError (queue untouched) on bad input."""
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
        config.validate()
        ids = self.encode(prompt, chat)
        total = len(ids) + config.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={config.max_new_tokens} = {total} exceeds the "
                f"context limit max_seq_len={self.max_seq_len}"
            )
        need = pages_needed(total, self.page_size)
        if need > self.allocator.capacity:
            raise ValueError(
                f"request needs {need} KV pages but the pool only has {self.allocator.capacity}; "
                "raise num_pages / kv_memory_bytes or lower max_new_tokens"
            )
        if self.ee_decoder is not None and self.ee_decoder.verify and config.temperature > 0:
            raise ValueError(f"temperature={config.temperature} but this engine runs EEConfig(verify=True), which "
                             "verifies drafts greedily (speculative sampling is not implemented): use temperature=0 "
                             "or an engine without verify")
        req = _Request(self._next_id, ids, config, self._eos if not config.ignore_eos else frozenset(),
                       time.perf_counter())
        req.stop_ids = req.stop_ids | frozenset(config.stop_token_ids)
        self._next_id += 1
        self._waiting.append(req)
        return req.id

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        """Requests holding a decode slot."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued (new, or preempted and waiting to be recomputed)."""
        return len(self._waiting)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def cancel(self, request_id: int) -> GenerationResult:
        """Stop a waiting or running request now: its slot and pages return at once. Returns its
        partial result (finish_reason 'cancelled'). Other requests are unaffected."""
        for req in self._waiting:
            if req.id == request_id:
                self._waiting.remove(req)
                req.finish_reason = "cancelled"
                return self._result(req)
        for req in self._running.values():
            if req.id == request_id:
                req.finish_reason = "cancelled"
                return self._finish(req)
        raise ValueError(f"request {request_id!r} is not waiting or running (unknown, finished or cancelled)")

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StreamEvent]:
        """One engine iteration: plan (pages for every running request's next token, preempting
        when the pool is out), admit (prefill waiting requests into free slots), run (one decode
        iteration, plain or early exit), emit (each finished token becomes a `StreamEvent`)."""
        events: list[StreamEvent] = []
        preempted = self._grow_pages()
        if not (preempted and self._running):  # re-admitting a victim at once would only thrash
            self._admit(events)
        if self._running:
            self._run(events)
        return events

    def _run(self, events: list[StreamEvent]) -> None:
        """One decode iteration over the running requests; their tokens go through `_emit`."""
        if self.ee_decoder is not None:
            return self.ee_decoder.step(events)
        reqs = [self._running[s] for s in sorted(self._running)]
        batch = decode_batch(reqs, self.page_size, self.max_slots, self.table_width)
        nxt = self.runner.decode(batch, any(r.config.temperature > 0 for r in reqs))
        for i, r in enumerate(reqs):
            self._emit(r, int(nxt[i]), events, kv_depth=self.cfg.num_layers)

    def _grow_pages(self) -> int:
        """Give each running request (oldest first) the pages its next token needs; when the pool
        is out, preempt the most recently admitted request. Returns the number preempted."""
        preempted = 0
        for req in sorted(self._running.values(), key=lambda r: r.admit_seq):
            while req.slot >= 0 and (need := pages_needed(req.cache_len + 1, self.page_size) - len(req.pages)) > 0:
                pages = self.allocator.alloc(need)
                if pages is not None:
                    req.pages += pages
                    break
                self._preempt(max(self._running.values(), key=lambda r: r.admit_seq))
                preempted += 1
        self._note_pages()
        return preempted

    def _preempt(self, req: _Request) -> None:
        """Free a running request's slot and pages (dropping a half-computed token, if it waits in
        an early-exit buffer) and put it back at the front of the queue for recompute."""
        del self._running[req.slot]
        self.allocator.free(req.pages)
        self._free_slots.append(req.slot)
        req.pages, req.slot, req.stage, req.buffered_iter, req.first_want = [], -1, 0, -1, -1
        # prefill recomputes the context at full depth: nothing stays pending, and unverified
        # drafts are dropped (decoding resumes from the last verified token)
        req.pending, req.drafts, req.draft_depths = {}, [], []
        req.preemptions += 1
        self.num_preemptions += 1
        # victims go newest first, so the oldest ends up first in the queue
        self._waiting.appendleft(req)

    def _trim_pages(self, req: _Request) -> None:
        """Return the pages past a request's next token (after verify mode drops rejected drafts)."""
        keep = pages_needed(req.cache_len + 1, self.page_size)
        if len(req.pages) > keep:
            self.allocator.free(req.pages[keep:])
            req.pages = req.pages[:keep]

    def _note_pages(self) -> None:
        self.peak_pages_used = max(self.peak_pages_used, self.allocator.capacity - self.allocator.num_free)

    def _admit(self, events: list[StreamEvent]) -> None:
        """Move waiting requests (FIFO) into free slots while pages and the prefill budget last,
        then prefill them together in one packed stream. A request gets the pages of its context
        and next token now; later pages come one at a time as it grows (`_grow_pages`)."""
        group: list[_Request] = []
        budget = self.max_prefill_tokens_per_step
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            n = len(req.context_ids)
            if group and n > budget:
                break
            pages = self.allocator.alloc(pages_needed(n + 1, self.page_size))
            if pages is None:  # wait for pages to come back
                break
            self._waiting.popleft()
            req.pages, req.slot = pages, self._free_slots.pop()
            if req.admit_seq < 0:
                req.admit_seq, self._admitted = self._admitted, self._admitted + 1
            group.append(req)
            budget -= n
        if group:
            self._note_pages()
            self._prefill(group, events)

    def _prefill(self, group: list[_Request], events: list[StreamEvent]) -> None:
        """Prefill each request's context: a new request's prompt (sampling its first token), or a
        preempted request's prompt + generated tokens, replaying the depth of every early exit so
        its cache is rebuilt as it was (its next token is already known; the sample is dropped)."""
        rows = self._pack(group)
        W = self._prefill_width(group)
        R, Q = row_bucket(len(rows)), bucket(len(group))
        tokens = np.zeros((R, W), np.int32)
        positions = np.full((R, W), -1, np.int32)
        segment_ids = np.full((R, W), -1, np.int32)
        write_page = np.full((R, W), self.allocator.num_pages, np.int32)  # out of range = no write
        write_off = np.zeros((R, W), np.int32)
        last_index = np.zeros(Q, np.int32)
        L = self.cfg.num_layers
        kv_depth = np.full((R, W), L, np.int32)
        for row, members in enumerate(rows):
            o = 0
            for j in members:
                r = group[j]
                ctx = r.context_ids
                n, pos = len(ctx), np.arange(len(ctx))
                tokens[row, o:o + n], positions[row, o:o + n], segment_ids[row, o:o + n] = ctx, pos, j
                write_page[row, o:o + n] = np.asarray(r.pages)[pos // self.page_size]
                write_off[row, o:o + n] = pos % self.page_size
                kv_depth[row, o + len(r.prompt_ids):o + n] = r.kv_depths
                last_index[j] = row * W + o + n - 1
                o += n
        sp = SamplingParams.build([r.sampling_row() for r in group], Q)
        replay = self.ee_decoder is not None and bool((kv_depth < L).any())
        first = self.runner.prefill(
            tokens, positions, segment_ids, write_page, write_off, last_index, sp, kv_depth if replay else None,
            do_sample=any(r.config.temperature > 0 for r in group),
            missing_kv=self.ee_decoder.ee.missing_kv if replay else "copy")
        for j, r in enumerate(group):
            self._running[r.slot] = r
            if not r.generated:
                r.exit_layers.append(L)  # prefill runs full depth
                self._emit(r, int(first[j]), events)

    def _prefill_width(self, group: list[_Request]) -> int:
        """Row width: fits the longest prompt; up to 128 when there is that much to pack."""
        total = sum(len(r.context_ids) for r in group)
        widest = min(128, bucket(total, 16), bucket(self.max_seq_len, 16))
        return max(bucket(max(len(r.context_ids) for r in group), 16), widest)

    def _pack(self, group: list[_Request]) -> list[list[int]]:
        """First-fit-decreasing packing of prompts (indices into `group`) into rows of the width."""
        W = self._prefill_width(group)
        rows: list[list[int]] = []
        room: list[int] = []
        for j in sorted(range(len(group)), key=lambda j: -len(group[j].context_ids)):
            n = len(group[j].context_ids)
            k = next((k for k, free in enumerate(room) if free >= n), None)
            if k is None:
                rows.append([]), room.append(W)
                k = len(rows) - 1
            rows[k].append(j)
            room[k] -= n
        return rows

    def _emit(self, req: _Request, token: int, events: list[StreamEvent], kv_depth: int | None = None) -> None:
        """Record a sampled token. `kv_depth`: depth of the K/V this step wrote at the input position
        (None for the token sampled by prefill, which wrote the prompt's K/V)."""
        now = time.perf_counter()
        if kv_depth is not None:
            req.kv_depths.append(kv_depth)
        if not req.generated:
            req.first_token_time = now
        req.last_token_time = now
        req.generated.append(token)
        done = None
        if token in req.stop_ids:
            done = "stop"
        elif len(req.generated) >= req.config.max_new_tokens:
            done = "length"
        delta = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in req.config.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, done = text[:cut], "stop"
            # hold back a possible stop-string prefix and incomplete UTF-8 until final
            safe = len(text) if done else _safe_prefix_len(text, req.config.stop)
            delta = text[req.emitted_chars:safe]
            req.emitted_chars = max(req.emitted_chars, safe)
            req.text = text
        result = None
        if done:
            req.finish_reason = done
            result = self._finish(req)
        events.append(StreamEvent(req.id, token, delta, done is not None, result))

    def _finish(self, req: _Request) -> GenerationResult:
        del self._running[req.slot]
        self.allocator.free(req.pages)
        self._free_slots.append(req.slot)
        req.pages, req.slot = [], -1
        return self._result(req)

    def _result(self, req: _Request) -> GenerationResult:
        n = len(req.generated)
        end = req.last_token_time if n else time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), generated_tokens=n,
            ttft_s=req.first_token_time - req.submit_time if n else float("nan"),
            tpot_s=(req.last_token_time - req.first_token_time) / max(n - 1, 1),
            latency_s=end - req.submit_time, finish_reason=req.finish_reason, preemptions=req.preemptions,
        )
        return GenerationResult(req.id, req.text, list(req.generated), stats, list(req.exit_layers))

    def warmup(self, progress: bool = False, sampling: bool = True) -> int:
        """Compile every (batch, page-width) decode bucket and prompt bucket ahead of time by running
        all-padding batches (their KV writes are dropped, so the pool is untouched). With early
        exit: every segment, KV fill and ART profiling program instead of the decode step.
        Returns the number of programs run; afterwards a steady stream compiles nothing
        (`sampling=False`: greedy programs only, for greedy-only serving)."""
        from tqdm import tqdm

        max_rows = bucket(self.max_slots)
        budget = max(self.max_prefill_tokens_per_step, self.max_seq_len)
        shapes = [("decode", b, w, 0) for b in pow2_upto(max_rows) for w in self.page_widths]
        # prefill: row width W, rows R (each row holds >= 1 prompt), prompts Q
        for W in pow2_upto(bucket(self.max_seq_len, 16)):
            if W < 16:
                continue
            # first-fit rows are more than half full, except the last
            for R in row_buckets_upto(min(self.max_slots, 2 * -(-budget // W))):
                shapes += [("prefill", q, W, R) for q in pow2_upto(max_rows) if q >= R]
        if self.ee_decoder is not None:  # early exit decodes through segments (recompute: the fused fallback
            # with nothing pending is decode_step itself)
            shapes = [s for s in shapes if s[0] != "decode" or self.ee_decoder.recompute] + [
                ("ee",) + x for x in self.ee_decoder.warmup_shapes(max_rows, self.page_widths)]
        drop = self.allocator.num_pages
        greedy_only = self.ee_decoder is not None and self.ee_decoder.verify  # verify mode refuses sampling
        variants = (False, True) if sampling and not greedy_only else (False,)
        for shape in tqdm(shapes, desc="compiling", disable=not progress, file=sys.stderr):
            for do_sample in variants:
                if shape[0] == "ee":  # (kind, segment, batch, width, chunk length)
                    self.ee_decoder.warmup_one(*shape[1:], do_sample)
                    continue
                kind, b, n, rows = shape
                sp = SamplingParams.build([], b)
                if kind == "decode":
                    pad = np.full(b, -1, np.int32)
                    self.runner.decode(DecodeBatch(pad, np.zeros(b, np.int32), pad, block_table_array([[]] * b, n), sp),
                                       do_sample)
                else:
                    pad, zero = np.full((rows, n), -1, np.int32), np.zeros((rows, n), np.int32)
                    self.runner.prefill(zero, pad, pad, np.full((rows, n), drop, np.int32), zero, np.zeros(b, np.int32),
                                        sp, None, do_sample=do_sample)
        self.runner.sync()
        return len(variants) * len(shapes)

    # ------------------------------------------------------------------ convenience
    def stream(self, prompts: Iterable[str | list[int]], config: GenerationConfig | None = None,
               chat: bool = False) -> Iterator[StreamEvent]:
        """Submit all prompts, then yield token events as the engine produces them. Closing the
        iterator early (`break`, `.close()`) cancels its unfinished requests."""
        encoded = [self.encode(p, chat) for p in _as_list(prompts)]
        ids = [self.submit(e, config) for e in encoded]
        pending = set(ids)
        try:
            while pending:
                for ev in self.step():
                    if ev.request_id in pending:
                        if ev.finished:
                            pending.discard(ev.request_id)
                        yield ev
        finally:
            for rid in sorted(pending):
                self.cancel(rid)

    def generate(self, prompts: str | Iterable[str | list[int]], config: GenerationConfig | None = None,
                 chat: bool = False, progress: bool = False) -> list[GenerationResult]:
        """Generate for every prompt (continuous batching); results in prompt order."""
        prompts = _as_list(prompts)
        # validate everything before queueing anything
        encoded = [self.encode(p, chat) for p in prompts]
        ids = [self.submit(e, config) for e in encoded]
        results: dict[int, GenerationResult] = {}
        bar = _progress(len(ids), progress)
        while len(results) < len(ids):
            for ev in self.step():
                if ev.finished and ev.request_id in ids:
                    results[ev.request_id] = ev.result
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]


def resolve_attention(attention: str, dtype, mesh=None) -> str:
    """The decode-attention path for `Engine(attention=...)`: "auto" takes the Pallas kernel on a
    GPU, the C++ FFI kernel on a CPU (fp32, one device) where it builds, else the XLA path."""
    from drex_jax.model.paged import ATTENTION

    if attention not in ATTENTION + ("auto",):
        raise ValueError(f"attention must be one of {('auto',) + ATTENTION}, got {attention!r}")
    backend = jax.default_backend()
    if attention == "auto":
        if mesh is not None:  # the kernels have no partitioning rule: GSPMD partitions the XLA path
            return "xla"
        if backend == "gpu":
            return "pallas"
        if backend == "cpu" and dtype == jnp.float32:
            from drex_jax.model.kernels import ffi

            return "ffi" if ffi.available() else "xla"
        return "xla"
    if attention != "xla" and mesh is not None:
        raise ValueError(f"attention={attention!r} runs on one device; with a mesh use 'xla' or 'auto'")
    if attention == "ffi":
        if backend != "cpu" or dtype != jnp.float32:
            raise ValueError(f"attention='ffi' is the CPU kernel for float32; this engine runs {backend} "
                             f"{jnp.dtype(dtype).name}: use 'auto'")
        from drex_jax.model.kernels import ffi

        if not ffi.available():
            raise ValueError("attention='ffi' but the CPU kernel could not be built (see the notice above)")
    return attention


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # a single token-id prompt
    return prompts


def _safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text` that can be emitted now: not ending in a partial stop string or U+FFFD."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n = min(n, len(text[:n]) - k)
                break
    return n


def _dtype(name: str):
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in allowed:
        raise ValueError(f"dtype {name!r} not supported; choose one of {sorted(allowed)}")
    return allowed[name]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", disable=not enabled, file=sys.stderr)
