"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions (streaming and not),
/v1/models, /health, /metrics. Handlers never call the engine: they submit to the EngineWorker
and read their request's events."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from drex_jax.generation import GenerationResult
from drex_jax.serve import openapi
from drex_jax.serve.metrics import ServerMetrics, exit_summary
from drex_jax.serve.openapi import openapi_document
from drex_jax.serve.protocol import (ChatCompletionRequest, CompletionRequest, RequestError, error_body,
                                     new_id)
from drex_jax.serve.responses import TokenText, chat_logprobs, completion_logprobs, usage
from drex_jax.serve.worker import EngineWorker, RequestHandle, Submission

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


def build_app(engine, model_name: str, *, max_waiting: int = 256, retry_after_s: int = 1) -> FastAPI:
    """The app for `engine` served as `model_name`; the engine thread starts with the app's
    lifespan and cancels whatever is in flight when it ends."""
    metrics = ServerMetrics()
    worker = EngineWorker(engine, metrics, max_waiting=max_waiting)
    num_layers = engine.cfg.num_layers

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="drex_jax", lifespan=lifespan)
    app.openapi = lambda: openapi_document(app, model_name, engine.cfg.vocab_size, engine.max_seq_len)
    app.state.worker, app.state.metrics, app.state.model_name = worker, metrics, model_name

    # ---------------------------------------------------------------- errors, OpenAI-style
    def error_response(e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if e.status == 429 else None
        return JSONResponse(error_body(e.message, e.param, e.type, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return error_response(RequestError(f"the request body is not valid JSON: {err.get('ctx', {}).get('error')}"))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        shown = "input" in err and err.get("type") != "value_error" and not isinstance(err["input"], (dict, list))
        got = f" (got {err['input']!r})" if shown else ""  # our own checks name the value already
        return error_response(RequestError(f"{'.'.join(loc) or 'body'}: {msg}{got}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        # e.headers: the `Allow` of a 405
        return JSONResponse(error_body(str(e.detail), None, kind), status_code=e.status_code, headers=e.headers)

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health", responses=openapi.HEALTH)
    async def health():
        if worker.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "error": repr(worker.error) if worker.error else None},
                            status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, engine)]}

    @app.get("/v1/models/{name:path}", responses=openapi.MODEL)
    async def model(name: str):
        _check_model(name, model_name)
        return _model_card(model_name, engine)

    # ---------------------------------------------------------------- generation
    text_of = TokenText(engine.tokenizer) if engine.tokenizer is not None else str

    @app.post("/v1/completions", responses=openapi.GENERATION)
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        body.check_fields()
        k = body.logprobs
        subs = [Submission(p, False, body.max_tokens, functools.partial(body.generation_config, choice=j, logprobs=k),
                           score_prompt=bool(body.echo) and k is not None)
                for p in body.prompts for j in range(body.num_choices)]
        handles = await worker.submit(subs)
        prompts = [p for p in body.prompts for _ in range(body.num_choices)]

        def prefix(h: RequestHandle) -> tuple[str, dict | None]:
            """What a choice starts with: the prompt's text (and logprobs) with echo, else nothing."""
            if not body.echo:
                return "", None
            p = prompts[h.index]
            text = p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else ""
            lps = None if k is None else completion_logprobs(h.prompt_ids, h.prompt_logprobs, k, text_of)
            return text, lps

        def choice(h: RequestHandle, delta: str, tokens: list[int], lps: list, offset: int, first: bool) -> dict:
            text, logprobs = prefix(h) if first else ("", None)
            if k is not None:
                gen = completion_logprobs(tokens, lps, k, text_of, offset + len(text))
                logprobs = gen if logprobs is None else {f: logprobs[f] + gen[f] for f in gen}
            return {"index": h.index, "text": text + delta, "logprobs": logprobs}

        return await _respond(request, handles, body, "cmpl", "text_completion", choice, _prompt_tokens(handles, body))

    @app.post("/v1/chat/completions", responses=openapi.GENERATION)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        body.check_fields()
        k = body.num_logprobs
        subs = [Submission(body.message_dicts(), True, body.token_limit,
                           functools.partial(body.generation_config, choice=j, logprobs=k))
                for j in range(body.num_choices)]
        handles = await worker.submit(subs)

        def choice(h: RequestHandle, delta: str, tokens: list[int], lps: list, offset: int, first: bool) -> dict:
            content = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            return {"index": h.index, ("message" if not body.stream else "delta"): content,
                    "logprobs": None if k is None else chat_logprobs(tokens, lps, k, text_of)}

        return await _respond(request, handles, body, "chatcmpl", "chat.completion", choice, handles[0].prompt_tokens)

    async def _respond(request: Request, handles: list[RequestHandle], body, prefix: str, obj: str, choice,
                       prompt_tokens: int):
        rid, created = new_id(prefix), int(time.time())
        if body.stream:
            chunks = _sse(request, handles, body, rid, created, obj + (".chunk" if prefix == "chatcmpl" else ""),
                          choice, prompt_tokens)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await _final_results(request, handles)
        finally:
            for h in handles:
                h.cancel()  # no-op once finished; frees the slot at once if the client left
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        choices = []
        for h, r in zip(handles, results):
            c = choice(h, r.text, r.token_ids, r.logprobs or [], 0, True)
            c["finish_reason"] = r.stats.finish_reason
            if body.logprobs:
                c["drex"] = {"exit_layers": list(r.exit_layers)}  # the depth each token (and its logprob) came from
            choices.append(c)
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, results), "drex": exit_summary(results, num_layers)}

    async def _next_event(request: Request, handles: list[RequestHandle]):
        """The response's next (handle, event); None if the client disconnected meanwhile. Raises
        RequestError when a request was cancelled by shutdown or the engine failed."""
        getter = asyncio.ensure_future(handles[0].events.get())
        try:
            while not (await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    return None
        finally:
            getter.cancel()  # only if still pending: a cancelled get loses no event
        handle, item = getter.result()
        if isinstance(item, Exception):
            raise RequestError(str(item), status=500, type="server_error")
        if item.finished and item.result.stats.finish_reason == "cancelled":
            raise RequestError("request cancelled: the server is shutting down", status=503, type="server_error")
        return handle, item

    async def _final_results(request: Request, handles: list[RequestHandle]) -> list[GenerationResult] | None:
        results: dict[int, GenerationResult] = {}
        while len(results) < len(handles):
            got = await _next_event(request, handles)
            if got is None:
                return None
            if got[1].finished:
                results[got[0].index] = got[1].result
        return [results[h.index] for h in handles]

    async def _sse(request, handles, body, rid, created, obj, choice, prompt_tokens) -> AsyncIterator[str]:
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(choices: list[dict], **extra) -> str:
            msg = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                   **usage_field, **extra}
            return f"data: {json.dumps(msg)}\n\n"

        # per choice: tokens (and logprobs) not yet sent, characters sent, whether it has started
        pending = {h.index: ([], []) for h in handles}
        offset = {h.index: 0 for h in handles}
        results: dict[int, GenerationResult] = {}
        try:
            for h in handles:  # each choice opens with its role (chat) or its echoed prompt
                first = choice(h, "", [], [], 0, True)
                if first.get("text") or first.get("delta"):
                    offset[h.index] = len(first.get("text", ""))
                    yield chunk([{**first, "finish_reason": None}])
            while len(results) < len(handles):
                try:
                    got = await _next_event(request, handles)
                except RequestError as e:
                    yield f"data: {json.dumps(error_body(e.message, None, e.type))}\n\n"
                    break
                if got is None:
                    return  # client gone: `finally` cancels
                h, ev = got
                tokens, lps = pending[h.index]
                if ev.token_id >= 0:
                    tokens.append(ev.token_id)
                    lps.append(ev.logprob)
                if not (ev.text or ev.finished):
                    continue
                c = choice(h, ev.text, tokens, lps, offset[h.index], False)
                offset[h.index] += len(ev.text)
                pending[h.index] = ([], [])
                c["finish_reason"] = ev.result.stats.finish_reason if ev.finished else None
                if ev.finished:
                    results[h.index] = ev.result
                    extra = {"drex": exit_summary([ev.result], num_layers)}
                    if body.logprobs:
                        c["drex"] = {"exit_layers": list(ev.result.exit_layers)}
                    yield chunk([c], **extra)
                else:
                    yield chunk([c])
            else:
                if body.include_usage:
                    msg = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [],
                           "usage": usage(prompt_tokens, list(results.values()))}
                    yield f"data: {json.dumps(msg)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                h.cancel()  # a client that disconnects mid-stream frees its slots and pages now

    return app


def _prompt_tokens(handles: list[RequestHandle], body: CompletionRequest) -> int:
    """Prompt tokens of a completions request: each prompt counted once, whatever n."""
    return sum(h.prompt_tokens for h in handles[::body.num_choices])


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise RequestError(f"model {name!r} does not exist; this server serves {served!r}", param="model",
                           status=404, code="model_not_found")


def _model_card(name: str, engine) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "drex_jax", "max_model_len": engine.max_seq_len,
            "drex": {"num_layers": engine.cfg.num_layers, "early_exit": engine.early_exit,
                     "matmul": engine.matmul}}
