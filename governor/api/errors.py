"""Every error is `{"error": "<one sentence>"}` with a 4xx, never a 5xx for bad input.

The one place a kind of refusal (governor/jobs/errors.py) becomes an HTTP status: the
REST API answers with it, and the audit log's "<what>-refused" events record it as
`status`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from governor.jobs.errors import (
    Conflict,
    NoSuchJob,
    NotPermitted,
    NotRecorded,
    OverQuota,
    RegistrationError,
    Unacceptable,
)

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


#: the HTTP status of each kind of refusal; a kind not listed takes its nearest listed base
STATUS: dict[type[RegistrationError], int] = {
    RegistrationError: 422,
    NoSuchJob: 404,
    NotPermitted: 403,
    Conflict: 409,
    Unacceptable: 422,
    OverQuota: 429,
    NotRecorded: 507,
}


def status_of(refusal: RegistrationError | type[RegistrationError]) -> int:
    """The HTTP status of a refusal, or of a kind of refusal."""
    kind = refusal if isinstance(refusal, type) else type(refusal)
    return next(STATUS[k] for k in kind.__mro__ if k in STATUS)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    where = ".".join(loc)
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(RegistrationError)
    async def _refused(_: Request, exc: RegistrationError) -> JSONResponse:
        return error_response(status_of(exc), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "There is no such path."
        elif exc.status_code == 405:
            message = "That method is not allowed on this path."
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering a request")
        return error_response(500, f"The governor failed to answer: {type(exc).__name__}.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "The request body is not valid JSON.")
        first = _describe(errors[0]) if errors else "the request is invalid"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, f"Invalid request: {first}{more}.")
