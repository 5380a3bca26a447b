"""`POST /v1/generate`, the native API.

Without `stream`: one JSON answer (GenerateResponse). With `stream`: Server-Sent Events
  event: token      data: {"text", "token_id", "position"}   one per generated token, in order
  event: injection  data: {"position", "target_position", "outcome", "alpha", "lateness", "action",
                           "action_text", "reason", ...}
  event: done       data: {"finish_reason", "usage", "timings", "deliberation"}   last
  event: error      data: {"error": {"message", "type", "param", "code"}}         last, instead of done
Concatenating the token texts gives the answer's text; `done.usage.completion_tokens` equals the number
of token events.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncGenerator

from fastapi import APIRouter, Request

from crsm_core.engine import Completion, DoneEvent, ErrorEvent, GenerationFailed, SessionStream, TokenEvent
from crsm_core.injection import InjectionEvent
from crsm_core.tokenizer import Tokenizer

from .errors import APIError, from_session_error
from .runtime import runtime_of
from .schemas import GenerateRequest, GenerateResponse, Timings, Usage
from .streaming import SSEResponse, json_string, sse, unless_disconnected

router = APIRouter()


def usage_of(done: DoneEvent) -> Usage:
    u = done.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def done_payload(done: DoneEvent) -> dict:
    return {"finish_reason": done.finish_reason, "usage": usage_of(done).model_dump(),
            "timings": dataclasses.asdict(done.timings), "deliberation": done.deliberation}


def injection_payload(event: InjectionEvent, tokenizer: Tokenizer) -> dict:
    """The event's fields, and the planned token's text (`action_text`), for people reading the stream."""
    return {**event.to_dict(), "action_text": tokenizer.decode([event.action])}


def error_payload(event: ErrorEvent) -> dict:
    return from_session_error(event).body()


def failure(error: GenerationFailed) -> APIError:
    return from_session_error(error.event)


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request):
    runtime = runtime_of(request)
    _, tokenizer = runtime.require_engine()
    ids = body.token_ids if body.token_ids is not None else (await runtime.encode([body.prompt]))[0]
    gen = body.to_generation_request(ids, runtime.defaults)
    param_names = {"prompt": "token_ids"} if body.token_ids is not None else {"token_ids": "prompt"}
    [session] = await runtime.submit([gen], param_names)
    if body.stream:
        return SSEResponse(_events(session, tokenizer))
    try:
        completion: Completion = await unless_disconnected(request, session.collect(), [session])
    except GenerationFailed as e:
        raise failure(e) from e
    return GenerateResponse(
        id=f"gen-{session.id}", model=runtime.model_name, text=completion.text, token_ids=completion.token_ids,
        finish_reason=completion.done.finish_reason, usage=usage_of(completion.done),
        timings=Timings(**dataclasses.asdict(completion.done.timings)),
        injections=[injection_payload(e, tokenizer) for e in completion.injections],
        deliberation=completion.done.deliberation)


def token_message(event: TokenEvent) -> str:
    """sse({"text", "token_id", "position"}, "token") written directly: it is sent once per token."""
    return (f'event: token\ndata: {{"text":{json_string(event.text)},"token_id":{event.token_id:d},'
            f'"position":{event.position:d}}}\n\n')


def _message(event: object, tokenizer: Tokenizer) -> str:
    if isinstance(event, TokenEvent):
        return token_message(event)
    if isinstance(event, DoneEvent):
        return sse(done_payload(event), "done")
    if isinstance(event, ErrorEvent):
        return sse(error_payload(event), "error")
    return sse(injection_payload(event, tokenizer), "injection")


async def _events(session: SessionStream, tokenizer: Tokenizer) -> AsyncGenerator[str, None]:
    """The session's events as SSE messages; those that arrived together are written together."""
    try:
        async for batch in session.batches():
            yield "".join(_message(event, tokenizer) for event in batch)
    finally:
        session.cancel()  # the client left (or the stream ended: then a no-op)
