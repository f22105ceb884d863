"""Host-side early-exit decode (a `sched.decoding.Decoder`): how the running rows go through
segments of layers between ramps under an exit policy, with per-ramp buffers for `rebatching`.
Every device call goes through the `DeviceRunner` it is built over (no jax here); the tokens it
finalizes come back from `step()` as `Emission`s for the scheduler to commit.

Segment s covers layers [bounds[s], bounds[s+1]) and ends at ramp s (the LM head for the
last segment). A request's `ee.stage` is the segment it waits to run: 0 = ready at layer 0,
s > 0 = sitting in the buffer of ramp s-1 with its hidden state in `hidden[slot]`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from drex_jax.early_exit import ACCEPTANCE_DECAY, PROBE_TOKENS, EEConfig
from drex_jax.generation import GenerationConfig, Sampled
from drex_jax.kv.missing import get_method
from drex_jax.kv.pages import batch_bucket, batch_buckets_upto, bucket, pow2_upto
from drex_jax.model.config import ModelConfig
from drex_jax.rebatch.policies import ExitPolicy, get_policy, involuntary
from drex_jax.sched.art import ARTProfiler
from drex_jax.sched.batch import BatchLayout, ChunkBatch, DecodeBatch
from drex_jax.sched.flush import FlushConfig, flush_reason
from drex_jax.sched.ramp_gate import EE, FUSED, GateConfig, RampGate
from drex_jax.sched.decoding import wants_logprobs
from drex_jax.sched.request import Emission, Request

# how exit decisions follow cost: a table timed at warm-up and then frozen (tokens never depend on
# timing), or live measurements (ART and the ramp gate adapt; lossy policies' tokens may vary)
DECISIONS = ("frozen", "measured")


@dataclasses.dataclass
class EEStats:
    tokens: int = 0  # decode tokens finalized (prefill tokens excluded)
    layers_run: int = 0  # sum over decode tokens of the layers actually executed for them
    exits_per_ramp: list[int] = dataclasses.field(default_factory=list)  # last entry = full depth
    # where each token first passed its threshold (last entry = never): the exit distribution
    # the model asked for, before any policy or ART overrode it (what exit traces record)
    wanted_per_ramp: list[int] = dataclasses.field(default_factory=list)
    involuntary_exits: int = 0
    involuntary_stays: int = 0
    art_declined: int = 0
    flushes: dict[str, int] = dataclasses.field(default_factory=dict)
    device_s: float = 0.0  # time inside synchronous device calls
    host_gap_s: float = 0.0  # time between one device result and the next dispatch
    segment_calls: int = 0
    round_trips: int = 0  # synchronous device calls (the host waits for a result; fills are not waited on)
    fused_iterations: int = 0  # rebatching iterations the ramp gate ran fused (early exit did not pay)
    gate_probes: int = 0  # windows that re-measured the mode the gate was not using
    # missing_kv="recompute": wanted exits refused because the row already held max_draft pending
    # positions (verify mode: also near max_new_tokens or after a drafted stop token)
    draft_cap_stays: int = 0
    # verify mode: drafted tokens, how many the full model confirmed, per ramp, and deep passes
    drafts_per_ramp: list[int] = dataclasses.field(default_factory=list)
    checked_per_ramp: list[int] = dataclasses.field(default_factory=list)  # drafts that reached a deep pass
    accepted_per_ramp: list[int] = dataclasses.field(default_factory=list)
    verify_passes: int = 0
    draft_stops: int = 0  # verify, draft_stop: tokens that would have drafted but ran deep to verify the chain
    ramp_skips: int = 0  # verify, adaptive_ramps: tokens that passed a ramp its request's acceptance had left

    def mean_depth(self) -> float:
        """Layers run per finalized token (with recompute: the deep layers run later for exited
        positions included, and in verify mode those of rejected drafts too)."""
        return self.layers_run / max(self.tokens, 1)

    def acceptance_rate(self) -> float:
        """Verify mode: the fraction of checked drafts the full model confirmed (drafts dropped by a
        preemption or cancellation were never checked)."""
        return sum(self.accepted_per_ramp) / max(sum(self.checked_per_ramp), 1)

    def mean_accepted(self) -> float:
        """Verify mode: tokens emitted per verifying deep pass (accepted drafts + the full model's)."""
        return (sum(self.accepted_per_ramp) + self.verify_passes) / max(self.verify_passes, 1)


class EarlyExitDecoder:
    """Early-exit decoding of the scheduler's running rows.

    runner: the `DeviceRunner` every segment, fill and fused step runs on (its early-exit
      buffers already set up by `runner.enable_early_exit`).
    policy: an `ExitPolicy` (or its name). layout: how batches are built (`sched.batch.BatchLayout`).
    """

    overlappable = False  # every segment's confidences decide on the host what runs next

    def __init__(self, cfg: ModelConfig, runner, ee: EEConfig, policy: ExitPolicy | str, flush: FlushConfig,
                 art: bool = True, exit_trace=None, gate: GateConfig | None = None, *,
                 layout: BatchLayout, decisions: str = "frozen"):
        ee.validate(cfg.num_layers, cfg.vocab_size)
        policy = get_policy(policy) if isinstance(policy, str) else policy
        self.recompute, self.verify = get_method(ee.missing_kv).deferred, ee.verify
        if self.recompute and not policy.exact_kv:
            raise ValueError(f"missing_kv='recompute' runs with policy 'rebatching' (or 'off'), got {policy.name!r}: "
                             "a grouped policy moves the batch as one and has no per-row deep pass to recompute in")
        if not isinstance(flush, FlushConfig):
            raise ValueError(f"flush must be a FlushConfig, got {type(flush).__name__}")
        # ART prices a split by single-position segment times; with recompute a deep segment also
        # carries its rows' pending positions, so the ramp gate (measured cost per token) decides
        self.cfg, self.runner, self.ee, self.policy, self.flush = cfg, runner, ee, policy, flush
        self.missing_kv = ee.missing_kv
        self.use_art = art and not self.recompute
        self.layout = layout
        ramps = [e for e in ee.exit_layers if e < cfg.num_layers]
        self.thresholds = list(ee.thresholds[: len(ramps)])
        self.bounds = [0] + ramps + [cfg.num_layers]
        self.num_segments = len(self.bounds) - 1
        # recompute: the runner's hidden buffer is a ring [slots, R, hidden] holding each row's
        # pending positions and current token at position % R (a row's pending positions and
        # current token are consecutive, at most max_draft + 1 of them)
        self.ring_size = bucket(ee.max_draft + 1) if self.recompute else 1
        self.art = ARTProfiler(self.num_segments)
        # "frozen": every exit decision is a function of the rows' data and the batch composition:
        # ART prices splits from segment and fused-step times taken at warm-up and never updated, and
        # the ramp gate (which picks a mode from live timings and its own history) runs only where
        # it cannot change a token (verify mode). "measured": both follow live timings.
        if decisions not in DECISIONS:
            raise ValueError(f"decisions must be one of {DECISIONS}, got {decisions!r}")
        self.decisions, self._warming = decisions, False
        self._candidates = None  # verify mode sampling: ramp candidate id -> index (built on first use)
        # the ramp gate adapts to measured cost like ART, so it is on where ART is (art=False keeps
        # every wanted exit: what the equality-with-the-reference tests run)
        gate_ok = decisions == "measured" or self.verify
        if gate is not None and gate.enabled and policy.gated and not gate_ok:
            raise ValueError(f"the ramp gate picks early exit or the fused step from live timings, which would make "
                             f"policy {policy.name!r}'s tokens depend on timing: pass decisions='measured' to use "
                             "it, or GateConfig(enabled=False)")
        self.gate = RampGate(gate or GateConfig(enabled=policy.gated and art and gate_ok))
        self.exit_trace = exit_trace  # ExitTrace: replayed exit decisions (scale benchmarks) or None
        self.reset_stats()
        self.iteration = 0
        self._last_ready: float | None = None
        self._out: list[Emission] = []  # this iteration's emissions
        self._ending: set[int] = set()  # ids of rows whose emitted token ends them (stop id or length)

    def reset_stats(self) -> None:
        n = self.num_segments
        self.stats = EEStats(exits_per_ramp=[0] * n, wanted_per_ramp=[0] * n, drafts_per_ramp=[0] * (n - 1),
                             checked_per_ramp=[0] * (n - 1), accepted_per_ramp=[0] * (n - 1))

    def check_request(self, config: GenerationConfig) -> None:
        if self.verify and config.logprobs is not None:
            raise ValueError(f"logprobs={config.logprobs} but this engine runs EEConfig(verify=True), whose tokens "
                             "come from verifying drafts, not from one distribution: use an engine without verify")

    def describe(self) -> dict:
        """The early-exit setup: EEConfig fields, policy name, ART."""
        return {**dataclasses.asdict(self.ee), "policy": self.policy.name, "art": self.use_art,
                "decisions": self.decisions, "gate": self.gate.config.enabled}

    # ------------------------------------------------------------------ device calls
    def _account(self, timing) -> None:
        """Device time of a synchronous call, and the host gap before it."""
        if self._last_ready is not None:
            self.stats.host_gap_s += timing.start - self._last_ready
        self._last_ready = timing.end
        self.stats.device_s += timing.end - timing.start
        self.stats.round_trips += 1

    def _batch_arrays(self, reqs, start: int = 0, end: int | None = None) -> DecodeBatch | ChunkBatch:
        """The rows for layers [start, end) (recompute: with their pending positions)."""
        # rows pad to `batch_bucket` (1, 2, 4, 8, 16, 24, 32, 48, ...): with the CPU projection kernel
        # 24 rows cost ~0.75x of 32 (on XLA's dot they cost ~0.9x: BENCHMARKS.md, issue 27)
        if self.recompute:
            return self.layout.chunk(reqs, start, self.cfg.num_layers if end is None else end)
        return self.layout.decode(reqs)

    def run_layers(self, arrays, start: int, end: int, ramp: int, do_sample: bool, logprobs: bool = False,
                   reqs: list = ()):
        """Layers [start, end) then ramp `ramp` (-1: LM head) on batch `arrays`; returns (tokens (a
        `Sampled`), confidences, seconds or None when the call compiled). Verify mode with sampling:
        speculative sampling, the drafts of `reqs` (the batch's rows) verified by the deep pass."""
        speculative = self.verify and do_sample
        drafts = self._draft_arrays(reqs, arrays) if speculative and ramp < 0 else None
        tok, conf, timing = self.runner.run_layers(arrays, start, end, ramp, do_sample,
                                                   every_position=self.verify and ramp < 0, logprobs=logprobs,
                                                   speculative=speculative, drafts=drafts)
        self._account(timing)
        return tok, conf, timing.seconds

    def _draft_arrays(self, reqs: list, arrays) -> tuple[np.ndarray, np.ndarray]:
        """Speculative sampling's inputs for a deep pass over `arrays` (a ChunkBatch whose rows hold
        their drafted positions first, `sched.batch.chunk_batch`): (draft_tokens [B, T], -1 where
        none; draft_probs [B, T, K], each draft's distribution over the ramp candidates). A draft
        made while its batch decoded greedily carries no distribution: its row is greedy, so its
        distribution is one-hot at the draft."""
        B, T = arrays.positions.shape
        tokens = np.full((B, T), -1, np.int32)
        probs = np.zeros((B, T, self._num_candidates), np.float32)
        for i, r in enumerate(reqs):
            for j, (d, q) in enumerate(zip(r.ee.drafts, r.ee.draft_probs)):
                tokens[i, j] = d
                if q is None:
                    probs[i, j, self._candidate_index(d)] = 1.0
                else:
                    probs[i, j] = q
        return tokens, probs

    @property
    def _num_candidates(self) -> int:
        rt = self.runner.ramp_tokens
        return self.cfg.vocab_size if rt is None else int(rt.shape[0])

    def _candidate_index(self, token: int) -> int:
        """A token's index among the ramps' candidates (the token itself without a ramp vocabulary)."""
        if self.runner.ramp_tokens is None:
            return token
        if self._candidates is None:
            self._candidates = {int(t): i for i, t in enumerate(np.asarray(self.runner.ramp_tokens))}
        return self._candidates[token]

    def _segment(self, s: int, arrays, do_sample: bool, reqs: list):
        last = s == self.num_segments - 1
        tok, conf, dt = self.run_layers(arrays, self.bounds[s], self.bounds[s + 1], -1 if last else s, do_sample,
                                        wants_logprobs(reqs), reqs)
        if dt is not None and self._learns():
            self.art.record_segment(s, self._art_key(arrays), dt)
        self.stats.segment_calls += 1
        self._progress(reqs, self.bounds[s + 1])
        return tok, conf

    def _progress(self, reqs: list, end: int) -> None:
        """Recompute: the pending positions a call over layers [.., end) took along have run to `end`
        (pending positions join where their depth is, which is below `end` only for those taken)."""
        if not self.recompute:
            return
        for r in reqs:
            for q, d in list(r.ee.pending.items()):
                if d < end:
                    self.stats.layers_run += end - d
                    if end >= self.cfg.num_layers:
                        del r.ee.pending[q]
                    else:
                        r.ee.pending[q] = end

    def _padding_batch(self, B: int, width: int, T: int = 1) -> DecodeBatch | ChunkBatch:
        return self.layout.padding(B, width, T if self.recompute else None)

    def _learns(self) -> bool:
        """Whether a measured time may update ART's cost table now (frozen: during warm-up only)."""
        return self.decisions == "measured" or self._warming

    @staticmethod
    def _art_key(arrays) -> tuple[int, int]:
        """ART profiles per (batch bucket, page-width bucket): attention over the pages costs as
        much as the layers' matmuls here, so times at one width say little about another."""
        return len(arrays[0]), arrays[3].shape[1]

    def profile_art(self) -> int:
        """Time the fused full-depth step for every shape whose segments ART has timed but whose
        full step it has not (compiling those programs now, outside serving). Returns how many
        (0 unless the policy rebatches with ART on)."""
        if not (self.use_art and self.policy.rebatches):
            return 0
        keys = sorted({k for _, k in self.art.segment_s} - set(self.art.full_s))
        with self._warming_up():
            for key in keys:
                self._profile_full(key, False)
        return len(keys)

    @contextlib.contextmanager
    def _warming_up(self):
        """Times measured inside may update ART's table (with decisions="frozen", the only ones)."""
        self._warming, warming = True, self._warming
        try:
            yield
        finally:
            self._warming = warming

    def _run_time(self, arrays, start: int, end: int, ramp: int, do_sample: bool) -> float:
        """Seconds of one call on `arrays`; a call that compiles is repeated, so this is run time only."""
        dt = None
        while dt is None:
            _, _, dt = self.run_layers(arrays, start, end, ramp, do_sample)
        return dt

    def _profile_full(self, key: tuple[int, int], do_sample: bool) -> None:
        """Time a fused full-depth step on an all-padding batch of shape `key` (writes nothing)."""
        self.art.record_full(key, self._run_time(self._padding_batch(*key), 0, self.cfg.num_layers, -1, do_sample))

    def warmup_shapes(self, max_batch: int, widths: list[int]) -> list[tuple]:
        """Every (kind, ramp/segment, batch bucket, page width, chunk length) this decoder can run
        (recompute: also the plain decode step, its fused fallback with nothing pending)."""
        shapes = []
        # recompute: segments past the first (and the fused step) carry chunks of up to R positions
        chunks = pow2_upto(self.ring_size)
        for b in batch_buckets_upto(max_batch):
            for w in widths:
                if self.recompute:
                    shapes.append(("decode", -1, b, w, 1))
                shapes += [("segment", s, b, w, T) for s in range(self.num_segments) for T in chunks[:1 if s == 0 else None]]
                if self.policy.runs_fused:
                    shapes += [("full", -1, b, w, T) for T in chunks]  # ART and the ramp gate run the fused step
                if self.policy.fills and not self.recompute:
                    shapes += [("fill", s, b, w, 1) for s in range(self.num_segments - 1)]
        return shapes

    def warmup_one(self, shape: tuple, do_sample: bool) -> None:
        """Run one shape on an all-padding batch: no KV or hidden-state row is written. With ART,
        segment shapes are timed too (run again after compiling): the cost table ART decides from
        (with decisions="frozen", the only times it ever gets)."""
        with self._warming_up():
            self._warmup_one(shape, do_sample)

    def _warmup_one(self, shape: tuple, do_sample: bool) -> None:
        kind, s, B, width, T = shape
        if kind == "decode":
            self.runner.decode(self.layout.padding(B, width), do_sample)
            return
        arrays = self._padding_batch(B, width, T)
        if kind == "segment":
            last = s == self.num_segments - 1
            call = (arrays, self.bounds[s], self.bounds[s + 1], -1 if last else s, do_sample)
            if self.use_art and self.policy.rebatches and not do_sample and T == 1:
                self.art.record_segment(s, self._art_key(arrays), self._run_time(*call))
            else:
                self.run_layers(*call)
        elif kind == "full" and self.use_art and self.policy.rebatches and not do_sample:
            self._profile_full((B, width), do_sample)
        elif kind == "full":
            self.run_layers(arrays, 0, self.cfg.num_layers, -1, do_sample)
        elif not do_sample:  # fills do not sample
            rows = list(range(B))  # positions are -1: the fill writes nothing
            self._fill(self.bounds[s + 1], rows, arrays)

    def _fill(self, exit_layer: int, rows: list, arrays) -> None:
        """Missing KV of layers >= exit_layer for the given batch rows (indices into arrays)."""
        if exit_layer >= self.cfg.num_layers or not rows or self.recompute:
            return  # recompute: the next deep pass of the row computes it
        keep = np.full(len(arrays.positions), -1, np.int32)
        keep[rows] = arrays.positions[rows]
        self.runner.fill(self.ee.missing_kv, exit_layer, arrays, keep)

    def _wants_exit(self, s: int, conf: np.ndarray, reqs: list) -> np.ndarray:
        """[n] bool: rows whose confidence passes ramp s's threshold (or the exit trace's draw)."""
        n = len(reqs)
        wants = self.exit_trace.wants_exit(s, n) if self.exit_trace is not None else conf[:n] > self.thresholds[s]
        for i in np.flatnonzero(wants):
            st = reqs[i].ee
            if st.first_want < 0:
                st.first_want = s
            if self.recompute and not self._may_exit(reqs[i]):
                wants[i] = False
                self.stats.draft_cap_stays += st.first_want == s  # once per token
            elif self.verify and self.ee.adaptive_ramps and not self._ramp_pays(reqs[i], s):
                wants[i] = False
                self.stats.ramp_skips += 1
            elif self.verify and self.exit_trace is None and self.ee.draft_stop > 0:
                if st.chain_conf * float(conf[i]) < self.ee.draft_stop:
                    wants[i] = False
                    self.stats.draft_stops += st.first_want == s
                else:
                    st.chain_conf *= float(conf[i])  # it drafts here (verify runs without ART)
        return wants

    def _ramp_pays(self, req: Request, s: int) -> bool:
        """adaptive_ramps: whether `req` drafts at ramp s: its decayed acceptance there (one optimistic
        prior draft) reaches the ramp's break-even depth / L, or it has not drafted there for
        PROBE_TOKENS tokens (a retry)."""
        st = req.ee
        acceptance = (st.ramp_accepted.get(s, 0.0) + 1.0) / (st.ramp_checked.get(s, 0.0) + 1.0)
        if acceptance >= self.bounds[s + 1] / self.cfg.num_layers:
            return True
        return len(req.generated) - st.ramp_drafted_at.get(s, 0) >= PROBE_TOKENS

    def _may_exit(self, req: Request) -> bool:
        """Recompute: a row holds at most max_draft pending positions. Verify mode: a draft must leave
        room for the full model's token within max_new_tokens, and a drafted stop token is
        verified before anything is drafted after it."""
        st = req.ee
        if len(st.pending) >= self.ee.max_draft:
            return False
        if self.verify:
            return (len(req.generated) + len(st.drafts) + 1 < req.config.max_new_tokens
                    and not (st.drafts and st.drafts[-1] in req.stop_ids))
        return True

    def _emit(self, req: Request, token: int, exit_layer: int, kv_depth: int, before: list[int] = (),
              logprob=None) -> bool:
        """Hand a finalized token to the scheduler (`before`: this row's tokens emitted earlier in this
        iteration); returns whether it ends the request (stop id, length, stop string)."""
        self._out.append(Emission(req, token, exit_layer, kv_depth, logprob))
        ends = req.ends_with(list(before) + [token])
        if ends:
            self._ending.add(req.id)
        return ends

    def _finalize(self, req: Request, out: Sampled, i: int, segment: int, kv_depth: int | None = None) -> None:
        """Emit row i of `out` for `req`, exited after `segment`; `kv_depth`: depth of the K/V its
        step wrote, when not the exit depth (latency-only keeps computing)."""
        token = out.token(i)
        depth = self.bounds[segment + 1]
        if self.verify and depth < self.cfg.num_layers:
            return self._draft(req, token, segment, None if out.probs is None else out.probs[i])
        if self.recompute and depth < self.cfg.num_layers:  # computed by the row's next deep pass
            req.ee.pending[req.cache_len] = depth
            kv_depth = self.cfg.num_layers
        self.stats.tokens += 1
        self.stats.layers_run += depth
        self.stats.exits_per_ramp[segment] += 1
        self.stats.wanted_per_ramp[req.ee.first_want if req.ee.first_want >= 0 else self.num_segments - 1] += 1
        req.ee.token_done()
        self._emit(req, token, depth, kv_depth or depth, logprob=out.logprob(i))

    def _draft(self, req: Request, token: int, segment: int, probs: np.ndarray | None = None) -> None:
        """Verify mode: `token` exited at ramp `segment`: a draft, the row's next input, not output
        (`probs`: the distribution it was sampled from, when its batch sampled)."""
        depth = self.bounds[segment + 1]
        st = req.ee
        st.pending[req.cache_len] = depth
        st.drafts.append(token)
        st.draft_probs.append(probs)
        st.draft_depths.append(depth)
        st.ramp_drafted_at[segment] = len(req.generated)
        st.stage, st.first_want = 0, -1
        self.stats.layers_run += depth
        self.stats.drafts_per_ramp[segment] += 1

    def _verify(self, req: Request, full_tokens: np.ndarray) -> None:
        """Verify mode, after a deep pass over the row's chunk (its drafted positions, then its current
        token): `full_tokens` [T] are the full model's tokens at those positions. Keep the drafts that
        agree, then the full model's token at the first disagreement (or after the last draft), up to
        a token that ends the request; the scheduler returns the rejected drafts' pages at commit."""
        L = self.cfg.num_layers
        st = req.ee
        n = len(st.drafts)
        accepted = 0
        while accepted < n and st.drafts[accepted] == int(full_tokens[accepted]):
            accepted += 1
        emit = st.drafts[:accepted] + [int(full_tokens[accepted])]
        depths = st.draft_depths[:accepted] + [L]
        for j, d in enumerate(st.draft_depths):
            seg = self.bounds.index(d) - 1
            self.stats.checked_per_ramp[seg] += 1
            st.ramp_checked[seg] = ACCEPTANCE_DECAY * st.ramp_checked.get(seg, 0.0) + 1
            st.ramp_accepted[seg] = ACCEPTANCE_DECAY * st.ramp_accepted.get(seg, 0.0) + (j < accepted)
        self.stats.verify_passes += 1
        self.stats.layers_run += L
        wanted = st.first_want if st.first_want >= 0 else self.num_segments - 1  # of the last token
        st.drafts, st.draft_depths, st.draft_probs, st.pending, st.chain_conf = [], [], [], {}, 1.0
        st.token_done()
        for j, (token, depth) in enumerate(zip(emit, depths)):
            self.stats.tokens += 1
            seg = self.bounds.index(depth) - 1
            self.stats.exits_per_ramp[seg] += 1
            self.stats.wanted_per_ramp[seg if j < accepted else wanted] += 1
            if j < accepted:
                self.stats.accepted_per_ramp[seg] += 1
            if self._emit(req, token, depth, L, before=emit[:j]):  # the rest is dropped
                return

    # ------------------------------------------------------------------ scheduling
    def step(self, rows: list[Request]) -> list[Emission]:
        """One decode iteration over the running rows (slot order); returns the finalized tokens."""
        self._out, self._ending = [], set()
        self.iteration += 1
        self._last_ready = None  # host gaps are measured between this iteration's device calls
        ready = [r for r in rows if r.ee.stage == 0]
        now = time.perf_counter()
        for r in ready:
            if r.ee.buffered_iter < 0:
                r.ee.token_start = now
        if not self.policy.rebatches:
            if ready:
                self._run_grouped(ready)
            return self._out
        shape = (batch_bucket(len(rows)), self.layout.width(rows))
        probes = self.gate.probes
        mode = self.gate.mode(shape)
        self.stats.gate_probes += self.gate.probes - probes
        t0, compiles = now, self.runner.compile_count()
        progress0 = self._progress_count(rows)
        # fused only once no row is mid-token; until then buffered rows finish theirs (a drain)
        ran = FUSED if mode == FUSED and len(ready) == len(rows) else EE
        if ran == FUSED:
            self._run_fused(ready)
            self.stats.fused_iterations += 1
        else:
            self._run_pipeline(rows, ready, drain=mode == FUSED)
        steady = self.runner.compile_count() == compiles and ran == mode
        progress = self._progress_count(rows) - progress0
        self.gate.record(shape, ran, time.perf_counter() - t0, progress, count=steady)
        return self._out

    def _progress_count(self, rows) -> int:
        """Tokens finalized so far, plus (verify mode) the drafts the rows hold: the gate's measure of
        progress, so an iteration is credited with the drafts it makes and a rejection takes them
        back, instead of every verified token landing on the iteration that verifies."""
        return self.stats.tokens + sum(len(r.ee.drafts) for r in rows)

    def _run_fused(self, reqs: list) -> None:
        """All rows through every layer in one fused call, no ramp evaluated (the gate found early
        exit slower than this for the shape): rows that would have exited stay."""
        do_sample = any(r.config.temperature > 0 for r in reqs)
        for r in reqs:
            r.ee.first_want = -1  # no ramp was asked
        if self.recompute and not any(r.ee.pending for r in reqs):
            # nothing to recompute: the plain decode step, plain decoding exactly
            tok, timing = self.runner.timed_decode(self.layout.decode(reqs), do_sample, wants_logprobs(reqs))
            self._account(timing)
            return self._finalize_all(reqs, tok)
        arrays = self._batch_arrays(reqs)
        tok, _, dt = self.run_layers(arrays, 0, self.cfg.num_layers, -1, do_sample, wants_logprobs(reqs), reqs)
        if dt is not None and self._learns():
            self.art.record_full(self._art_key(arrays), dt)
        self._progress(reqs, self.cfg.num_layers)
        self._finalize_all(reqs, tok)

    def _finalize_all(self, reqs: list, tok: Sampled) -> None:
        """Rows that ran the last layer: emit the LM head's token (verify mode: check the drafts)."""
        last = self.num_segments - 1
        for i, r in enumerate(reqs):
            r.ee.buffered_iter = -1
            if self.verify:  # tokens [B, T] from a chunk, or [B] from the plain decode step
                self._verify(r, np.atleast_1d(tok.tokens[i]))
            else:
                self._finalize(r, tok, i, last)

    def _run_pipeline(self, rows: list, ready: list, drain: bool = False) -> None:
        """DREX rebatching, shallow segments first so rows merge: ready rows run segment 0; at each
        ramp the exiting rows leave and the rest join that ramp's buffer, merging with rows that
        waited there from earlier iterations; a buffer runs on when the flush policy says so
        (`drain`: always). A group that nobody left (no exit, or ART declined the split) runs on
        at once."""
        carried: set[int] = set()  # slots of rows that continue in this iteration unconditionally
        if ready:
            cont, split = self._run_segment(0, ready)
            carried = set() if split else {r.slot for r in cont}
        now = time.perf_counter()
        n_running = len(rows) - len(self._ending)  # rows that finished at layer 0's ramp have left
        for s in range(1, self.num_segments):
            buf = [r for r in rows if r.ee.stage == s]
            if not buf:
                continue
            if not drain and not any(r.slot in carried for r in buf):
                oldest = min(buf, key=lambda r: r.ee.buffered_iter)
                sla = oldest.config.deadline_ms or self.flush.tpot_sla_ms
                used = (now - oldest.ee.token_start) * 1e3 / sla if sla else 0.0
                # layer 0 ran this iteration unless nothing was ready: then only buffers can run
                reason = flush_reason(self.flush, len(buf), n_running, len(ready),
                                      self.iteration - oldest.ee.buffered_iter, used)
                if reason is None:
                    continue
                self.stats.flushes[reason] = self.stats.flushes.get(reason, 0) + 1
            elif drain:
                self.stats.flushes["drain"] = self.stats.flushes.get("drain", 0) + 1
            cont, split = self._run_segment(s, buf)
            carried = set() if split else {r.slot for r in cont}

    def _run_segment(self, s: int, reqs: list) -> tuple[list, bool]:
        """Run `reqs` through segment s. Rows whose confidence passes ramp s exit (their missing
        K/V filled), unless ART declines the split; the others move to stage s + 1. Returns (the
        rows that continue, whether the batch was split)."""
        do_sample = any(r.config.temperature > 0 for r in reqs)
        arrays = self._batch_arrays(reqs, self.bounds[s], self.bounds[s + 1])
        key = self._art_key(arrays)
        # refresh a known shape's fused-step time now and then; an unknown shape is not profiled
        # here (that would compile a full-depth program mid-serving): ART splits and measures
        # its segments until `profile_art()` (warmup does it) times the fused step
        if self.use_art and self._learns() and key in self.art.full_s and self.art.needs_full_profile(key):
            self._profile_full(key, do_sample)
        tok, conf = self._segment(s, arrays, do_sample, reqs)
        if s == self.num_segments - 1:
            self._finalize_all(reqs, tok)
            return [], True
        wants = self._wants_exit(s, conf, reqs)
        split = bool(wants.any()) and (not self.use_art or self.art.decide(s, key, int(wants.sum()), len(reqs)))
        if not split:
            self.stats.involuntary_stays += int(wants.sum())
            self.stats.art_declined += int(wants.any())
            for r in reqs:
                r.ee.stage = s + 1
            return reqs, False
        self._fill(self.bounds[s + 1], list(np.flatnonzero(wants)), arrays)
        rest = []
        for i, r in enumerate(reqs):
            if wants[i]:
                r.ee.buffered_iter = -1
                self._finalize(r, tok, i, s)
            else:
                r.ee.stage, r.ee.buffered_iter = s + 1, self.iteration
                rest.append(r)
        return rest, True

    def _run_grouped(self, reqs: list) -> None:
        """Policies where the batch moves as one: off, eager, lazy, average, median, latency-only."""
        do_sample = any(r.config.temperature > 0 for r in reqs)
        arrays = self._batch_arrays(reqs)
        n = len(reqs)
        if not self.policy.evaluates_ramps:
            tok, _, _ = self.run_layers(arrays, 0, self.cfg.num_layers, -1, do_sample, wants_logprobs(reqs), reqs)
            self._finalize_all(reqs, tok)
            return
        released = np.zeros(n, bool)  # latency-only: token already emitted
        for s in range(self.num_segments):
            tok, conf = self._segment(s, arrays, do_sample, reqs)
            if s == self.num_segments - 1:
                for i, r in enumerate(reqs):
                    if not released[i]:
                        self._finalize(r, tok, i, s)
                return
            wants = self._wants_exit(s, conf, reqs)
            if self.policy.releases_early:
                new = wants & ~released
                for i in np.flatnonzero(new):  # emitted now, but the row keeps computing real KV
                    self._finalize(reqs[i], tok, i, s, kv_depth=self.cfg.num_layers)
                    self.stats.layers_run += self.cfg.num_layers - self.bounds[s + 1]
                released |= new
                continue
            if self.exit_trace is not None:  # a trace gives decisions, not confidences: 1 = wants out
                exit_all = self.policy.rule(wants.astype(np.float32), 0.5)
            else:
                exit_all = self.policy.rule(conf[:n], self.thresholds[s])
            ie, st = involuntary(wants, np.full(n, exit_all))
            self.stats.involuntary_exits += ie
            self.stats.involuntary_stays += st
            if exit_all:
                self._fill(self.bounds[s + 1], list(range(n)), arrays)
                for i, r in enumerate(reqs):
                    self._finalize(r, tok, i, s)
                return
