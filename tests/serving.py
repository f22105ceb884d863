"""Drive an engine with requests arriving while others decode (continuous batching)."""


def serve_with_arrivals(engine, prompts, configs, first=2, every=3, per_arrival=2):
    """Submit `first` prompts, then `per_arrival` more every `every` steps. Returns {index: result}."""
    configs = configs if isinstance(configs, list) else [configs] * len(prompts)
    out, ids, queue, steps = {}, {}, list(enumerate(prompts)), 0

    def arrive(n):
        for _ in range(n):
            if queue:
                i, p = queue.pop(0)
                ids[engine.submit(p, configs[i])] = i

    arrive(first)
    while queue or engine.has_work:
        if steps % every == 0:
            arrive(per_arrival)
        for ev in engine.step():
            if ev.finished:
                out[ids[ev.request_id]] = ev.result
        steps += 1
    return out
