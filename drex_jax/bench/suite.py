"""The benchmark suite behind `drex-jax bench`.

CPU/default mode, on the bundled SmolLM2 with its trained exit heads (shared heads if none):
for each workload, the full model (`off`), then each early-exit policy at each threshold,
offline (all requests at once) and, at the main threshold, online (Poisson arrivals); a batch
size sweep; and HF `transformers` generate on the same prompts. Every engine runs the workload
once untimed (compiles what it needs) before its timed run; the compile count of the timed run
is reported (shapes the warm-up did not meet compile there). Quality is measured against `off`.

Scale mode (`--scale PRESET`): random bf16 weights at a large model's shape, exits replayed from
the exit trace the default mode records, so scheduling is measured at realistic size; prints the
HBM bandwidth utilization of full-depth decode against the bytes it must read.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from drex_jax.bench import quality, report
from drex_jax.bench.runner import RunResult, hf_baseline, run_engine
from drex_jax.bench.workloads import WORKLOADS, poisson_arrivals
from drex_jax.rebatch.policies import POLICIES

# peak memory bandwidth (bytes/s) by device kind, for the utilization figure
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    workloads: tuple[str, ...] = ("humaneval", "chat")
    num_prompts: int = 12
    new_tokens: int = 48
    policies: tuple[str, ...] = ("off", "eager", "lazy", "rebatching")
    thresholds: tuple[float, ...] = (0.7, 0.9)  # the last one is the main threshold
    batch_sizes: tuple[int, ...] = (4, 16)
    online_rate: float = 2.0  # requests/s
    sla_ttft_ms: float = 2000.0
    sla_tpot_ms: float = 250.0
    hf: bool = True
    missing_kv: str = "propagate"
    ramp_vocab: int | None = None  # candidate tokens per ramp (EEConfig.ramp_vocab); None = whole vocabulary
    out_dir: str = "bench_results"
    seed: int = 0

    def validate(self) -> None:
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad or not self.workloads:
            raise ValueError(f"unknown workloads {bad}; choose from {sorted(WORKLOADS)}")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad or "off" not in self.policies:
            raise ValueError(f"policies {list(self.policies)} must include 'off' (the reference) and come from "
                             f"{POLICIES}")
        for name, v in (("num_prompts", self.num_prompts), ("new_tokens", self.new_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.thresholds or any(not 0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be in [0, 1], got {list(self.thresholds)}")
        if any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if not self.online_rate > 0:
            raise ValueError(f"online_rate must be > 0 requests/s, got {self.online_rate}")


def machine() -> dict:
    import jax

    d = jax.devices()[0]
    return {"device": d.device_kind, "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def run_suite(bc: BenchConfig, model: str | None = None, progress: bool = True) -> tuple[list[RunResult], dict]:
    """Run the default-mode suite; write JSON, markdown and plots to `bc.out_dir`."""
    import jax
    from tqdm import tqdm

    from convert.checkpoint import load_checkpoint
    from drex_jax import Engine, GenerationConfig
    from drex_jax.default_model import default_model_path
    from drex_jax.early_exit import EEConfig
    from drex_jax.exit_heads import find_heads, read_meta

    bc.validate()
    os.makedirs(bc.out_dir, exist_ok=True)
    path = model or default_model_path()
    cfg, params, tok = load_checkpoint(path)
    heads_dir = find_heads(path, cfg, params)
    if heads_dir is not None:
        head, exit_layers = "trained", tuple(read_meta(heads_dir)["exit_layers"])
    else:
        head, exit_layers = "shared", tuple(e for e in (8, 15, 22) if e < cfg.num_layers) or (cfg.num_layers // 2,)
        print("[bench] no trained exit heads (drex-jax train-exits); using the shared head", file=sys.stderr)
    main_thr = bc.thresholds[-1]
    gc = GenerationConfig(max_new_tokens=bc.new_tokens, ignore_eos=True)  # same work for every policy
    runs = [(wl, p, t) for wl in bc.workloads for p in bc.policies for t in ((None,) if p == "off" else bc.thresholds)]
    sweep = [(p, b) for p in ("off", "rebatching") if p in bc.policies for b in bc.batch_sizes]
    bar = tqdm(total=len(runs) + sum(t in (None, main_thr) for _, _, t in runs) + len(sweep)
               + (len(bc.workloads) if bc.hf else 0), desc="bench", unit="run", disable=not progress, file=sys.stderr)
    results: list[RunResult] = []

    def engine(policy, thr, slots, max_len):
        ee = None if policy == "off" else EEConfig(exit_layers, thr, missing_kv=bc.missing_kv, head=head,
                                                   ramp_vocab=bc.ramp_vocab)
        return Engine.from_params(cfg, params, tok, max_slots=slots, max_seq_len=max_len, ee=ee, policy=policy,
                                  exit_heads=heads_dir if head == "trained" or bc.ramp_vocab else None)

    encoder = engine("off", None, 1, 64)  # tokenizes exactly as serving does
    for wl_name in bc.workloads:
        wl = WORKLOADS[wl_name](bc.num_prompts)
        encoded = [encoder.encode(p, wl.chat) for p in wl.prompts]
        max_len = min(cfg.max_position_embeddings, max(map(len, encoded)) + bc.new_tokens)
        ref = None
        for _, policy, thr in [r for r in runs if r[0] == wl_name]:
            bar.set_postfix_str(f"{wl_name} {policy} {thr or ''}")
            eng = engine(policy, thr, bc.num_prompts, max_len)
            label = policy if thr is None else f"{policy}@{thr}"
            run_engine(eng, encoded, gc, label=label, workload=wl_name, policy=policy, threshold=thr)  # warm-up
            eng.profile_art()  # ART's fused-step times for the shapes the warm-up met (early exit)
            r = run_engine(eng, encoded, gc, label=label, workload=wl_name, policy=policy, threshold=thr)
            bar.update(1)
            ref = r if ref is None else ref  # the first run of a workload is `off`
            _score(r, ref, wl)
            results.append(r)
            if thr in (None, main_thr):
                arrivals = poisson_arrivals(len(encoded), bc.online_rate, bc.seed)
                o = run_engine(eng, encoded, gc, label=f"{label} online", workload=wl_name, policy=policy,
                               threshold=thr, arrivals=arrivals, sla_ttft_ms=bc.sla_ttft_ms,
                               sla_tpot_ms=bc.sla_tpot_ms)
                _score(o, ref, wl)
                results.append(o)
                bar.update(1)
            del eng
        if bc.hf:
            bar.set_postfix_str(f"{wl_name} HF")
            h = hf_baseline(wl.prompts, wl.chat, bc.new_tokens, label="HF transformers", workload=wl_name)
            _score(h, ref, wl)
            results.append(h)
            bar.update(1)
        # each compiled XLA CPU program holds memory mappings; free this workload's programs so
        # a long suite stays under the kernel's map limit (vm.max_map_count)
        jax.clear_caches()

    if sweep:
        wl = WORKLOADS["chat"](max(bc.batch_sizes))
        for policy, b in sweep:
            thr = None if policy == "off" else main_thr
            bar.set_postfix_str(f"batch {b} {policy}")
            eng = engine(policy, thr, b, 256)
            encoded = [encoder.encode(p, True) for p in wl.prompts[:b]]
            lab = f"batch{b} {policy}"
            run_engine(eng, encoded, gc, label=lab, workload="chat", policy=policy, threshold=thr)
            eng.profile_art()  # ART's fused-step times for the shapes the warm-up met (early exit)
            results.append(run_engine(eng, encoded, gc, label=lab, workload="chat", policy=policy, threshold=thr))
            bar.update(1)
            del eng
    bar.close()

    meta = {"machine": machine(), "config": dataclasses.asdict(bc), "model": path, "head": head,
            "exit_layers": list(exit_layers), "num_layers": cfg.num_layers, "command": " ".join(sys.argv)}
    trace = _exit_trace(results, main_thr, exit_layers, cfg.num_layers)
    if trace:
        meta["exit_trace"] = trace
        with open(os.path.join(bc.out_dir, "exit_trace.json"), "w") as f:
            json.dump(trace, f, indent=1)
    report.write_json(os.path.join(bc.out_dir, "results.json"), results, meta)
    pngs = report.plots(results, bc.out_dir)
    md = report.markdown(results, f"Machine: {meta['machine']}; model {os.path.basename(path)}, {head} heads at "
                                  f"layers {list(exit_layers)}, missing KV {bc.missing_kv}; {bc.num_prompts} prompts "
                                  f"x {bc.new_tokens} new tokens; online rate {bc.online_rate}/s, SLA TTFT "
                                  f"{bc.sla_ttft_ms:.0f} ms / TPOT {bc.sla_tpot_ms:.0f} ms.")
    with open(os.path.join(bc.out_dir, "results.md"), "w") as f:
        f.write(md)
    meta["plots"] = pngs
    return results, meta


def _score(r: RunResult, ref: RunResult, wl) -> None:
    """Quality against the full model `ref` (same prompts); HumanEval pass@1 by execution."""
    if r is not ref:
        r.token_agreement = quality.token_agreement(r.token_ids, ref.token_ids)
        r.rouge_l = quality.rouge_l(r.texts, ref.texts)
    if wl.problems is not None:
        r.pass_at_1 = quality.humaneval_pass_at_1(wl.problems, r.texts)


def _exit_trace(results, thr, exit_layers, num_layers) -> dict | None:
    """Where tokens wanted to exit (confidence first passing the threshold, before ART kept any
    running) under rebatching at the main threshold, offline, all workloads."""
    runs = [r for r in results if r.policy == "rebatching" and r.threshold == thr and r.mode == "offline"
            and not r.label.startswith("batch")]
    if not runs:
        return None
    counts = np.sum([r.wanted_per_ramp for r in runs], axis=0)
    return {"exit_layers": list(exit_layers), "num_layers": num_layers, "threshold": thr,
            "workloads": [r.workload for r in runs], "fractions": (counts / counts.sum()).tolist()}


# ---------------------------------------------------------------------------------- scale mode
def run_scale(preset: str, trace_path: str, batch: int = 32, prompt_len: int = 128, new_tokens: int = 128,
              policies=("off", "lazy", "rebatching"), dtype: str = "bfloat16", peak_bandwidth: float | None = None,
              progress: bool = True) -> tuple[list[RunResult], dict]:
    """Random weights at `preset`'s shape; early exits replayed from the recorded trace."""
    import jax

    from drex_jax import Engine, GenerationConfig
    from drex_jax.early_exit import EEConfig
    from drex_jax.sched.ramp_gate import GateConfig
    from drex_jax.model.config import config_from_hf
    from drex_jax.model.params import init_params, param_specs
    from drex_jax.plan import PRESETS
    from drex_jax.sched.exit_trace import ExitTrace

    if preset not in PRESETS:
        raise ValueError(f"unknown scale preset {preset!r}; choose one of {sorted(PRESETS)}")
    if not os.path.exists(trace_path):
        raise FileNotFoundError(f"exit trace {trace_path!r} not found; run `drex-jax bench` (default mode) first, "
                                "it writes OUT_DIR/exit_trace.json")
    try:
        with open(trace_path) as f:
            trace = json.load(f)
        trace["exit_layers"], trace["num_layers"], trace["fractions"]  # noqa: B018 (presence check)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{trace_path!r} is not an exit trace written by `drex-jax bench` (needs exit_layers, "
                         f"num_layers, fractions): {e!r}") from e
    cfg = config_from_hf(PRESETS[preset])
    # the recorded ramps at the same relative depths of this model
    layers = tuple(sorted({max(1, min(cfg.num_layers - 1, round(e / trace["num_layers"] * cfg.num_layers)))
                           for e in trace["exit_layers"]}))
    if len(layers) != len(trace["exit_layers"]):
        raise ValueError(f"{preset} has too few layers to place the trace's ramps {trace['exit_layers']}")
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.key(0), dtype=getattr(jax.numpy, dtype))
    jax.block_until_ready(params)
    if progress:
        print(f"[bench scale] {preset}: random {dtype} weights in {time.perf_counter() - t0:.1f}s; ramps {layers}, "
              f"exit fractions {np.round(trace['fractions'], 3).tolist()}", file=sys.stderr)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, prompt_len)] for _ in range(batch)]
    gc = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    results = []
    for policy in policies:
        ee = None if policy == "off" else EEConfig(layers, 0.5, head="shared")
        trace_obj = None if ee is None else ExitTrace.for_ramps(trace["fractions"], len(layers))
        # the ramp gate off: scale mode measures the rebatching machinery on the trace's exits, not
        # the fused step the gate would fall back to (the ee-efficiency benchmark measures both)
        eng = Engine.from_params(cfg, params, dtype=dtype, max_slots=batch, max_seq_len=prompt_len + new_tokens,
                                 ee=ee, policy=policy, exit_trace=trace_obj, gate=GateConfig(enabled=False))
        run_engine(eng, prompts, gc, label=policy, workload=f"scale:{preset}", policy=policy, threshold=None)
        r = run_engine(eng, prompts, gc, label=policy, workload=f"scale:{preset}", policy=policy, threshold=None)
        results.append(r)
        if progress:
            print(f"[bench scale] {policy}: {r.tok_s:.1f} tok/s, TPOT p50 {r.tpot_p50_ms:.2f} ms, mean depth "
                  f"{r.mean_depth:.1f}/{cfg.num_layers}", file=sys.stderr)
        del eng
    # bytes one full-depth decode step must read: every weight but the embedding table (only B
    # rows are gathered; a tied table is read whole as the LM head) + the batch's K/V
    item = np.dtype(getattr(jax.numpy, dtype)).itemsize
    weights = sum(int(np.prod(s.shape)) for k, s in param_specs(cfg).items()
                  if k != "embed" or cfg.tie_word_embeddings) * item
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item
    mean_ctx = prompt_len + new_tokens / 2
    step_bytes = weights + batch * mean_ctx * kv_per_token
    off = next((r for r in results if r.policy == "off"), None)
    kind = jax.devices()[0].device_kind
    peak = peak_bandwidth or next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)
    meta = {"machine": machine(), "preset": preset, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "dtype": dtype, "exit_layers": list(layers), "trace": trace,
            "decode_step_bytes": step_bytes}
    if off is not None:
        bw = step_bytes / (off.tpot_p50_ms / 1e3)
        meta["achieved_bandwidth_Bps"] = bw
        meta["peak_bandwidth_Bps"] = peak
        meta["bandwidth_utilization"] = bw / peak if peak else None
    return results, meta
