"""The host scheduler: queues, slots and pages; `schedule()` plans a step, `commit()` applies its results.

No jax here. Each engine step asks `schedule()` for a `StepPlan`: first every running request
gets the page its next token needs (oldest first), preempting the most recently admitted
requests when the pool runs out (their slot and pages return; they go back to the front of the
queue and are recomputed by prefill when pages free up); then the step's prefill token budget
goes first to a context whose prefill is under way, then to waiting requests admitted in FIFO
order into free slots while pages last. A context longer than what is left of the budget is cut:
its first piece is packed with the others (one prefill call), the rest comes in later steps as
chunks that attend through the pool (chunked prefill), so running requests keep decoding between
them. The plan is data: the prefill arrays and the running requests to decode. The
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
from drex_jax.kv.pages import PageAllocator, bucket, causal_block, pages_needed, row_bucket
from drex_jax.sched.batch import PrefillChunk, chunk_min_width, prefill_chunk
from drex_jax.sched.detokenize import IncrementalDetokenizer
from drex_jax.sched.request import Emission, Request


@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """Contexts (or the first piece of a context cut at the budget) packed into rows [R, W]
    (first-fit decreasing), one prefill call.

    requests: the admitted requests, context index j = position in this tuple; ends_context[j]:
    whether its whole context is here (then its next token is emitted). tokens, positions (-1 =
    padding), segment_ids (= j), write_page (num_pages = no write), write_off: [R, W] int32;
    last_index [prefill_rows]: flat index (row * W + col) of each context's last token here (a
    fixed length per engine, so the compiled programs differ by (R, W) only); kv_depth [R, W]: the
    depth to replay at each position (a preempted request's early exits), None when all are full
    depth. The sampling rows: Q = bucket(len(requests))."""

    requests: tuple[Request, ...]
    ends_context: tuple[bool, ...]
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    write_page: np.ndarray
    write_off: np.ndarray
    last_index: np.ndarray
    kv_depth: np.ndarray | None
    sampling: SamplingParams
    do_sample: bool
    logprobs: bool  # some request asks for log-probabilities


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one engine step runs: a packed prefill batch (or None), a prefill chunk of contexts
    already partly in the pool (or None), then a decode over `running` (slot order: the requests
    whose context is in the pool, including those whose prefill ended this step; those that finish
    on their first token drop out at commit)."""

    prefill: PrefillBatch | None
    running: tuple[Request, ...]
    preempted: int = 0
    chunk: PrefillChunk | None = None


# Row widths a packed prefill may take: 1.5x steps up to 512 (first-fit packing of HumanEval chat
# prompts pads ~7-11 % at 8-64 prompts, the same as multiples of 64 with fewer programs), powers of
# two above.
PACKED_WIDTHS = (32, 64, 128, 192, 256, 384, 512)


def prefill_widths(max_seq_len: int) -> list[int]:
    """Every row width a packed prefill of contexts up to `max_seq_len` tokens may take."""
    top = bucket(max_seq_len, 32)
    out, w = [w for w in PACKED_WIDTHS if w <= top], 1024
    while w <= top:
        out.append(w)
        w *= 2
    return out


def attention_keys(W: int) -> float:
    """Mean keys a query of a W-wide packed row scores (`ops.causal_attention`'s query blocks)."""
    block = causal_block(W)
    return block * (W // block + 1) / 2


def first_fit(lengths: list[int], W: int) -> list[list[int]]:
    """First-fit-decreasing: indices of `lengths` per row of width W."""
    rows, room = [], []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = next((k for k, free in enumerate(room) if free >= lengths[j]), None)
        if k is None:
            rows.append([]), room.append(W)
            k = len(rows) - 1
        rows[k].append(j)
        room[k] -= lengths[j]
    return rows


def packing(lengths: list[int], max_seq_len: int) -> tuple[int, list[list[int]]]:
    """(W, rows): the row width whose first-fit packing costs least, counting padded tokens (rows
    come in `row_bucket`s) and their attention keys (a token's projections cost about as much as
    scoring ~1,000 keys on this model: `drex-jax bench --roofline`'s prefill profile). Ties go to
    the narrower width."""
    best = None
    for W in prefill_widths(max_seq_len):
        if W < max(lengths):
            continue
        rows = first_fit(lengths, W)
        cost = row_bucket(len(rows)) * W * (1 + attention_keys(W) / 1024)
        if best is None or cost < best[0]:
            best = (cost, W, rows)
    return best[1], best[2]


class Scheduler:
    """Requests, slots and KV pages for one engine (host side).

    num_layers: model depth (the K/V depth of full-depth positions). tokenizer: for incremental
    detokenization and stop strings (None: token ids only). eos_ids: the model's end tokens."""

    def __init__(self, *, num_pages: int, page_size: int, max_slots: int, max_seq_len: int,
                 max_prefill_tokens_per_step: int, num_layers: int, tokenizer=None, eos_ids=frozenset(),
                 max_prefill_tokens_while_decoding: int | None = None, table_width: int | None = None,
                 replay_depths: bool = False):
        self.check_sizes(max_slots=max_slots, page_size=page_size, max_prefill_tokens_per_step=max_prefill_tokens_per_step)
        if max_prefill_tokens_while_decoding is not None:
            self.check_sizes(max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding)
        self.allocator = PageAllocator(int(num_pages))
        self.page_size, self.max_slots, self.max_seq_len = page_size, max_slots, max_seq_len
        self.max_prefill_tokens_per_step, self.num_layers = max_prefill_tokens_per_step, num_layers
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding or max_prefill_tokens_per_step
        self.table_width = table_width  # fixed block-table width of the attention backend (None: bucketed)
        # early-exit engines: every packed prefill carries kv_depth, so a preempted request's replay
        # runs the same (warmed-up) program as any prefill instead of compiling its own
        self.replay_depths = replay_depths
        self.chunk_min = chunk_min_width(self.max_prefill_tokens_while_decoding)  # narrowest chunk program
        self.prefill_rows = bucket(max_slots)  # last_index length: every program samples from this many
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
        """Requests holding a slot, in slot order (some may still be prefilling)."""
        return [self._running[s] for s in sorted(self._running)]

    @property
    def decoding(self) -> list[Request]:
        """Running requests whose context is in the pool (they decode), in slot order."""
        return [r for r in self.running if not r.prefilling]

    @property
    def waiting(self) -> list[Request]:
        """Queued requests, next to admit first."""
        return list(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def can_admit(self) -> bool:
        """Whether the next plan could admit a waiting request (or continue a prefill): a decision
        the host makes before the next step."""
        return bool(self._waiting and self._free_slots) or any(r.prefilling for r in self._running.values())

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def reset_peak_pages(self) -> None:
        self.peak_pages_used = self.allocator.capacity - self.allocator.num_free

    # ------------------------------------------------------------------ planning
    def schedule(self) -> StepPlan:
        """Pages for every running request's next token (preempting when out), then prefill: the
        context under way first, then admission."""
        preempted = self._grow_pages()
        prefill = chunk = None
        if not (preempted and self._running):  # re-admitting a victim at once would only thrash
            prefill, chunk = self._prefill_plan()
        return StepPlan(prefill, tuple(self.decoding), preempted, chunk)

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
        self.note_pages()
        return preempted

    def preempt(self, req: Request) -> None:
        """Free a running request's slot and pages (dropping the token it was computing) and put it
        back at the front of the queue for recompute."""
        del self._running[req.slot]
        self.allocator.free(req.pages)
        self._free_slots.append(req.slot)
        req.pages, req.slot = [], -1
        req.prefilled, req.prefilling = 0, False
        req.ee.reset()
        req.preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)  # victims go newest first, so the oldest ends up first

    def note_pages(self) -> None:
        self.peak_pages_used = max(self.peak_pages_used, self.allocator.capacity - self.allocator.num_free)

    def _prefill_plan(self) -> tuple[PrefillBatch | None, PrefillChunk | None]:
        """Spend this step's prefill budget (smaller while requests decode, so they keep streaming):
        the contexts under way continue first (as a chunk through the pool), then waiting requests
        are admitted (FIFO) into free slots while pages last; the one that does not fit what is left
        of the budget is cut there. A preempted request replaying early exits is never cut (it
        exceeds the budget when it comes alone)."""
        budget = step_budget = (self.max_prefill_tokens_while_decoding if self.decoding
                                else self.max_prefill_tokens_per_step)
        chunks: list[tuple[Request, int, int]] = []
        for req in sorted((r for r in self._running.values() if r.prefilling), key=lambda r: r.admit_seq):
            if budget <= 0:
                break
            start = req.prefilled
            end = min(len(req.context_ids), start + budget)
            chunks.append((req, start, end))
            budget -= end - start
        fresh: list[tuple[Request, int, int]] = []
        while self._waiting and self._free_slots and budget > 0:
            req = self._waiting[0]
            n = len(req.context_ids)
            replay = any(d < self.num_layers for d in req.kv_depths)  # early exits to replay
            if n > budget and (replay and (fresh or chunks) or budget < min(64, step_budget)):
                break  # a replay waits for a step of its own; a sliver of budget is not worth a cut
            pages = self.allocator.alloc(pages_needed(n + 1, self.page_size))
            if pages is None:  # wait for pages to come back
                break
            self._waiting.popleft()
            req.pages, req.slot = pages, self._free_slots.pop()
            self._running[req.slot] = req
            if req.admit_seq < 0:
                req.admit_seq, self._admitted = self._admitted, self._admitted + 1
            end = n if replay else min(n, budget)
            fresh.append((req, 0, end))
            budget -= end
        for req, _, end in chunks + fresh:
            req.prefilled, req.prefilling = end, end < len(req.context_ids)
        self.note_pages()
        return (self._pack(fresh) if fresh else None,
                prefill_chunk(chunks, self.page_size, self.table_width, self.chunk_min) if chunks else None)

    def _pack(self, pieces: list[tuple[Request, int, int]]) -> PrefillBatch:
        """First-fit-decreasing packing of context pieces [0, end) into rows of the width that
        costs least (`packing`); a preempted request's context replays the depth of every early
        exit, so its cache is rebuilt as it was."""
        group = [r for r, _, _ in pieces]
        lengths = [e for _, _, e in pieces]
        W, rows = packing(lengths, self.max_seq_len)
        R, Q, L = row_bucket(len(rows)), bucket(len(group)), self.num_layers
        tokens = np.zeros((R, W), np.int32)
        positions = np.full((R, W), -1, np.int32)
        segment_ids = np.full((R, W), -1, np.int32)
        write_page = np.full((R, W), self.allocator.num_pages, np.int32)  # out of range = no write
        write_off = np.zeros((R, W), np.int32)
        last_index = np.zeros(self.prefill_rows, np.int32)
        kv_depth = np.full((R, W), L, np.int32)
        for row, members in enumerate(rows):
            o = 0
            for j in members:
                r = group[j]
                n = lengths[j]
                ctx, pos = r.context_ids[:n], np.arange(n)
                tokens[row, o:o + n], positions[row, o:o + n], segment_ids[row, o:o + n] = ctx, pos, j
                write_page[row, o:o + n] = np.asarray(r.pages)[pos // self.page_size]
                write_off[row, o:o + n] = pos % self.page_size
                if r.kv_depths and n == len(r.context_ids):  # a cut piece is never a replay (all full depth)
                    kv_depth[row, o + len(r.prompt_ids):o + n] = r.kv_depths
                last_index[j] = row * W + o + n - 1
                o += n
        return PrefillBatch(tuple(group), tuple(n == len(r.context_ids) for r, n in zip(group, lengths)),
                            tokens, positions, segment_ids, write_page, write_off, last_index,
                            kv_depth if self.replay_depths or (kv_depth < L).any() else None,
                            SamplingParams.build([r.sampling_row() for r in group], Q),
                            any(r.config.temperature > 0 for r in group),
                            any(r.config.logprobs is not None for r in group))

    def prefill_emissions(self, batch: PrefillBatch | PrefillChunk, first) -> list[Emission]:
        """Prefill's sampled tokens (a `logprobs.Sampled`, one per context) as emissions, for the
        contexts whose last piece ran: a new request's first token; a preempted request's next
        token is already known, so its sample is dropped."""
        return [Emission(r, first.token(j), self.num_layers, None, first.logprob(j))
                for j, (r, ends) in enumerate(zip(batch.requests, batch.ends_context)) if ends and not r.generated]

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
