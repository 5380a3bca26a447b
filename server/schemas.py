"""Request and response bodies.

The OpenAI-shaped requests ignore unknown fields (as OpenAI does); features we do not implement are
refused when asked for rather than silently dropped. The native `/v1/generate` request forbids unknown
fields so a typo is an error, not a default.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Temperature = Field(1.0, ge=0.0, le=2.0)
TopP = Field(1.0, gt=0.0, le=1.0)
TopK = Field(0, ge=0)
# The 64-bit range torch's generators take (the engine keeps a seed's 64 bits); a seed outside it used
# to fail in the engine with a 500.
Seed = Field(None, ge=-2**63, le=2**64 - 1)
MAX_STOPS = 8


def _stops(value: object) -> object:
    """str | list[str] | None -> list[str] (a non-list is left for the type check to refuse)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        return stops
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


# ---- native API ---------------------------------------------------------------------------------------

# One request must not be able to hold up every session's planning or fill the device: a plan's node
# pool holds simulations + 1 states per session (9.8 MB each at 129M parameters), and a plan steps `lag`
# tokens ahead before it searches.
MAX_SIMULATIONS = 256
MAX_LAG = 32


class DeliberationRequest(BaseModel):
    """Per-request deliberation; fields left out take the server's defaults."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    lag: int | None = Field(None, ge=1, le=MAX_LAG)
    simulations: int | None = Field(None, ge=1, le=MAX_SIMULATIONS)
    injection_rate: float | None = Field(None, ge=0.0, le=1.0)
    use_suggestions: bool | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Temperature
    top_p: float = TopP
    top_k: int = TopK
    seed: int | None = Seed
    stop: list[str] = Field(default_factory=list)  # a string or a list of strings
    stream: bool = False
    ignore_eos: bool = False
    deliberation: DeliberationRequest | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        return _stops(v)


class Timings(BaseModel):
    queue_s: float
    ttft_s: float | None
    mean_itl_s: float | None
    tokens_per_s: float | None
    total_s: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    injections: list[dict]
    deliberation: dict | None


# ---- OpenAI API ---------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Temperature
    top_p: float = TopP
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)  # a string or a list of strings
    seed: int | None = Seed
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM spells them the same way)
    top_k: int = TopK
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        return _stops(v)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported_completion(self):
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "crsm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
