"""OpenAI-format error responses: what every client library knows how to read."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.responses import Response

from policies.errors import CascadeError

REDACTED = "[redacted]"

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
}


class ApiError(CascadeError):
    """Raised inside a handler; rendered as an OpenAI error object with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.extra = extra or {}

    def body(self) -> dict:
        error = {
            "message": self.message,
            "type": TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
            **self.extra,
        }
        return {"error": error}

    def to_json(self, redact: Iterable[str] = ()) -> str:
        """The body as JSON text, every string of `redact` (secrets an upstream may have
        echoed into its error message) masked."""
        text = json.dumps(self.body())
        for secret in redact:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def response(
        self, headers: dict[str, str] | None = None, redact: Iterable[str] = ()
    ) -> Response:
        return Response(
            self.to_json(redact),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


# The error object as an OpenAPI schema, for the documented error responses.
ERROR_SCHEMA: dict = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries: each status answers an OpenAI error object."""
    content = {"application/json": {"schema": ERROR_SCHEMA}}
    return {s: {"description": TYPES.get(s, "error"), "content": content} for s in statuses}
