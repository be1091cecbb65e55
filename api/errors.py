"""Every error leaves the API as JSON: {"error": {"code", "message", "details"}} with a stable code."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from app.errors import ErrorCode, InvalidInput, http_status, summarise

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer with `code`'s HTTP status from the error table (app.errors)."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = http_status(code)
        self.code = code.value
        self.message = message
        self.details = details or {}
        self.headers = headers


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    content = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(status_code=status, content=content, headers=headers)


def _field_name(location: tuple[Any, ...]) -> str:
    # ("body", "inputs", "width") → "inputs.width"; the leading "body"/"query"/"path" says where, not what.
    parts = [str(part) for part in location[1:]] if len(location) > 1 else [str(part) for part in location]
    return ".".join(parts) or "body"


def _field_error(error: dict[str, Any]) -> dict[str, str]:
    return {"field": _field_name(tuple(error["loc"])), "message": error["msg"]}


# An answer lists this many offending fields and counts the rest: a body with a million unknown fields once
# got an answer of 104 MB. Names and messages are cut to a length a client can still read: a name is the
# client's own key, and may be megabytes long.
MAX_LISTED_FIELDS = 50
_MAX_TEXT = 200


def _bounded(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def validation_error(fields: Sequence[dict[str, str]]) -> ApiError:
    """A 400 naming the first MAX_LISTED_FIELDS offending fields in `details.fields` and counting the rest in
    `details.moreFields`; its message names the first few."""
    return _validation_error(fields[:MAX_LISTED_FIELDS], len(fields))


def request_validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """`validation_error` of FastAPI's and pydantic's errors, of which only the listed ones are formatted."""
    return _validation_error([_field_error(error) for error in errors[:MAX_LISTED_FIELDS]], len(errors))


def _validation_error(listed: Sequence[dict[str, str]], total: int) -> ApiError:
    fields = [{"field": _bounded(item["field"]), "message": _bounded(item["message"])} for item in listed]
    details: dict[str, Any] = {"fields": fields}
    if total > len(fields):
        details["moreFields"] = total - len(fields)
    summary = summarise([(item["field"], item["message"]) for item in fields], total)
    return ApiError(ErrorCode.VALIDATION_ERROR, f"invalid request: {summary}", details)


def invalid_input(error: InvalidInput) -> ApiError:
    return validation_error([{"field": issue.field, "message": issue.message} for issue in error.issues])


# Starlette's own refusals, by status, as the gateway's codes.
_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 408: ErrorCode.REQUEST_TIMEOUT,
               413: ErrorCode.REQUEST_TOO_LARGE}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at the request's path, for a 405's Allow header. Starlette's own names
    only the methods of the first route at the path: GET /jobs and POST /jobs are two routes."""
    routes = request.app.router.routes
    return ", ".join(method for method in _METHODS
                     if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes))


# SQLite's results that say "not now": busy or locked past the timeout, the file unopenable, the disk failing.
_SQLITE_UNAVAILABLE = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL"}
# PostgreSQL's SQLSTATE classes and codes that say the same: connection (08), resources (53), a lock not
# available (55P03), a statement cancelled (57014), the server shutting down (57P01-57P03).
_POSTGRES_UNAVAILABLE_CLASSES = ("08", "53")
_POSTGRES_UNAVAILABLE_CODES = {"55P03", "57014", "57P01", "57P02", "57P03"}


# What a database that cannot answer raises (database_unavailable tells which of these mean "not now").
DATABASE_ERRORS = (OperationalError, PoolTimeout)


def database_unavailable(exc: Exception) -> bool:
    """Whether a database error means the database cannot answer now (a 503 worth retrying), not a fault of the
    gateway's own (a missing table, a bad statement: SQLite raises OperationalError for those too)."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if exc.connection_invalidated:
        return True
    sqlite_name = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_name is not None:
        return "_".join(sqlite_name.split("_")[:2]) in _SQLITE_UNAVAILABLE  # SQLITE_BUSY_SNAPSHOT is SQLITE_BUSY
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        return True  # psycopg's failures without a server's answer: no connection could be made or kept
    return sqlstate.startswith(_POSTGRES_UNAVAILABLE_CLASSES) or sqlstate in _POSTGRES_UNAVAILABLE_CODES


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = request_validation_error(exc.errors())
        return error_response(error.status, error.code, error.message, error.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.VALIDATION_ERROR)
        details = {"fields": [{"field": "body", "message": str(exc.detail)}]} if exc.status_code == 413 else {}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(exc.status_code, code.value, str(exc.detail), details, headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it is one rather than a 500 because the gateway is not at fault.
        error = validation_error([{"field": "body", "message": "the client disconnected before sending all of it"}])
        return error_response(error.status, error.code, error.message, error.details)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            return await _unexpected(request, exc)  # a missing table or a bad statement is the gateway's fault
        # The driver's own words only: the statement and its parameters (prompts, keys' hashes) stay out of logs.
        cause = exc.orig if isinstance(exc, OperationalError) else exc
        reason = (str(cause).strip().splitlines() or [""])[0][:200]
        log.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path,
                    type(cause).__name__, reason)
        return error_response(http_status(ErrorCode.DATABASE_UNAVAILABLE), ErrorCode.DATABASE_UNAVAILABLE.value,
                              "the database did not answer in time; try again", {}, {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorCode.INTERNAL_ERROR.value, "internal error; see the gateway's log")
