"""OpenAI API request bodies (the fields drex_jax serves) and OpenAI-style error bodies.

Validation here names the field and its allowed range; the worker checks what needs the
tokenizer (prompt length against the context limit)."""
from __future__ import annotations

import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drex_jax.generation import GenerationConfig


class RequestError(ValueError):
    """A bad request: HTTP `status`, the offending request field `param`, OpenAI error `type`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_body(message: str, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # unknown fields (user, presence_penalty, ...) are accepted and ignored, as other servers do;
    # fields whose meaning we cannot honour are rejected below
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most 4 non-empty strings, got {v!r}")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return v

    def generation_config(self, max_new_tokens: int, default_temperature: float = 1.0) -> GenerationConfig:
        """The engine's per-request config. An unseeded sampled request draws a fresh seed (two
        identical unseeded requests should not sample the same text). A request that sends no
        temperature gets `default_temperature` (the OpenAI default 1.0; 0 on a server that decodes
        greedily only, such as verify mode)."""
        seed = self.seed if self.seed is not None else secrets.randbelow(2**32)
        temperature = self.temperature if "temperature" in self.model_fields_set else default_temperature
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=float(temperature),
                                top_p=float(self.top_p), stop=tuple(self.stop or ()), seed=seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got a list of {len(v)}")
            v = v[0]
        if not v:
            raise ValueError("prompt is empty")
        return v

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, False, 1):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, str):
            return v
        parts = []
        for part in v:  # the list form: text parts only
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
