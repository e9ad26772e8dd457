"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with their HTTP status.

The engine's error codes (docs/protocol.md) map onto statuses here, once, for every endpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from pagedkv.runtime.serving.client import ServerError

INVALID = "invalid_request_error"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter" if param else None)


def engine_unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable_error", code="engine_unavailable")


# The engine's `error` codes -> (HTTP status, OpenAI error type, code).
_ENGINE_CODES = {
    "bad_request": (400, INVALID, None),
    "too_long": (413, INVALID, "context_length_exceeded"),
    "overloaded": (429, "rate_limit_error", "overloaded"),
    "aborted": (503, "service_unavailable_error", "aborted"),  # the engine is shutting down
    "internal": (500, "server_error", "internal_error"),
    # not the engine's: the router's, for requests in flight on an engine it took out of service
    "unavailable": (503, "service_unavailable_error", "engine_unavailable"),
}


def from_engine(error: ServerError) -> ApiError:
    status, kind, code = _ENGINE_CODES.get(error.code, (500, "server_error", error.code))
    if error.param is not None and code is None:
        code = "invalid_parameter"
    return ApiError(status, error.message, kind, param=error.param, code=code)

