"""/openapi.json as the server answers: the OpenAI error body on the statuses each route sends (never
FastAPI's 422), /metrics as text/plain, the generation endpoints' Server-Sent Events, and this
deployment's limits (max_tokens, prompt token ids, the vocabulary, the verifiers and the simulations a
plan may have), so that a request the schema allows is one the server accepts.

What the validators check across fields is in the request models themselves (server/schemas.py,
`_cross_field`); the limits known only once the model is loaded (the vocabulary, the verifiers, the
planner's memory) are filled in then, and the schema is kept from that moment on.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from crsm_core.engine import PlannerLimits

from .runtime import Runtime
from .schemas import MAX_STOPS, spelled_out


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {
    400: "bad input: malformed JSON, a schema violation, a value the engine cannot run (code invalid_value), "
         "a field not implemented (code unsupported_parameter); `param` names the field",
    401: "no API key or a wrong one (when the server has one)",
    404: "an unknown model (code model_not_found)",
    413: "a request body over the server's limit",
    429: "the waiting queue is full (code queue_full); Retry-After says when to try again",
    500: "a failure inside generation (code internal_error)",
    503: "the model is loading or failed to load, or the server is shutting down; Retry-After",
}
GENERATION = (400, 401, 413, 429, 500, 503)
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "/v1/completions": GENERATION + (404,),
    "/v1/chat/completions": GENERATION + (404,),
    "/v1/generate": GENERATION,
    "/tokenize": (400, 401, 404, 413, 503),
    "/detokenize": (400, 401, 404, 413, 503),
    "/v1/models": (401,),
    "/v1/models/{model_id}": (401, 404),
    "/v1/status": (401,),
    "/ready": (503,),
}
SSE = {
    "/v1/generate": "with stream: true, Server-Sent Events: `event: token` data {text, token_id, position} per "
                    "token; `event: injection` data {position, target_position, outcome, alpha, ...} per "
                    "resolved plan; then `event: done` data {finish_reason, usage, timings, deliberation} or "
                    "`event: error` data {error: {message, type, param, code}}",
    "/v1/completions": "with stream: true, Server-Sent Events: `data:` CompletionResponse chunks (one per released "
                       "text, with its tokens' logprobs), `data: {error}` on a failure, then `data: [DONE]`",
    "/v1/chat/completions": "with stream: true, Server-Sent Events: `data:` chat.completion.chunk objects (the first "
                            "with the role, then one per released text), `data: {error}` on a failure, then "
                            "`data: [DONE]`",
}


def _sse_event(path: str) -> dict:
    """One Server-Sent Event: its name (the native stream's) and its data, JSON (OpenAI's: or [DONE])."""
    data = {"type": "string", "contentMediaType": "application/json"}
    if path == "/v1/generate":
        return {"type": "object", "description": SSE[path], "required": ["event", "data"],
                "properties": {"event": {"enum": ["token", "injection", "done", "error"]}, "data": data}}
    return {"type": "object", "description": SSE[path], "required": ["data"], "properties": {"data": data}}


def install(app: FastAPI, runtime: Runtime) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _responses(schema)
        _limits(schema, runtime)
        for component in schema["components"]["schemas"].values():
            if "allOf" in component:
                spelled_out(component)
        if runtime.engine is not None:   # the vocabulary and the planner's limits are in: it is final
            app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _responses(schema: dict) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components.update(ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs"))
    components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in ROUTE_ERRORS.get(path, ()):
                responses[str(status)] = {"description": ERRORS[status], "content": error}
            if path in SSE:
                ok = responses["200"]
                ok["description"] = f"JSON; {SSE[path]}"
                ok["content"]["text/event-stream"] = {"schema": _sse_event(path)}
    schema["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}


def _integers(minimum: int, maximum: int | None = None) -> dict:
    return {"type": "integer", "minimum": minimum, **({} if maximum is None else {"maximum": maximum})}


def _below(limit: int) -> str:
    """A regular expression of the decimal integers in [0, limit) (leading zeros allowed)."""
    top = str(limit - 1)
    alternatives = [f"[0-9]{{1,{len(top) - 1}}}"] if len(top) > 1 else []
    for i, digit in enumerate(top):
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            rest = len(top) - i - 1
            alternatives.append(f"{top[:i]}[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(top)
    return f"^0*(?:{'|'.join(alternatives)})$"


def _limits(schema: dict, runtime: Runtime) -> None:
    """This deployment's limits in the request schemas."""
    components = schema["components"]["schemas"]
    engine_config = runtime.settings.engine
    engine = runtime.engine
    vocab = engine.vocab_size if engine is not None else None
    token = _integers(0, None if vocab is None else vocab - 1)
    tokens = {"type": "array", "items": token, "minItems": 1, "maxItems": engine_config.max_prompt_tokens}
    text = {"type": "string", "minLength": 1}
    max_tokens = {"anyOf": [_integers(1, engine_config.max_new_tokens), {"type": "null"}]}
    stop = {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOPS}, {"type": "null"}]}
    seed = {"anyOf": [_integers(-2**63, 2**64 - 1), {"type": "null"}]}
    for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        props = components[name]["properties"]
        props["max_tokens"] = {**max_tokens, "title": "Max Tokens"}
        props["stop"] = {**stop, "title": "Stop", "description": "a string or up to 8 strings, not empty"}
        props["seed"] = {**seed, "title": "Seed"}
        props["stop_token_ids"] = {"anyOf": [{**props["stop_token_ids"]["anyOf"][0], "items": token},
                                             {"type": "null"}], **_described(props["stop_token_ids"])}
        bias = props["logit_bias"]["anyOf"][0]
        if vocab is not None:
            bias["propertyNames"] = {"pattern": _below(vocab)}
    components["ChatCompletionRequest"]["properties"]["max_completion_tokens"] = {**max_tokens,
                                                                                  "title": "Max Completion Tokens"}
    generate = components["GenerateRequest"]["properties"]
    generate["prompt"] = {"anyOf": [text, {"type": "null"}], "title": "Prompt"}
    generate["token_ids"] = {"anyOf": [tokens, {"type": "null"}], "title": "Token Ids"}
    components["CompletionRequest"]["properties"]["prompt"] = {"title": "Prompt", "anyOf": [
        text, {"type": "array", "items": text, "minItems": 1}, tokens,
        {"type": "array", "items": tokens, "minItems": 1}]}
    components["DetokenizeRequest"]["properties"]["tokens"] = {"type": "array", "items": token, "title": "Tokens"}
    if engine is not None and runtime.planner_limits is not None:
        _planner_limits(components["DeliberationRequest"], runtime, runtime.planner_limits)


def _described(prop: dict) -> dict:
    return {k: prop[k] for k in ("title", "description") if k in prop}


def _planner_limits(deliberation: dict, runtime: Runtime, limits: PlannerLimits) -> None:
    """When deliberation is on (the request's `enabled`, else the server's default): a verifier this server
    knows, and at most the simulations whose plan fits in the planner's memory."""
    off = [False] if runtime.defaults.deliberation_enabled else [False, None]
    deliberation.setdefault("allOf", []).append({"anyOf": [
        {"properties": {"enabled": {"enum": off}}},
        {"properties": {"verifier": {"enum": [*limits.verifiers, None]},
                        "simulations": {"anyOf": [_integers(1, max(limits.max_simulations, 1)), {"type": "null"}]}}}]})
