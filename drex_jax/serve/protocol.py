"""OpenAI API request bodies (the fields drex_jax serves) and OpenAI-style error bodies.

Every field the API allows to be `null` may be; a field that would change the output and that
drex_jax does not implement is a 400 naming it, never silently ignored. Fields with no effect on
the output (`user`, `metadata`, ...: `NO_EFFECT`) are accepted. Validation names the field and
its allowed range; the worker checks what needs the tokenizer (prompt length against the
context limit)."""
from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from drex_jax.generation import TOP_LOGPROBS_MAX, GenerationConfig

MAX_CHOICES = 16  # n (and best_of) per request
MAX_PROMPTS = 64  # prompts in one completions request

# fields accepted because they do not change what is generated (OpenAI's and vLLM's)
NO_EFFECT = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls",
    "skip_special_tokens", "spaces_between_special_tokens", "add_special_tokens", "request_id", "priority",
})


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


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # vLLM's extension: EOS does not end the request
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no stop before this many tokens
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most 4 non-empty strings, got {v!r}")
        return [_check_text(s, "stop") for s in stops]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        if v not in (None, 0):
            raise ValueError(f"{info.field_name}={v} is not supported by this server (only 0 or null)")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _no_repetition_penalty(cls, v):
        if v not in (None, 1):
            raise ValueError(f"repetition_penalty={v} is not supported by this server (only 1 or null)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server (only {} or null)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported by this server (constrained "
                             "decoding is not implemented); only {\"type\": \"text\"}")
        return v

    def check_fields(self) -> None:
        """RequestError naming the first field this server does not know (unknown fields would
        otherwise be dropped without a word)."""
        for name in self.model_extra or {}:
            if name not in NO_EFFECT:
                raise RequestError(f"{name} is not supported by this server", param=name)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def generation_config(self, max_new_tokens: int, choice: int = 0, default_temperature: float = 1.0,
                          logprobs: int | None = None) -> GenerationConfig:
        """The engine's config for choice `choice`. A seeded request's choice j draws with seed + j
        (n independent samples); an unseeded sampled request draws fresh seeds (two identical
        unseeded requests should not sample the same text). A request that sends no temperature
        gets `default_temperature` (the OpenAI default 1.0; 0 on a server that decodes greedily
        only, such as verify mode)."""
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


TokenIds = list[StrictInt]


class CompletionRequest(_Common):
    prompt: str | list[str] | TokenIds | list[TokenIds]  # checked (strictly) by `_prompts`
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v):
        """A string, a list of strings, a list of token ids or a list of token-id lists; token ids
        are integers (not booleans or floats)."""
        def ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(type(t) is int for t in p)

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

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server (only null or \"\")")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids (one choice per prompt and n)."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def check_fields(self) -> None:
        super().check_fields()
        if self.best_of not in (None, self.num_choices):
            raise RequestError(f"best_of={self.best_of} with n={self.num_choices}: only best_of equal to n (or null) "
                               "is supported (ranking candidates is not implemented)", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens=0 is only allowed with echo=true (prompt scoring); allowed range [1, ...]",
                               param="max_tokens")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if v is None:
            return ""
        if isinstance(v, str):
            return _check_text(v, "content")
        parts = []
        for part in v:  # the list form: text parts only
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(_check_text(part["text"], "content"))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} are not supported by this server (tool calling is not implemented)")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info):
        if v not in (None, "none", "auto"):
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server (tool calling is not "
                             "implemented)")
        return v

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
