"""`drex-jax bench --url`: a bounded load test of a running `drex-jax serve`.

Poisson arrivals, a cap on concurrent clients, a share of clients that disconnect mid-stream.
Reports throughput, TTFT / TPOT percentiles and errors; afterwards checks through /metrics that
no slot or KV page leaked, and (given a reference engine) that every completed greedy output
equals offline `Engine.generate` for the same prompt."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    num_requests: int = 200
    concurrency: int = 16
    rate: float = 8.0  # arrivals per second (Poisson)
    disconnect_fraction: float = 0.1  # clients that close their stream after a few chunks
    max_tokens: int = 32
    num_prompts: int = 20  # distinct chat prompts, cycled
    seed: int = 0
    timeout_s: float = 600.0  # the whole run; it stops by itself

    def __post_init__(self):
        for name, lo in (("num_requests", 1), ("concurrency", 1), ("max_tokens", 2), ("num_prompts", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not 0 <= self.disconnect_fraction <= 1:
            raise ValueError(f"disconnect_fraction must be in [0, 1], got {self.disconnect_fraction}")


@dataclasses.dataclass
class Outcome:
    prompt: int  # index into the prompt list
    status: str  # "ok", "disconnected", "error"
    text: str = ""
    completion_tokens: int = 0
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")
    finish_reason: str | None = None
    error: str | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _one(client, url: str, model: str, prompt: str, idx: int, cfg: LoadConfig, cut_after: int | None) -> Outcome:
    """One streaming chat request; `cut_after` chunks then close the connection (a disconnect)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    parts, chunks, usage, finish = [], 0, None, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Outcome(idx, "error", error=f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return Outcome(idx, "error", error=msg["error"]["message"])
                if msg.get("usage"):
                    usage = msg["usage"]
                for ch in msg.get("choices", []):
                    text = ch["delta"].get("content") or ""
                    if text:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        parts.append(text)
                        chunks += 1
                    finish = ch.get("finish_reason") or finish
                if cut_after is not None and chunks >= cut_after:
                    return Outcome(idx, "disconnected", "".join(parts))  # leaving the block closes the socket
    except Exception as e:  # noqa: BLE001 - a load test reports every failure
        return Outcome(idx, "error", error=f"{type(e).__name__}: {e}")
    n = usage["completion_tokens"] if usage else chunks
    return Outcome(idx, "ok", "".join(parts), n, (first or time.perf_counter()) - t0,
                   (last - first) / (n - 1) if first and n > 1 else float("nan"), finish)


async def _run(url: str, prompts: list[str], cfg: LoadConfig) -> tuple[list[Outcome], float, str]:
    import httpx

    rng = np.random.default_rng(cfg.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, cfg.num_requests))
    cuts = [int(rng.integers(1, max(2, cfg.max_tokens // 2))) if rng.random() < cfg.disconnect_fraction else None
            for _ in range(cfg.num_requests)]
    gate = asyncio.Semaphore(cfg.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=cfg.concurrency + 4)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()

        async def client_task(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            async with gate:
                return await _one(client, url, model, prompts[i % len(prompts)], i % len(prompts), cfg, cuts[i])

        outcomes = await asyncio.wait_for(asyncio.gather(*(client_task(i) for i in range(cfg.num_requests))),
                                          cfg.timeout_s)
        return outcomes, time.perf_counter() - t0, model


def settled_metrics(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """/metrics once no request is running or waiting (a cancelled stream frees its slot on the
    engine thread's next turn)."""
    import httpx

    deadline = time.perf_counter() + timeout_s
    while True:
        m = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
        idle = m.get("drex_requests_running", 1) == 0 and m.get("drex_requests_waiting", 1) == 0
        if idle or time.perf_counter() > deadline:
            return m
        time.sleep(0.2)


def run_load(url: str, cfg: LoadConfig = LoadConfig(), reference=None, progress: bool = True) -> dict:
    """Run the load test against `url`; `reference`: an Engine of the same model and context limit
    to compute the offline greedy outputs (None = skip that check)."""
    from drex_jax.bench.workloads import chat
    from drex_jax.generation import GenerationConfig

    url = url.rstrip("/")
    prompts = chat(cfg.num_prompts).prompts
    if progress:
        print(f"[drex_jax] load test: {cfg.num_requests} requests, {cfg.concurrency} concurrent, "
              f"{cfg.rate}/s Poisson, {cfg.disconnect_fraction:.0%} disconnect -> {url}", flush=True)
    before = settled_metrics(url)
    outcomes, wall, model = asyncio.run(_run(url, prompts, cfg))
    after = settled_metrics(url)
    ok = [o for o in outcomes if o.status == "ok"]
    errors = [o for o in outcomes if o.status == "error"]
    disconnected = [o for o in outcomes if o.status == "disconnected"]

    def pct(xs, q):
        xs = [x for x in xs if np.isfinite(x)]
        return float(np.percentile(xs, q)) if xs else float("nan")

    tokens = sum(o.completion_tokens for o in ok)
    res = {
        "url": url, "model": model, "config": dataclasses.asdict(cfg), "wall_s": wall,
        "completed": len(ok), "disconnected": len(disconnected), "errors": len(errors),
        "error_samples": [o.error for o in errors[:5]],
        "output_tok_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "ttft_s": {f"p{q}": pct([o.ttft_s for o in ok], q) for q in (50, 90, 99)},
        "tpot_s": {f"p{q}": pct([o.tpot_s for o in ok], q) for q in (50, 90, 99)},
    }
    # leaks: after the run nothing may hold a slot or a page, and every disconnect was cancelled
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    res["server"] = {
        "running": after.get("drex_requests_running"), "waiting": after.get("drex_requests_waiting"),
        "slots_used": after.get("drex_slots_used"), "kv_pages_used": after.get("drex_kv_pages_used"),
        "cancelled": delta('drex_requests_total{outcome="cancelled"}'),
        "completed": delta('drex_requests_total{outcome="stop"}') + delta('drex_requests_total{outcome="length"}'),
    }
    exits = {k.split('"')[1]: delta(k) for k in after if k.startswith("drex_exits_total{")}
    res["server"]["exits_per_layer"] = {k: v for k, v in sorted(exits.items(), key=lambda kv: int(kv[0])) if v}
    n = sum(res["server"]["exits_per_layer"].values())
    res["server"]["mean_exit_depth"] = sum(int(k) * v for k, v in exits.items()) / n if n else float("nan")
    res["no_leak"] = (res["server"]["slots_used"] == 0 and res["server"]["kv_pages_used"] == 0
                      and res["server"]["running"] == 0 and res["server"]["waiting"] == 0)
    if reference is not None:
        if progress:
            print("[drex_jax] offline greedy reference for the completed prompts", flush=True)
        used = sorted({o.prompt for o in ok})
        offline = reference.generate([prompts[i] for i in used], GenerationConfig(max_new_tokens=cfg.max_tokens),
                                     chat=True)
        want = {i: r.text for i, r in zip(used, offline)}
        mismatches = [o.prompt for o in ok if o.text != want[o.prompt]]
        res["greedy_checked"] = len(ok)
        res["greedy_mismatches"] = len(mismatches)
        res["mismatch_samples"] = [{"prompt": prompts[i], "server": next(o.text for o in ok if o.prompt == i),
                                    "offline": want[i]} for i in sorted(set(mismatches))[:3]]
    return res


def markdown(res: dict) -> str:
    c, s = res["config"], res["server"]
    ms = lambda d: " / ".join(f"{v * 1e3:.0f}" for v in d.values())  # noqa: E731
    lines = [
        f"Load test of {res['url']} ({res['model']}): {c['num_requests']} requests, {c['concurrency']} concurrent, "
        f"Poisson {c['rate']}/s, {c['disconnect_fraction']:.0%} disconnecting, max_tokens {c['max_tokens']}, greedy",
        "",
        "| completed | disconnected | errors | wall s | output tok/s | req/s | TTFT p50/p90/p99 ms | "
        "TPOT p50/p90/p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {res['completed']} | {res['disconnected']} | {res['errors']} | {res['wall_s']:.1f} | "
        f"{res['output_tok_s']:.1f} | {res['requests_per_s']:.2f} | {ms(res['ttft_s'])} | {ms(res['tpot_s'])} |",
        "",
        f"After the run (/metrics): running {s['running']:.0f}, waiting {s['waiting']:.0f}, slots used "
        f"{s['slots_used']:.0f}, KV pages used {s['kv_pages_used']:.0f}; server counted {s['cancelled']:.0f} cancelled "
        f"and {s['completed']:.0f} completed: **{'no leak' if res['no_leak'] else 'LEAK'}**.",
        f"Tokens by exit depth (layers run: count) {{{', '.join(f'{k}: {v:.0f}' for k, v in s['exits_per_layer'].items())}}}, "
        f"mean depth {s['mean_exit_depth']:.2f}.",
    ]
    if "greedy_checked" in res:
        lines.append(f"Greedy outputs equal to offline `Engine.generate`: "
                     f"{res['greedy_checked'] - res['greedy_mismatches']} / {res['greedy_checked']}.")
    if res["errors"]:
        lines.append(f"Errors (first {len(res['error_samples'])}): {res['error_samples']}")
    return "\n".join(lines) + "\n"
