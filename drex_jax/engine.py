"""Continuous-batching engine over the paged KV pool (BATON-style insertion), as one loop.

Each `step()`: the scheduler plans (pages for every running request's next token, preempting
when the pool is out; admission of waiting requests into free slots, packed into one prefill
batch); the runner prefills the admitted contexts straight into their own pages; the decoder
runs one iteration over the running rows (full depth, or early exit through ramps); the
scheduler commits what the device produced and the events go out. Prefilled requests join that
same step's decode; finished and cancelled requests return slot and pages at once.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax import compile_cache, compile_counter
from drex_jax.generation import GenerationConfig, GenerationResult, StreamEvent, TokenLogprob
from drex_jax.kv.pages import bucket, pages_needed, pow2_upto
from drex_jax.kv.pool import KV_MEMORY_FRACTION, free_device_bytes, page_bytes, pages_for_budget
from drex_jax.model.attention_backends import get_backend, resolve_attention
from drex_jax.model.config import ModelConfig
from drex_jax.model.kernels.matmul import resolve_matmul
from drex_jax.model.params import check_params, decode_layout, packed_layout
from drex_jax.prompts import encode_chat, encode_prompt
from drex_jax.runner import DeviceRunner
from drex_jax.sched.batch import BatchLayout
from drex_jax.sched.decoding import FullDepthDecoder
from drex_jax.sched.scheduler import Scheduler
from drex_jax.sched.step import engine_step, overlapped_step


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
      max_prefill_tokens_per_step: context tokens one step prefills when nothing is decoding; a
        longer context is prefilled in chunks over several steps.
      max_prefill_tokens_while_decoding: the same while requests decode (default: the same
        figure): each step runs this much prefill and then one decode step, so it bounds how
        long running requests wait for their next token while prompts arrive (smaller: smoother
        streaming, slower admission; BENCHMARKS.md "chunked prefill" measures the trade).
      mesh: a ("dp"=1, "tp") `jax.sharding.Mesh` (drex_jax.sharding.make_mesh): params and the
        KV pool are split over tp; None = one device.
      attention: decode attention over the paged pool: "auto" (default: Pallas kernel on a GPU,
        the C++ FFI kernel on a CPU in fp32, else "xla"), or a name in
        `model.attention_backends.ATTENTION`. All give the same tokens (tests compare them).
      matmul: the layers' projections: "auto" (default: the CPU projection kernel over packed
        weights on a CPU in fp32 on one device, `model.kernels.matmul`, else "xla"), "kernel" or
        "xla" (XLA's dot). Both give the same tokens in fp32 (tests compare them).
      ee, policy, exit_heads, flush, art, gate, exit_trace, ramp_tokens: early exit
        (`EEConfig`, an exit policy name, trained heads, `FlushConfig`, ART on/off, `GateConfig`,
        a replayed `ExitTrace`, ramp candidate ids); `ee=None` decodes at full depth.
      decisions: how early-exit decisions follow cost. "frozen" (default): ART prices splits from a
        cost table timed at `warmup()` and never updated, and the ramp gate runs only in verify mode
        (where it cannot change a token), so greedy output depends on the requests and the batch
        composition only, never on timing. "measured": ART and the gate follow live timings
        (faster to adapt; a lossy policy's tokens may then differ from run to run).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", verbose: bool = False, **kwargs):
        from drex_jax.loading import heads_dir_for, load_model, needs_heads_dir

        path, cfg, params, tok = load_model(model, _dtype(dtype))
        if needs_heads_dir(kwargs.get("ee")) and kwargs.get("exit_heads") is None:
            kwargs["exit_heads"] = heads_dir_for(path, cfg, params, required=True)
        self._setup(cfg, params, tok, dtype=dtype, verbose=verbose, **kwargs)

    @classmethod
    def from_params(cls, cfg: ModelConfig, params: dict, tokenizer=None, *, dtype: str = "auto", **kwargs):
        check_params(cfg, params)
        eng = cls.__new__(cls)
        params = jax.tree.map(lambda a: jnp.asarray(a, _dtype(dtype)), params)
        eng._setup(cfg, params, tokenizer, dtype=dtype, **kwargs)
        return eng

    def _setup(self, cfg, params, tokenizer, *, dtype, verbose=False, max_slots=32, page_size=16,
               num_pages=None, kv_memory_bytes=None, kv_memory_fraction=KV_MEMORY_FRACTION, max_seq_len=None, max_prefill_tokens_per_step=1024,
               max_prefill_tokens_while_decoding=None,
               ee=None, policy=None, exit_heads=None, flush=None, art=True, mesh=None, exit_trace=None,
               ramp_tokens=None, attention="auto", gate=None, overlap="auto", matmul="auto", decisions="frozen"):
        if mesh is not None:
            from drex_jax.sharding import check_mesh

            check_mesh(mesh, cfg)
            if mesh.shape["dp"] != 1:
                raise ValueError(f"an Engine serves one replica but the mesh has dp={mesh.shape['dp']}; build one "
                                 "Engine per drex_jax.sharding.replica_meshes(mesh)")
        self.cfg, self.tokenizer, self.mesh, self.verbose = cfg, tokenizer, mesh, verbose
        self.dtype = _dtype(dtype)
        self.compile_cache = compile_cache.enable()  # before the first program compiles
        self.attention = resolve_attention(attention, self.dtype, mesh, cfg, page_size)
        self.max_seq_len = int(max_seq_len or min(cfg.max_position_embeddings, 2048))
        if not 1 < self.max_seq_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] for this model, "
                             f"got {max_seq_len}")
        Scheduler.check_sizes(max_slots=max_slots, page_size=page_size,
                              max_prefill_tokens_per_step=max_prefill_tokens_per_step)
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
        if num_pages is not None and kv_memory_bytes is not None:
            raise ValueError("give num_pages or kv_memory_bytes, not both")
        if kv_memory_bytes is not None:
            num_pages = pages_for_budget(cfg, kv_memory_bytes, page_size, self.dtype)
        # the layers' projections: the CPU kernel over packed weights where it can run (f32, one
        # device), else XLA's dot (kernels/matmul.py)
        self.matmul = resolve_matmul(matmul, self.dtype, mesh, cfg, max_slots=max_slots)
        # the compiled steps read per-layer weights, [out, in] (or packed panels); placed before the
        # pool is sized, so a GPU's free memory is measured with this copy on it (the caller may
        # still hold its own). Packed params (another kernel engine's) stay as they are.
        params = packed_layout(params) if self.matmul == "kernel" else decode_layout(params)
        if mesh is not None:
            from drex_jax.sharding import shard_params

            params = shard_params(cfg, params, mesh)
        if num_pages is None:
            num_pages = self._default_pages(cfg, max_slots, page_size, kv_memory_fraction, mesh)
        eos = frozenset(cfg.eos_token_ids) | (
            {int(tokenizer.eos_token_id)} if tokenizer is not None and tokenizer.eos_token_id is not None else set())
        # block-table widths the decode programs take: a backend whose cost follows each row's
        # length takes one width (the longest sequence's) for every batch, one program per batch
        # bucket; the others a power-of-two bucket per batch
        max_width = bucket(pages_needed(self.max_seq_len, page_size))
        self.table_width = max_width if get_backend(self.attention).fixed_table_width else None
        self.scheduler = Scheduler(num_pages=num_pages, page_size=page_size, max_slots=max_slots,
                                   max_seq_len=self.max_seq_len, max_prefill_tokens_per_step=max_prefill_tokens_per_step,
                                   num_layers=cfg.num_layers, tokenizer=tokenizer, eos_ids=eos,
                                   max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding,
                                   table_width=self.table_width, replay_depths=ee is not None)
        self.page_size, self.max_slots = page_size, max_slots
        # keep a plain decode step in flight while the host commits the previous one (one device:
        # a step's device output feeds the next as it lies). "auto": on a GPU only. On this 2-core
        # CPU the host's work then competes with XLA's compute threads: SmolLM2 decode ran 5-19 %
        # slower with it (BENCHMARKS.md, issue 29)
        if overlap not in ("auto", True, False):
            raise ValueError(f"overlap must be 'auto', True or False, got {overlap!r}")
        overlap = jax.default_backend() == "gpu" if overlap == "auto" else overlap
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.max_prefill_tokens_while_decoding = self.scheduler.max_prefill_tokens_while_decoding
        self.page_widths = [max_width] if self.table_width else pow2_upto(max_width)
        self.runner = DeviceRunner(cfg, params, self.scheduler.allocator.num_pages, page_size, self.dtype,
                                   self.attention, mesh)
        compile_counter.install()
        layout = BatchLayout(page_size, max_slots, self.table_width)
        if policy is not None:
            from drex_jax.rebatch.policies import get_policy

            get_policy(policy)  # an unknown name is a ValueError listing the policies
        if ee is None:
            if policy not in (None, "off"):
                raise ValueError(f"policy {policy!r} needs an early-exit config (ee=EEConfig(...))")
            self.decoder = FullDepthDecoder(self.runner, layout, cfg.num_layers)
        else:
            self.decoder = self._early_exit_decoder(layout, ee, policy, exit_heads, flush, art, exit_trace,
                                                    ramp_tokens, gate, decisions)
        self.overlap, self._inflight = overlap and mesh is None and self.decoder.overlappable, None

    def _default_pages(self, cfg, max_slots: int, page_size: int, fraction: float, mesh) -> int:
        """1 + max_slots x pages per max_seq_len sequence; on a device that reports its memory (a GPU)
        never more than `fraction` of what is free on any of this process's devices (a mesh splits
        each page over its tp devices)."""
        num_pages = 1 + max_slots * pages_needed(self.max_seq_len, page_size)
        local = None if mesh is None else [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        free = free_device_bytes(local)
        if free is None:
            return num_pages
        share = 1 if mesh is None else mesh.shape["tp"]
        fits = int(fraction * free * share) // page_bytes(cfg, page_size, self.dtype)
        if fits < 1 + pages_needed(self.max_seq_len, page_size):
            raise ValueError(f"the device has {free / 2**30:.2f} GiB free after the weights; kv_memory_fraction="
                             f"{fraction} of it holds {fits} KV pages of {page_size} tokens, fewer than one "
                             f"{self.max_seq_len}-token sequence needs: lower max_seq_len or raise kv_memory_fraction")
        return min(num_pages, fits)

    def _early_exit_decoder(self, layout, ee, policy, exit_heads, flush, art, exit_trace, ramp_tokens, gate,
                            decisions):
        from drex_jax.loading import load_exit_heads
        from drex_jax.rebatch.policies import get_policy
        from drex_jax.sched.ee_decoder import EarlyExitDecoder
        from drex_jax.sched.exit_trace import ExitTrace
        from drex_jax.sched.flush import FlushConfig

        policy = get_policy(policy or "rebatching")
        ee.validate(self.cfg.num_layers, self.cfg.vocab_size)
        heads, ramp_tokens = load_exit_heads(ee, self.cfg, self.params, exit_heads, ramp_tokens)
        ramps = [e for e in ee.exit_layers if e < self.cfg.num_layers]
        if exit_trace is not None and (not isinstance(exit_trace, ExitTrace)
                                       or len(exit_trace.fractions) != len(ramps) + 1):
            raise ValueError(f"exit_trace must be an ExitTrace with {len(ramps) + 1} fractions (ramps + full depth)")
        decoder = EarlyExitDecoder(self.cfg, self.runner, ee, policy, flush or FlushConfig(), art, exit_trace, gate,
                                   layout=layout, decisions=decisions)
        self.runner.enable_early_exit(ee, heads, ramp_tokens, self.max_slots)
        return decoder

    # ------------------------------------------------------------------ state, read only
    @property
    def params(self) -> dict:
        """The weights the compiled steps read (decode layout, or the packed layout with the CPU
        projection kernel; sharded under a mesh). `params.decode_layout` unpacks."""
        return self.runner.params

    @property
    def pool(self) -> dict:
        """The paged KV pool, K and V [layers, kv_heads, pages, page_size, head_dim]."""
        return self.runner.pool

    @property
    def allocator(self):
        return self.scheduler.allocator

    @property
    def early_exit(self) -> dict | None:
        """The early-exit setup (EEConfig fields, policy, ART) or None at full depth."""
        return self.decoder.describe() if hasattr(self.decoder, "describe") else None

    @property
    def ee_stats(self):
        """Early-exit counters (`EEStats`) or None without early exit."""
        return getattr(self.decoder, "stats", None)

    def stats(self) -> dict:
        """Serving counters: requests running / waiting, free pages and slots, preemptions, the
        peak of pages in use since the last `reset_stats()`."""
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "free_pages": s.allocator.num_free,
                "free_slots": s.num_free_slots, "preemptions": s.num_preemptions, "peak_pages_used": s.peak_pages_used}

    def reset_stats(self) -> None:
        """Start counting afresh: the early-exit counters and the page-use peak."""
        self.scheduler.reset_peak_pages()
        if hasattr(self.decoder, "reset_stats"):
            self.decoder.reset_stats()

    def profile_art(self) -> int:
        """Early exit with ART: time the fused step for the shapes ART has met (see
        `EarlyExitDecoder.profile_art`); 0 otherwise."""
        return self.decoder.profile_art() if hasattr(self.decoder, "profile_art") else 0

    has_work = property(lambda self: self.scheduler.has_work)
    num_running = property(lambda self: len(self.scheduler.running), doc="Requests holding a decode slot.")
    num_waiting = property(lambda self: len(self.scheduler.waiting), doc="Requests queued (new or preempted).")
    num_free_pages = property(lambda self: self.scheduler.allocator.num_free)
    num_free_slots = property(lambda self: self.scheduler.num_free_slots)
    num_preemptions = property(lambda self: self.scheduler.num_preemptions)
    peak_pages_used = property(lambda self: self.scheduler.peak_pages_used)

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt (text, through the chat template if `chat`, or ids, checked)."""
        return encode_prompt(self.tokenizer, self.cfg.vocab_size, prompt, chat)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (`[{"role": ..., "content": ...}, ...]`) through the model's chat
        template, ending with the assistant's turn."""
        return encode_chat(self.tokenizer, messages)

    def score(self, prompt: str | list[int], chat: bool = False) -> list[TokenLogprob]:
        """Each prompt token's full-depth log-probability given the tokens before it, with its top
        `TOP_LOGPROBS_MAX` alternatives (the first token's is None: nothing predicts it). A dense
        forward pass outside the paged pool: requests in flight are untouched."""
        ids = self.encode(prompt, chat)
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the context limit max_seq_len={self.max_seq_len}")
        return self.runner.score(ids)

    def submit(self, prompt: str | list[int], config: GenerationConfig | None = None, chat: bool = False) -> int:
        """Queue one request; returns its id. Raises ValueError (queue untouched) on bad input."""
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
        config.validate()
        ids = self.encode(prompt, chat)
        self.decoder.check_request(config)
        return self.scheduler.submit(ids, config).id

    def cancel(self, request_id: int) -> GenerationResult:
        """Stop a waiting or running request now: its slot and pages return at once. Returns its
        partial result (finish_reason 'cancelled'). Other requests are unaffected."""
        return self.scheduler.cancel(request_id)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[StreamEvent]:
        """One engine iteration: schedule -> prefill -> decode -> commit; each finished token is a
        `StreamEvent`. With `overlap` (plain decoding, one device), steady decode keeps one step in
        flight: a call dispatches the next step, then commits the previous one (`sched.step`)."""
        if not self.overlap:
            return engine_step(self.scheduler, self.runner, self.decoder)
        events, self._inflight = overlapped_step(self.scheduler, self.runner, self.decoder, self._inflight)
        return events

    def warmup(self, progress: bool = False, sampling: bool = True) -> int:
        """Compile every decode (or early-exit segment, fill and ART) shape and prompt bucket ahead of
        time on all-padding batches (the pool is untouched). Returns the number of programs run;
        afterwards a steady stream compiles nothing (`sampling=False`: greedy programs only)."""
        from drex_jax.warmup import warmup

        return warmup(self.runner, self.decoder, progress=progress, sampling=sampling, **self._warmup_sizes(),
                      num_pages=self.scheduler.allocator.num_pages,
                      replay_layers=self.cfg.num_layers if self.scheduler.replay_depths else None)

    def warmup_programs(self, sampling: bool = True) -> int:
        """How many programs `warmup()` would run (nothing compiles)."""
        from drex_jax.warmup import warmup_jobs

        return len(warmup_jobs(self.decoder, sampling=sampling, **self._warmup_sizes()))

    def _warmup_sizes(self) -> dict:
        return dict(max_slots=self.max_slots, max_seq_len=self.max_seq_len, page_widths=self.page_widths,
                    prefill_budget=max(self.max_prefill_tokens_per_step, self.max_prefill_tokens_while_decoding),
                    chunk_min=self.scheduler.chunk_min)

    def stream(self, prompts: Iterable[str | list[int]], config: GenerationConfig | None = None,
               chat: bool = False) -> Iterator[StreamEvent]:
        """Submit all prompts, then yield token events as the engine produces them. Closing the
        iterator early (`break`, `.close()`) cancels its unfinished requests."""
        encoded = [self.encode(p, chat) for p in _as_list(prompts)]
        pending = {self.submit(e, config) for e in encoded}
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
        from tqdm import tqdm

        encoded = [self.encode(p, chat) for p in _as_list(prompts)]  # validate everything before queueing
        ids = [self.submit(e, config) for e in encoded]
        results: dict[int, GenerationResult] = {}
        with tqdm(total=len(ids), desc="requests", unit="req", disable=not progress, file=sys.stderr) as bar:
            while len(results) < len(ids):
                for ev in self.step():
                    if ev.finished and ev.request_id in ids:
                        results[ev.request_id] = ev.result
                        bar.update(1)
        return [results[i] for i in ids]


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # a single token-id prompt
    return prompts


def _dtype(name: str):
    """"auto": bfloat16 on a GPU (the weights' bandwidth halves; its dots run bf16 natively), float32
    on a CPU (XLA:CPU computes bf16 dots by converting to f32 and back, measured slower)."""
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    if name not in allowed:
        raise ValueError(f"dtype {name!r} not supported; choose one of {sorted(allowed) + ['auto']}")
    return allowed[name]
