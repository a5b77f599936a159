"""OpenAI-format error responses, and the one place where an exception becomes one.

Handlers raise: an ApiError (a refusal with its status and code), or any error of the
cascade tree (policies/errors.py), which `as_api_error` maps by class. `render` turns
whatever was raised into the response a client reads; `install` registers it as the app's
exception handlers, and the chat route's fast path (proxy/http/app.py) calls the same
`render`, so every route answers errors alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from policies.errors import CascadeError, InvalidInput, LedgerError
from proxy.engine.cascade import OverrideError
from proxy.engine.reload import ReloadError
from proxy.ledger.reports import ReportError

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


INTERNAL_ERROR = ApiError(500, "internal error in the proxy", code="internal_error")
# (class, status, code) for the errors of the tree a handler may let through; the first
# class an error is an instance of decides (the most specific first)
_BY_CLASS: tuple[tuple[type[CascadeError], int, str], ...] = (
    (OverrideError, 400, "invalid_cascade_override"),
    (ReloadError, 400, "reload_failed"),
    (ReportError, 400, "invalid_report_option"),
    (InvalidInput, 400, "invalid_request"),
    (LedgerError, 503, "ledger_unavailable"),
)


def as_api_error(exc: BaseException) -> ApiError:
    """What the client is told about `exc`: an ApiError as raised; an error of the cascade
    tree by its class; a framework's HTTP or validation error as such; anything else is a
    bug of the proxy, told as a 500 (and logged with its traceback)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CascadeError):
        for cls, status, code in _BY_CLASS:
            if isinstance(exc, cls):
                return ApiError(status, str(exc), param=getattr(exc, "param", None), code=code)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), code=code)
    if isinstance(exc, RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        return ApiError(400, where, code="invalid_request")
    logging.getLogger("cascade").error("internal error in the proxy", exc_info=exc)
    return INTERNAL_ERROR


def render(request: Request, exc: BaseException, secrets: Iterable[str] = ()) -> Response:
    """`exc` as an OpenAI error response, under the request's id once it has one, with every
    secret an upstream may have echoed into it masked."""
    error = as_api_error(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        headers["x-request-id"] = request_id
    return error.response(headers or None, secrets)


def install(app: FastAPI, secrets: Iterable[str]) -> None:
    """`render` as the app's handler of every exception."""
    hidden = frozenset(secrets)

    async def handler(request: Request, exc: Exception) -> Response:
        return render(request, exc, hidden)

    for cls in (CascadeError, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(cls, handler)
