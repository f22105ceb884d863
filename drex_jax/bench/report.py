"""Benchmark outputs: JSON (everything), a markdown table per workload, and PNG plots."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

COLUMNS = [  # (header, field, format)
    ("run", "label", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"), ("tok/s", "tok_s", "{:.1f}"),
    ("req/s", "req_s", "{:.2f}"), ("TTFT p50/p99 ms", ("ttft_p50_ms", "ttft_p99_ms"), "{:.0f}/{:.0f}"),
    ("TPOT p50/p99 ms", ("tpot_p50_ms", "tpot_p99_ms"), "{:.1f}/{:.1f}"), ("mean depth", "mean_depth", "{:.1f}"),
    ("exits per ramp", "exits_per_ramp", "{}"), ("invol. exits", "involuntary_exits", "{}"),
    ("invol. stays", "involuntary_stays", "{}"), ("peak KV pages", "peak_kv_pages", "{}"),
    ("compiles", "compiles", "{}"), ("SLA met", "sla_attainment", "{:.0%}"),
    ("token agr.", "token_agreement", "{:.1%}"), ("ROUGE-L", "rouge_l", "{:.3f}"), ("pass@1", "pass_at_1", "{:.1%}"),
]


def _cell(r, field, fmt) -> str:
    vals = [getattr(r, f) for f in field] if isinstance(field, tuple) else [getattr(r, field)]
    if any(v is None for v in vals):
        return "-"
    return fmt.format(*vals)


def markdown(results: list, header: str = "") -> str:
    out = [header] if header else []
    for wl in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wl]
        out += [f"\n#### Workload `{wl}`\n", "| " + " | ".join(c[0] for c in COLUMNS) + " |",
                "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
        out += ["| " + " | ".join(_cell(r, f, fmt) for _, f, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_json(path: str, results: list, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "runs": [dataclasses.asdict(r) for r in results]}, f, indent=1)


def plots(results: list, out_dir: str) -> list[str]:
    """Throughput vs threshold per policy, exit-depth breakdown, throughput vs batch size,
    latency CDFs. Returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    workloads = list(dict.fromkeys(r.workload for r in results))
    offline = [r for r in results if r.mode == "offline" and not r.label.startswith("batch")]

    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        runs = [r for r in offline if r.workload == wl]
        for pol in dict.fromkeys(r.policy for r in runs if r.threshold is not None):
            pts = sorted((r.threshold, r.tok_s) for r in runs if r.policy == pol and r.threshold is not None)
            ax.plot(*zip(*pts), marker="o", label=pol)
        for r in runs + [r for r in results if r.mode == "hf" and r.workload == wl]:
            if r.threshold is None:
                ax.axhline(r.tok_s, ls="--" if r.mode == "hf" else ":", color="k" if r.mode == "hf" else "gray",
                           label=f"{r.policy} ({r.tok_s:.0f})")
        ax.set(title=f"{wl}: throughput vs threshold", xlabel="exit threshold", ylabel="output tokens/s")
        ax.legend(fontsize=7)
    written.append(_save(fig, out_dir, "throughput_vs_threshold.png"))

    ee = [r for r in offline if r.exits_per_ramp]
    if ee:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(ee)), 4))
        fr = np.asarray([np.asarray(r.exits_per_ramp) / max(sum(r.exits_per_ramp), 1) for r in ee])
        bottom = np.zeros(len(ee))
        for k in range(fr.shape[1]):
            ax.bar(range(len(ee)), fr[:, k], bottom=bottom, label="full depth" if k == fr.shape[1] - 1 else f"ramp {k}")
            bottom += fr[:, k]
        ax.set_xticks(range(len(ee)), [f"{r.workload[:5]} {r.policy} {r.threshold}" for r in ee], rotation=70,
                      fontsize=7)
        ax.set(title="where tokens exit", ylabel="share of decode tokens")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, "exit_depth.png"))

    sweep = [r for r in results if r.label.startswith("batch")]
    if sweep:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for pol in dict.fromkeys(r.policy for r in sweep):
            pts = sorted((r.batch, r.tok_s) for r in sweep if r.policy == pol)
            ax.plot(*zip(*pts), marker="o", label=pol)
        ax.set(title="throughput vs batch size", xlabel="batch (max slots)", ylabel="output tokens/s", xscale="log",
               xticks=sorted({r.batch for r in sweep}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, "throughput_vs_batch.png"))

    online = [r for r in results if r.mode == "online"]
    if online:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in online:
            for ax, xs in zip(axes, (r.ttft_ms, r.tpot_ms)):
                xs = np.sort(xs)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{r.workload} {r.policy}")
        axes[0].set(title="online: TTFT CDF", xlabel="TTFT ms", ylabel="share of requests")
        axes[1].set(title="online: TPOT CDF", xlabel="TPOT ms")
        axes[1].legend(fontsize=7)
        written.append(_save(fig, out_dir, "latency_cdf.png"))
    return written


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
