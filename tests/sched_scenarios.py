"""Scheduler scenarios that run without jax: the real `Scheduler` and decoders over a fake runner.

The fake runner is a "model" whose next token depends only on the input token and its position,
`markov(t, p)`, but it reads the input tokens back from a fake KV pool addressed like the real
one, (page, offset) through each row's block table. So a page handed to two requests at once, a
page freed while in use, a wrong replay after preemption or a botched verify rollback changes
the tokens, and the outputs are checked against the plain chain. Ramps draft the right token
except at positions where `wrong_draft` says otherwise, always confidently, so verify mode
drafts, rejects and rolls back often.

Importing this module loads no jax (a test checks that in a fresh interpreter)."""
from __future__ import annotations

import types

import numpy as np

from drex_jax.early_exit import EEConfig
from drex_jax.generation import GenerationConfig, Sampled
from drex_jax.kv.pages import pages_needed
from drex_jax.sched.batch import BatchLayout, ChunkBatch
from drex_jax.sched.decoding import FullDepthDecoder
from drex_jax.sched.ee_decoder import EarlyExitDecoder
from drex_jax.sched.ramp_gate import GateConfig
from drex_jax.sched.scheduler import Scheduler
from drex_jax.sched.step import engine_step

V, LAYERS = 97, 4


def markov(t: int, p: int) -> int:
    return (7 * int(t) + 3 * int(p) + 1) % V


def wrong_draft(t: int, p: int) -> bool:
    return (int(t) + int(p)) % 3 == 0


def chain(prompt: list[int], n: int) -> list[int]:
    """The full model's greedy output: `n` tokens after `prompt`."""
    out, t, p = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        t, p = markov(t, p), p + 1
        out.append(t)
    return out


class FakeRunner:
    """The `DeviceRunner` calls the decoders and the engine loop make, on a dict "pool"."""

    def __init__(self, page_size: int):
        self.page_size, self.mem = page_size, {}  # (page, offset) -> input token
        self.calls = 0

    def _addr(self, bt, i, p):
        return int(bt[i, p // self.page_size]), p % self.page_size

    def prefill(self, tokens, positions, segment_ids, write_page, write_off, last_index, sampling, kv_depth=None,
                *, do_sample, missing_kv="copy", logprobs=False):
        for r, c in zip(*np.nonzero(positions >= 0)):
            self.mem[int(write_page[r, c]), int(write_off[r, c])] = int(tokens[r, c])
        flat_t, flat_p = tokens.reshape(-1), positions.reshape(-1)
        return Sampled(np.asarray([markov(flat_t[i], flat_p[i]) for i in last_index], np.int32))

    def prefill_chunk(self, batch, *, do_sample, logprobs=False):
        out = np.zeros(len(batch.requests), np.int32)
        for i in range(len(batch.requests)):
            valid = np.flatnonzero(batch.positions[i] >= 0)
            for j in valid:  # the earlier positions must already be in the pool (read back below)
                self.mem[self._addr(batch.block_tables, i, int(batch.positions[i, j]))] = int(batch.tokens[i, j])
            p = int(batch.positions[i, valid[-1]])
            assert all(self._addr(batch.block_tables, i, q) in self.mem for q in range(p)), "chunk before its prefix"
            out[i] = markov(self.mem[self._addr(batch.block_tables, i, p)], p)
        return Sampled(out)

    def decode(self, batch, do_sample, logprobs=False):
        out = np.zeros(len(batch.slot_ids), np.int32)
        for i, p in enumerate(batch.positions):
            if p >= 0:
                self.mem[self._addr(batch.block_tables, i, p)] = int(batch.tokens[i])
                out[i] = markov(batch.tokens[i], p)
        return Sampled(out)

    def timed_decode(self, batch, do_sample, logprobs=False):
        return self.decode(batch, do_sample), _timing()

    def run_layers(self, batch, start, end, ramp, do_sample, every_position=False, logprobs=False,
                   speculative=False, drafts=None):
        assert not speculative, "the fake runner decodes greedily: no speculative sampling"
        self.calls += 1
        chunk = isinstance(batch, ChunkBatch)
        positions = batch.positions if chunk else batch.positions[:, None]
        tokens = batch.tokens if chunk else batch.tokens[:, None]
        depths = batch.depths if chunk else np.full_like(positions, start)
        B, T = positions.shape
        full = np.zeros((B, T), np.int32)
        cur = np.zeros(B, np.int32)
        for i in range(B):
            valid = np.flatnonzero(positions[i] >= 0)
            for j in valid:
                p, addr = int(positions[i, j]), self._addr(batch.block_tables, i, int(positions[i, j]))
                if start == 0 and depths[i, j] == 0:  # the input token enters at layer 0
                    self.mem[addr] = int(tokens[i, j])
                full[i, j] = markov(self.mem[addr], p)
            if len(valid):
                p = int(positions[i, valid[-1]])
                t = self.mem[self._addr(batch.block_tables, i, p)]
                cur[i] = full[i, valid[-1]] if ramp < 0 or not wrong_draft(t, p) else (full[i, valid[-1]] + 1) % V
        conf = np.full(B, np.inf if ramp < 0 else 1.0, np.float32)
        return Sampled(full if every_position and ramp < 0 else cur), conf, _timing()

    def fill(self, *args):
        raise AssertionError("recompute never fills")

    @staticmethod
    def compile_count() -> int:
        return 0


def _timing():
    return types.SimpleNamespace(start=0.0, end=0.0, seconds=1e-3)


class CharTokenizer:
    """Token t decodes to one letter: enough for stop strings without a real tokenizer."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(t) % 26) for t in ids)


class Loop:
    """The engine's loop (schedule -> prefill -> decode -> commit) over the fake runner."""

    def __init__(self, num_pages: int, verify: bool, max_slots: int = 4, page_size: int = 4, tokenizer=None,
                 budget: int = 64, budget_while_decoding: int | None = None):
        self.scheduler = Scheduler(num_pages=num_pages, page_size=page_size, max_slots=max_slots, max_seq_len=64,
                                   max_prefill_tokens_per_step=budget, num_layers=LAYERS, eos_ids=frozenset(),
                                   tokenizer=tokenizer, max_prefill_tokens_while_decoding=budget_while_decoding)
        self.runner = FakeRunner(page_size)
        layout = BatchLayout(page_size, max_slots, None)
        if verify:
            ee = EEConfig((2,), 0.5, missing_kv="recompute", verify=True, max_draft=3)
            cfg = types.SimpleNamespace(num_layers=LAYERS, vocab_size=V)
            self.decoder = EarlyExitDecoder(cfg, self.runner, ee, "rebatching", flush=_flush(), art=False,
                                            gate=GateConfig(enabled=False), layout=layout)
        else:
            self.decoder = FullDepthDecoder(self.runner, layout, LAYERS)

    def step(self):
        events = engine_step(self.scheduler, self.runner, self.decoder)
        self.check_pages()
        return events

    def check_pages(self):
        """No page is held twice; held + free = capacity; nobody holds pages past its next token."""
        s = self.scheduler
        held = [p for r in s.running for p in r.pages]
        assert len(held) == len(set(held)) and 0 not in held, "a page is held twice (or the dummy page)"
        assert len(held) + s.allocator.num_free == s.allocator.capacity, "pages leaked"
        for r in s.running:
            upto = len(r.context_ids) if r.prefilling else r.cache_len  # mid-prefill: its context and next token
            assert len(r.pages) <= pages_needed(upto + 1, s.page_size), (r.id, r.cache_len, r.pages)


def _flush():
    from drex_jax.sched.flush import FlushConfig

    return FlushConfig()


def prompts(n: int, seed: int, lengths=(2, 10)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, V, rng.integers(*lengths))] for _ in range(n)]


def serve(loop: Loop, work: list[list[int]], new_tokens: int, cancel_at: dict | None = None, stop=()) -> dict:
    """Submit two prompts per step; `cancel_at` {step: "running" | "waiting"} cancels one then.
    Returns {prompt index: GenerationResult}."""
    gc = GenerationConfig(max_new_tokens=new_tokens, stop=tuple(stop))
    ids, out, step, queue = {}, {}, 0, list(enumerate(work))
    while queue or loop.scheduler.has_work:
        for _ in range(2):
            if queue:
                i, p = queue.pop(0)
                ids[loop.scheduler.submit(p, gc).id] = i
        what = (cancel_at or {}).get(step)
        pool = loop.scheduler.running if what == "running" else loop.scheduler.waiting if what else []
        if pool:
            victim = max(pool, key=lambda r: len(r.ee.drafts)) if what == "running" else pool[-1]
            out[ids[victim.id]] = loop.scheduler.cancel(victim.id)
            loop.check_pages()
        for ev in loop.step():
            if ev.finished:
                out[ids[ev.request_id]] = ev.result
        step += 1
        assert step < 10_000, "the scheduler stopped making progress"
    return out


def check_against_chain(work, out, new_tokens) -> int:
    """Every result equals the chain (a cancelled one: a prefix of it). Returns how many were cancelled."""
    cancelled = 0
    for i, p in enumerate(work):
        want, got = chain(p, new_tokens), out[i].token_ids
        if out[i].stats.finish_reason == "cancelled":
            cancelled += 1
            assert got == want[:len(got)], f"request {i}: cancelled output is not a prefix of the chain"
        else:
            assert got == want, f"request {i}: {got} != {want}"
    return cancelled


def preemption(verify: bool = False) -> int:
    """A pool too small for everyone: requests are preempted and recomputed; outputs equal the
    chain and every page comes back. Returns the number of preemptions."""
    work, n = prompts(10, 1), 14
    loop = Loop(num_pages=13, verify=verify)
    out = serve(loop, work, n)
    check_against_chain(work, out, n)
    s = loop.scheduler
    assert s.num_preemptions > 0, "the pool was meant to run out"
    assert sum(r.stats.preemptions for r in out.values()) == s.num_preemptions
    assert s.allocator.num_free == s.allocator.capacity and s.num_free_slots == 4 and not s.has_work
    return s.num_preemptions


def cancellation(verify: bool = False) -> None:
    """Cancelling a running request (the one holding most drafts) and a waiting one returns their
    slot and pages at once; the others are unaffected."""
    work, n = prompts(8, 2), 12
    loop = Loop(num_pages=64, verify=verify)
    out = serve(loop, work, n, cancel_at={3: "running", 4: "waiting"})
    assert check_against_chain(work, out, n) == 2
    s = loop.scheduler
    assert s.allocator.num_free == s.allocator.capacity and s.num_free_slots == 4 and not s.has_work


def verify_rollback() -> dict:
    """Verify mode with drafts that are often wrong: accepted prefixes, corrections, rejected
    drafts' pages returned (checked after every step), under preemption; outputs equal the chain."""
    work, n = prompts(10, 3), 16
    loop = Loop(num_pages=17, verify=True)
    out = serve(loop, work, n)
    check_against_chain(work, out, n)
    st = loop.decoder.stats
    assert sum(st.drafts_per_ramp) > 0 and sum(st.accepted_per_ramp) > 0, "nothing was drafted or accepted"
    assert sum(st.accepted_per_ramp) < sum(st.checked_per_ramp), "no draft was rejected"
    assert loop.scheduler.num_preemptions > 0
    return {"drafts": sum(st.drafts_per_ramp), "accepted": sum(st.accepted_per_ramp),
            "preemptions": loop.scheduler.num_preemptions}


def stop_strings_in_verify_mode() -> int:
    """Verify mode with a stop string that ends some requests in the middle of a step's accepted
    drafts: each output is the chain up to the token that completes the stop string, the text is cut
    before it, and the decoder counted exactly the tokens the requests kept (nothing after a stop).
    Returns how many requests stopped on it."""
    work, n = prompts(12, 4), 16
    texts = [CharTokenizer.decode(chain(p, n)) for p in work]
    stop = texts[0][5:7]  # occurs in request 0 at least
    loop = Loop(num_pages=64, verify=True, tokenizer=CharTokenizer())
    out = serve(loop, work, n, stop=(stop,))
    stopped = 0
    for i, p in enumerate(work):
        full, text = chain(p, n), texts[i]
        at = text.find(stop)
        if at >= 0:
            stopped += 1
            want = full[:at + len(stop)]
            assert out[i].stats.finish_reason == "stop" and out[i].text == text[:at], (i, out[i].text, text, stop)
        else:
            want = full
            assert out[i].text == text
        assert out[i].token_ids == want, (i, out[i].token_ids, want)
    st = loop.decoder.stats
    assert st.tokens == sum(len(r.token_ids) - 1 for r in out.values()), "tokens counted past a stop string"
    assert sum(st.accepted_per_ramp) > 0
    return stopped


def chunked_prefill(verify: bool = False, num_pages: int = 64) -> dict:
    """Prompts longer than a step's prefill budget (16 tokens; 5 while others decode) are prefilled
    in chunks over several steps while the running requests decode one token per step: outputs
    equal the chain, no step prefills more than its budget, and a request decodes in every step
    while a long prompt is being prefilled. Returns counts of what happened."""
    work, n = prompts(8, 3, lengths=(12, 40)), 10
    loop = Loop(num_pages=num_pages, verify=verify, budget=16, budget_while_decoding=5)
    s, counts = loop.scheduler, {"chunk_steps": 0, "cut_steps": 0, "stalled_steps": 0}
    real_schedule = s.schedule

    def schedule():
        decoding_before = bool(s.decoding)
        plan = real_schedule()
        tokens = (0 if plan.prefill is None else int((plan.prefill.positions >= 0).sum())) + (
            0 if plan.chunk is None else int((plan.chunk.positions >= 0).sum()))
        budget = 5 if decoding_before else 16
        assert tokens <= budget or (plan.prefill is not None and plan.prefill.kv_depth is not None), (tokens, budget)
        counts["chunk_steps"] += plan.chunk is not None
        counts["cut_steps"] += plan.prefill is not None and not all(plan.prefill.ends_context)
        if decoding_before and not plan.running and not plan.preempted:
            counts["stalled_steps"] += 1  # somebody was decoding and nobody decodes now
        return plan

    s.schedule = schedule
    out = serve(loop, work, n)
    check_against_chain(work, out, n)
    assert s.allocator.num_free == s.allocator.capacity and s.num_free_slots == 4 and not s.has_work
    return {**counts, "preemptions": s.num_preemptions}
