"""One benchmark run: a workload through an engine, offline (all requests at once) or online
(Poisson arrivals), with serving metrics; and the HF `transformers` baseline."""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from drex_jax import compile_counter


@dataclasses.dataclass
class RunResult:
    label: str
    workload: str
    policy: str
    threshold: float | None
    mode: str  # "offline" | "online" | "hf"
    batch: int  # max decode batch (engine max_slots)
    rate: float | None  # online arrivals per second
    requests: int
    tokens: int
    wall_s: float
    tok_s: float
    req_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    mean_depth: float | None = None
    exits_per_ramp: list[int] | None = None
    wanted_per_ramp: list[int] | None = None  # where confidence first passed (before policy/ART)
    involuntary_exits: int | None = None
    involuntary_stays: int | None = None
    peak_kv_pages: int | None = None
    compiles: int | None = None  # XLA compilations during the timed run
    sla_attainment: float | None = None  # online: share of requests within both TTFT and TPOT SLAs
    token_agreement: float | None = None
    rouge_l: float | None = None
    pass_at_1: float | None = None
    # per request (for quality and latency CDFs; left out of the markdown table)
    token_ids: list[list[int]] = dataclasses.field(default_factory=list, repr=False)
    texts: list[str] = dataclasses.field(default_factory=list, repr=False)
    ttft_ms: list[float] = dataclasses.field(default_factory=list, repr=False)
    tpot_ms: list[float] = dataclasses.field(default_factory=list, repr=False)


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_engine(engine, encoded: list[list[int]], gc, *, label: str, workload: str, policy: str,
               threshold: float | None, arrivals: np.ndarray | None = None,
               sla_ttft_ms: float | None = None, sla_tpot_ms: float | None = None) -> RunResult:
    """Serve `encoded` prompts. arrivals=None: all submitted at once; else submitted at these
    times (seconds from start), and TTFT counts from the scheduled arrival."""
    engine.reset_stats()
    c0 = compile_counter.count()
    n = len(encoded)
    due = np.zeros(n) if arrivals is None else np.asarray(arrivals, float)
    results, rid_to_i, late = {}, {}, {}
    nxt, t0 = 0, time.perf_counter()
    while nxt < n or engine.has_work:
        now = time.perf_counter() - t0
        while nxt < n and due[nxt] <= now:
            rid_to_i[engine.submit(encoded[nxt], gc)] = nxt
            late[nxt] = now - due[nxt]  # the engine was busy when the request arrived
            nxt += 1
        if not engine.has_work:
            time.sleep(max(due[nxt] - (time.perf_counter() - t0), 0.0))
            continue
        for ev in engine.step():
            if ev.finished:
                results[rid_to_i[ev.request_id]] = ev.result
    wall = time.perf_counter() - t0
    res = [results[i] for i in range(n)]
    ttft = [(r.stats.ttft_s + late[i]) * 1e3 for i, r in enumerate(res)]
    tpot = [r.stats.tpot_s * 1e3 for r in res if r.stats.generated_tokens > 1]
    tokens = sum(r.stats.generated_tokens for r in res)
    out = RunResult(
        label=label, workload=workload, policy=policy, threshold=threshold,
        mode="offline" if arrivals is None else "online", batch=engine.max_slots,
        rate=None if arrivals is None else n / max(float(due[-1]), 1e-9), requests=n, tokens=tokens,
        wall_s=wall, tok_s=tokens / wall, req_s=n / wall, ttft_p50_ms=_pct(ttft, 50), ttft_p99_ms=_pct(ttft, 99),
        tpot_p50_ms=_pct(tpot, 50), tpot_p99_ms=_pct(tpot, 99), peak_kv_pages=engine.peak_pages_used,
        compiles=compile_counter.count() - c0, token_ids=[r.token_ids for r in res], texts=[r.text for r in res],
        ttft_ms=ttft, tpot_ms=tpot,
    )
    st = engine.ee_stats
    if st is not None:
        out.mean_depth, out.exits_per_ramp = st.mean_depth(), list(st.exits_per_ramp)
        out.wanted_per_ramp = list(st.wanted_per_ramp)
        out.involuntary_exits, out.involuntary_stays = st.involuntary_exits, st.involuntary_stays
    else:
        out.mean_depth = float(engine.cfg.num_layers)
    if arrivals is not None and (sla_ttft_ms or sla_tpot_ms):
        ok = [(sla_ttft_ms is None or a <= sla_ttft_ms) and (sla_tpot_ms is None or r.stats.tpot_s * 1e3 <= sla_tpot_ms)
              for a, r in zip(ttft, res)]
        out.sla_attainment = sum(ok) / n
    return out


def hf_generator():
    """Load HF `transformers`' fp32 copy of the bundled model (its GGUF). Returns (model,
    tokenizer, generate) with `generate(prompts, chat, n) -> (new token ids per prompt, seconds)`:
    greedy, all prompts in one left-padded batch, exactly `n` new tokens each; only
    `model.generate` is timed."""
    import torch
    import transformers

    from drex_jax.default_model import default_gguf_path

    d, f = default_gguf_path().rsplit("/", 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"

    def generate(prompts: list[str], chat: bool, n: int):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) if chat else p for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        seconds = time.perf_counter() - t0
        return [row[enc["input_ids"].shape[1]:].tolist() for row in out], seconds

    return model, tok, generate


def hf_baseline(prompts: list[str], chat: bool, new_tokens: int, *, label: str, workload: str) -> RunResult:
    """HF `transformers` fp32 greedy `generate` on the bundled model, all prompts in one
    left-padded batch, exactly `new_tokens` each. TTFT is a 1-token generate of the same batch."""
    model, tok, gen = hf_generator()
    gen(prompts, chat, 2)  # warm-up
    _, ttft = gen(prompts, chat, 1)
    ids, wall = gen(prompts, chat, new_tokens)
    n = len(prompts)
    tpot = (wall - ttft) / max(new_tokens - 1, 1) * 1e3
    return RunResult(
        label=label, workload=workload, policy="hf", threshold=None, mode="hf", batch=n, rate=None, requests=n,
        tokens=n * new_tokens, wall_s=wall, tok_s=n * new_tokens / wall, req_s=n / wall,
        ttft_p50_ms=ttft * 1e3, ttft_p99_ms=ttft * 1e3, tpot_p50_ms=tpot, tpot_p99_ms=tpot,
        mean_depth=float(model.config.num_hidden_layers), token_ids=ids,
        texts=[tok.decode(i, skip_special_tokens=True) for i in ids],
    )
