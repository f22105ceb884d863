"""`drex-jax bench --verify`: lossless early exit (verify mode) against full-depth decoding.

Per batch size, full-depth decoding (`off`: the engine's fused decode step) and verify mode at each
threshold of a sweep decode the same real prompts (held-out chat prompts, then HumanEval problems) greedily,
in the same run: decode tokens/s with prefill excluded, the speed-up over `off`, whether every
output equals `off` token for token, the drafts' acceptance rate per ramp, the mean tokens emitted
per verifying deep pass, and how many iterations the ramp gate ran as plain decoding because
drafting did not pay. Each engine runs the workload again until a round compiles nothing (at least
twice, at most 4 times; the ramp gate has measured both modes by then); the last round is timed.
"""
from __future__ import annotations

import sys
import time

import numpy as np

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
BATCHES = (1, 8, 32)
MAX_ROUNDS = 4
RAMP_SETS = ((22,), (15, 22), (8, 15, 22))  # subsets of the shipped heads' ramps


def workload(tokenizer, n: int) -> list[list[int]]:
    """`n` chat-templated prompts, all held out from exit-head training and calibration: the 20 chat
    prompts of `drex_jax.data.texts.PROMPTS`, then HumanEval problems 64-83."""
    from drex_jax.data.texts import PROMPTS, humaneval_prompts

    texts = (list(PROMPTS) + humaneval_prompts()[64:84])[:n]
    if len(texts) < n:
        raise ValueError(f"the held-out workload has {len(texts)} prompts; a batch of {n} needs more")
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def _decode(eng, prompts: list[list[int]], batch: int, gc) -> tuple[float, int, dict]:
    """Run the prompts in waves of `batch`; returns (decode seconds, decode tokens, outputs by index).
    Each wave's first step (admission, prefill of every prompt, one decode step) is not timed."""
    seconds, tokens, outputs = 0.0, 0, {}
    for w in range(0, len(prompts), batch):
        ids = {eng.submit(p, gc): w + j for j, p in enumerate(prompts[w:w + batch])}
        events = eng.step()
        t0 = time.perf_counter()
        while eng.has_work:
            step = eng.step()
            tokens += len(step)
            events += step
        seconds += time.perf_counter() - t0
        for ev in events:
            if ev.finished:
                outputs[ids[ev.request_id]] = ev.result.token_ids
    return seconds, tokens, outputs


def _stats(eng) -> dict:
    st = eng.ee_stats
    return {"drafts": list(st.drafts_per_ramp), "checked": list(st.checked_per_ramp),
            "accepted": list(st.accepted_per_ramp),
            "verify_passes": st.verify_passes, "fused_iterations": st.fused_iterations,
            "draft_cap_stays": st.draft_cap_stays, "tokens": st.tokens, "draft_stops": st.draft_stops,
            "ramp_skips": st.ramp_skips}


def measure(heads_dir, cfg, params, tok, prompts, batch: int, ramps: tuple[int, ...], threshold: float | None,
            new_tokens: int, max_draft: int, gate: bool, draft_stop: float = 0.0, adaptive_ramps: bool = False) -> dict:
    """One engine (threshold None = `off`): rounds until one compiles nothing; the last is timed."""
    from drex_jax import Engine, GenerationConfig, compile_counter
    from drex_jax.early_exit import EEConfig

    kw = dict(max_slots=batch, max_seq_len=max(len(p) for p in prompts) + new_tokens + 8,
              max_prefill_tokens_per_step=batch * 1024)
    if threshold is None:
        eng = Engine.from_params(cfg, params, tok, **kw)
    else:
        ee = EEConfig(ramps, threshold, missing_kv="recompute", verify=True, max_draft=max_draft, head="trained",
                      ramp_vocab=1024, draft_stop=draft_stop, adaptive_ramps=adaptive_ramps)
        eng = Engine.from_params(cfg, params, tok, ee=ee, policy="rebatching", art=gate, exit_heads=heads_dir, **kw)
    gc = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    # the same workload again until a round compiles nothing (new chunk lengths and row counts can
    # first appear in later rounds, as the ramp gate switches modes): that round is the timed one
    for rnd in range(MAX_ROUNDS):
        before = _stats(eng) if eng.ee_stats is not None else None
        compiles = compile_counter.count()
        seconds, tokens, outputs = _decode(eng, prompts, batch, gc)
        compiled = compile_counter.count() - compiles
        if rnd >= 1 and compiled == 0:
            break
    row = {"batch": batch, "ramps": list(ramps) if threshold is not None else None, "threshold": threshold,
           "tok_s": tokens / seconds, "seconds": seconds, "decode_tokens": tokens, "rounds": rnd + 1,
           "compiled_in_timed_round": compiled, "outputs": [outputs[i] for i in range(len(prompts))]}
    if before is not None:
        after = _stats(eng)
        d = {k: (np.subtract(after[k], before[k]).tolist()) for k in after}
        drafted, accepted = sum(d["checked"]), sum(d["accepted"])
        row.update(drafts_per_ramp=d["drafts"], accepted_per_ramp=d["accepted"], verify_passes=d["verify_passes"],
                   fused_iterations=d["fused_iterations"], draft_cap_stays=d["draft_cap_stays"],
                   draft_stops=d["draft_stops"], ramp_skips=d["ramp_skips"],
                   acceptance=accepted / max(drafted, 1),
                   acceptance_per_ramp=[a / dr if dr else None for a, dr in zip(d["accepted"], d["checked"])],
                   mean_accepted=(accepted + d["verify_passes"]) / max(d["verify_passes"], 1))
    return row


def run_verify(model: str | None = None, quick: bool = False, new_tokens: int = 32, thresholds=THRESHOLDS,
               batches=BATCHES, ramp_sets=RAMP_SETS, max_draft: int = 7, gate: bool = True,
               heads=None, progress: bool = True, draft_stop: float = 0.0,
               adaptive_ramps: bool = False) -> dict:
    """Every batch size x (heads x ramp set x threshold), each beside `off` at the same batch size.
    `heads`: one or several heads (a directory, or 'local' / 'attention': `exit_heads.heads_dir_arg`);
    default: the model's own (MODEL/exit_heads, else the bundled local heads)."""
    from convert.checkpoint import load_checkpoint
    from drex_jax import compile_counter
    from drex_jax.bench.roofline import machine
    from drex_jax.default_model import default_model_path
    from drex_jax.exit_heads import find_heads, heads_dir_arg

    path = model or default_model_path()
    cfg, params, tok = load_checkpoint(path)
    names = [heads] if isinstance(heads, str) else list(heads or [])
    heads_dirs = {n: heads_dir_arg(n) for n in names} if names else {"default": find_heads(path, cfg, params)}
    if None in heads_dirs.values():
        raise ValueError(f"verify benchmark needs trained exit heads for {path!r} (drex-jax train-exits)")
    if quick:
        thresholds, batches, ramp_sets, new_tokens = (0.5,), (1, 8), ramp_sets[:1], min(new_tokens, 24)
    compile_counter.install()
    settings = [(None, None, None)] + [(h, tuple(r), t) for h in heads_dirs for r in ramp_sets for t in thresholds]
    rows = []
    for batch in batches:
        prompts = workload(tok, max(batch, 4))
        block = []
        # `off` runs first and again last: the machine drifts, so each setting is compared with the
        # mean of the two, and their spread is reported beside it
        for name, ramps, thr in settings + [(None, None, None)]:
            if progress:
                label = "off" if thr is None else f"verify heads {name} ramps {list(ramps)} threshold {thr}"
                print(f"[verify] batch {batch}: {label}", file=sys.stderr, flush=True)
            block.append(measure(heads_dirs.get(name), cfg, params, tok, prompts, batch, ramps, thr, new_tokens,
                                 max_draft, gate, draft_stop, adaptive_ramps))
            block[-1]["heads"] = name
        first, last = block[0], block.pop()
        base = (first["tok_s"] + last["tok_s"]) / 2
        first.update(tok_s=base, off_first_tok_s=first["tok_s"], off_last_tok_s=last["tok_s"],
                     off_drift=last["tok_s"] / first["tok_s"] - 1)
        for row in block:
            row["speedup"] = row["tok_s"] / base
            row["identical"] = row["outputs"] == first["outputs"]
        rows += block
    for r in rows:
        del r["outputs"]
    best = {}
    for b in batches:
        top = max((r for r in rows if r["batch"] == b and r["threshold"] is not None), key=lambda r: r["speedup"])
        best[b] = {"heads": top["heads"], "ramps": top["ramps"], "threshold": top["threshold"],
                   "speedup": top["speedup"]}
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "model": path, "heads": heads_dirs,
            "ramp_vocab": 1024, "new_tokens": new_tokens, "max_draft": max_draft, "gate": gate, "rows": rows,
            "draft_stop": draft_stop, "adaptive_ramps": adaptive_ramps,
            "best": best}


def markdown(res: dict) -> str:
    heads = ", ".join(f"{n} = `{d}`" for n, d in res["heads"].items())
    lines = [f"Verify mode (lossless early exit) vs full depth, {res['machine']}, {res['date']}: trained ramp "
             f"heads {heads} (ramp vocabulary {res['ramp_vocab']}), max_draft {res['max_draft']}, "
             f"ramp gate {'on' if res['gate'] else 'off'}, draft_stop {res.get('draft_stop', 0.0)}, adaptive ramps "
             f"{'on' if res.get('adaptive_ramps') else 'off'}, {res['new_tokens']} greedy tokens per request, decode tok/s "
             "with prefill excluded (the last of 2-4 identical rounds: the first that compiled nothing, or the 4th); `off` = the fused full-depth decode step, "
             "same run, before and after the settings (their mean is the baseline).", "",
             "| batch | heads | ramps | threshold | tok/s | vs off | identical to off | acceptance | per ramp | "
             "mean accepted | deep passes | fused iters (gate) | cap stays | draft stops | ramp skips | "
             "compiles in timed round |",
             "|---:|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if r["threshold"] is None:
            lines.append(f"| {r['batch']} | - | - | off (first {r['off_first_tok_s']:.1f}, last {r['off_last_tok_s']:.1f}: "
                         f"{r['off_drift']:+.0%}) | {r['tok_s']:.1f} | 1.00x | - | - | - | - | - | - | - | - | - | "
                         f"{r['compiled_in_timed_round']} |")
            continue
        per = " / ".join("-" if a is None else f"{a:.0%}" for a in r["acceptance_per_ramp"])
        drafts = " / ".join(str(d) for d in r["drafts_per_ramp"])
        lines.append(f"| {r['batch']} | {r['heads']} | {r['ramps']} | {r['threshold']} | {r['tok_s']:.1f} | **{r['speedup']:.2f}x** | "
                     f"{'yes' if r['identical'] else 'NO'} | {r['acceptance']:.0%} | {per} (of {drafts}) | "
                     f"{r['mean_accepted']:.2f} | {r['verify_passes']} | {r['fused_iterations']} | "
                     f"{r['draft_cap_stays']} | {r.get('draft_stops', 0)} | {r.get('ramp_skips', 0)} | "
                     f"{r['compiled_in_timed_round']} |")
    lines.append("")
    lines.append("Best setting per batch: " + ", ".join(
        f"batch {b}: heads {t['heads']}, ramps {t['ramps']} threshold {t['threshold']} ({t['speedup']:.2f}x)"
        for b, t in res["best"].items()))
    return "\n".join(lines) + "\n"
