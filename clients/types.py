"""Typed requests, results and stream events of the native API (`POST /v1/generate`).

Everything the server sends is validated here, once, as it arrives; fields the server adds later are
ignored (or kept, for the open-ended `timings`), so an older client keeps working with a newer server.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from clients.errors import ProtocolError, StreamError
from clients.sse import SSEMessage


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class DeliberationOptions(_Wire):
    """The planner's knobs for one request; None leaves the server's default."""
    enabled: bool = True
    lag: int | None = None
    simulations: int | None = None
    injection_rate: float | None = None
    use_suggestions: bool | None = None


class GenerateRequest(BaseModel):
    """The body of `POST /v1/generate`. Ranges are the server's to check; the client only makes sure
    the request says what to continue (a prompt or token ids, not both)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | None = None
    token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None
    stream: bool = False
    deliberation: DeliberationOptions | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self

    def body(self) -> dict[str, Any]:
        """JSON body; unset options are left out so the server's defaults apply."""
        return self.model_dump(exclude_none=True)


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    """Seconds. None where it does not apply (no token generated). Extra fields are kept."""
    model_config = ConfigDict(frozen=True, extra="allow")

    queue_s: float | None = None
    ttft_s: float | None = None
    mean_itl_s: float | None = None
    tokens_per_s: float | None = None
    total_s: float | None = None


class TokenEvent(_Wire):
    text: str
    token_id: int
    position: int


class InjectionEvent(_Wire):
    position: int                 # generator position when the entry was taken
    target_position: int          # the position the planner aimed at
    outcome: str                  # applied | applied_late | pruned | vetoed | rejected
    alpha: list[float]            # per-layer gate actually used (zeros when not applied)
    lateness: int
    reason: str | None = None     # why, for the outcomes that are not "applied"


class DoneEvent(_Wire):
    finish_reason: str
    usage: Usage
    timings: Timings
    deliberation: dict[str, Any] | None = None


class ErrorEvent(_Wire):
    """Sent as {"error": {message, type, param, code}} (OpenAI's error body) or flat."""
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return data["error"]
        return data


StreamEvent = Union[TokenEvent, InjectionEvent, DoneEvent, ErrorEvent]

_EVENT_TYPES: dict[str, type[StreamEvent]] = {
    "token": TokenEvent, "injection": InjectionEvent, "done": DoneEvent, "error": ErrorEvent,
}


def parse_event(message: SSEMessage) -> StreamEvent | None:
    """One SSE message -> its typed event; None for an event type this client does not know."""
    event_type = _EVENT_TYPES.get(message.event)
    if event_type is None:
        return None
    try:
        return event_type.model_validate(json.loads(message.data))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ProtocolError(f"malformed {message.event!r} event: {err}") from err


class GenerateResult(_Wire):
    id: str | None = None
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings
    deliberation: dict[str, Any] | None = None
    injections: list[InjectionEvent] = []

    @classmethod
    def from_events(cls, events: Iterable[StreamEvent], id: str | None = None) -> GenerateResult:
        """Assembles a stream's events into the answer the non-streaming call would give.
        Raises `StreamError` for an `error` event and `ProtocolError` when no `done` event came."""
        pieces: list[str] = []
        token_ids: list[int] = []
        injections: list[InjectionEvent] = []
        for event in events:
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
                token_ids.append(event.token_id)
            elif isinstance(event, InjectionEvent):
                injections.append(event)
            elif isinstance(event, ErrorEvent):
                raise StreamError(event.message, type=event.type, code=event.code)
            else:
                return cls(id=id, text="".join(pieces), token_ids=token_ids,
                           finish_reason=event.finish_reason, usage=event.usage,
                           timings=event.timings, deliberation=event.deliberation,
                           injections=injections)
        raise ProtocolError("event stream ended without a 'done' event")


def parse_result(payload: Any) -> GenerateResult:
    """The JSON answer of a non-streaming `POST /v1/generate`."""
    try:
        return GenerateResult.model_validate(payload)
    except ValidationError as err:
        raise ProtocolError(f"malformed generate response: {err}") from err
