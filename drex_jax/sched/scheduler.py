"""The host scheduler: queues, slots and pages; `schedule()` plans a step, `commit()` applies its results.

No jax here. Each engine step asks `schedule()` for a `StepPlan`: first every running request
gets the page its next token needs (oldest first), preempting the most recently admitted
requests when the pool runs out (their slot and pages return; they go back to the front of the
queue and are recomputed by prefill when pages free up); then waiting requests are admitted in
FIFO order into free slots while pages and the prefill token budget last, and packed into one
prefill batch. The plan is data: the prefill arrays and the running requests to decode. The
device work happens elsewhere (the engine's runner and decoder); what it produced comes back as
`Emission`s to `commit()`, which records tokens, detokenizes incrementally, finishes requests
(stop token, length, stop string) and returns their slot and pages at once.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from drex_jax.generation import GenerationConfig, GenerationResult, RequestStats, SamplingParams, StreamEvent
from drex_jax.kv.pages import PageAllocator, bucket, pages_needed, row_bucket
from drex_jax.sched.detokenize import IncrementalDetokenizer
from drex_jax.sched.request import Emission, Request


@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """Contexts packed into rows [R, W] (first-fit decreasing), one prefill call.

    requests: the admitted requests, prompt index j = position in this tuple. tokens, positions
    (-1 = padding), segment_ids (= j), write_page (num_pages = no write), write_off: [R, W] int32;
    last_index [Q]: flat index (row * W + col) of each context's last token; kv_depth [R, W]: the
    depth to replay at each position (a preempted request's early exits), None when all are full
    depth. Q = bucket(len(requests)): padded prompts."""

    requests: tuple[Request, ...]
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    write_page: np.ndarray
    write_off: np.ndarray
    last_index: np.ndarray
    kv_depth: np.ndarray | None
    sampling: SamplingParams
    do_sample: bool
    logprobs: bool = False  # some request asks for log-probabilities


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one engine step runs: a prefill batch (or None), then a decode over `running` (slot
    order; it includes the requests prefilled this step; those that finish on their first token
    drop out at commit)."""

    prefill: PrefillBatch | None
    running: tuple[Request, ...]
    preempted: int = 0


class Scheduler:
    """Requests, slots and KV pages for one engine (host side).

    num_layers: model depth (the K/V depth of full-depth positions). tokenizer: for incremental
    detokenization and stop strings (None: token ids only). eos_ids: the model's end tokens."""

    def __init__(self, *, num_pages: int, page_size: int, max_slots: int, max_seq_len: int,
                 max_prefill_tokens_per_step: int, num_layers: int, tokenizer=None, eos_ids=frozenset()):
        self.check_sizes(max_slots=max_slots, page_size=page_size, max_prefill_tokens_per_step=max_prefill_tokens_per_step)
        self.allocator = PageAllocator(int(num_pages))
        self.page_size, self.max_slots, self.max_seq_len = page_size, max_slots, max_seq_len
        self.max_prefill_tokens_per_step, self.num_layers = max_prefill_tokens_per_step, num_layers
        self.tokenizer, self.eos_ids = tokenizer, frozenset(eos_ids)
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}  # slot -> request
        self._next_id = self._admitted = 0
        self.num_preemptions = 0
        self.peak_pages_used = 0

    @staticmethod
    def check_sizes(**sizes) -> None:
        """ValueError unless every size is an integer >= 1 (and `page_size` a power of two)."""
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if "page_size" in sizes and sizes["page_size"] & (sizes["page_size"] - 1):
            raise ValueError(f"page_size must be a power of two, got {sizes['page_size']}")

    # ------------------------------------------------------------------ queue
    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> Request:
        """Queue a request (ids already checked against the vocabulary). Raises ValueError, queue
        untouched, when it can never fit."""
        total = len(prompt_ids) + config.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={config.max_new_tokens} = {total} "
                             f"exceeds the context limit max_seq_len={self.max_seq_len}")
        need = pages_needed(total, self.page_size)
        if need > self.allocator.capacity:
            raise ValueError(f"request needs {need} KV pages but the pool only has {self.allocator.capacity}; "
                             "raise num_pages / kv_memory_bytes or lower max_new_tokens")
        stop_ids = (frozenset() if config.ignore_eos else self.eos_ids) | frozenset(config.stop_token_ids)
        req = Request(self._next_id, list(prompt_ids), config, stop_ids, time.perf_counter())
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, config.stop)
        if config.logprobs is not None:
            req.logprobs = []
        self._next_id += 1
        self._waiting.append(req)
        return req

    def cancel(self, request_id: int) -> GenerationResult:
        """Stop a waiting or running request now (slot and pages return at once); its partial result."""
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

    @property
    def running(self) -> list[Request]:
        """Requests holding a slot, in slot order."""
        return [self._running[s] for s in sorted(self._running)]

    @property
    def waiting(self) -> list[Request]:
        """Queued requests, next to admit first."""
        return list(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def reset_peak_pages(self) -> None:
        self.peak_pages_used = self.allocator.capacity - self.allocator.num_free

    # ------------------------------------------------------------------ planning
    def schedule(self) -> StepPlan:
        """Pages for every running request's next token (preempting when out), then admission."""
        preempted = self._grow_pages()
        prefill = None
        if not (preempted and self._running):  # re-admitting a victim at once would only thrash
            prefill = self._admit()
        return StepPlan(prefill, tuple(self.running), preempted)

    def _grow_pages(self) -> int:
        preempted = 0
        for req in sorted(self._running.values(), key=lambda r: r.admit_seq):
            while req.slot >= 0 and (need := pages_needed(req.cache_len + 1, self.page_size) - len(req.pages)) > 0:
                pages = self.allocator.alloc(need)
                if pages is not None:
                    req.pages += pages
                    break
                self.preempt(max(self._running.values(), key=lambda r: r.admit_seq))
                preempted += 1
        self._note_pages()
        return preempted

    def preempt(self, req: Request) -> None:
        """Free a running request's slot and pages (dropping the token it was computing) and put it
        back at the front of the queue for recompute."""
        del self._running[req.slot]
        self.allocator.free(req.pages)
        self._free_slots.append(req.slot)
        req.pages, req.slot = [], -1
        req.ee.reset()
        req.preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)  # victims go newest first, so the oldest ends up first

    def _note_pages(self) -> None:
        self.peak_pages_used = max(self.peak_pages_used, self.allocator.capacity - self.allocator.num_free)

    def _admit(self) -> PrefillBatch | None:
        """Waiting requests (FIFO) into free slots while pages and the prefill budget last. A request
        gets the pages of its context and next token now; later ones come as it grows."""
        group: list[Request] = []
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
            self._running[req.slot] = req
            if req.admit_seq < 0:
                req.admit_seq, self._admitted = self._admitted, self._admitted + 1
            group.append(req)
            budget -= n
        if not group:
            return None
        self._note_pages()
        return self._pack(group)

    def prefill_width(self, lengths: list[int]) -> int:
        """Row width for contexts of these lengths: fits the longest; up to 128 when there is that
        much to pack."""
        widest = min(128, bucket(sum(lengths), 16), bucket(self.max_seq_len, 16))
        return max(bucket(max(lengths), 16), widest)

    def _pack(self, group: list[Request]) -> PrefillBatch:
        """First-fit-decreasing packing of the contexts into rows; a preempted request's context
        replays the depth of every early exit, so its cache is rebuilt as it was."""
        lengths = [len(r.context_ids) for r in group]
        W = self.prefill_width(lengths)
        rows: list[list[int]] = []
        room: list[int] = []
        for j in sorted(range(len(group)), key=lambda j: -lengths[j]):
            k = next((k for k, free in enumerate(room) if free >= lengths[j]), None)
            if k is None:
                rows.append([]), room.append(W)
                k = len(rows) - 1
            rows[k].append(j)
            room[k] -= lengths[j]
        R, Q, L = row_bucket(len(rows)), bucket(len(group)), self.num_layers
        tokens = np.zeros((R, W), np.int32)
        positions = np.full((R, W), -1, np.int32)
        segment_ids = np.full((R, W), -1, np.int32)
        write_page = np.full((R, W), self.allocator.num_pages, np.int32)  # out of range = no write
        write_off = np.zeros((R, W), np.int32)
        last_index = np.zeros(Q, np.int32)
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
        return PrefillBatch(tuple(group), tokens, positions, segment_ids, write_page, write_off, last_index,
                            kv_depth if (kv_depth < L).any() else None,
                            SamplingParams.build([r.sampling_row() for r in group], Q),
                            any(r.config.temperature > 0 for r in group),
                            any(r.config.logprobs is not None for r in group))

    def prefill_emissions(self, batch: PrefillBatch, first) -> list[Emission]:
        """Prefill's sampled tokens (a `logprobs.Sampled` of [Q]) as emissions: a new request's
        first token; a preempted request's next token is already known, so its sample is dropped."""
        return [Emission(r, first.token(j), self.num_layers, None, first.logprob(j))
                for j, r in enumerate(batch.requests) if not r.generated]

    # ------------------------------------------------------------------ results
    def commit(self, emissions: list[Emission]) -> list[StreamEvent]:
        """Apply what the device produced, in order: tokens of a request that has finished (a stop
        met earlier in the same list) are dropped. Pages past a request's next token return (verify
        mode's rejected drafts)."""
        events, touched = [], {}
        for em in emissions:
            req = em.request
            if req.finished or req.slot < 0:
                continue
            events.append(self._record(req, em))
            touched[req.id] = req
        for req in touched.values():
            if req.slot >= 0:
                keep = pages_needed(req.cache_len + 1, self.page_size)
                if len(req.pages) > keep:
                    self.allocator.free(req.pages[keep:])
                    req.pages = req.pages[:keep]
        return events

    def _record(self, req: Request, em: Emission) -> StreamEvent:
        now = time.perf_counter()
        if em.kv_depth is not None:
            req.kv_depths.append(em.kv_depth)
        if not req.generated:
            req.first_token_time = now
        req.last_token_time = now
        req.generated.append(em.token)
        req.exit_layers.append(em.exit_layer)
        if req.logprobs is not None:
            req.logprobs.append(em.logprob)
        may_stop = req.may_stop(len(req.generated))
        done = None
        if em.token in req.stop_ids and may_stop:
            done = "stop"
        elif len(req.generated) >= req.config.max_new_tokens:
            done = "length"
        delta = ""
        if req.detok is not None:
            delta, stopped = req.detok.add(em.token, final=done is not None, may_stop=may_stop)
            done = "stop" if stopped else done
            req.text = req.detok.text + req.detok.pending
        result = None
        if done:
            req.finish_reason = done
            result = self._finish(req)
        return StreamEvent(req.id, em.token, delta, done is not None, result, em.logprob, em.exit_layer)

    def _finish(self, req: Request) -> GenerationResult:
        del self._running[req.slot]
        self.allocator.free(req.pages)
        self._free_slots.append(req.slot)
        req.pages, req.slot = [], -1
        return self._result(req)

    @staticmethod
    def _result(req: Request) -> GenerationResult:
        n = len(req.generated)
        end = req.last_token_time if n else time.perf_counter()
        stats = RequestStats(
            prompt_tokens=len(req.prompt_ids), generated_tokens=n,
            ttft_s=req.first_token_time - req.submit_time if n else float("nan"),
            tpot_s=(req.last_token_time - req.first_token_time) / max(n - 1, 1),
            latency_s=end - req.submit_time, finish_reason=req.finish_reason, preemptions=req.preemptions,
        )
        return GenerationResult(req.id, req.text, list(req.generated), stats, list(req.exit_layers),
                                None if req.logprobs is None else list(req.logprobs))
