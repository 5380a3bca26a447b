"""OpenAI-compatible endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/models` (and one model's
card), and vLLM's `/tokenize`, `/detokenize` and `/version`.

Every (prompt, n) pair is one engine session; all of a request's sessions are queued together (or the
request is refused with 429). With a seed and n > 1, choice j uses seed + j. Streams end with
`data: [DONE]`; with `stream_options.include_usage` the chunk before it has empty choices and the
usage. A generation that fails mid-stream sends `data: {"error": ...}` before `[DONE]`.
Chat uses the template in chat_template.py.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncGenerator, Callable

from fastapi import APIRouter, Request

from crsm_core.engine import Completion, DoneEvent, ErrorEvent, GenerationFailed, SessionStream, TokenEvent
from crsm_core.tokenizer import Tokenizer

from .chat_template import render_chat
from .errors import APIError
from .generate_api import error_payload, failure
from .runtime import SERVER_VERSION, Runtime, runtime_of
from .schemas import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatLogprobs,
                      ChatCompletionResponse, ChatDelta, ChatMessageOut, CompletionChoice, CompletionLogprobs,
                      CompletionRequest, CompletionResponse, DetokenizeRequest, TokenLogprob, TopLogprob, DetokenizeResponse, ModelCard, ModelList,
                      TokenizeRequest, TokenizeResponse, Usage, VersionResponse, _OpenAIRequest)
from .streaming import MessageTemplate, SSEResponse, merge, sse, unless_disconnected

router = APIRouter()
DONE = "data: [DONE]\n\n"
# The engine names prompt problems "prompt" or "token_ids"; OpenAI calls both "prompt".
PARAM_NAMES = {"token_ids": "prompt"}


def _card(runtime: Runtime) -> ModelCard:
    return ModelCard(id=runtime.model_name, created=runtime.created, root=str(runtime.settings.model_dir),
                     max_model_len=runtime.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return ModelList(data=[_card(runtime_of(request))])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, request: Request) -> ModelCard:
    runtime = runtime_of(request)
    runtime.check_model(model_id)
    return _card(runtime)


# ---- vLLM's tokenizer endpoints and version ---------------------------------------------------------------

@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    runtime = runtime_of(request)
    if body.model is not None:
        runtime.check_model(body.model)
    _, tokenizer = runtime.require_engine()
    ids = (await runtime.encode([body.text()]))[0]
    strs = [tokenizer.decode([t]) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=runtime.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    runtime = runtime_of(request)
    if body.model is not None:
        runtime.check_model(body.model)
    engine, tokenizer = runtime.require_engine()
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:8]}", param="tokens",
                       code="invalid_value")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=SERVER_VERSION)


async def _submit(runtime: Runtime, body: _OpenAIRequest, prompts: list[list[int]]) -> list[SessionStream]:
    defaults = runtime.defaults
    requests = [body.to_generation_request(ids, defaults, choice=j) for ids in prompts for j in range(body.n)]
    return await runtime.submit(requests, PARAM_NAMES)


def _usage(prompts: list[list[int]], completions_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completions_tokens,
                 total_tokens=prompt_tokens + completions_tokens)


async def _collect(request: Request, sessions: list[SessionStream]) -> list[Completion]:
    async def all_of() -> list[Completion]:
        return [await s.collect() for s in sessions]

    try:
        return await unless_disconnected(request, all_of(), sessions)
    except GenerationFailed as e:
        raise failure(e) from e


async def _stream(sessions: list[SessionStream], prompts: list[list[int]], include_usage: bool,
                  chunk: Callable[[int, str | None, str | None, list[TokenEvent]], str], opening: list[str],
                  usage_chunk: Callable[[Usage], str]) -> AsyncGenerator[str, None]:
    """chunk(index, text or None, finish_reason, the tokens it carries) -> SSE message; opening: messages
    sent first. A token whose text is held back (a UTF-8 character or a stop string pending) goes with
    the next chunk of its choice, so each token's logprobs are sent once."""
    completion_tokens = 0
    pending: dict[int, list[TokenEvent]] = {}
    try:
        for message in opening:
            yield message
        failed = False
        async for batch in merge(sessions):
            messages = []   # what arrived together is written together
            for index, event in batch:
                if isinstance(event, TokenEvent):
                    completion_tokens += 1
                    pending.setdefault(index, []).append(event)
                    if event.text:
                        messages.append(chunk(index, event.text, None, pending.pop(index)))
                elif isinstance(event, DoneEvent):
                    messages.append(chunk(index, None, event.finish_reason, pending.pop(index, [])))
                elif isinstance(event, ErrorEvent):
                    messages.append(sse(error_payload(event)))
                    failed = True
                    break
            if messages:
                yield "".join(messages)
            if failed:
                break
        if include_usage:
            yield usage_chunk(_usage(prompts, completion_tokens))
        yield DONE
    finally:
        for session in sessions:
            session.cancel()


def _chunk_dict(chunk: CompletionResponse | ChatCompletionChunk, include_usage: bool) -> dict:
    """As OpenAI: `usage` (null until the last chunk) only when asked for; deltas carry only what is set."""
    data = chunk.model_dump()
    if not include_usage:
        data.pop("usage")
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


# ---- logprobs -----------------------------------------------------------------------------------------
# The engine computes them in the batched step from the model's raw distribution (before temperature
# and the sampler's adjustments); a token's text here is the token decoded alone.

def _completion_logprobs(tokens: list[TokenEvent], tokenizer: Tokenizer, offset: int) -> CompletionLogprobs:
    """offset: where the first token's text starts in the choice's text (after the echo, or the text
    streamed before)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t in tokens:
        out.tokens.append(tokenizer.decode([t.token_id]))
        out.token_logprobs.append(t.logprob)
        top: dict[str, float] = {}
        for text, value in [*((tokenizer.decode([i]), v) for i, v in t.top_logprobs), (out.tokens[-1], t.logprob)]:
            top[text] = max(value, top.get(text, value))   # tokens of one text: the best one's
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = tokenizer.decode([token_id])
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def _chat_logprobs(tokens: list[TokenEvent], tokenizer: Tokenizer) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprob(**_top(tokenizer, t.token_id, t.logprob).model_dump(),
                     top_logprobs=[_top(tokenizer, i, v) for i, v in t.top_logprobs]) for t in tokens])


# ---- /v1/completions ----------------------------------------------------------------------------------

@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request):
    runtime = runtime_of(request)
    runtime.check_model(body.model)
    _, tokenizer = runtime.require_engine()
    raw = body.prompt
    if isinstance(raw, str):
        prompts = await runtime.encode([raw])
    elif all(isinstance(p, str) for p in raw):
        prompts = await runtime.encode(raw)
    elif all(isinstance(p, int) for p in raw):
        prompts = [list(raw)]
    else:
        prompts = [list(p) for p in raw]
    echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts]
    sessions = await _submit(runtime, body, prompts)
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), runtime.model_name

    wants_logprobs = body.logprobs is not None
    if body.stream:
        offsets = [len(echoes[i // body.n]) for i in range(len(sessions))]   # of each choice's next text

        def render(index: int, text: str | None, finish: str | None, tokens: list[TokenEvent] = ()) -> str:
            logprobs = _completion_logprobs(tokens, tokenizer, offsets[index]) if wants_logprobs else None
            choice = CompletionChoice(index=index, text=text or "", logprobs=logprobs, finish_reason=finish)
            return sse(_chunk_dict(CompletionResponse(id=cid, created=created, model=model, choices=[choice]),
                                   body.include_usage))

        # a token's chunk, from a template; with logprobs each chunk is rendered whole
        token_chunk = None if wants_logprobs else MessageTemplate(lambda index, text: render(index, text, None))

        def chunk(index: int, text: str | None, finish: str | None, tokens: list[TokenEvent] = ()) -> str:
            message = (token_chunk(index, text) if token_chunk is not None and text is not None and finish is None
                       else render(index, text, finish, tokens))
            offsets[index] += len(text or "")
            return message

        def usage_chunk(usage: Usage) -> str:
            return sse(CompletionResponse(id=cid, created=created, model=model, choices=[], usage=usage).model_dump())

        opening = [sse(_chunk_dict(CompletionResponse(id=cid, created=created, model=model, choices=[
            CompletionChoice(index=i, text=echoes[i // body.n], finish_reason=None)]), body.include_usage))
            for i in range(len(sessions)) if echoes[i // body.n]]
        return SSEResponse(_stream(sessions, prompts, body.include_usage, chunk, opening, usage_chunk))

    done = await _collect(request, sessions)
    choices = [CompletionChoice(index=i, text=echoes[i // body.n] + c.text, finish_reason=c.done.finish_reason,
                                logprobs=_completion_logprobs(c.token_events, tokenizer, len(echoes[i // body.n]))
                                if wants_logprobs else None,
                                deliberation=c.done.deliberation) for i, c in enumerate(done)]
    return CompletionResponse(id=cid, created=created, model=model, choices=choices,
                              usage=_usage(prompts, sum(c.done.usage.completion_tokens for c in done)))


# ---- /v1/chat/completions -----------------------------------------------------------------------------

@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    runtime = runtime_of(request)
    runtime.check_model(body.model)
    _, tokenizer = runtime.require_engine()
    prompts = await runtime.encode([render_chat([(m.role, m.text()) for m in body.messages])])
    sessions = await _submit(runtime, body, prompts)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), runtime.model_name
    wants_logprobs = body.logprob_alternatives() is not None

    if body.stream:
        def message(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
            return sse(_chunk_dict(c, body.include_usage))

        def render(index: int, text: str | None, finish: str | None, tokens: list[TokenEvent] = ()) -> str:
            logprobs = _chat_logprobs(tokens, tokenizer) if wants_logprobs else None
            return message([ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=logprobs,
                                            finish_reason=finish)])

        token_chunk = None if wants_logprobs else MessageTemplate(lambda index, text: render(index, text, None))

        def chunk(index: int, text: str | None, finish: str | None, tokens: list[TokenEvent] = ()) -> str:
            if token_chunk is not None and text is not None and finish is None:
                return token_chunk(index, text)
            return render(index, text, finish, tokens)

        opening = [message([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                   for i in range(len(sessions))]
        return SSEResponse(_stream(sessions, prompts, body.include_usage, chunk, opening,
                                    lambda usage: message([], usage)))

    done = await _collect(request, sessions)
    choices = [ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.done.finish_reason,
                          logprobs=_chat_logprobs(c.token_events, tokenizer) if wants_logprobs else None,
                          deliberation=c.done.deliberation) for i, c in enumerate(done)]
    return ChatCompletionResponse(id=cid, created=created, model=model, choices=choices,
                                  usage=_usage(prompts, sum(c.done.usage.completion_tokens for c in done)))
