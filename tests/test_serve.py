"""`drex-jax serve`: the real `openai` client against a server on 127.0.0.1, outputs compared with
offline `Engine.generate`, every error class, disconnects, back-pressure, the load test, SIGTERM."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from drex_jax import Engine, GenerationConfig
from drex_jax.bench.load import LoadConfig, parse_metrics, run_load, settled_metrics
from drex_jax.serve.app import build_app

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write one word about the sea."]
SEQ = 256


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def settled_metrics(self) -> dict:
        return settled_metrics(self.url, timeout_s=20)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def smol(default_model):
    cfg, params, tok = default_model
    eng = Engine.from_params(cfg, params, tok, max_slots=4, max_seq_len=SEQ)
    srv = ServerThread(build_app(eng, "smol", max_waiting=8))
    yield srv, Engine.from_params(cfg, params, tok, max_slots=4, max_seq_len=SEQ)
    srv.stop()


def test_completions_equal_offline_greedy_concurrently(smol):
    srv, offline = smol
    want = offline.generate(PROMPTS, GenerationConfig(max_new_tokens=10))
    client = srv.client()

    def ask(p):
        return client.completions.create(model="smol", prompt=p, max_tokens=10, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
        got = list(ex.map(ask, PROMPTS))
    for g, w in zip(got, want):
        assert g.choices[0].text == w.text
        assert g.choices[0].finish_reason == w.stats.finish_reason
        assert g.usage.completion_tokens == len(w.token_ids)
        assert g.usage.prompt_tokens == w.stats.prompt_tokens
        assert g.usage.total_tokens == g.usage.prompt_tokens + g.usage.completion_tokens
        assert g.model_extra["drex"]["mean_depth"] == 30.0  # full depth: every token ran all 30 layers
    # token ids as the prompt give the same text
    ids = offline.encode(PROMPTS[0])
    assert client.completions.create(model="smol", prompt=ids, max_tokens=10, temperature=0).choices[0].text == want[0].text


def test_chat_streaming_with_usage_equals_offline(smol):
    srv, offline = smol
    want = offline.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=12), chat=True)[0]
    stream = srv.client().chat.completions.create(
        model="smol", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == want.stats.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    # non-streaming chat gives the same message
    msg = srv.client().chat.completions.create(model="smol", messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=12, temperature=0)
    assert msg.choices[0].message.content == want.text and msg.choices[0].message.role == "assistant"


def test_stop_strings_cut_like_offline(smol):
    srv, offline = smol
    full = offline.generate(PROMPTS[1:2], GenerationConfig(max_new_tokens=16))[0].text
    stop = full.split()[2]  # a word from the middle of the greedy answer
    want = offline.generate(PROMPTS[1:2], GenerationConfig(max_new_tokens=16, stop=(stop,)))[0]
    assert want.stats.finish_reason == "stop" and stop not in want.text
    client = srv.client()
    got = client.completions.create(model="smol", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == want.text


@pytest.mark.parametrize("kwargs,param,fragment", [
    (dict(temperature=5), "temperature", "less than or equal to 2"),
    (dict(top_p=0), "top_p", "greater than 0"),
    (dict(max_tokens=0), "max_tokens", "only allowed with echo"),
    (dict(max_tokens=10_000), "max_tokens", "allowed range [1, "),
    (dict(n=17), "n", "less than or equal to 16"),
    (dict(seed=-1), "seed", "greater than or equal to 0"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(logprobs=21), "logprobs", "less than or equal to 20"),
    (dict(presence_penalty=0.5), "presence_penalty", "not supported"),
    (dict(frequency_penalty=-1), "frequency_penalty", "not supported"),
    (dict(logit_bias={"5": 10}), "logit_bias", "not supported"),
    (dict(best_of=3), "best_of", "less than or equal to 1"),
    (dict(suffix="end"), "suffix", "not supported"),
    (dict(extra_body={"response_format": {"type": "json_object"}}), "response_format", "constrained decoding"),
    (dict(extra_body={"guided_json": {}}), "guided_json", "not supported"),
])
def test_bad_completion_fields_are_400_naming_the_field(smol, kwargs, param, fragment):
    srv, _ = smol
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().completions.create(model="smol", prompt="one two three four five six seven", **kwargs)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and fragment in err["message"], err


def test_prompt_lists_token_lists_and_n_choices(smol):
    """Every OpenAI prompt form; n choices per prompt, `index` in prompt-major order; usage counts each
    prompt once; seeded samples are reproducible per choice and differ between choices."""
    srv, offline = smol
    want = offline.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=6))
    client = srv.client()
    got = client.completions.create(model="smol", prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [want[0].text] * 2 + [want[1].text] * 2
    assert got.usage.prompt_tokens == sum(w.stats.prompt_tokens for w in want)
    assert got.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)
    ids = [offline.encode(p) for p in PROMPTS[:2]]
    by_ids = client.completions.create(model="smol", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [w.text for w in want]
    sampled = [[c.text for c in client.completions.create(model="smol", prompt=PROMPTS[2], n=3, max_tokens=8,
                                                           temperature=1.0, seed=11).choices] for _ in range(2)]
    assert sampled[0] == sampled[1] and len(set(sampled[0])) > 1, sampled
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": PROMPTS[0]}], n=2,
                                          max_tokens=4, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_logprobs_echo_and_scoring_equal_offline(smol):
    """Completions `logprobs` + `echo` (what lm-eval's loglikelihood sends) and chat `logprobs`, equal to
    offline `Engine.score` / `generate(logprobs=...)`, streamed or not."""
    srv, offline = smol
    client = srv.client()
    prompt = "Once upon a time, in a small village by the sea,"  # greedy goes on past 3 tokens
    ids = offline.encode(prompt)
    scores = offline.score(ids)
    want = offline.generate([prompt], GenerationConfig(max_new_tokens=3, logprobs=2))[0]
    assert want.stats.finish_reason == "length"
    got = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = got.choices[0]
    assert c.text == prompt + want.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expect = [s.logprob for s in scores[1:]] + [t.logprob for t in want.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(expect, abs=1e-5)
    assert "".join(lp.tokens) == c.text and lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for top, tok in zip(lp.top_logprobs[1:], lp.tokens[1:]):
        assert 2 <= len(top) <= 3 and tok in top
    assert c.model_extra["drex"]["exit_layers"] == [30, 30, 30]
    # scoring only: max_tokens 0
    only = client.completions.create(model="smol", prompt=[ids], max_tokens=0, logprobs=0, echo=True)
    assert only.choices[0].text == offline.tokenizer.decode(ids) and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expect[:len(ids) - 1], abs=1e-5)
    # streamed: the same tokens and logprobs, spread over the chunks
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                            stream=True))
    streamed = [x for ch in chunks for x in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    assert streamed == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    # chat
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    want_chat = offline.generate([prompt], GenerationConfig(max_new_tokens=3, logprobs=2), chat=True)[0]
    content = chat.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([t.logprob for t in want_chat.logprobs], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert content[0].bytes == list(content[0].token.encode())


def test_nulls_ignore_eos_min_tokens_and_bad_values(smol):
    srv, offline = smol
    r = httpx.post(srv.url + "/v1/completions", json={"model": "smol", "prompt": PROMPTS[1], "max_tokens": 3,
                                                      "temperature": None, "top_p": None, "n": None, "stream": None,
                                                      "seed": None, "stop": None, "logprobs": None, "user": "x"},
                   timeout=120)
    assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 3, r.text  # null: defaults
    free = offline.generate([PROMPTS[1]], GenerationConfig(max_new_tokens=64))[0]
    assert free.stats.finish_reason == "stop", "the prompt must stop early for this test"
    n = len(free.token_ids) + 4
    client = srv.client()
    long = client.completions.create(model="smol", prompt=PROMPTS[1], max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == n and long.choices[0].finish_reason == "length"
    held = client.completions.create(model="smol", prompt=PROMPTS[1], max_tokens=n, temperature=0,
                                     extra_body={"min_tokens": n - 2})
    assert held.usage.completion_tokens >= n - 2
    for body, param, fragment in [
        ({"prompt": [True]}, "prompt", "integer token ids"),
        ({"prompt": [[1, 2.5]]}, "prompt", "integer token ids"),
        ({"prompt": "\x04\x06"}, "prompt", "encodes to no tokens"),  # control characters the tokenizer drops
        ('"\\ud800"', "prompt", "lone surrogate"),  # valid JSON, not valid Unicode
    ]:
        raw = body if isinstance(body, str) else json.dumps(body["prompt"])
        r = httpx.post(srv.url + "/v1/completions", content=f'{{"model": "smol", "prompt": {raw}}}'.encode(),
                       headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and fragment in err["message"], err
        assert "Error" not in err["message"]  # no internal exception text
    for extra, param in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
                         ({"logprobs": False, "top_logprobs": 2}, "top_logprobs")]:
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_bad_chat_input_unknown_model_and_bad_json(smol):
    srv, _ = smol
    client = srv.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "wizard", "content": "hi"}], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi " * 400}])
    assert e.value.body["param"] == "messages" and "context limit" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "smol" in e.value.body["message"]
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "smol", "prompt": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # none of that disturbed the server: a good request still works and nothing is held
    assert client.completions.create(model="smol", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    m = srv.settled_metrics()
    assert m["drex_slots_used"] == 0 and m["drex_kv_pages_used"] == 0


def test_models_health_and_metrics(smol):
    srv, _ = smol
    assert [m.id for m in srv.client().models.list()] == ["smol"]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    m = srv.settled_metrics()
    for name in ("drex_generated_tokens_total", "drex_kv_pages_free", "drex_mean_exit_depth",
                 "drex_time_to_first_token_seconds_count", "drex_time_per_output_token_seconds_bucket{le=\"+Inf\"}",
                 'drex_exits_total{layer="30"}', "drex_preemptions_total"):
        assert name in m, name
    assert m["drex_mean_exit_depth"] == 30.0 and m["drex_generated_tokens_total"] > 0
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(srv.url + "/metrics").headers["content-type"].startswith("text/plain")
    doc = httpx.get(srv.url + "/openapi.json").json()
    responses = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in responses and {"200", "400", "404", "429", "503"} <= set(responses)


def test_disconnect_mid_stream_frees_slot_and_pages(smol):
    srv, _ = smol
    before = srv.settled_metrics()
    stream = srv.client().completions.create(model="smol", prompt="Once upon a time, in a small village by the sea,",
                                             max_tokens=200, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert srv.metrics()["drex_slots_used"] == 1
    stream.close()  # the client goes away mid-stream
    after = srv.settled_metrics()
    assert after["drex_slots_used"] == 0 and after["drex_kv_pages_used"] == 0
    assert after['drex_requests_total{outcome="cancelled"}'] == before.get('drex_requests_total{outcome="cancelled"}', 0) + 1


def test_full_queue_is_429_with_retry_after(tiny_llama):
    cfg, params = tiny_llama
    eng = Engine.from_params(cfg, params, max_slots=1, max_seq_len=128)
    step = eng.step
    eng.step = lambda: (time.sleep(0.05), step())[1]  # a slow device: the busy request lasts ~2 s
    srv = ServerThread(build_app(eng, "tiny", max_waiting=0))
    try:
        client = srv.client()
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            busy = ex.submit(client.completions.create, model="tiny", prompt=[1, 2, 3], max_tokens=40)
            while srv.metrics()["drex_slots_used"] < 1:  # it holds the only slot
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny", prompt=[4, 5], max_tokens=2)
            assert busy.result().usage.completion_tokens == 40  # the refusal did not touch it
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["type"] == "rate_limit_error" and "limit 1" in e.value.body["message"]
        m = srv.settled_metrics()
        assert m["drex_slots_used"] == 0 and m['drex_requests_total{outcome="rejected"}'] == 1
        assert client.completions.create(model="tiny", prompt=[4, 5], max_tokens=2).usage.completion_tokens == 2
    finally:
        srv.stop()


def test_engine_failure_is_500_and_health_503(tiny_llama):
    cfg, params = tiny_llama
    eng = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64)
    srv = ServerThread(build_app(eng, "tiny"))
    try:
        def broken():
            raise RuntimeError("device lost")

        eng.step = broken
        with pytest.raises(openai.InternalServerError) as e:
            srv.client().completions.create(model="tiny", prompt=[1, 2], max_tokens=3)
        assert "device lost" in e.value.body["message"]
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "device lost" in r.json()["error"]
        with pytest.raises(openai.APIStatusError) as e:
            srv.client().completions.create(model="tiny", prompt=[1, 2], max_tokens=3)
        assert e.value.status_code == 503
    finally:
        srv.stop()


def test_load_test_counts_disconnects_and_finds_no_leak(smol):
    srv, offline = smol
    res = run_load(srv.url, LoadConfig(num_requests=10, concurrency=4, rate=20.0, disconnect_fraction=0.3,
                                       max_tokens=8, num_prompts=3, seed=1), reference=offline, progress=False)
    assert res["errors"] == 0, res["error_samples"]
    assert res["completed"] + res["disconnected"] == 10 and res["disconnected"] >= 1
    assert res["no_leak"] and res["server"]["cancelled"] == res["disconnected"]
    assert res["greedy_checked"] == res["completed"] and res["greedy_mismatches"] == 0, res["mismatch_samples"]


@pytest.mark.slow
def test_sigterm_drains_in_flight_stream_and_exits(tmp_path):
    """The real CLI in its own process: SIGTERM while a stream is open lets it finish, then exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "drex_jax.cli", "serve", "--port", str(port), "--max-slots", "2",
                             "--max-seq-len", "256", "--served-model-name", "smol", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="smol", prompt="Count from one to fifty:", max_tokens=40,
                                           temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # drained, not cut
        assert first.choices[0].text is not None
        assert proc.wait(60) == 0
        assert "stopped by SIGTERM" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_verify_server_samples(tiny_llama):
    """A lossless-early-exit server takes `temperature` (speculative sampling, `drex_jax.speculative`;
    its distribution is tested in test_speculative.py); the card says verify."""
    from drex_jax.early_exit import EEConfig

    cfg, params = tiny_llama
    ee = EEConfig((1, 2), (0.05, 0.04), missing_kv="recompute", verify=True)
    eng = Engine.from_params(cfg, params, max_slots=2, max_seq_len=64, ee=ee, policy="rebatching")
    srv = ServerThread(build_app(eng, "tiny"))
    try:
        client = srv.client()
        assert client.models.list().data[0].model_extra["drex"]["early_exit"]["verify"] is True
        for temperature in (0, 1.5, None):  # None: the OpenAI default, 1.0
            out = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=12, temperature=temperature,
                                            seed=7)
            assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
    finally:
        srv.stop()
    assert sum(eng.ee_stats.drafts_per_ramp) > 0 and eng.ee_stats.verify_passes > 0
