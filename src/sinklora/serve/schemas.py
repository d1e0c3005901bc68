"""Request and response bodies of the OpenAI-compatible API (pydantic), with sinklora's own fields.

Requests follow OpenAI's chat and completions APIs; what sinklora cannot honour is refused by name
(``n`` > 1, penalties, logprobs, tools), never silently ignored. sinklora's KV-cache settings ride in
the same body (OpenAI clients send them with ``extra_body``): the fields of
:class:`~sinklora.settings.CacheOptions` (``cache``, ``budget``, ``sink_tokens``, ``heavy_ratio``, ``slack``,
``budget_floor``, ``positions``), as in ``sinklora chat``. Responses carry a ``sinklora`` object: the
cache's stats (kept and seen tokens, KV bytes) and timings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sinklora.settings import CacheOptions, CachePolicyName

CACHE_FIELDS = tuple(f.name for f in dataclasses.fields(CacheOptions))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields both routes share: sampling, streaming, and sinklora's cache settings."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as OpenAI documents it (abuse monitoring)
    n: Literal[1] = 1
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None
    # sinklora: the request's KV cache (defaults: the server's)
    cache: CachePolicyName | None = None
    budget: int | float | str | None = None
    sink_tokens: int | None = None
    heavy_ratio: float | None = None
    slack: int | None = None
    budget_floor: int | None = None
    positions: Literal["absolute", "rank"] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops

    def cache_settings(self) -> dict[str, Any]:
        """The cache fields this request sets."""
        return {name: getattr(self, name) for name in CACHE_FIELDS if name in self.model_fields_set}


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class _Answer(BaseModel):
    """What every answer object has; ``sinklora``: the cache's stats and timings."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    sinklora: dict[str, Any] | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sinklora"
    context_length: int
    sinklora: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error answered as OpenAI's error object, with its HTTP status (and headers, e.g. Retry-After)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorBody(error=ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code))
