"""What can go wrong when talking to the server, as exception types a caller can tell apart."""
from __future__ import annotations

import json


class CRSMError(Exception):
    """Base of every error the client raises."""


class APIConnectionError(CRSMError):
    """The server could not be reached, or the connection broke before the answer was complete."""


class APITimeoutError(APIConnectionError):
    """Connecting took longer than the connect timeout, or the server sent nothing for longer than
    the read timeout (between two chunks of a stream, too)."""


class ProtocolError(CRSMError):
    """The server's answer does not follow the API (malformed JSON or SSE, a stream with no end)."""


class StreamError(CRSMError):
    """The server ended a stream with an `error` event."""

    def __init__(self, message: str, *, type: str, code: str | int | None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code


class APIStatusError(CRSMError):
    """The server answered with a non-2xx status and (usually) an OpenAI-style error body."""

    def __init__(self, status_code: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after   # seconds the server asked us to wait, if it said


class BadRequestError(APIStatusError):
    """400 or 422: the request is invalid; retrying it unchanged will not help."""


class NotFoundError(APIStatusError):
    """404."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full."""


class ServiceUnavailableError(APIStatusError):
    """503: the server is loading or shutting down."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 422: BadRequestError, 404: NotFoundError,
    429: RateLimitError, 503: ServiceUnavailableError,
}


def status_error(status_code: int, body: bytes, retry_after: float | None) -> APIStatusError:
    """Builds the exception for a non-2xx answer from its body ({"error": {message, type, param,
    code}}); a body of another shape becomes the message as it is."""
    error_type = _BY_STATUS.get(status_code, APIStatusError)
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error_type(status_code, error["message"], type=error.get("type"),
                          param=error.get("param"), code=error.get("code"),
                          retry_after=retry_after)
    return error_type(status_code, text[:2000] or f"status {status_code}", retry_after=retry_after)
