"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions (streaming and not),
/v1/models, /health, /metrics. Handlers never call the engine: they submit to the EngineWorker
and read their request's events."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from drex_jax.generation import GenerationResult, StreamEvent
from drex_jax.serve.metrics import ServerMetrics, exit_summary
from drex_jax.serve.protocol import (ChatCompletionRequest, CompletionRequest, RequestError, error_body,
                                     new_id)
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
        return JSONResponse(error_body(str(e.detail), None, kind), status_code=e.status_code)

    # ---------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        if worker.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "error": repr(worker.error) if worker.error else None},
                            status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(name, model_name)
        return _model_card(model_name, engine)

    # ---------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        handle = await worker.submit(Submission(body.prompt, False, body.max_tokens, body.generation_config))
        return await _respond(request, handle, body, "cmpl", "text_completion", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        handle = await worker.submit(Submission(body.message_dicts(), True, body.token_limit, body.generation_config))
        return await _respond(request, handle, body, "chatcmpl", "chat.completion", chat=True)

    async def _respond(request: Request, handle: RequestHandle, body, prefix: str, obj: str, chat: bool):
        rid, created = new_id(prefix), int(time.time())
        if body.stream:
            stream = _sse(request, handle, body, rid, created, obj + (".chunk" if chat else ""), chat)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = await _final_result(request, handle)
        finally:
            handle.cancel()  # no-op once finished; frees the slot at once if the client left
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}} if chat
                  else {"index": 0, "text": result.text, "logprobs": None})
        choice["finish_reason"] = result.stats.finish_reason
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": _usage(handle, result), "drex": exit_summary(result, num_layers)}

    async def _next_event(request: Request, handle: RequestHandle) -> StreamEvent | None:
        """The request's next event; None if the client disconnected meanwhile. Raises RequestError
        when the request was cancelled by shutdown or the engine failed."""
        getter = asyncio.ensure_future(handle.events.get())
        try:
            while not (await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    return None
        finally:
            getter.cancel()  # only if still pending: a cancelled get loses no event
        item = getter.result()
        if isinstance(item, Exception):
            raise RequestError(str(item), status=500, type="server_error")
        if item.finished and item.result.stats.finish_reason == "cancelled":
            raise RequestError("request cancelled: the server is shutting down", status=503, type="server_error")
        return item

    async def _final_result(request: Request, handle: RequestHandle) -> GenerationResult | None:
        while True:
            ev = await _next_event(request, handle)
            if ev is None or ev.finished:
                return None if ev is None else ev.result

    async def _sse(request, handle, body, rid, created, obj, chat) -> AsyncIterator[str]:
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(payload: dict, finish_reason=None, **extra) -> str:
            choice = {"index": 0, **payload, "logprobs": None, "finish_reason": finish_reason}
            msg = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                   **usage_field, **extra}
            return f"data: {json.dumps(msg)}\n\n"

        try:
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}})
            while True:
                try:
                    ev = await _next_event(request, handle)
                except RequestError as e:
                    yield f"data: {json.dumps(error_body(e.message, None, e.type))}\n\n"
                    break
                if ev is None:
                    return  # client gone: `finally` cancels
                if ev.text or ev.finished:
                    payload = {"delta": {"content": ev.text} if ev.text else {}} if chat else {"text": ev.text}
                    if ev.finished:
                        yield chunk(payload, ev.result.stats.finish_reason, drex=exit_summary(ev.result, num_layers))
                        if body.include_usage:
                            msg = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [],
                                   "usage": _usage(handle, ev.result)}
                            yield f"data: {json.dumps(msg)}\n\n"
                        break
                    yield chunk(payload)
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # a client that disconnects mid-stream frees its slot and pages now

    return app


def _usage(handle: RequestHandle, result: GenerationResult) -> dict:
    n = result.stats.generated_tokens
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": n, "total_tokens": handle.prompt_tokens + n}


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise RequestError(f"model {name!r} does not exist; this server serves {served!r}", param="model",
                           status=404, code="model_not_found")


def _model_card(name: str, engine) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "drex_jax", "max_model_len": engine.max_seq_len,
            "drex": {"num_layers": engine.cfg.num_layers, "early_exit": engine.early_exit}}
