"""Request and response bodies.

The OpenAI-shaped requests ignore unknown fields (as OpenAI does); features we do not implement are
refused when asked for rather than silently dropped. The native `/v1/generate` request forbids unknown
fields so a typo is an error, not a default.

`to_generation_request` on each request model is the one conversion of a request into the engine's
parameters: the fields a request leaves out take `RequestDefaults` (the server's settings over the model's).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Sequence

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from crsm_core.deliberation import DeliberationConfig
from crsm_core.engine import MAX_TOP_LOGPROBS, GenerationRequest
from crsm_core.sampling import SamplingParams

from .chat_template import CHAT_STOPS, render_chat
from .settings import DeliberationKnobs, RequestDefaults

Temperature = Field(1.0, ge=0.0, le=2.0)
TopP = Field(1.0, gt=0.0, le=1.0)
# top_k and min_tokens live in int64 tensors on the device; no vocabulary or generation comes near this
MAX_COUNT = 1 << 30
TopK = Field(0, ge=0, le=MAX_COUNT)
# The 64-bit range torch's generators take (the engine keeps a seed's 64 bits); a seed outside it used
# to fail in the engine with a 500.
Seed = Field(None, ge=-2**63, le=2**64 - 1)
MAX_STOPS = 8

# Request bodies are validated strictly (no "1" for 1, no 1.5 for an integer, no "true" for true): a body
# the schema in /openapi.json refuses is refused.
STRICT = ConfigDict(strict=True)


def _json_integers(value: Any) -> Any:
    """A JSON body with its integral numbers as ints: 2.0 is an integer in JSON Schema, so /openapi.json
    promises to take it (schemathesis sends such bodies), while "2" and true stay refused; a strict float
    field takes an int as it is."""
    if type(value) is float and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_json_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_integers(v) for k, v in value.items()}
    return value


class _Body(BaseModel):
    """A request body: strict, with JSON's integral numbers taken as integers."""
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data: Any) -> Any:
        return _json_integers(data)


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


UNSUPPORTED = "unsupported_parameter"


def unsupported(message: str) -> PydanticCustomError:
    """A refusal of a field we do not implement: a 400 whose `param` is the field and code UNSUPPORTED."""
    return PydanticCustomError(UNSUPPORTED, message)


def invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _cross_field(*constraints: dict):
    """A model's json_schema_extra: what its validators check across fields, in JSON Schema (allOf of
    anyOf / oneOf), so that /openapi.json accepts what the server accepts and nothing else."""
    def extra(schema: dict) -> None:
        schema.setdefault("allOf", []).extend(constraints)
    return extra


def spelled_out(schema: dict) -> None:
    """Each branch of the schema's cross-field constraints with every field of the schema, in the field's
    own schema where the branch does not narrow it: the same set of bodies, but generators that draw a
    branch (schemathesis) otherwise draw the fields it leaves out unconstrained. Done last, on the
    final properties."""
    properties = schema["properties"]
    for constraint in schema.get("allOf", []):
        [(kind, branches)] = constraint.items()
        constraint[kind] = [{**branch, "properties": {**properties, **branch.get("properties", {})}}
                            for branch in branches]


def _null(field: str) -> dict:
    """The field is left out or null."""
    return {"properties": {field: {"type": "null"}}}


def exactly_one_of(a: str, b: str) -> dict:
    return {"oneOf": [{"required": [a], "properties": {a: {"not": {"type": "null"}}, b: {"type": "null"}}},
                      {"required": [b], "properties": {b: {"not": {"type": "null"}}, a: {"type": "null"}}}]}


def _only_with(field: str, other: str, value: object) -> dict:
    """`field` only when `other` is `value`."""
    return {"anyOf": [_null(field), {"required": [other], "properties": {other: {"const": value}}}]}


# ---- native API ---------------------------------------------------------------------------------------

class DeliberationRequest(DeliberationKnobs):
    """Per-request deliberation (the knobs and their bounds: server/settings.py); fields left out take the
    server's defaults."""
    model_config = STRICT
    enabled: bool | None = None

    def resolve(self, defaults: RequestDefaults) -> DeliberationConfig | None:
        """The request's fields over the server's defaults over the model's; None when it is off."""
        if not (defaults.deliberation_enabled if self.enabled is None else self.enabled):
            return None
        return self.apply_to(defaults.deliberation)


MAX_STOP_TOKEN_IDS = 64
MAX_N = 16
MAX_LOGIT_BIAS = 1024


class SamplingFields(_Body):
    """How tokens are drawn, on every generation endpoint (the names and meanings are vLLM's; the order
    in which they apply: crsm_core/sampling.py)."""
    temperature: float = Temperature
    top_p: float = TopP
    top_k: int = TopK
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p times the most "
                                                           "likely one (0: off)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from the logit of every "
                                                                     "token the output holds")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit per "
                                                                      "occurrence in the output")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="divides the positive logits (multiplies "
                                      "the negative) of the tokens in the prompt or the output (1: off)")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id -> added to its logit, in [-100, 100]")
    min_tokens: int = Field(0, ge=0, le=MAX_COUNT, description="eos and stop_token_ids are not drawn, and stop strings do "
                                                 "not stop, before this many tokens (more than max_tokens: "
                                                 "nothing stops before max_tokens)")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="tokens that end the generation as eos does")
    include_stop_str_in_output: bool = Field(False, description="a matched stop string ends the text instead "
                                                                "of being cut from it")
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None):
        for token in value or {}:
            if not re.fullmatch("[0-9]+", token):
                raise invalid(f"logit_bias keys are token ids, got {token!r}")
        return value

    def sampling_params(self, seed: int | None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
                              min_tokens=self.min_tokens)


def _generation_request(body: SamplingFields, prompt_ids: Sequence[int], max_tokens: int,
                        seed: int | None, stop: Sequence[str], deliberation: DeliberationRequest | None,
                        defaults: RequestDefaults, logprobs: int | None = None) -> GenerationRequest:
    return GenerationRequest(tuple(prompt_ids), max_tokens, body.sampling_params(seed), tuple(stop), body.ignore_eos,
                             (deliberation or DeliberationRequest()).resolve(defaults),
                             stop_token_ids=tuple(body.stop_token_ids or ()),
                             include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs)


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_cross_field(exactly_one_of("prompt", "token_ids")))
    prompt: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Seed
    stop: list[str] = Field(default_factory=list)  # a string or a list of strings
    stream: bool = False
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
#
# A field is implemented, or refused with a 400 naming it (code `unsupported_parameter`), or one of those
# OpenAI itself accepts without any effect on the output (`user`, `metadata`, ...). The table is in
# docs/serving.md.

def _refused(what: str, allowed: tuple = (None,)):
    """A validator refusing any value but `allowed` (the field's type in the schema says what is allowed)."""
    def check(value: Any) -> Any:
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise unsupported(f"{what} is not supported")
    return BeforeValidator(check)


def _not_supported(what: str):
    """A field accepted only when left out or null."""
    return Field(None, description=f"not supported: {what}; refused unless null")


class TextResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"]


def _text_response_format(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") in ("json_object", "json_schema"):
        raise unsupported(f"response_format {value['type']!r} is not supported (only 'text')")
    return value


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


STREAM_OPTIONS_ONLY_WHEN_STREAMING = _only_with("stream_options", "stream", True)


class _OpenAIRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_cross_field(STREAM_OPTIONS_ONLY_WHEN_STREAMING))
    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: list[str] = Field(default_factory=list)  # a string or a list of strings
    seed: int | None = Seed
    user: str | None = None
    response_format: Annotated[TextResponseFormat | None, BeforeValidator(_text_response_format)] = Field(
        None, description="only {\"type\": \"text\"}; json_object and json_schema are refused")
    # the native API's deliberation object (OpenAI clients send it through extra_body)
    deliberation: DeliberationRequest | None = None
    # vLLM's fields of what is not implemented here
    guided_json: Annotated[None, _refused("guided_json")] = _not_supported("guided decoding")
    guided_regex: Annotated[None, _refused("guided_regex")] = _not_supported("guided decoding")
    guided_choice: Annotated[None, _refused("guided_choice")] = _not_supported("guided decoding")
    guided_grammar: Annotated[None, _refused("guided_grammar")] = _not_supported("guided decoding")
    structured_outputs: Annotated[None, _refused("structured_outputs")] = _not_supported("structured outputs")
    allowed_token_ids: Annotated[None, _refused("allowed_token_ids")] = _not_supported("allowed_token_ids")
    bad_words: Annotated[None, _refused("bad_words")] = _not_supported("bad_words")
    prompt_logprobs: Annotated[None, _refused("prompt_logprobs")] = _not_supported("the prompt's logprobs")
    truncate_prompt_tokens: Annotated[None, _refused("truncate_prompt_tokens")] = _not_supported("prompt truncation")
    use_beam_search: Annotated[Literal[False] | None, _refused("use_beam_search", (None, False))] = Field(
        None, description="only false")
    skip_special_tokens: Annotated[Literal[True] | None, _refused("skip_special_tokens false", (None, True))] = (
        Field(None, description="only true: special tokens add no text"))

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        return _stops(v)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo):
        # as OpenAI and vLLM: stream_options without stream is a mistake, not a no-op
        if value is not None and info.data.get("stream") is not True:
            raise invalid("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    # stop strings the endpoint adds to the request's own (chat: the template's turn markers)
    extra_stops: ClassVar[tuple[str, ...]] = ()

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        raise NotImplementedError

    def logprob_alternatives(self) -> int | None:
        """How many top alternatives each token's logprobs list; None: no logprobs."""
        raise NotImplementedError

    def to_generation_request(self, prompt_ids: Sequence[int], defaults: RequestDefaults,
                              choice: int = 0) -> GenerationRequest:
        """Choice `choice` (of n) of one prompt. With a seed, choice j uses seed + j, kept to 64 bits (the
        same bits as a seed, so -1 and 2**64 - 1 are one seed)."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        return _generation_request(self, prompt_ids, self.max_tokens_or(defaults), seed,
                                   [*self.stop, *self.extra_stops], self.deliberation, defaults,
                                   self.logprob_alternatives())


class CompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(json_schema_extra=_cross_field(
        STREAM_OPTIONS_ONLY_WHEN_STREAMING,
        {"anyOf": [_null("logprobs"), {"properties": {"echo": {"const": False}}}]},
        {"anyOf": [_null("best_of"), {"properties": {"n": {"const": 1}, "best_of": {"const": 1}}}]}))
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="each token's logprob and this many most likely alternatives")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 (with n 1), or left out")
    suffix: Annotated[None, _refused("suffix")] = _not_supported("suffix")

    @field_validator("logprobs")
    @classmethod
    def _not_the_prompts(cls, value: int | None, info: ValidationInfo):
        if value is not None and info.data.get("echo"):
            raise unsupported("logprobs with echo (the prompt's logprobs) is not supported")
        return value

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of_is_one(cls, value: Any, info: ValidationInfo):
        # before the type's bounds, so that best_of > 1 is named as not supported
        n = info.data.get("n", 1)
        if type(value) is not int:
            return value    # for the type check to refuse
        if value > 1:
            raise unsupported("best_of greater than 1 is not supported (n gives several choices)")
        if value < n:
            raise invalid(f"best_of must be at least n ({n}), got {value}")
        return value

    @model_validator(mode="after")
    def _prompt_not_empty(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        return self.max_tokens or defaults.max_tokens


NON_TEXT_PARTS = ("image_url", "input_audio", "file", "refusal")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


def _text_parts(value: Any) -> Any:
    """Name a non-text content part plainly (a union's error would list every alternative it failed)."""
    if isinstance(value, list):
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in NON_TEXT_PARTS:
                raise unsupported(f"content part {i} is of type {kind!r}; only text parts are supported")
    return value


def _chat_role(value: Any) -> Any:
    if value in ("tool", "function"):
        raise unsupported(f"{value} messages are not supported (no tool calling)")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Annotated[Literal["system", "developer", "user", "assistant"], BeforeValidator(_chat_role)]
    content: Annotated[str | list[ContentPart], BeforeValidator(_text_parts)]
    name: Annotated[None, _refused("name (the chat template has no speaker names)")] = _not_supported("name")
    tool_calls: Annotated[list | None, _refused("tool_calls", (None, [])),
                          WithJsonSchema({"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]})] = (
        _not_supported("tool calls"))
    function_call: Annotated[None, _refused("function_call")] = _not_supported("function calls")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(json_schema_extra=_cross_field(
        STREAM_OPTIONS_ONLY_WHEN_STREAMING, _only_with("top_logprobs", "logprobs", True),
        {"anyOf": [{"properties": {"tools": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}},
                   {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}}]}))
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="each token's logprob (and top_logprobs alternatives)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="only with logprobs: true")
    # tools are refused unless the model is told not to call them (then they are inert)
    tool_choice: Annotated[Literal["none"] | None, _refused("tool_choice other than 'none'", (None, "none"))] = Field(
        None, description="only 'none'")
    tools: list[dict] | None = Field(None, description="only with tool_choice 'none'")
    functions: Annotated[None, _refused("functions")] = _not_supported("function calling")
    function_call: Annotated[Literal["none"] | None, _refused("function_call other than 'none'", (None, "none"))] = (
        Field(None, description="only 'none'"))
    audio: Annotated[None, _refused("audio output")] = _not_supported("audio output")
    modalities: Annotated[list[Literal["text"]] | None, _refused("modalities other than ['text']", (None, ["text"])),
                          WithJsonSchema({"anyOf": [{"const": ["text"]}, {"type": "null"}]})] = (
        Field(None, description="only ['text']"))
    prediction: Annotated[None, _refused("prediction")] = _not_supported("predicted outputs")
    reasoning_effort: Annotated[None, _refused("reasoning_effort")] = _not_supported("reasoning models' effort")
    web_search_options: Annotated[None, _refused("web_search_options")] = _not_supported("web search")
    # vLLM's chat fields: the one template, rendered as it is
    add_generation_prompt: Annotated[Literal[True] | None, _refused("add_generation_prompt false", (None, True))] = (
        Field(None, description="only true: the prompt opens the assistant's turn"))
    continue_final_message: Annotated[Literal[False] | None, _refused("continue_final_message", (None, False))] = (
        Field(None, description="only false"))
    echo: Annotated[Literal[False] | None, _refused("echo on chat", (None, False))] = Field(None, description="only false")
    chat_template: Annotated[None, _refused("chat_template")] = _not_supported("another chat template")
    chat_template_kwargs: Annotated[None, _refused("chat_template_kwargs")] = _not_supported("template arguments")
    documents: Annotated[None, _refused("documents")] = _not_supported("documents")
    extra_stops: ClassVar[tuple[str, ...]] = CHAT_STOPS

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo):
        if value is not None and info.data.get("logprobs") is not True:   # as OpenAI
            raise invalid("top_logprobs is only allowed when logprobs is true")
        return value

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _tools_only_if_unused(cls, value: list[dict] | None, info: ValidationInfo):
        if value and info.data.get("tool_choice") != "none":
            raise unsupported("tools are not supported (unless tool_choice is 'none')")
        return value

    def max_tokens_or(self, defaults: RequestDefaults) -> int:
        return self.max_completion_tokens or self.max_tokens or defaults.chat_max_tokens


class CompletionLogprobs(BaseModel):
    """Per generated token: its text, logprob, the most likely tokens' logprobs by text (the sampled one
    included, as OpenAI: up to logprobs + 1), and where its text starts in the choice's text."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None   # the UTF-8 bytes of `token`


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    deliberation: dict | None = None   # the session's deliberation counters, when it deliberated


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
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    deliberation: dict | None = None   # the session's deliberation counters, when it deliberated


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
    logprobs: ChatLogprobs | None = None
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
    root: str              # as vLLM: where the weights are (the model directory)
    parent: str | None = None   # the model this one adapts (none: no adapters are served)
    max_model_len: int     # the longest prompt plus the most tokens a request may generate


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints (vLLM's /tokenize and /detokenize) ----------------------------------------------

class TokenizeRequest(_Body):
    """Exactly one of `prompt` and `messages` (rendered by the chat template, as chat completions does)."""
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_cross_field(exactly_one_of("prompt", "messages")))
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="no effect: the tokenizers served add no special tokens")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def text(self) -> str:
        if self.messages is None:
            return self.prompt
        return render_chat([(m.role, m.text()) for m in self.messages])


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
