"""Python client of the CRSM server's native API (`POST /v1/generate`), sync and async."""
from clients.client import (AsyncCRSMClient, AsyncEventStream, CRSMClient, EventStream, Timeouts)
from clients.errors import (APIConnectionError, APIStatusError, APITimeoutError, BadRequestError,
                            CRSMError, NotFoundError, ProtocolError, RateLimitError,
                            ServiceUnavailableError, StreamError)
from clients.retry import RetryPolicy
from clients.types import (DeliberationOptions, DoneEvent, ErrorEvent, GenerateRequest,
                           GenerateResult, InjectionEvent, StreamEvent, Timings, TokenEvent, Usage)

__all__ = [
    "AsyncCRSMClient", "AsyncEventStream", "CRSMClient", "EventStream", "Timeouts",
    "APIConnectionError", "APIStatusError", "APITimeoutError", "BadRequestError", "CRSMError",
    "NotFoundError", "ProtocolError", "RateLimitError", "ServiceUnavailableError", "StreamError",
    "RetryPolicy",
    "DeliberationOptions", "DoneEvent", "ErrorEvent", "GenerateRequest", "GenerateResult",
    "InjectionEvent", "StreamEvent", "Timings", "TokenEvent", "Usage",
]
