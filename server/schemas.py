"""Request and response bodies.

The OpenAI-shaped requests ignore unknown fields (as OpenAI does); features we do not implement are
refused when asked for rather than silently dropped. The native `/v1/generate` request forbids unknown
fields so a typo is an error, not a default.

`to_generation_request` on each request model is the one conversion of a request into the engine's
parameters: the fields a request leaves out take `RequestDefaults` (the server's settings over the model's).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine import GenerationRequest
from crsm_core.sampling import SamplingParams

from .chat_template import CHAT_STOPS
from .settings import DeliberationKnobs, RequestDefaults

Temperature = Field(1.0, ge=0.0, le=2.0)
TopP = Field(1.0, gt=0.0, le=1.0)
TopK = Field(0, ge=0)
# The 64-bit range torch's generators take (the engine keeps a seed's 64 bits); a seed outside it used
# to fail in the engine with a 500.
Seed = Field(None, ge=-2**63, le=2**64 - 1)
# Integer fields are StrictInt: "16", true and 16.0 are refused (400) rather than read as 16 or 1.
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

class DeliberationRequest(DeliberationKnobs):
    """Per-request deliberation (the knobs and their bounds: server/settings.py); fields left out take the
    server's defaults."""
    enabled: bool | None = None

    def resolve(self, defaults: RequestDefaults) -> DeliberationConfig | None:
        """The request's fields over the server's defaults over the model's; None when it is off."""
        if not (defaults.deliberation_enabled if self.enabled is None else self.enabled):
            return None
        return self.apply_to(defaults.deliberation)


def _generation_request(body: GenerateRequest | _OpenAIRequest, prompt_ids: Sequence[int], max_tokens: int,
                        seed: int | None, stop: Sequence[str], deliberation: DeliberationRequest | None,
                        defaults: RequestDefaults) -> GenerationRequest:
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed)
    return GenerationRequest(tuple(prompt_ids), max_tokens, sampling, tuple(stop), body.ignore_eos,
                             (deliberation or DeliberationRequest()).resolve(defaults))


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    token_ids: list[StrictInt] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Temperature
    top_p: float = TopP
    top_k: StrictInt = TopK
    seed: StrictInt | None = Seed
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

    def to_generation_request(self, prompt_ids: Sequence[int], defaults: RequestDefaults) -> GenerationRequest:
        """prompt_ids: the prompt's tokens (token_ids, or the prompt encoded)."""
        return _generation_request(self, prompt_ids, self.max_tokens or defaults.max_tokens, self.seed, self.stop,
                                   self.deliberation, defaults)


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
    n: StrictInt = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)  # a string or a list of strings
    seed: StrictInt | None = Seed
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions (vLLM spells them the same way)
    top_k: StrictInt = TopK
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

    # stop strings the endpoint adds to the request's own (chat: the template's turn markers)
    extra_stops: ClassVar[tuple[str, ...]] = ()

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        raise NotImplementedError

    def to_generation_request(self, prompt_ids: Sequence[int], defaults: RequestDefaults,
                              choice: int = 0) -> GenerationRequest:
        """Choice `choice` (of n) of one prompt. With a seed, choice j uses seed + j, kept to 64 bits (the
        same bits as a seed, so -1 and 2**64 - 1 are one seed)."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        return _generation_request(self, prompt_ids, self.max_tokens_or(defaults), seed,
                                   [*self.stop, *self.extra_stops], None, defaults)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(None, ge=1)
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

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        return self.max_tokens or defaults.max_tokens


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
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    extra_stops: ClassVar[tuple[str, ...]] = CHAT_STOPS

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        return self.max_completion_tokens or self.max_tokens or defaults.chat_max_tokens


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
