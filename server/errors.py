"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Bad input of any kind (malformed JSON, schema violations, values the engine cannot run) is a 400;
a full queue is a 429 and a model still loading (or a server shutting down) a 503, both with
Retry-After, as is a session that found no slot within the queue deadline. Only a bug is a 500.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from crsm_core.engine import EngineClosed, ErrorEvent, QueueFull, RequestError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
# pydantic's error types for a body that is not an object (or was not parsed as JSON)
NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})
# codes of the errors Starlette raises itself
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_ready(message: str, code: str, retry_after_s: int) -> APIError:
    return APIError(503, message, "service_unavailable", code=code, headers={"Retry-After": str(retry_after_s)})


def from_engine(error: RequestError | QueueFull | EngineClosed, param_names: dict[str, str] | None = None) -> APIError:
    """Map the engine's refusals to HTTP; param_names renames the engine's field names for an API."""
    if isinstance(error, QueueFull):
        return APIError(429, str(error), "rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, EngineClosed):
        return not_ready(str(error), "shutting_down", 1)
    param = (param_names or {}).get(error.param, error.param)
    return APIError(400, str(error), INVALID_REQUEST, param=param, code="invalid_value")


def from_session_error(event: ErrorEvent) -> APIError:
    """A session's final ErrorEvent: shutting down, or not started within the queue deadline, is a 503
    (the latter with Retry-After: later may work); anything else failed on the server, a 500."""
    if event.code == "queue_timeout":
        return APIError(503, event.message, "service_unavailable", code=event.code,
                        headers={"Retry-After": str(event.retry_after_s)})
    if event.code == "shutdown":
        return APIError(503, event.message, "service_unavailable", code=event.code)
    return APIError(500, event.message, "internal_error", code=event.code)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="json_invalid")
    if not loc and first.get("type") in NOT_AN_OBJECT:  # the body whole: not JSON (no content type) or no object
        return APIError(400, "the request body must be a JSON object, sent as 'Content-Type: application/json'",
                        code="json_invalid")
    where = ".".join(loc)
    message = f"{where}: {first['msg']}" if where else first["msg"]
    extra = len(exc.errors()) - 1
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return APIError(400, message, param=where or None, code=first.get("type"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's JSON parsing of a body that is not UTF-8 (it says only "error parsing the body")
            return APIError(400, f"the request body is not valid JSON: not UTF-8 ({exc.__cause__.reason} at byte "
                                 f"{exc.__cause__.start})", code="json_invalid").response()
        kind = "not_found_error" if exc.status_code == 404 else INVALID_REQUEST
        return APIError(exc.status_code, str(exc.detail), kind, code=HTTP_CODES.get(exc.status_code),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", "internal_error").response()
