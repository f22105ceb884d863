"""The OpenAPI document as the server behaves: OpenAI-style error bodies with the statuses it
returns (400 for every invalid body, never FastAPI's 422), server-sent events next to JSON for
the generation endpoints, Prometheus text for /metrics."""
from __future__ import annotations

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error(description: str, **extra) -> dict:
    return {"model": ErrorBody, "description": description, **extra}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

GENERATION = {
    200: {"description": "the completion (JSON), or with `stream: true` server-sent events ending in "
                         "`data: [DONE]`",
          "content": {"application/json": {}, "text/event-stream": {}}},
    400: _error("invalid request: the message names the field and its allowed range"),
    404: _error("unknown model"),
    429: _error("too many requests in flight", headers=RETRY_AFTER),
    500: _error("the engine failed"),
    503: _error("not serving (shutting down or failed)"),
}
MODEL = {404: _error("unknown model")}
HEALTH = {503: {"description": "the engine is not serving",
                "content": {"application/json": {"schema": {"type": "object"}}}}}
METRICS = {200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def openapi_document(app, model_name: str, vocab_size: int, max_seq_len: int) -> dict:
    """The app's OpenAPI document without the 422 responses FastAPI adds (invalid bodies are 400s
    here) and their schemas, with what this server takes: `model` (and the models path) is the
    served name, token ids are below the vocabulary size, token limits below the context limit
    (prompt + completion must fit it too: a joint limit JSON Schema cannot state, so a long
    prompt with a large `max_tokens` is a schema-valid 400). Cached on the app, as FastAPI's own."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                for param in op.get("parameters", []):
                    if param.get("name") == "name":
                        param["schema"] = {"type": "string", "enum": [model_name]}
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schemas[name]["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        _bound_token_ids(schemas["CompletionRequest"]["properties"]["prompt"], vocab_size)
        # (chat's max_tokens is not bounded: max_completion_tokens overrides it when both are sent)
        for name, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens")):
            schemas[name]["properties"][field]["anyOf"][0]["maximum"] = max_seq_len - 1
        app.openapi_schema = doc
    return app.openapi_schema


def _bound_token_ids(schema, vocab_size: int) -> None:
    """Every integer (token id) in `schema` gets `maximum` vocab_size - 1."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = vocab_size - 1
        for v in schema.values():
            _bound_token_ids(v, vocab_size)
    elif isinstance(schema, list):
        for v in schema:
            _bound_token_ids(v, vocab_size)
