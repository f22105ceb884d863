"""lm-evaluation-harness against `drex-jax serve`, next to lm-eval's own `hf` backend.

    python -m benchmarks.lm_eval_server [--lm-eval PATH] [--json out.json]

Two small local tasks (`benchmarks/lm_eval_tasks/`): `drex_mc_tiny` (24 multiple-choice items,
96 loglikelihood requests: `echo` + `logprobs` scoring) and `drex_gen_tiny` (16 generate_until
items, greedy). Three runs on the bundled SmolLM2 in fp32, same data, same seed:
  1. lm-eval `--model hf` on an fp32 `transformers` copy of the bundled GGUF (made once into the
     cache; the reference),
  2. lm-eval `--model local-completions` against `drex-jax serve` at full depth,
  3. the same against `drex-jax serve --early-exit` (the shipped ramps, rebatching), with the mean
     exit depth of its generated tokens read from the server's /metrics.
Checks: (2) has the reference's accuracy on both tasks and every per-item loglikelihood within
1e-3 of it; prints a markdown table and exits 1 if a check fails.

lm-eval lives in its own venv (it pins its own datasets/transformers; nothing of it in the
project's): `python3 -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0
&& /work/lmeval-venv/bin/pip install "lm-eval[api,hf]==0.4.13" gguf`; pass its `lm_eval` with
`--lm-eval` (default: `$LM_EVAL`, else `lm_eval` on PATH). Runs offline. ~6 min on 2 cores.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("drex_mc_tiny", "drex_gen_tiny")
SEED = 1234
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_lm_eval(lm_eval: str, model: str, model_args: str, out: str, env: dict) -> dict:
    """Run lm-eval on TASKS; returns {"results": ..., "samples": {task: [sample, ...]}}."""
    cmd = [lm_eval, "run", "--model", model, "--model_args", model_args, "--batch_size", "1",
           "--include_path", os.path.join("benchmarks", "lm_eval_tasks"), "--tasks", *TASKS,
           "--log_samples", "--output_path", out, "--seed", str(SEED)]
    t0 = time.perf_counter()
    print(f"[lm_eval_server] {model}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval {model} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.load(open(sorted(glob.glob(os.path.join(out, "*", "results_*.json")))[-1]))
    samples = {t: [json.loads(line) for line in open(sorted(glob.glob(os.path.join(out, "*", f"samples_{t}_*.jsonl")))[-1])]
               for t in TASKS}
    return {"results": results["results"], "samples": samples, "seconds": time.perf_counter() - t0}


class Server:
    """`drex-jax serve` in its own process on a free 127.0.0.1 port."""

    def __init__(self, extra: list[str], name: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "drex_jax.cli", "serve", "--port", str(self.port),
                                      "--served-model-name", name, "--max-slots", "4", "--log-level", "warning",
                                      *extra], stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"drex-jax serve did not start:\n{self.log.read().decode()[-3000:]}")
            time.sleep(0.5)

    def metric(self, name: str) -> float:
        import httpx

        from drex_jax.bench.load import parse_metrics

        return parse_metrics(httpx.get(self.url + "/metrics").text)[name]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def loglikelihoods(run: dict) -> dict:
    """(doc_id, choice index) -> loglikelihood, from the multiple-choice task's samples."""
    return {(s["doc_id"], k): float(r[0][0]) for s in run["samples"]["drex_mc_tiny"] for k, r in enumerate(s["resps"])}


def scores(run: dict) -> dict:
    mc, gen = run["results"]["drex_mc_tiny"], run["results"]["drex_gen_tiny"]
    return {"mc_acc": mc["acc,none"], "mc_acc_norm": mc["acc_norm,none"], "gen_exact_match": gen["exact_match,none"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", default=os.environ.get("LM_EVAL") or shutil.which("lm_eval"),
                    help="the lm_eval executable of lm-eval's own venv")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if not args.lm_eval or not os.path.exists(args.lm_eval):
        print("lm-eval not found: install it in its own venv (see this script's docstring) and pass --lm-eval",
              file=sys.stderr)
        return 2
    from drex_jax.default_model import DEFAULT_MODEL_NAME, default_hf_copy, default_model_path

    ref_dir = default_hf_copy()
    tokenizer = os.path.join(default_model_path(), "tokenizer")
    work = tempfile.mkdtemp(prefix="lm_eval_server-")
    env = {**os.environ, **OFFLINE, "HF_HOME": os.path.join(work, "hf_home")}
    runs = {"hf": run_lm_eval(args.lm_eval, "hf", f"pretrained={ref_dir},dtype=float32", os.path.join(work, "hf"),
                              env)}
    depth = {}
    for label, extra in (("drex_jax serve", []), ("drex_jax serve --early-exit", ["--early-exit"])):
        srv = Server(extra, DEFAULT_MODEL_NAME)
        try:
            model_args = (f"model={DEFAULT_MODEL_NAME},base_url={srv.url}/v1/completions,tokenizer={tokenizer},"
                          "tokenizer_backend=huggingface,max_retries=1")
            runs[label] = run_lm_eval(args.lm_eval, "local-completions", model_args,
                                      os.path.join(work, label.replace(" ", "_")), env)
            depth[label] = srv.metric("drex_mean_exit_depth")
        finally:
            srv.stop()

    ref = loglikelihoods(runs["hf"])
    rows, ok = [], True
    for label, run in runs.items():
        got = loglikelihoods(run)
        diff = max(abs(got[k] - ref[k]) for k in ref) if set(got) == set(ref) else float("inf")
        sc = scores(run)
        rows.append({"run": label, **sc, "max_loglik_diff": diff, "mean_exit_depth": depth.get(label),
                     "seconds": round(run["seconds"], 1)})
    full, hf = rows[1], rows[0]
    checks = {"same accuracy as hf (full depth)": all(full[m] == hf[m] for m in ("mc_acc", "mc_acc_norm",
                                                                                  "gen_exact_match")),
              "per-item loglikelihoods within 1e-3 of hf (full depth)": full["max_loglik_diff"] <= 1e-3}
    ok = all(checks.values())
    print("| run | MC acc | MC acc_norm | gen exact match | max |Δ loglik| vs hf | mean exit depth | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d = "-" if r["mean_exit_depth"] is None else f"{r['mean_exit_depth']:.2f}"
        print(f"| {r['run']} | {r['mc_acc']:.4f} | {r['mc_acc_norm']:.4f} | {r['gen_exact_match']:.4f} | "
              f"{r['max_loglik_diff']:.2e} | {d} | {r['seconds']} |")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checks": checks}, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
