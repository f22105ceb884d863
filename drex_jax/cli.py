"""`drex-jax` command line: convert checkpoints, generate text, serve the OpenAI API, train exit heads, plan
memory, benchmark."""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "Give three tips for writing readable Python code.",
]


def _convert(args) -> int:
    from convert import convert_any

    t0 = time.perf_counter()
    print(f"converting {args.src} -> {args.dst} ({args.dtype})", file=sys.stderr)
    convert_any(args.src, args.dst, dtype=args.dtype)
    print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _generate(args) -> int:
    from drex_jax import Engine, GenerationConfig

    prompts = args.prompt or DEFAULT_PROMPTS
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()),
    )
    engine, ee_kwargs, mesh, (model_dir, params) = _build_engine(args)
    label = _run_label(ee_kwargs)
    encoded = [engine.encode(p, not args.raw) for p in prompts]
    runs = [(label, engine, *_timed_generate(engine, encoded, cfg, label))]
    if ee_kwargs and not args.no_compare:
        # beside a lossy policy, the lossless one (verify mode) on the same heads; then full depth:
        # what early exit costs and buys
        kw = dict(dtype=args.dtype, max_slots=args.max_slots, max_seq_len=args.max_seq_len, mesh=mesh,
                  attention=args.attention, matmul=args.matmul, **_prefill_kwargs(args))
        if not args.verify:
            vargs = copy.copy(args)
            vargs.verify, vargs.missing_kv, vargs.policy = True, None, "rebatching"
            if args.exit_layers is None:
                vargs.threshold = None  # verify mode's own default ramps and threshold
            v_kwargs = _early_exit_kwargs(vargs, engine.cfg, params, model_dir)
            verify = Engine.from_params(engine.cfg, params, engine.tokenizer, **kw, **v_kwargs)
            name = _run_label(v_kwargs)
            runs.append((name, verify, *_timed_generate(verify, encoded, cfg, name)))
        full = Engine.from_params(engine.cfg, params, engine.tokenizer, **kw)
        runs.append(("full depth", full, *_timed_generate(full, encoded, cfg, "full depth")))
    if args.json:
        print(json.dumps([{"prompt": p, **{name: {"text": r[i].text, "token_ids": r[i].token_ids,
                                                   "exit_layers": r[i].exit_layers, "stats": vars(r[i].stats)}
                                            for name, _, r, _ in runs}}
                          for i, p in enumerate(prompts)], indent=2))
    else:
        _print_comparison(prompts, encoded, runs)
    return 0


def _run_label(ee_kwargs: dict) -> str:
    if not ee_kwargs:
        return "full depth"
    return "verify (lossless)" if ee_kwargs["ee"].verify else f"{ee_kwargs['policy']} (lossy)"


def _build_engine(args):
    """The Engine `generate` and `serve` run: model, dtype, slots, attention, devices, early exit.
    Returns (engine, early-exit kwargs ({} at full depth), mesh, (model dir, the loaded params))."""
    from drex_jax import Engine

    mesh = None
    if args.coordinator or args.num_processes:
        from drex_jax.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.tp > 1:
        import jax

        from drex_jax.sharding import make_mesh

        mesh = make_mesh(tp=args.tp, devices=jax.devices()[: args.tp])
    from drex_jax.loading import load_model

    _note(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'}")
    model_dir, mcfg, params, tok = load_model(args.model)
    ee_kwargs = _early_exit_kwargs(args, mcfg, params, model_dir)
    engine = Engine.from_params(mcfg, params, tok, dtype=args.dtype, max_slots=args.max_slots,
                                max_seq_len=args.max_seq_len, mesh=mesh, attention=args.attention,
                                matmul=args.matmul, **_prefill_kwargs(args), **ee_kwargs)
    return engine, ee_kwargs, mesh, (model_dir, params)


def _prefill_kwargs(args) -> dict:
    return {"max_prefill_tokens_per_step": args.max_prefill_tokens,
            "max_prefill_tokens_while_decoding": args.max_prefill_tokens_while_decoding}


def _serve(args) -> int:
    import uvicorn

    from drex_jax.default_model import default_model_path
    from drex_jax.serve.app import build_app

    engine, ee_kwargs, *_ = _build_engine(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model or default_model_path()))
    if args.warmup:
        _note("compiling every batch and prompt bucket before serving (--warmup)")
        engine.warmup(progress=True)
    depth = "early exit (" + ee_kwargs["policy"] + ")" if ee_kwargs else "full depth"
    _note(f"serving {name!r} ({depth}, {engine.max_slots} slots, context {engine.max_seq_len}) on "
          f"http://{args.host}:{args.port}/v1  (first requests of each batch size compile)")
    app = build_app(engine, name, max_waiting=args.max_waiting)
    # uvicorn drains on Ctrl-C / SIGTERM, then re-raises the signal to the handler it found; this
    # one makes that a normal exit (status 0) instead of death by signal
    stopped_by = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signal.Signals(signum).name))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout)
    if stopped_by:
        _note(f"stopped by {stopped_by[0]}: in-flight requests drained (or cancelled after --drain-timeout)")
    return 0


def _note(msg: str) -> None:
    print(f"[drex_jax] {msg}", file=sys.stderr, flush=True)


def _timed_generate(engine, encoded: list[list[int]], config, label: str):
    """Generate with a token progress bar; returns (results, timing) where timing separates the
    time spent compiling from decode throughput."""
    from tqdm import tqdm

    from drex_jax import compile_counter

    compiles = compile_counter.count()
    t0 = time.perf_counter()
    ids = [engine.submit(e, config) for e in encoded]
    done = {}
    bar = tqdm(total=len(ids) * config.max_new_tokens, desc=f"{label} (first steps compile)", unit="tok",
               file=sys.stderr, leave=False)
    while engine.has_work:
        for ev in engine.step():
            bar.update(1)
            if ev.finished:
                done[ev.request_id] = ev.result
    bar.close()
    t1 = time.perf_counter()
    results = [done[i] for i in ids]
    # decode span: from the first request's first token to the last request's last token
    first = t0 + min(r.stats.ttft_s for r in results)
    last = t0 + max(r.stats.latency_s for r in results)
    decode_tokens = sum(max(r.stats.generated_tokens - 1, 0) for r in results)
    decode_compile = compile_counter.seconds_between(first, last)
    return results, {"wall_s": t1 - t0, "compile_s": compile_counter.seconds_between(t0, t1),
                     "programs": compile_counter.count() - compiles,
                     "decode_tok_s": decode_tokens / max(last - first - decode_compile, 1e-9)}


def _print_comparison(prompts, encoded, runs) -> None:
    """Each prompt's answers (every run), then per run: decode speed against full depth, and how its
    tokens compare with full depth's (verify mode: identical or not; a lossy policy: agreement)."""
    import numpy as np

    from drex_jax.bench.quality import agreement

    ref = next((r for r in runs if r[0] == "full depth"), None)
    width = max(len(name) for name, *_ in runs)
    for i, p in enumerate(prompts):
        print(f"### {p}")
        for name, eng, res, _ in runs:
            r = res[i]
            print(f"[{name:>{width}}] {r.text.strip()}")
        for name, eng, res, _ in runs:
            r, L = res[i], eng.cfg.num_layers
            line = f"  {name}: {r.stats.generated_tokens} tokens, ttft {r.stats.ttft_s * 1e3:.0f} ms"
            ee = eng.early_exit
            if ee:
                ramps = [e for e in ee["exit_layers"] if e < L]
                per_ramp = [sum(1 for e in r.exit_layers[1:] if e == x) for x in ramps + [L]]
                depth = np.mean(r.exit_layers[1:]) if len(r.exit_layers) > 1 else L
                kind = "accepted drafts" if ee["verify"] else "exits"
                line += f", mean depth {depth:.1f}/{L}, {kind} per ramp (last = full depth) {per_ramp}"
            if ee and ref is not None:
                want = ref[2][i].token_ids
                if ee["verify"]:
                    line += f"; identical to full depth: {'yes' if r.token_ids == want else 'NO'}"
                else:
                    a = agreement(eng.params, eng.cfg, eng.tokenizer, [encoded[i]], [r.token_ids], [want])
                    line += (f"; vs full depth: prefix agreement {a['prefix_agreement']:.0%}, token agreement "
                             f"{a['token_agreement']:.0%}, ROUGE-L {a['rouge_l']:.2f}")
            if ee or len(runs) > 1:
                print(line)
        print()
    print("| | " + " | ".join(name for name, *_ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    print("| decode tok/s (compile excluded) | " + " | ".join(f"{t['decode_tok_s']:.1f}" for *_, t in runs) + " |")
    if ref is not None:
        print("| vs full depth | " + " | ".join(f"{t['decode_tok_s'] / ref[3]['decode_tok_s']:.2f}x"
                                              for *_, t in runs) + " |")
    print("| compile s (programs) | " + " | ".join(f"{t['compile_s']:.1f} ({t['programs']})" for *_, t in runs) + " |")
    print("| wall s | " + " | ".join(f"{t['wall_s']:.1f}" for *_, t in runs) + " |")
    for name, eng, res, t in runs:
        st, ee = eng.ee_stats, eng.early_exit
        if st is None:
            continue
        L = eng.cfg.num_layers
        print(f"\n{name}: policy {ee['policy']}, {ee['head']} heads, ramps {list(ee['exit_layers'])}, thresholds "
              f"{list(ee['thresholds'])}, missing KV {ee['missing_kv']}, ramp vocabulary {ee['ramp_vocab'] or 'full'}")
        line = f"  mean depth {st.mean_depth():.2f}/{L} (layers run per token)"
        if ee["verify"]:
            line += (f"; drafts per ramp {st.drafts_per_ramp}, accepted {st.accepted_per_ramp} "
                     f"({st.acceptance_rate():.0%}), {st.mean_accepted():.2f} tokens per deep pass, "
                     f"{st.fused_iterations} iterations as plain decoding (ramp gate)")
        else:
            line += (f"; exits per ramp (last = full depth) {st.exits_per_ramp}; involuntary exits "
                     f"{st.involuntary_exits}, stays {st.involuntary_stays}")
        print(line)
        if ref is None:
            continue
        speed = t["decode_tok_s"] / ref[3]["decode_tok_s"]
        want = [r.token_ids for r in ref[2]]
        if ee["verify"]:
            same = sum(r.token_ids == w for r, w in zip(res, want))
            print(f"  all prompts: {same} of {len(want)} answers identical to full depth; decode speed {speed:.2f}x "
                  "full depth")
        else:
            a = agreement(eng.params, eng.cfg, eng.tokenizer, encoded, [r.token_ids for r in res], want)
            print(f"  all prompts vs full depth: prefix agreement {a['prefix_agreement']:.1%}, token agreement "
                  f"{a['token_agreement']:.1%}, ROUGE-L {a['rouge_l']:.3f}; decode speed {speed:.2f}x full depth")


VERIFY_THRESHOLD = 0.9


def _early_exit_kwargs(args, cfg, params, model_dir: str | None) -> dict:
    """Engine kwargs for --early-exit. With trained heads (MODEL/exit_heads, or the ones bundled for
    SmolLM2) the ramps, calibrated thresholds, ramp vocabulary and missing-KV method default to
    what the heads were calibrated for; without them, the shared head with a notice."""
    from drex_jax.early_exit import EEConfig
    from drex_jax.exit_heads import check_fit, heads_dir_arg, read_meta
    from drex_jax.loading import heads_dir_for

    if not args.early_exit:
        return {}
    if args.exit_heads is not None and args.head == "shared":
        raise ValueError("--exit-heads names trained heads; it cannot run with --head shared")
    if args.exit_heads is not None:
        heads_dir = heads_dir_arg(args.exit_heads)
        check_fit(heads_dir, read_meta(heads_dir), cfg, params)
    else:
        heads_dir = heads_dir_for(model_dir, cfg, params, required=args.head == "trained") \
            if args.head != "shared" else None
    meta = read_meta(heads_dir) if heads_dir else {}
    if heads_dir is None:
        _note("no trained exit heads for this model (run `drex-jax train-exits`); using the shared head, "
              "which is much less accurate at shallow layers")
    layers = tuple(args.exit_layers or meta.get("exit_layers") or (8, 15, 22))
    if args.verify and not args.exit_layers and not args.threshold:
        # verify mode's default, the best of the sweep in BENCHMARKS.md (issue 17): drafts at the
        # deepest ramp only, at 0.9 (shallower ramps' drafts were rejected too often to pay)
        layers, args.threshold = layers[-1:], [VERIFY_THRESHOLD]
    if args.threshold:
        thr = tuple(args.threshold) if len(args.threshold) > 1 else args.threshold[0]
    elif meta:
        trained = meta["exit_layers"]
        missing = [e for e in layers if e < cfg.num_layers and e not in trained]
        if missing:
            raise ValueError(f"exit layers {missing} have no trained head (trained: {trained}); pick among them")
        thr = tuple(meta["thresholds"][trained.index(e)] if e in trained else 0.0 for e in layers)
    else:
        thr = 0.9
    ramp_vocab = args.ramp_vocab if args.ramp_vocab is not None else meta.get("ramp_vocab")
    missing_kv = "recompute" if args.verify else args.missing_kv or meta.get("missing_kv", "propagate")
    if args.verify and args.missing_kv not in (None, "recompute"):
        raise ValueError(f"--verify recomputes the skipped layers' K/V; it cannot run with --missing-kv {args.missing_kv}")
    ee = EEConfig(layers, thr, confidence=args.confidence, missing_kv=missing_kv,
                  head="trained" if heads_dir else "shared", ramp_vocab=ramp_vocab or None, verify=args.verify,
                  max_draft=args.max_draft, draft_stop=args.draft_stop, adaptive_ramps=args.adaptive_ramps)
    return {"ee": ee, "policy": args.policy, "exit_heads": heads_dir, "decisions": args.exit_decisions}


def _train_exits(args) -> int:
    from drex_jax.loading import load_model
    from drex_jax.train_exits import TrainExitsConfig, train_exit_heads

    model, cfg, params, tok = load_model(args.model)
    # context-aware heads: a smaller step (the probe in benchmarks/draft_adapters.py trained them at 1e-3)
    lr = args.learning_rate or (1e-3 if args.adapter == "attention" else TrainExitsConfig.learning_rate)
    tc = TrainExitsConfig(exit_layers=tuple(args.exit_layers), rank=args.rank, steps=args.steps,
                          new_tokens=args.new_tokens, num_humaneval=args.num_humaneval, seed=args.seed,
                          target_precision=args.target_precision, ramp_vocab=args.ramp_vocab or None,
                          adapter=args.adapter, learning_rate=lr)
    out = args.out or os.path.join(model, "exit_heads")
    if tc.adapter == "attention":
        from drex_jax.train_drafts import train_draft_heads

        _, meta = train_draft_heads(params, cfg, tok, out, tc)
    else:
        _, meta = train_exit_heads(params, cfg, tok, out, tc)
    ev = meta["held_out"]
    print(f"saved exit heads to {out}\ncalibrated thresholds {meta['thresholds']} (ramps {meta['exit_layers']}); "
          f"held-out: prefix agreement {ev['prefix_agreement']:.1%}, token agreement {ev['token_agreement']:.1%}, "
          f"ROUGE-L {ev['rouge_l']:.3f}, mean depth {ev['mean_depth']:.2f}/{cfg.num_layers}")
    return 0


def _plan(args) -> int:
    from drex_jax.default_model import default_model_path
    from drex_jax.plan import format_plan, load_model_config, plan

    cfg = load_model_config(args.model or default_model_path())
    if args.validate:
        from drex_jax import projection

        res = projection.validate(projection.load_json(args.validate),
                                  projection.load_json(args.ee) if args.ee else None, cfg, itemsize=4)
        print(json.dumps(res, indent=2) if args.json else projection.format_validation(res))
        return 0
    if args.project:
        from drex_jax import projection
        from drex_jax.sched.cost_model import CARDS

        cal = projection.calibration_from_file(args.calibration) if args.calibration else projection.GPU_ASSUMPTION
        res = projection.project(cfg, CARDS[args.project], cal, args.batches, args.contexts, args.ramps,
                                 args.exit_shares, itemsize=2 if args.dtype == "bfloat16" else 4,
                                 ramp_vocab=args.ramp_vocab or None)
        print(json.dumps(res, indent=2) if args.json else projection.format_projection(res, cfg))
        return 0
    mem = int(args.memory_gib * 2**30) if args.memory_gib else None
    p = plan(cfg, tp=args.tp, max_batch=args.max_batch, max_len=args.max_len, dtype=args.dtype,
             memory_bytes=mem, page_size=args.page_size, reserve_fraction=args.reserve)
    print(json.dumps(vars(p), indent=2) if args.json else format_plan(p, cfg, args.max_batch, args.max_len))
    return 0


def _bench(args) -> int:
    from drex_jax.bench import report
    from drex_jax.bench.suite import BenchConfig, run_scale, run_suite

    t0 = time.perf_counter()
    if args.url:
        md = _load_test(args)
    elif args.peers:
        from drex_jax.bench import peers

        def early_exit_engine(max_slots: int, max_seq_len: int):
            ee_args = build_parser().parse_args(["generate", "--early-exit", "--max-slots", str(max_slots),
                                                 "--max-seq-len", str(max_seq_len)])
            return _build_engine(ee_args)[0]

        return peers.main(["--batches", *map(str, args.peers_batches), "--rounds", str(args.peers_rounds),
                           "--new-tokens", str(args.peers_new_tokens), "--out", args.out], early_exit_engine)
    elif args.roofline:
        from drex_jax.bench import roofline

        res = roofline.run_roofline(args.model, quick=args.quick, steps=args.steps, hf=not args.no_hf,
                                    attention=args.attention)
        md = _write_report(args.out, "roofline", res, roofline.markdown(res))
        roofline.plot(res, os.path.join(args.out, "roofline.png"))
    elif args.ee_efficiency:
        from drex_jax.bench import ee_efficiency

        res = ee_efficiency.run_ee_efficiency(args.model, quick=args.quick, new_tokens=args.ee_new_tokens,
                                              batches=args.ee_batches)
        md = _write_report(args.out, "ee_efficiency", res,
                           ee_efficiency.markdown(res) + "\n" + ee_efficiency.summary(res) + "\n")
        ee_efficiency.plot(res, os.path.join(args.out, "ee_efficiency.png"))
    elif args.verify:
        from drex_jax.bench import verify

        res = verify.run_verify(args.model, quick=args.quick, new_tokens=args.verify_new_tokens,
                                thresholds=tuple(args.verify_thresholds), batches=tuple(args.verify_batches),
                                max_draft=args.max_draft, gate=not args.no_gate, heads=args.exit_heads,
                                ramp_sets=tuple(tuple(int(e) for e in r.split(",")) for r in args.verify_ramps),
                                draft_stop=args.draft_stop, adaptive_ramps=args.adaptive_ramps)
        md = _write_report(args.out, "verify", res, verify.markdown(res))
    elif args.scale:
        trace = args.trace or os.path.join(args.out, "exit_trace.json")
        results, meta = run_scale(args.scale, trace, batch=args.scale_batch, prompt_len=args.scale_prompt_len,
                                  new_tokens=args.scale_new_tokens, policies=tuple(args.policies or
                                                                                   ("off", "lazy", "rebatching")),
                                  peak_bandwidth=args.peak_gbps * 1e9 if args.peak_gbps else None)
        os.makedirs(args.out, exist_ok=True)
        name = f"scale_{args.scale}"
        report.write_json(os.path.join(args.out, name + ".json"), results, meta)
        md = report.markdown(results, f"Scale mode {args.scale}: {meta['machine']}")
        util = meta.get("bandwidth_utilization")
        md += (f"\n`off` decode reads {meta['decode_step_bytes'] / 1e9:.2f} GB per step; achieved "
               f"{meta.get('achieved_bandwidth_Bps', 0) / 1e9:.0f} GB/s"
               + (f" = {util:.0%} of peak {meta['peak_bandwidth_Bps'] / 1e9:.0f} GB/s" if util else
                  " (peak bandwidth unknown for this device; pass --peak-gbps)") + "\n")
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(md)
    else:
        bc = BenchConfig(
            workloads=tuple(args.workloads), num_prompts=args.num_prompts, new_tokens=args.new_tokens,
            policies=tuple(args.policies or BenchConfig.policies), thresholds=tuple(args.thresholds),
            batch_sizes=tuple(args.batch_sizes), online_rate=args.rate, sla_ttft_ms=args.sla_ttft_ms,
            sla_tpot_ms=args.sla_tpot_ms, hf=not args.no_hf, missing_kv=args.missing_kv, out_dir=args.out,
            ramp_vocab=args.ramp_vocab)
        results, meta = run_suite(bc, args.model)
        with open(os.path.join(args.out, "results.md")) as f:
            md = f.read()
    print(md)
    print(f"wrote {args.out}/ in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


def _add_engine_args(g: argparse.ArgumentParser, policies) -> None:
    """Model, engine and early-exit options shared by `generate` and `serve`."""
    from drex_jax.kv.missing import MISSING_KV_METHODS
    from drex_jax.model.attention_backends import ATTENTION

    g.add_argument("--model", default=None, help="converted checkpoint dir (default: bundled SmolLM2)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights, activations and KV pool (auto: bfloat16 on a GPU, float32 on a CPU)")
    g.add_argument("--max-slots", type=int, default=32)
    g.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                   help="decode attention over the paged KV pool (auto: Pallas on a GPU, the C++ kernel on a CPU)")
    g.add_argument("--matmul", default="auto", choices=["auto", "kernel", "xla"],
                   help="the layers' projections (auto: the C++ projection kernel over packed weights on a CPU in "
                        "float32 on one device, else XLA's dot)")
    g.add_argument("--max-seq-len", type=int, default=1024)
    g.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens one step prefills when nothing decodes (longer prompts come in chunks)")
    g.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None, metavar="N",
                   help="the same while requests decode (default: --max-prefill-tokens); smaller keeps running "
                        "requests streaming while long prompts arrive, at the cost of slower admission")
    m = g.add_argument_group("devices")
    m.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices; splits heads and MLP)")
    m.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port (jax.distributed)")
    m.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    m.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    e = g.add_argument_group("early exit")
    e.add_argument("--early-exit", action="store_true", help="exit easy tokens at ramps (DREX rebatching)")
    e.add_argument("--exit-layers", type=int, nargs="+", default=None,
                   help="default: the trained heads' ramps (8 15 22 for the bundled heads)")
    e.add_argument("--threshold", "--thresholds", type=float, nargs="+", default=None,
                   help="one per ramp, or one for all; default: the thresholds the heads were calibrated for "
                        "(0.9 with the shared head)")
    e.add_argument("--policy", default="rebatching",
                   choices=list(policies))
    e.add_argument("--confidence", default="top1_minus_top2", choices=["top1_minus_top2", "max_prob", "neg_entropy"])
    e.add_argument("--missing-kv", default=None, choices=list(MISSING_KV_METHODS),
                   help="default: what the heads were calibrated with (propagate: measured better than copy on "
                        "SmolLM2, BENCHMARKS.md); recompute: the skipped layers' K/V exactly, in the row's next "
                        "deep pass (--verify implies it)")
    e.add_argument("--verify", action="store_true",
                   help="lossless early exit: exited tokens are drafts that the deep pass verifies; greedy output "
                        "equals full depth (needs recompute and temperature 0)")
    e.add_argument("--max-draft", type=int, default=7, help="recompute/verify: pending positions a row may hold")
    e.add_argument("--draft-stop", type=float, default=0.0, metavar="P",
                   help="verify: stop drafting once the product of a row's unverified drafts' confidences falls "
                        "below P (a second exit; default 0 = off)")
    e.add_argument("--adaptive-ramps", action="store_true",
                   help="verify: each request drafts at a ramp only while its own recent acceptance there reaches "
                        "the ramp's break-even (depth / layers)")
    e.add_argument("--exit-decisions", default="frozen", choices=["frozen", "measured"],
                   help="frozen: ART prices splits from costs timed at warm-up and the ramp gate runs in verify "
                        "mode only, so greedy output never depends on timing; measured: both follow live "
                        "timings (lossy policies' tokens may vary from run to run)")
    e.add_argument("--exit-heads", default=None, metavar="DIR|local|attention",
                   help="trained heads: a directory written by train-exits, or the bundled SmolLM2 heads, 'local' "
                        "(position-local) or 'attention' (context-aware drafts); default: MODEL/exit_heads, else "
                        "the bundled local heads when they fit")
    e.add_argument("--head", default=None, choices=["shared", "trained"],
                   help="default: trained when heads fit the model (MODEL/exit_heads or the bundled ones), else shared")
    e.add_argument("--ramp-vocab", type=int, default=None,
                   help="ramps score only this many candidate tokens (the most frequent outputs, ranked by "
                        "train-exits); 0 = whole vocabulary; default: what the heads were calibrated with")


def _load_test(args) -> str:
    """`bench --url`: load-test a running server; the offline greedy reference runs here, on the
    model given by --model (default: the bundled one) at the server's context limit."""
    import httpx

    from drex_jax.bench import load

    cfg = load.LoadConfig(num_requests=args.requests, concurrency=args.concurrency, rate=args.rate,
                          disconnect_fraction=args.disconnect_fraction, max_tokens=args.max_tokens)
    reference = None
    if not args.no_reference:
        from drex_jax import Engine

        from drex_jax.early_exit import EEConfig

        card = httpx.get(args.url.rstrip("/") + "/v1/models", timeout=10).json()["data"][0]
        ee = card.get("drex", {}).get("early_exit")  # an early-exit server is checked against the same setup
        kw = {} if not ee else {"ee": EEConfig(**{k: v for k, v in ee.items() if k not in ("policy", "art")}),
                                "policy": ee["policy"], "art": ee["art"]}
        _note(f"offline reference: {args.model or 'bundled model'}, {'early exit ' + ee['policy'] if ee else 'full depth'}")
        # the server's projection path, so that both sum in the same order ("auto" follows max_slots)
        kw["matmul"] = card.get("drex", {}).get("matmul") or "auto"
        reference = Engine(args.model, max_slots=args.concurrency, max_seq_len=card["max_model_len"], **kw)
    res = load.run_load(args.url, cfg, reference)
    return _write_report(args.out, "load", res, load.markdown(res))


def _write_report(out: str, name: str, res: dict, md: str) -> str:
    """OUT/NAME.json (the raw results) and OUT/NAME.md; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(md)
    return md


def build_parser() -> argparse.ArgumentParser:
    from drex_jax.kv.missing import METHODS
    from drex_jax.model.attention_backends import ATTENTION
    from drex_jax.rebatch.policies import POLICIES

    p = argparse.ArgumentParser(prog="drex-jax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF safetensors dir or .gguf file -> drex_jax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(fn=_convert)

    g = sub.add_parser("generate", help="generate text (default: bundled SmolLM2, chat template)")
    g.add_argument("--prompt", action="append", help="prompt (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print results as JSON")
    _add_engine_args(g, POLICIES)
    g.add_argument("--no-compare", action="store_true", help="skip the full-depth run beside the early-exit one")
    g.set_defaults(fn=_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                      "/v1/models, /health, /metrics)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the model dir's name)")
    sv.add_argument("--max-waiting", type=int, default=256,
                    help="requests queued beyond the decode slots; more get 429 with Retry-After")
    sv.add_argument("--drain-timeout", type=float, default=30.0,
                    help="on Ctrl-C / SIGTERM: seconds in-flight requests may finish before they are cancelled")
    sv.add_argument("--warmup", action="store_true", help="compile every bucket before accepting requests")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_engine_args(sv, POLICIES)
    sv.set_defaults(fn=_serve)

    from drex_jax.train_exits import TrainExitsConfig

    d = TrainExitsConfig()
    t = sub.add_parser("train-exits", help="train exit heads by self-distillation (resumable)")
    t.add_argument("--model", default=None, help="converted checkpoint dir (default: bundled SmolLM2)")
    t.add_argument("--out", default=None, help="output dir (default: MODEL/exit_heads)")
    t.add_argument("--exit-layers", type=int, nargs="+", default=list(d.exit_layers))
    t.add_argument("--adapter", default=d.adapter, choices=["none", "attention"],
                   help="attention: context-aware draft heads, an attention block over the earlier positions in "
                        "front of each ramp head (drex_jax.draft_attention); none: position-local heads")
    t.add_argument("--rank", type=int, default=d.rank)
    t.add_argument("--learning-rate", type=float, default=None,
                   help=f"default {d.learning_rate} (--adapter none) or 1e-3 (--adapter attention)")
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--new-tokens", type=int, default=d.new_tokens)
    t.add_argument("--num-humaneval", type=int, default=d.num_humaneval)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--target-precision", type=float, default=d.target_precision,
                   help="calibrated thresholds: exits agree with the full model on this share of held-out positions")
    t.add_argument("--ramp-vocab", type=int, default=d.ramp_vocab,
                   help="candidate tokens per ramp used for calibration and evaluation (0 = whole vocabulary)")
    t.set_defaults(fn=_train_exits)

    pl = sub.add_parser("plan", help="params and KV bytes per device under tp; largest batch that fits")
    pl.add_argument("--model", default=None,
                    help="checkpoint or HF dir, or a preset (llama2-7b, llama2-13b, llama3-8b); default SmolLM2")
    pl.add_argument("--tp", type=int, default=1)
    pl.add_argument("--max-batch", type=int, default=32)
    pl.add_argument("--max-len", type=int, default=2048)
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    pl.add_argument("--memory-gib", type=float, default=None, help="memory per device, e.g. 80 for an H100")
    pl.add_argument("--page-size", type=int, default=16)
    pl.add_argument("--reserve", type=float, default=0.1, help="fraction kept for activations and XLA workspace")
    pl.add_argument("--json", action="store_true")
    pj = pl.add_argument_group("speed projection (a cost model, not a measurement)")
    pj.add_argument("--project", choices=["h100", "h200"], default=None,
                    help="project decode step times and early-exit speed-ups onto this card")
    pj.add_argument("--calibration", default=None,
                    help="roofline.json (`drex-jax bench --roofline`) measured on the card to fit the efficiencies; "
                         "default: stated assumptions")
    pj.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    pj.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    pj.add_argument("--ramps", type=int, nargs="+", default=[8, 15, 22])
    pj.add_argument("--exit-shares", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    pj.add_argument("--ramp-vocab", type=int, default=1024)
    pj.add_argument("--validate", default=None, metavar="ROOFLINE_JSON",
                    help="check the cost model here: fit on half of this roofline result's grid, predict the other "
                         "half (and, with --ee, the replayed-trace early-exit speed-ups)")
    pj.add_argument("--ee", default=None, metavar="EE_EFFICIENCY_JSON", help="with --validate")
    pl.set_defaults(fn=_plan)

    from drex_jax.bench.suite import BenchConfig

    bd = BenchConfig()
    b = sub.add_parser("bench", help="serving benchmark: workloads x policies, quality, HF baseline, plots")
    b.add_argument("--model", default=None, help="converted checkpoint dir (default: bundled SmolLM2)")
    b.add_argument("--workloads", nargs="+", default=list(bd.workloads), choices=["humaneval", "chat"])
    b.add_argument("--num-prompts", type=int, default=bd.num_prompts)
    b.add_argument("--new-tokens", type=int, default=bd.new_tokens)
    b.add_argument("--policies", nargs="+", default=None,
                   choices=list(POLICIES),
                   help=f"default {' '.join(bd.policies)} ('off' is the quality reference)")
    b.add_argument("--thresholds", type=float, nargs="+", default=list(bd.thresholds),
                   help="exit thresholds to sweep; the last is used for online and batch runs")
    b.add_argument("--batch-sizes", type=int, nargs="*", default=list(bd.batch_sizes))
    b.add_argument("--rate", type=float, default=bd.online_rate, help="arrivals per second (Poisson) of online runs and of --url")
    b.add_argument("--sla-ttft-ms", type=float, default=bd.sla_ttft_ms)
    b.add_argument("--sla-tpot-ms", type=float, default=bd.sla_tpot_ms)
    b.add_argument("--missing-kv", default=bd.missing_kv, choices=[n for n, m in METHODS.items() if m.fill])
    b.add_argument("--ramp-vocab", type=int, default=None,
                   help="candidate tokens per ramp (needs the trained heads' ranking); default: whole vocabulary")
    b.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    r = b.add_argument_group("roofline")
    r.add_argument("--roofline", action="store_true",
                   help="decode steps (prefill excluded) vs this machine's measured roofline over batch x context, "
                        "and prefill calls vs the matmul peak; writes OUT/roofline.json, .md, .png")
    r.add_argument("--quick", action="store_true", help="roofline: a small grid (batch 1 8 32, context 128 512)")
    r.add_argument("--steps", type=int, default=5, help="roofline: timed decode steps per point (median)")
    r.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                   help="roofline: decode attention path timed (the XLA path is timed beside it)")
    ef = b.add_argument_group("early-exit machinery efficiency")
    ef.add_argument("--ee-efficiency", action="store_true",
                    help="replayed exit traces (exit share x ramps x batch x context) through off / eager / lazy / "
                         "rebatching with and without ART: measured vs ideal speed-up; writes OUT/ee_efficiency.*; "
                         "--quick for one point pair")
    ef.add_argument("--ee-new-tokens", type=int, default=24, help="ee-efficiency: new tokens per request")
    ef.add_argument("--ee-batches", type=int, nargs="+", default=None,
                    help="ee-efficiency: batch sizes (default: the grid's)")
    from drex_jax.bench import verify as verify_bench

    vf = b.add_argument_group("verify mode (lossless early exit)")
    vf.add_argument("--verify", action="store_true",
                    help="verify mode (drafts at the trained ramps, checked by the deep pass) vs full depth over batch "
                         "sizes x thresholds, same run: tok/s, identical output, acceptance; writes OUT/verify.*; "
                         "--quick: threshold 0.5, batches 1 and 8")
    vf.add_argument("--verify-thresholds", type=float, nargs="+", default=list(verify_bench.THRESHOLDS))
    vf.add_argument("--verify-batches", type=int, nargs="+", default=list(verify_bench.BATCHES))
    vf.add_argument("--verify-ramps", nargs="+", default=[",".join(map(str, r)) for r in verify_bench.RAMP_SETS],
                    metavar="E[,E...]", help="verify: ramp sets to sweep, each comma-separated (e.g. 22 15,22)")
    vf.add_argument("--verify-new-tokens", type=int, default=32, help="verify: greedy tokens per request")
    vf.add_argument("--max-draft", type=int, default=7, help="verify: drafts a row may hold before a deep pass")
    vf.add_argument("--exit-heads", default=None, nargs="+", metavar="DIR|local|attention",
                    help="verify: trained heads to compare, each a train-exits directory or the bundled 'local' / "
                         "'attention' heads (default: MODEL/exit_heads, else the bundled local heads)")
    vf.add_argument("--draft-stop", type=float, default=0.0, metavar="P",
                    help="verify: a row stops drafting once its drafts' confidence product falls below P")
    vf.add_argument("--adaptive-ramps", action="store_true",
                    help="verify: each request drafts at a ramp only while its acceptance there pays")
    vf.add_argument("--no-gate", action="store_true",
                    help="verify: never fall back to plain decoding (the ramp gate off)")
    pe = b.add_argument_group("side by side with the CPU peers (vLLM's CPU build, llama.cpp)")
    pe.add_argument("--peers", action="store_true",
                    help="drex_jax (full depth, early exit) vs vLLM CPU vs llama.cpp on the same weights and prompt ids: "
                         "decode tok/s, TTFT, end-to-end tok/s per batch; peers run from their own venvs "
                         "($DREX_PEERS_DIR, install lines in drex_jax/bench/peers.py) or are skipped; writes OUT/peers.*")
    pe.add_argument("--peers-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    pe.add_argument("--peers-rounds", type=int, default=2, help="peers: timed rounds after the warm-up (medians)")
    pe.add_argument("--peers-new-tokens", type=int, default=128, help="peers: greedy tokens per request, EOS ignored")
    lt = b.add_argument_group("load test of a running `drex-jax serve`")
    lt.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000: run the load test "
                                                "(writes OUT/load.json, load.md)")
    lt.add_argument("--requests", type=int, default=200)
    lt.add_argument("--concurrency", type=int, default=16)
    lt.add_argument("--disconnect-fraction", type=float, default=0.1,
                    help="share of clients that close their stream mid-way")
    lt.add_argument("--max-tokens", type=int, default=32)
    lt.add_argument("--no-reference", action="store_true",
                    help="skip the offline greedy check (it loads --model here)")
    b.add_argument("--out", default=bd.out_dir, help="output dir: results.json, results.md, PNG plots")
    s = b.add_argument_group("GPU scale mode")
    s.add_argument("--scale", default=None, help="preset shape with random weights, e.g. llama2-7b, llama2-13b")
    s.add_argument("--trace", default=None, help="exit trace JSON (default OUT/exit_trace.json)")
    s.add_argument("--scale-batch", type=int, default=32)
    s.add_argument("--scale-prompt-len", type=int, default=128)
    s.add_argument("--scale-new-tokens", type=int, default=128)
    s.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth, GB/s")
    b.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"drex-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
