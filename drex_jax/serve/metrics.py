"""Prometheus metrics of one server (its own registry, so several servers can live in one
process, e.g. in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from drex_jax.generation import GenerationResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("drex_requests", "requests by outcome (stop, length, cancelled, rejected, error)",
                                ["outcome"], registry=r)
        self.running = Gauge("drex_requests_running", "requests holding a decode slot", registry=r)
        self.waiting = Gauge("drex_requests_waiting", "requests queued for a slot", registry=r)
        self.generated_tokens = Counter("drex_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("drex_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.ttft = Histogram("drex_time_to_first_token_seconds", "engine submit to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("drex_time_per_output_token_seconds", "mean time per token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("drex_engine_step_seconds", "one engine iteration (admit, prefill, decode)",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.exits = Counter("drex_exits", "generated tokens by the depth they exited at (layers run)", ["layer"],
                             registry=r)
        self.mean_exit_depth = Gauge("drex_mean_exit_depth", "mean layers run per generated token so far", registry=r)
        self.preemptions = Counter("drex_preemptions", "requests that lost their pages and were recomputed",
                                   registry=r)
        self.pages_used = Gauge("drex_kv_pages_used", "KV pages held by requests", registry=r)
        self.pages_free = Gauge("drex_kv_pages_free", "KV pages free", registry=r)
        self.slots_used = Gauge("drex_slots_used", "decode slots held by requests", registry=r)
        self._depth_sum = 0
        self._depth_tokens = 0
        self._preemptions_seen = 0

    def observe_engine(self, engine) -> None:
        """Gauges from the engine's public counters (engine thread)."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.pages_free.set(engine.num_free_pages)
        self.pages_used.set(engine.allocator.capacity - engine.num_free_pages)
        self.slots_used.set(engine.max_slots - engine.num_free_slots)
        if engine.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(engine.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = engine.num_preemptions

    def observe_result(self, result: GenerationResult, num_layers: int) -> None:
        st = result.stats
        self.requests.labels(outcome=st.finish_reason).inc()
        self.generated_tokens.inc(st.generated_tokens)
        self.prompt_tokens.inc(st.prompt_tokens)
        if st.generated_tokens:
            self.ttft.observe(st.ttft_s)
        if st.generated_tokens > 1:
            self.tpot.observe(st.tpot_s)
        depths = _depths(result, num_layers)
        for depth in depths:
            self.exits.labels(layer=str(depth)).inc()
        if depths:
            self._depth_sum += sum(depths)
            self._depth_tokens += len(depths)
            self.mean_exit_depth.set(self._depth_sum / self._depth_tokens)


def exit_summary(results: list[GenerationResult], num_layers: int) -> dict:
    """The per-response early-exit extension field: tokens per exit depth and the mean depth, over
    the response's choices."""
    depths = [d for r in results for d in _depths(r, num_layers)]
    counts: dict[str, int] = {}
    for depth in depths:
        counts[str(depth)] = counts.get(str(depth), 0) + 1
    mean = sum(depths) / len(depths) if depths else float(num_layers)
    return {"num_layers": num_layers, "exits_per_layer": counts, "mean_depth": round(mean, 3)}


def _depths(result: GenerationResult, num_layers: int) -> list[int]:
    """Layers run per generated token (the result lists one per token; a shorter list is padded at
    full depth)."""
    depths = list(result.exit_layers)[: result.stats.generated_tokens]
    return depths + [num_layers] * (result.stats.generated_tokens - len(depths))
