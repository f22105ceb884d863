"""A peer engine (vLLM or llama.cpp) as a worker process for `drex_jax/bench/peers.py`.

Runs with the peer's own venv python, never the project's (it imports nothing from drex_jax):

    PYTHON drex_jax/bench/peers_runner.py {vllm|llamacpp}

Protocol, one JSON object a line. stdin, first line: the setup
`{"model": PATH, "prompts": [[token ids], ...], "threads": T, "max_seq_len": N, "max_batch": B}`;
then one job a line, `{"batch": B, "new_tokens": n}` (the first B prompts, greedy, EOS ignored).
stdout: `{"ready": true, "version": ..., "load_s": ...}` once loaded (or `{"error": ...}` and exit 1),
then per job `{"first_s": [B], "last_s": [B], "token_ids": [B][n], "wall_s": ...}`: each request's
first and last token time in seconds after the batch was submitted. Everything the engine itself
prints goes to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time


class VLLM:
    """vLLM's `LLMEngine` (the engine under `LLM.generate`), stepped here so that each request's
    first-token time is seen. fp32, prefix caching off (drex_jax has none and the prompts share
    the chat template's system prompt), its own chunked-prefill scheduling."""

    def __init__(self, setup: dict):
        import vllm

        self.version = vllm.__version__
        self.llm = vllm.LLM(model=setup["model"], dtype="float32", max_model_len=setup["max_seq_len"],
                            max_num_seqs=setup["max_batch"], enable_prefix_caching=False, seed=0)
        self.engine, self.SamplingParams, self.runs = self.llm.llm_engine, vllm.SamplingParams, 0

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        sp = self.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        B, self.runs = len(prompts), self.runs + 1
        first, last, ids = [None] * B, [None] * B, [None] * B
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            self.engine.add_request(f"{self.runs}-{i}", {"prompt_token_ids": p}, sp)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                now, i = time.perf_counter() - t0, int(out.request_id.split("-")[1])
                if first[i] is None and out.outputs and len(out.outputs[0].token_ids):
                    first[i] = now
                if out.finished:
                    last[i], ids[i] = now, list(out.outputs[0].token_ids)
        return {"first_s": first, "last_s": last, "token_ids": ids, "wall_s": time.perf_counter() - t0}


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API, batched as llama.cpp's own `batched`
    example does: one context per batch size with one KV stream per request (n_seq_max = B),
    emptied before each run; all B prompts prefilled in one `llama_decode` call (split into
    ubatches inside), then one `llama_decode` of B tokens per step; greedy = argmax of the logits
    on the host. F32 KV cache for an F32 model (the precision drex_jax and vLLM run at), llama.cpp's
    default (F16) otherwise."""

    def __init__(self, setup: dict):
        import ctypes

        import llama_cpp as lc
        import numpy as np

        self.lc, self.np, self.ctypes, self.setup = lc, np, ctypes, setup
        self.version = lc.__version__
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # its per-decode debug lines cost
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(setup["model"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {setup['model']}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.f32 = lc.llama_model_ftype(self.model) == 0  # LLAMA_FTYPE_ALL_F32
        self.contexts = {}

    def _context(self, B: int, n_prompt: int):
        lc, t = self.lc, self.setup["threads"]
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = B * self.setup["max_seq_len"], B
        cp.n_batch = max(n_prompt, B)
        cp.n_threads = cp.n_threads_batch = t
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = False  # each request its own KV stream of max_seq_len cells
        if self.f32:
            cp.type_k = cp.type_v = lc.GGML_TYPE_F32
        ctx = lc.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def _decode(self, ctx, batch, entries: list[tuple[int, int, int, bool]]):
        """One llama_decode of (token, position, sequence, wants logits) entries; returns the argmax
        token of each entry that wanted logits, in order."""
        lc, np = self.lc, self.np
        batch.n_tokens = len(entries)
        for j, (tok, pos, seq, out) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
            batch.seq_id[j][0], batch.logits[j] = seq, out
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(e[3] for e in entries)
        ptr = self.ctypes.cast(lc.llama_get_logits(ctx), self.ctypes.POINTER(self.ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).argmax(axis=1).tolist()

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        lc, B = self.lc, len(prompts)
        n_prompt = sum(len(p) for p in prompts)
        if B not in self.contexts:  # made once per batch size (its first run is the warm-up), then emptied
            self.contexts[B] = self._context(B, n_prompt), lc.llama_batch_init(max(n_prompt, B), 0, 1)
        ctx, batch = self.contexts[B]
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        entries = [(tok, pos, i, pos == len(p) - 1) for i, p in enumerate(prompts) for pos, tok in enumerate(p)]
        ids = [[t] for t in self._decode(ctx, batch, entries)]
        first = [time.perf_counter() - t0] * B
        for step in range(1, new_tokens):
            nxt = self._decode(ctx, batch, [(ids[i][-1], len(p) + step - 1, i, True) for i, p in enumerate(prompts)])
            for i, t in enumerate(nxt):
                ids[i].append(t)
        wall = time.perf_counter() - t0
        return {"first_s": first, "last_s": [wall] * B, "token_ids": ids, "wall_s": wall}


def main() -> int:
    engine_name = sys.argv[1]
    out = os.fdopen(os.dup(1), "w")  # the protocol's stdout; the engines' own prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    setup = json.loads(sys.stdin.readline())
    t0 = time.perf_counter()
    try:
        engine = {"vllm": VLLM, "llamacpp": LlamaCpp}[engine_name](setup)
    except Exception as e:  # noqa: BLE001 -- reported to the parent as a one-line skip
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    send({"ready": True, "version": engine.version, "load_s": time.perf_counter() - t0})
    for line in sys.stdin:
        job = json.loads(line)
        send(engine.run(setup["prompts"][: job["batch"]], job["new_tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
