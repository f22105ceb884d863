"""OpenAI API request bodies (the fields drex_jax serves) and OpenAI-style error bodies.

Every field the API allows to be `null` may be; a field that would change the output and that
drex_jax does not implement is a 400 naming it, never silently ignored. Fields with no effect on
the output (`user`, `metadata`, ...) are accepted; any other field is a 400. Validation names the field and
its allowed range; the worker checks what needs the tokenizer (prompt length against the
context limit)."""
from __future__ import annotations

import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from drex_jax.generation import TOP_LOGPROBS_MAX, GenerationConfig

MAX_CHOICES = 16  # n (and best_of) per request
MAX_PROMPTS = 64  # prompts in one completions request

class RequestError(ValueError):
    """A bad request: HTTP `status`, the offending request field `param`, OpenAI error `type`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _check_text(v: str, what: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return v


def _integer(v):
    """JSON's integers: ints and integral floats (1.0), never booleans or numeric strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"must be an integer, got {v!r}")
    return int(v)


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {v!r}")
    return v


Bool = StrictBool


def _integers(*fields: str):
    """A before-validator making `fields` take JSON's integers only (`_integer`) or null."""
    return field_validator(*fields, mode="before")(classmethod(lambda cls, v: v if v is None else _integer(v)))


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: Bool | None = False


class ResponseFormat(BaseModel):
    type: Literal["text"]


def _only(allowed, why: str):
    """A before-validator: the field takes only `allowed` values (null included), else a clear 400."""
    def check(cls, v, info):
        if v is not None and (v not in allowed or isinstance(v, bool) != isinstance(allowed[0], bool)):
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server ({why})")
        return v

    return classmethod(check)


class _Common(BaseModel):
    # extra fields are kept to be refused by `check_fields`; the schema lists only declared ones
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: Bool | None = False  # vLLM's extension: EOS does not end the request
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no stop before this many tokens
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    repetition_penalty: float | None = Field(None, ge=1, le=1)
    logit_bias: dict | None = Field(None, json_schema_extra={"maxProperties": 0})
    response_format: ResponseFormat | None = None
    # accepted, no effect on the output (OpenAI's and vLLM's)
    user: str | None = None
    metadata: dict | None = None
    store: Bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: Bool | None = None
    skip_special_tokens: Literal[True] | None = None
    spaces_between_special_tokens: Bool | None = None
    request_id: str | None = None
    priority: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most 4 non-empty strings, got {v!r}")
        return [_check_text(s, "stop") for s in stops]

    _common_ints = _integers("max_tokens", "top_k", "seed", "n", "min_tokens", "priority")
    _numbers = field_validator("temperature", "top_p", mode="before")(classmethod(
        lambda cls, v: v if v is None else _number(v)))
    _no_penalty = field_validator("presence_penalty", "frequency_penalty", mode="before")(
        _only((0,), "penalties are not implemented: only 0 or null"))
    _no_repetition_penalty = field_validator("repetition_penalty", mode="before")(
        _only((1,), "penalties are not implemented: only 1 or null"))
    _special_tokens_skipped = field_validator("skip_special_tokens", mode="before")(
        _only((True,), "generated text always skips special tokens"))

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server (only {} or null)")
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, dict) and v.get("type") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported by this server (constrained "
                             "decoding is not implemented); only {\"type\": \"text\"}")
        return v

    def check_fields(self) -> None:
        """RequestError naming the first field this server does not know (unknown fields would
        otherwise be dropped without a word)."""
        for name in self.model_extra or {}:
            raise RequestError(f"{name} is not supported by this server", param=name)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def generation_config(self, max_new_tokens: int, choice: int = 0, default_temperature: float = 1.0,
                          logprobs: int | None = None) -> GenerationConfig:
        """The engine's config for choice `choice`. A seeded request's choice j draws with seed + j
        (n independent samples); an unseeded sampled request draws fresh seeds (two identical
        unseeded requests should not sample the same text). A request that sends no temperature
        gets `default_temperature` (the OpenAI default 1.0)."""
        seed = (self.seed + choice) % 2**32 if self.seed is not None else secrets.randbelow(2**32)
        temperature = default_temperature if self.temperature is None else self.temperature
        return GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=float(temperature),
            top_p=float(1.0 if self.top_p is None else self.top_p), top_k=max(self.top_k or 0, 0),
            stop=tuple(self.stop or ()), seed=seed, ignore_eos=bool(self.ignore_eos),
            min_tokens=min(self.min_tokens or 0, max_new_tokens), logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)




class CompletionRequest(_Common):
    # max_tokens 0 (scoring only) needs echo
    model_config = ConfigDict(json_schema_extra={
        "additionalProperties": False,
        "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
        "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}})
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    echo: Bool | None = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    suffix: Literal[""] | None = None
    best_of: int | None = Field(None, ge=1, le=1)  # ranking candidates is not implemented

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        """A string, a list of strings, a list of token ids or a list of token-id lists; token ids
        are integers (JSON's: 1.0 is 1; never booleans)."""
        def ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(
                type(t) is int or (type(t) is float and t.is_integer()) for t in p)

        def as_ids(p):  # token ids: 1.0 is JSON's 1
            return [int(t) for t in p] if ids(p) else p

        if isinstance(v, list) and v and isinstance(v[0], list):
            v = [as_ids(p) for p in v]
        elif isinstance(v, list):
            v = as_ids(v)
        if isinstance(v, str) or ids(v):
            prompts = [v]
        elif isinstance(v, list) and all(isinstance(p, str) or ids(p) for p in v):
            prompts = v
        else:
            raise ValueError("prompt must be a string, a list of strings, a list of integer token ids or a list of "
                             f"token-id lists, got {str(v)[:80]!r}")
        if not prompts or not all(prompts):
            raise ValueError("prompt is empty")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"a request takes at most {MAX_PROMPTS} prompts, got {len(prompts)}")
        for p in prompts:
            if isinstance(p, str):
                _check_text(p, "prompt")
        return v

    _completion_ints = _integers("max_tokens", "logprobs", "best_of")
    _no_suffix = field_validator("suffix", mode="before")(_only(("",), "only null or an empty string"))

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (one choice per prompt and n)."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def check_fields(self) -> None:
        super().check_fields()
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens=0 is only allowed with echo=true (prompt scoring); allowed range [1, ...]",
                               param="max_tokens")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        """A string, a list of text parts (joined) or null (empty)."""
        if v is None:
            return ""
        if isinstance(v, str):
            return _check_text(v, "content")
        if not isinstance(v, list):
            raise ValueError(f"content must be a string, a list of text parts or null, got {type(v).__name__}")
        parts = []
        for part in v:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got "
                                 f"{str(part)[:60]}")
            parts.append(_check_text(part["text"], "content"))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    # top_logprobs > 0 needs logprobs
    model_config = ConfigDict(json_schema_extra={
        "additionalProperties": False,
        "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list | None = Field(None, max_length=0)
    tool_choice: Literal["none", "auto"] | None = None
    functions: list | None = Field(None, max_length=0)
    function_call: Literal["none", "auto"] | None = None

    _chat_ints = _integers("max_tokens", "max_completion_tokens", "top_logprobs")

    @field_validator("tools", "functions", mode="before")
    @classmethod
    def _no_tools(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} are not supported by this server (tool calling is not implemented)")
        return v

    _no_tool_choice = field_validator("tool_choice", "function_call", mode="before")(
        _only(("none", "auto"), "tool calling is not implemented"))

    def check_fields(self) -> None:
        super().check_fields()
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
